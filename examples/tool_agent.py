"""An agent loop with the official ``openai`` client against ``tuneforge serve``: request, tool calls, tool
results, final answer.

    tuneforge serve --adapter tools=runs/tools          # the run of `tuneforge train examples/tools.yaml`
    python examples/tool_agent.py --request "What's the weather in Oslo, and 12 times 7?"

The five tools are the example's (``tuneforge.data.synthetic_tools.TOOLS``, the same as ``examples/data/tools.json``)
and run locally as fakes (:func:`tuneforge.data.synthetic_tools.run_tool`): the weather, the calendar and the
search are made up, deterministically; the calculator and the unit conversion compute. Each round sends the
conversation with the tools; calls are executed and their results sent back as ``tool`` messages, until the model
answers in text (or ``--max-rounds`` is reached).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tuneforge.data.synthetic_tools import SYSTEM_PROMPT, TOOLS, run_tool


def tool_choice_value(text: str) -> Any:
    """``auto``, ``none``, ``required``, or a tool name (that function is forced)."""
    if text in ("auto", "none", "required"):
        return text
    return {"type": "function", "function": {"name": text}}


def run_agent(client: Any, model: str, request: str, tool_choice: str = "auto", max_rounds: int = 3,
              max_tokens: int = 128, tools: list[dict[str, Any]] | None = None, out=print) -> list[dict[str, Any]]:
    """The conversation after the loop: system, user, then per round the assistant's message and the tool
    results; the last message is the assistant's final one. ``tool_choice`` applies to the first round (later
    rounds use ``auto``, so a forced call is followed by an answer). ``tools``: default the example's five."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT},
                                      {"role": "user", "content": request}]
    out(f"user: {request}")
    for round_ in range(max_rounds):
        choice = tool_choice_value(tool_choice) if round_ == 0 else "auto"
        response = client.chat.completions.create(model=model, messages=messages, tools=tools or TOOLS,
                                                  tool_choice=choice,
                                                  max_tokens=max_tokens, temperature=0.0)
        message = response.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        if not message.tool_calls:
            break
        for call in message.tool_calls:
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                arguments = None
            result = (run_tool(call.function.name, arguments) if isinstance(arguments, dict)
                      else {"error": "arguments are not a JSON object"})
            out(f"call:   {call.function.name}({call.function.arguments})")
            out(f"result: {json.dumps(result)}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    last = messages[-1]
    answered = last["role"] == "assistant" and not last.get("tool_calls")
    out(f"answer: {last.get('content') if answered else '(no text answer within --max-rounds)'}")
    return messages


def main(argv: list[str] | None = None) -> int:
    import openai

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server's /v1 URL")
    p.add_argument("--model", default="tools", help="the served adapter's name (--adapter NAME=RUN)")
    p.add_argument("--request", default="What's the weather in Oslo, and what is 12 times 7?")
    p.add_argument("--tool-choice", default="auto", help="auto, none, required, or a tool name to force")
    p.add_argument("--max-rounds", type=int, default=3, help="requests to the model at most")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--api-key", default="none", help="a key the server accepts (--api-key), if it asks for one")
    p.add_argument("--tools", help="a JSON file of tool definitions to send instead of the example's (calls run "
                                   "locally only for the example's tool names)")
    args = p.parse_args(argv)
    if args.max_rounds < 1:
        p.error("--max-rounds must be at least 1")
    tools = None
    if args.tools:
        try:
            tools = json.loads(open(args.tools, encoding="utf-8").read())
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: --tools {args.tools}: cannot read a JSON list of tools ({e})", file=sys.stderr)
            return 2
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=300)
    try:
        run_agent(client, args.model, args.request, args.tool_choice, args.max_rounds, args.max_tokens, tools)
    except openai.APIConnectionError:
        print(f"error: no server at {args.base_url}; start one with `tuneforge serve --adapter "
              f"{args.model}=RUN` (or pass --base-url)", file=sys.stderr)
        return 2
    except openai.APIStatusError as e:
        print(f"error: the server answered {e.status_code}: {e.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

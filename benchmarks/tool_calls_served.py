"""A tuned tool-use run behind ``tuneforge serve``: its calls free (``tool_choice: auto``) against guided
(``tool_choice: required``: the call's JSON constrained to the tools' schemas by llguidance), on the same requests.

For each test record whose reference is a call (the shipped example's ``tools_test.jsonl`` by default), the
official ``openai`` client sends the record's messages and tools, greedy, ``--concurrency`` at a time; the answer's
``tool_calls`` are scored as ``tuneforge eval`` scores them (:mod:`tuneforge.evaluation.tool_calls`: tool name,
exact arguments, arguments valid against the tool's schema) and the answers whose ``<tool_call>`` text did not parse
(returned as content) are counted. Issue 26's targets: schema validity 100% guided, guided tokens/s >= 0.9x free.

    python benchmarks/tool_calls_served.py runs/tools
    python benchmarks/tool_calls_served.py runs/tools --data examples/data/tools_handwritten.jsonl

Tokens/s counts the completion tokens the server reports over the wall time of each pass (one warm-up pass of
8 requests first, unmeasured). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "src" / "tuneforge" / "recipes" / "data"


async def _pass(url: str, records: list[dict], tools: list[dict], choice: str, args: argparse.Namespace) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=3600)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(records)):
        queue.put_nowait(i)
    answers: list = [None] * len(records)
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            r = await client.chat.completions.create(
                model="tools", messages=records[i]["messages"][:-1], tools=tools, tool_choice=choice,
                max_tokens=args.max_tokens, temperature=0)
            tokens += r.usage.completion_tokens
            answers[i] = r.choices[0].message

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"answers": answers, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def score(records: list[dict], answers: list, tools: list[dict]) -> dict:
    from tuneforge.evaluation.tool_calls import Call, score_calls, tool_validators

    validators = tool_validators(tools)
    rows = []
    unparsed = 0
    for record, message in zip(records, answers, strict=True):
        reference = [Call.of(c) for c in record["messages"][-1]["tool_calls"]]
        predicted = [Call.of(c.model_dump()) for c in (message.tool_calls or [])]
        unparsed += "<tool_call>" in (message.content or "")
        rows.append(score_calls(predicted, reference, validators))
    called = [r for r in rows if r.args_valid is not None]
    return {"examples": len(rows), "called": len(called),
            "tool_name": statistics.fmean(r.tool_name for r in rows),
            "args_exact": statistics.fmean(r.args_exact for r in rows),
            "args_valid": statistics.fmean(r.args_valid for r in called) if called else None,
            "unparsed": unparsed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the tuned run (or package) served as adapter `tools`")
    p.add_argument("--data", default=str(RECIPES / "tools_test.jsonl"), help="records; those ending in a call count")
    p.add_argument("--tools", default=str(RECIPES / "tools.json"))
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)

    from tuneforge.serving.commands import base_from_adapters
    from tuneforge.serving.server import ServeConfig, Server, ServerThread

    tools = json.loads(Path(args.tools).read_text())
    records = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    records = [r for r in records if r["messages"][-1].get("tool_calls")]
    adapters = {"tools": args.run}
    server = Server(ServeConfig(base=base_from_adapters(adapters), adapters=adapters, api_keys=["bench"],
                                max_output_tokens=max(1024, args.max_tokens)))
    results = {}
    with ServerThread(server.app) as thread:
        for choice in ("auto", "required"):
            asyncio.run(_pass(thread.url, records[:8], tools, choice, args))          # warm-up
        for choice in ("auto", "required"):
            out = asyncio.run(_pass(thread.url, records, tools, choice, args))
            results[choice] = {**score(records, out.pop("answers"), tools), **out}
    server.shutdown()
    print(f"# {args.run} on {args.data}: {len(records)} requests that need a call, {args.concurrency} at a time, "
          f"greedy, max_tokens {args.max_tokens}")
    print("| tool_choice | tool name | exact arguments | schema-valid arguments | unparsed | tokens/s |")
    print("|---|---|---|---|---|---|")
    for choice, label in (("auto", "auto (free)"), ("required", "required (guided)")):
        r = results[choice]
        valid = "n/a" if r["args_valid"] is None else f"{r['args_valid']:.1%} of {r['called']}"
        print(f"| {label} | {r['tool_name']:.1%} | {r['args_exact']:.1%} | {valid} | {r['unparsed']} | "
              f"{r['tokens_per_s']:.1f} |")
    ratio = results["required"]["tokens_per_s"] / results["auto"]["tokens_per_s"]
    print(f"\nguided / free tokens/s = {ratio:.2f}x (issue 26 target >= 0.9x); guided schema validity "
          f"{results['required']['args_valid']:.1%} (target 100%)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

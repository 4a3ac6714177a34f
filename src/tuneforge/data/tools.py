"""Tool calling in the data: the shapes records may use, the checks on them, and the built-in Hermes format.

**Shapes on load** (normalised to one internal shape; see :func:`normalise_tools`, :func:`normalise_calls`):

* ``tools``: a list of OpenAI function definitions, ``{"type": "function", "function": {"name", "description",
  "parameters": <JSON Schema>}}`` (the bare ``{"name", "parameters"}`` is accepted too), per record or for the
  whole data set (``data.tools``: one JSON file holding such a list; a record's own ``tools`` replace it);
* an assistant message with ``tool_calls``: ``[{"id", "type": "function", "function": {"name", "arguments"}}]``,
  ``arguments`` a JSON string or an object; internally always an object (``{"id": str | None, "type":
  "function", "function": {"name": str, "arguments": dict}}``); ``content`` may be empty;
* a ``tool`` message: ``{"role": "tool", "tool_call_id": ..., "content": ...}`` (without an id it answers the
  first unanswered call of the assistant turn before it);
* ShareGPT ``conversations`` (LLaMA-Factory's layout): ``from: function_call`` holds a JSON call (or a list of
  them, parallel calls) and becomes an assistant turn with ``tool_calls``; ``from: observation`` is a result and
  becomes a ``tool`` message (see :func:`from_sharegpt`).

**Checks** (:func:`check_conversation`; each a :class:`~tuneforge.data.formats.RecordError` whose ``check`` is
a key of :data:`TOOL_CHECKS`, the record goes to ``rejects.jsonl``). A call in the final assistant turn needs no
result: that turn teaches the model to call, which is a valid training target.

**The built-in format** (Hermes / Qwen2.5 style), used for chat templates that know no tools
(:func:`template_supports_tools` reads the Jinja source): the tools are listed in the system turn
(:data:`TOOLS_PREAMBLE`, then one JSON object a line inside ``<tools></tools>``), each call is
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` after the assistant's text, and the results of
one turn become one user turn, each wrapped in ``<tool_response>\\n...\\n</tool_response>``.
:func:`to_builtin` converts a conversation, :func:`parse_tool_calls` reads a model's output back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tuneforge.data.errors import RecordError

TOOL_CHECKS: dict[str, str] = {
    "invalid_tool_schema": "a tools entry is not a function definition with a valid JSON Schema",
    "tool_arguments_not_json": "a call's arguments are not a JSON object",
    "tool_arguments_schema": "a call's arguments fail the tool's JSON Schema",
    "unknown_tool": "a call to a tool the record's tools do not define",
    "unanswered_call": "a call with no answering tool message before the next assistant turn",
    "duplicate_call_id": "two calls of one conversation share an id",
    "orphan_tool_result": "a tool message that answers no call",
}

TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:")
TOOLS_OPEN, TOOLS_CLOSE = "<tools>", "</tools>"
TOOLS_AFTER = ("For each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call>")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

_TOOLS_WORD = re.compile(r"\btools\b")
_CALLS_WORD = re.compile(r"\btool_calls\b")
_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# --- shapes -----------------------------------------------------------------------------------------------------

def normalise_tools(tools: Any, where: str = "tools") -> list[dict[str, Any]]:
    """``tools`` as OpenAI function definitions (``{"type": "function", "function": {...}}``); raises
    :class:`RecordError` (``invalid_tool_schema``) naming the entry that is not one."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RecordError(f"{where} is a string that is not JSON ({e.msg})", "invalid_tool_schema") from None
    if not isinstance(tools, list):
        raise RecordError(f"{where} must be a list of function definitions, got {type(tools).__name__}",
                          "invalid_tool_schema")
    out, names = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError(f"{where}[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                              "\"parameters\": {...}}}}", "invalid_tool_schema")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise RecordError(f"{where}[{i}] ({fn['name']}): parameters must be a JSON Schema object",
                              "invalid_tool_schema")
        try:
            validator_for(params).check_schema(params)
        except SchemaError as e:
            raise RecordError(f"{where}[{i}] ({fn['name']}): parameters are not a valid JSON Schema: "
                              f"{e.message[:120]}", "invalid_tool_schema") from None
        if fn["name"] in names:
            raise RecordError(f"{where}[{i}]: a second tool named {fn['name']!r}", "invalid_tool_schema")
        names.add(fn["name"])
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def load_tools_file(path: str | Path, key: str = "data.tools") -> list[dict[str, Any]]:
    """The tools of one JSON file (a list of function definitions); ValueError, one line naming ``key``."""
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{key}: cannot read {path} ({e.strerror or e}); give a JSON file holding a list of tools"
                         ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{key}: {path} is not JSON ({e.msg} at line {e.lineno}); it must hold a list of tools"
                         ) from None
    try:
        return normalise_tools(tools, where=f"{key} ({path})")
    except RecordError as e:
        raise ValueError(str(e)) from None


def parse_arguments(arguments: Any, where: str) -> dict[str, Any]:
    """A call's arguments as an object (from a JSON string or an object); ``tool_arguments_not_json`` otherwise."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise RecordError(f"{where}.arguments are not JSON ({e.msg} at column {e.colno})",
                              "tool_arguments_not_json") from None
    if not isinstance(arguments, dict):
        raise RecordError(f"{where}.arguments must be a JSON object, got {type(arguments).__name__}",
                          "tool_arguments_not_json")
    return arguments


def normalise_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` in the internal shape (see the module docstring)."""
    if not isinstance(calls, list) or not calls:
        raise RecordError(f"{where}.tool_calls must be a non-empty list", "wrong_type")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError(f"{at} must be {{\"function\": {{\"name\": ..., \"arguments\": ...}}}}", "wrong_type")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise RecordError(f"{at}.id must be a string", "wrong_type")
        out.append({"id": call_id, "type": "function",
                    "function": {"name": fn["name"], "arguments": parse_arguments(fn.get("arguments", {}), at)}})
    return out


def has_tool_content(messages: Any) -> bool:
    """Whether a raw message list uses tools (a ``tool`` role or ``tool_calls``)."""
    return isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "function_call": "function_call", "observation": "observation"}


def from_sharegpt(conversations: Any, system: Any = None) -> list[dict[str, Any]]:
    """ShareGPT ``conversations`` (``[{"from", "value"}]``) as raw OpenAI-shaped messages: ``function_call`` turns
    become assistant turns with ``tool_calls``, ``observation`` turns ``tool`` messages; ``system``: the record's
    ``system`` column (LLaMA-Factory's), put first."""
    if not isinstance(conversations, list) or not conversations:
        raise RecordError("field 'conversations' must be a non-empty list of {from, value} objects", "wrong_type")
    out: list[dict[str, Any]] = []
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for i, turn in enumerate(conversations):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"{where} must be an object with 'from' and 'value'", "wrong_type")
        source, value = turn.get("from"), turn.get("value")
        role = _SHAREGPT_ROLES.get(source) if isinstance(source, str) else None
        if role is None:
            raise RecordError(f"{where}.from is {source!r}; expected one of {', '.join(_SHAREGPT_ROLES)}",
                              "unknown_role")
        if not isinstance(value, str):
            raise RecordError(f"{where}.value must be a string, got {type(value).__name__}", "wrong_type")
        if role == "function_call":
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}.value (function_call) is not JSON ({e.msg})",
                                  "tool_arguments_not_json") from None
            calls = parsed if isinstance(parsed, list) else [parsed]
            if not all(isinstance(c, dict) for c in calls):
                raise RecordError(f"{where}.value must be a JSON call {{\"name\", \"arguments\"}} or a list of them",
                                  "wrong_type")
            out.append({"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function", "function": c} for c in calls]})
        elif role == "observation":
            out.append({"role": "tool", "content": value})
        else:
            out.append({"role": role, "content": value})
    return out


# --- checks -----------------------------------------------------------------------------------------------------

def check_conversation(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
    """Raise :class:`RecordError` with a :data:`TOOL_CHECKS` name for the first tool problem of ``messages``
    (normalised); give results without an id the id of the call they answer."""
    from jsonschema import Draft202012Validator
    from jsonschema.validators import validator_for

    by_name = {t["function"]["name"]: t["function"] for t in tools or []}
    seen_ids: set[str] = set()
    pending: list[dict[str, Any]] = []        # the calls of the last assistant turn not yet answered
    pending_at = ""
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            call_id = m.get("tool_call_id")
            match = next((c for c in pending if call_id is None or c["id"] == call_id), None)
            if match is None:
                what = f"tool_call_id {call_id!r}" if call_id is not None else "no tool_call_id"
                raise RecordError(f"messages[{i}] (tool, {what}) answers no call of the assistant turn before it",
                                  "orphan_tool_result")
            pending.remove(match)
            if call_id is None and match["id"] is not None:
                m["tool_call_id"] = match["id"]
            continue
        if m["role"] == "assistant" and pending:
            names = ", ".join(c["function"]["name"] for c in pending)
            raise RecordError(f"{pending_at}: the call of {names} has no tool result before the next assistant turn",
                              "unanswered_call")
        if m["role"] != "assistant":
            pending = []        # a user turn between calls and results: the results that follow answer nothing
            continue
        calls = m.get("tool_calls") or []
        pending, pending_at = list(calls), f"messages[{i}]"
        for j, call in enumerate(calls):
            at, name = f"messages[{i}].tool_calls[{j}]", call["function"]["name"]
            if call["id"] is not None:
                if call["id"] in seen_ids:
                    raise RecordError(f"{at}: call id {call['id']!r} is used twice", "duplicate_call_id")
                seen_ids.add(call["id"])
            if name not in by_name:
                known = ", ".join(by_name) or "none (give the record `tools`, or data.tools)"
                raise RecordError(f"{at} calls {name!r}, not among the tools ({known})", "unknown_tool")
            schema = by_name[name]["parameters"]
            error = next(iter(validator_for(schema, default=Draft202012Validator)(schema)
                              .iter_errors(call["function"]["arguments"])), None)
            if error is not None:
                path = ".".join(str(p) for p in error.absolute_path) or "arguments"
                raise RecordError(f"{at} ({name}): {path}: {error.message[:120]}", "tool_arguments_schema")


# --- the built-in format ------------------------------------------------------------------------------------------

def template_supports_tools(chat_template: str | None) -> bool:
    """Whether a Jinja chat template renders tools itself (it reads both ``tools`` and ``tool_calls``)."""
    return bool(chat_template) and bool(_TOOLS_WORD.search(chat_template)) and bool(
        _CALLS_WORD.search(chat_template))


def tools_block(tools: list[dict[str, Any]]) -> str:
    """The system-turn text that lists ``tools``."""
    lines = "\n".join(_dumps(t) for t in tools)
    return f"{TOOLS_PREAMBLE}\n{TOOLS_OPEN}\n{lines}\n{TOOLS_CLOSE}\n\n{TOOLS_AFTER}"


def render_call(call: dict[str, Any]) -> str:
    fn = call["function"]
    arguments = fn["arguments"]
    if isinstance(arguments, str):      # a request's arguments as OpenAI sends them
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return f"{CALL_OPEN}\n{_dumps({'name': fn['name'], 'arguments': arguments})}\n{CALL_CLOSE}"


def assistant_text(content: str, calls: list[dict[str, Any]] | None) -> str:
    """An assistant turn's text in the built-in format: its content, then its calls, one per block."""
    parts = ([content] if content else []) + [render_call(c) for c in calls or []]
    return "\n".join(parts)


def to_builtin(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """``messages`` in the built-in format, as plain system / user / assistant turns any template renders."""
    out: list[dict[str, Any]] = []
    if tools:
        block = tools_block(tools)
        if messages and messages[0]["role"] == "system":
            out.append({**messages[0], "content": f"{messages[0]['content']}\n\n{block}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        if m["role"] == "tool":
            response = f"{RESPONSE_OPEN}\n{m['content']}\n{RESPONSE_CLOSE}"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_results": True})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            converted = {k: v for k, v in m.items() if k != "tool_calls"}
            converted["content"] = assistant_text(m["content"], m["tool_calls"])
            out.append(converted)
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_tool_results", None)
    return out


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """``(content, calls)`` of a model's output in the built-in format: every ``<tool_call>`` block that holds a
    JSON object with a string ``name`` and object ``arguments`` (or a JSON string of one) becomes a call
    ``{"name", "arguments"}``; the text outside such blocks, and any block that does not parse, is the content
    (stripped). Never raises."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    at = 0
    for match in _CALL_BLOCK.finditer(text):
        call = _parse_call(match[1])
        if call is None:
            continue
        kept.append(text[at:match.start()])
        at = match.end()
        calls.append(call)
    kept.append(text[at:])
    content = "".join(kept) if calls else text
    return content.strip(), calls


def _parse_call(body: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": obj["name"], "arguments": arguments}


def message_text(message: dict[str, Any]) -> str:
    """A message's text with its calls (for curation's quality checks and duplicate detection)."""
    return assistant_text(message["content"], message.get("tool_calls")) if message.get("tool_calls") \
        else message["content"]

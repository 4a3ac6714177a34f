"""Tools in chat completions: checking ``tools`` / ``tool_choice``, the grammar that forces a call, and reading the
model's output back into OpenAI's ``tool_calls`` and ``reasoning_content``.

The model writes calls in the format its chat template taught it (:mod:`tuneforge.data.tool_formats`: Hermes'
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, the built-in rendering's, or Mistral's,
Llama 3's, Granite's where the template renders tools itself), after an optional leading ``<think>...</think>``
block. :class:`OutputSplitter` splits the text as it streams: reasoning deltas while inside the ``<think>``
block, content deltas until a call could begin (text that may be the start of the format's marker is held
back), and at the end the held text parsed into calls; a block that does not parse is returned as content,
never an error.

``tool_choice``: ``auto`` (the model decides; its calls are parsed), ``none`` (the tools are not shown and nothing
is parsed), ``required`` (a call to one of the tools is forced by the grammar: :func:`tool_call_grammar`), or
``{"type": "function", "function": {"name": X}}`` (a call to X, forced). ``parallel_tool_calls: false`` keeps one
call (and the forced grammar allows one).
"""

from __future__ import annotations

import json
from typing import Any

from tuneforge.data.errors import RecordError
from tuneforge.data.tool_formats import HERMES, ToolCallFormat, held_prefix
from tuneforge.data.tools import normalise_tools
from tuneforge.data.turn_spans import THINK_CLOSE, THINK_OPEN
from tuneforge.serving.protocol import APIError


def request_tools(tools: list[Any] | None, tool_choice: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    """``(tools, forced)``: the request's tools as function definitions (None: none, or ``tool_choice: none``) and
    the name of the function a named ``tool_choice`` forces (``"*"``: ``required``, any tool). APIError 400 naming
    ``tools`` or ``tool_choice`` for a definition that is not one, an unknown function, or ``required`` without
    tools."""
    choice = tool_choice if tool_choice is not None else "auto"
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        raise APIError(400, f"tool_choice: {choice!r} is not auto, none, required or {{\"type\": \"function\", "
                       "\"function\": {\"name\": ...}}", param="tool_choice")
    if not tools:
        if choice == "required" or isinstance(choice, dict):
            raise APIError(400, "tool_choice: a call is required but the request has no tools", param="tool_choice")
        return None, None
    try:
        defined = normalise_tools(tools, where="tools")
    except RecordError as e:
        raise APIError(400, str(e), param="tools", code="invalid_tools") from None
    if choice == "none":
        return None, None
    if choice == "required":
        return defined, "*"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        names = [t["function"]["name"] for t in defined]
        if name not in names:
            raise APIError(400, f"tool_choice: function {name!r} is not among the tools ({', '.join(names)})",
                           param="tool_choice.function.name")
        return defined, str(name)
    return defined, None


def tool_call_grammar(tools: list[dict[str, Any]], forced: str, parallel: bool, fmt: ToolCallFormat = HERMES,
                      special: dict[str, int] | None = None) -> str:
    """A Lark grammar (llguidance's, JSON Schemas inside ``%json``) of the answer that calls the ``forced`` tool
    (``"*"``: any of ``tools``; more calls with ``parallel``) in ``fmt``, its arguments valid against the tool's
    parameters. ``special``: marker text -> token id for markers the vocabulary holds as special tokens
    (:func:`~tuneforge.data.tool_formats.special_marker_ids`): matched as that token, ``<[id]>``."""
    from tuneforge.serving.guided import JSON_OPTIONS

    chosen = [t for t in tools if forced in ("*", t["function"]["name"])]
    key = fmt.arguments_key
    bodies = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                key: t["function"]["parameters"]},
               "required": ["name", key], "additionalProperties": False} for t in chosen]
    schema = {**(bodies[0] if len(bodies) == 1 else {"anyOf": bodies}), "x-guidance": JSON_OPTIONS}

    def lit(text: str) -> str:
        return f"<[{special[text]}]>" if special and text in special else json.dumps(text)
    return fmt.forced(parallel, lit) + f"body: %json {json.dumps(schema)}\n"


def openai_calls(calls: list[dict[str, Any]], parallel: bool = True, fmt: ToolCallFormat = HERMES
                 ) -> list[dict[str, Any]]:
    """Parsed calls (``{"name", "arguments"}``) in OpenAI's shape, each with a fresh id (``fmt``'s kind: Mistral's
    templates take only 9 letters and digits); one without ``parallel``."""
    return [{"id": fmt.new_call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in (calls if parallel else calls[:1])]


class OutputSplitter:
    """A chat answer as it streams, split into ``reasoning_content`` and ``content`` deltas and, at the end, tool
    calls (``tools``: parse calls in ``fmt``, from where one begins). :meth:`feed` takes the next piece of text and
    returns the deltas that can be sent; :meth:`finish` the rest and the calls."""

    def __init__(self, tools: bool, fmt: ToolCallFormat = HERMES) -> None:
        self.tools = tools
        self.fmt = fmt
        self.phase = "start"          # start -> reasoning -> content (-> calls: everything held for parsing)
        self.pending = ""             # text not sent yet
        self.fresh = True             # no content sent yet (Llama's calls are an answer that opens with "{")

    def feed(self, text: str) -> list[dict[str, str]]:
        self.pending += text
        out: list[dict[str, str]] = []
        while True:
            if self.phase == "start":
                head = self.pending.lstrip()
                if head.startswith(THINK_OPEN):
                    self.pending, self.phase = head[len(THINK_OPEN):], "reasoning"
                    continue
                if THINK_OPEN.startswith(head):         # "", "<", "<th", ...: not known yet
                    return out
                self.phase = "content"
                continue
            if self.phase == "reasoning":
                end = self.pending.find(THINK_CLOSE)
                if end >= 0:
                    if end:
                        out.append({"reasoning_content": self.pending[:end]})
                    self.pending, self.phase = self.pending[end + len(THINK_CLOSE):].lstrip(), "content"
                    continue
                keep = held_prefix(self.pending, THINK_CLOSE)
                sendable = self.pending[:len(self.pending) - keep]
                if sendable:
                    out.append({"reasoning_content": sendable})
                self.pending = self.pending[len(sendable):]
                return out
            if self.phase == "content":
                if self.tools:
                    start, keep = self.fmt.call_start(self.pending, self.fresh)
                    if start >= 0:
                        before = self.pending[:start]
                        if before and not (self.fresh and before.isspace()):   # blanks before a first call: none
                            out.append({"content": before})
                        self.pending, self.phase = self.pending[start:], "calls"
                        return out
                else:
                    keep = 0
                sendable = self.pending[:len(self.pending) - keep]
                if sendable:
                    out.append({"content": sendable})
                    self.fresh = False
                self.pending = self.pending[len(sendable):]
                return out
            return out             # calls: held until finish

    def finish(self) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
        """The deltas still held, and the parsed calls (``{"name", "arguments"}``)."""
        rest, self.pending = self.pending, ""
        if self.phase == "reasoning":
            return ([{"reasoning_content": rest}] if rest else []), []
        if self.phase == "calls":
            content, calls = self.fmt.parse(rest)
            return ([{"content": content}] if content else []), calls
        return ([{"content": rest}] if rest else []), []


def split_answer(text: str, tools: bool, fmt: ToolCallFormat = HERMES) -> tuple[str | None, str, list[dict[str, Any]]]:
    """``(reasoning, content, calls)`` of a whole answer (what :class:`OutputSplitter` streams)."""
    splitter = OutputSplitter(tools, fmt)
    deltas = splitter.feed(text)
    rest, calls = splitter.finish()
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas + rest)
    content = "".join(d.get("content", "") for d in deltas + rest)
    return (reasoning or None), content.strip() if calls else content, calls

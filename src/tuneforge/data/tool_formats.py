"""The formats models write tool calls in, behind one registry: how each is detected from a chat template, where
its calls begin (streaming holds back text that may be the start), how its text is read back into calls, and the
Lark grammar that forces a call in it.

A model writes calls in the format its chat template taught it. Templates that know no tools get the built-in
rendering (:mod:`tuneforge.data.tools`: Hermes, the only format with a renderer); templates that render tools
themselves are recognised by their Jinja source (:func:`detect`):

============ ===================================================================== ==============================
name         what the model writes                                                 detected by (template source)
============ ===================================================================== ==============================
hermes       ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,     ``<tool_call>``; also the
             one block per call (Qwen2.5 / Qwen3, Hermes, SmolLM3)                 built-in rendering
mistral      ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v0.3, Nemo);  ``[TOOL_CALLS]``
             also ``[TOOL_CALLS]name[ARGS]{...}`` per call (newer templates)
llama3_json  ``{"name": ..., "parameters": {...}}`` as the whole answer, optionally  ``<|python_tag|>``, or the
             after ``<|python_tag|>``; several separated by ``;`` or newlines     ``"parameters"`` instruction
             (Llama 3.1 / 3.2 / 3.3)
granite      ``<|tool_call|>[{"name": ..., "arguments": {...}}, ...]`` (Granite 3)  ``<|tool_call|>``
============ ===================================================================== ==============================

Every parser returns ``(content, calls)``: ``calls`` as ``{"name": str, "arguments": dict}`` (arguments given as
an object or a JSON string of one; Llama's ``parameters`` read as arguments), ``content`` the text outside the
calls, stripped. A block that does not parse stays in the content; parsers never raise.

The markers (``[TOOL_CALLS]``, ``<|python_tag|>``, ...) are special tokens in their models' vocabularies: text
decoding keeps them (:attr:`ToolCallFormat.tokens`), and a forced-call grammar names such a marker by its token id
(:func:`special_marker_ids`; the grammar itself: :func:`tuneforge.serving.tool_calls.tool_call_grammar`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuneforge.data.tools import CALL_CLOSE, CALL_OPEN, parse_tool_calls, template_supports_tools

Call = dict[str, Any]                  # {"name": str, "arguments": dict}
Parsed = tuple[str, list[Call]]        # (content, calls)

TOOL_CALL_FORMATS = ("hermes", "mistral", "llama3_json", "granite")
MISTRAL_OPEN, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
PYTHON_TAG = "<|python_tag|>"
GRANITE_OPEN = "<|tool_call|>"

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"\s*")
_NAMED_CALL = re.compile(r"\s*([A-Za-z0-9_.:\-]+)(?:" + re.escape(MISTRAL_CALL_ID) + r"[A-Za-z0-9_\-]*)?"
                         + re.escape(MISTRAL_ARGS))
_LLAMA_INSTRUCTION = re.compile(r"""["']parameters["']\s*:""")


@dataclass(frozen=True)
class ToolCallFormat:
    """One way of writing tool calls.

    ``markers``: texts where calls begin, anywhere in an answer; ``leading_json``: an answer whose first
    non-blank character is ``{`` is calls too (Llama's bare JSON); ``tokens``: marker texts a vocabulary may hold
    as special tokens, kept when decoding; ``detect``: whether a chat template's Jinja source writes calls this
    way; ``parse``: text -> ``(content, calls)``; ``forced``: ``(parallel, lit)`` -> the Lark rules of the
    forced answer, one call being rule ``body`` (``lit(marker)``: the marker as a Lark terminal);
    ``arguments_key``: the key of a call's arguments in its JSON; ``renders``: the built-in rendering writes calls
    this way (only Hermes); ``new_call_id``: a fresh id for a parsed call, of the kind the format's templates take
    back (Mistral's refuse any but 9 letters and digits).
    """

    name: str
    markers: tuple[str, ...]
    detect: Callable[[str], bool]
    parse: Callable[[str], Parsed]
    forced: Callable[[bool, Callable[[str], str]], str]
    arguments_key: str = "arguments"
    leading_json: bool = False
    tokens: tuple[str, ...] = ()
    renders: bool = False
    new_call_id: Callable[[], str] = lambda: f"call_{uuid.uuid4().hex[:24]}"

    def call_start(self, text: str, fresh: bool) -> tuple[int, int]:
        """``(start, held)``: where calls begin in ``text`` (-1: nowhere yet) and, when nowhere, how many trailing
        characters must be held back (they may be the start of a marker). ``fresh``: nothing of the answer's
        content has been sent yet (Llama's leading ``{``; blank text is held until it is known)."""
        start = min((i for m in self.markers if (i := text.find(m)) >= 0), default=-1)
        if self.leading_json and fresh:
            head = text.lstrip()
            if head.startswith("{"):
                return len(text) - len(head), 0
            if not head:
                return -1, len(text)
        if start >= 0:
            return start, 0
        return -1, max((held_prefix(text, m) for m in self.markers), default=0)


def held_prefix(text: str, marker: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def call_of(obj: Any, keys: tuple[str, ...] = ("arguments",)) -> Call | None:
    """``{"name", "arguments"}`` of one decoded JSON call (arguments under the first of ``keys`` present, an
    object or a JSON string of one; none: ``{}``), or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = next((obj[k] for k in keys if k in obj), {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": obj["name"], "arguments": arguments}


def _json_at(text: str, at: int) -> tuple[Any, int] | None:
    """The JSON value starting at ``text[at]`` (after blanks) and the index after it, or None."""
    at = _SPACE.match(text, at).end()      # type: ignore[union-attr]
    try:
        return _DECODER.raw_decode(text, at)
    except (json.JSONDecodeError, RecursionError):
        return None


# --- hermes ---------------------------------------------------------------------------------------------------------

def _hermes_rules(parallel: bool, lit: Callable[[str], str]) -> str:
    repeat = ' ("\\n" call)*' if parallel else ""
    return (f"start: call{repeat}\n"
            f"call: {lit(CALL_OPEN)} \"\\n\" body \"\\n\" {lit(CALL_CLOSE)}\n")


# --- mistral and granite: a marker, then a JSON list of calls (or, Mistral's newer templates, name[ARGS]{...}) ---

def _list_calls(text: str, at: int) -> tuple[list[Call], int] | None:
    """The calls of a JSON list (or one JSON object) at ``text[at]``, and the index after it; None unless every
    entry is a call."""
    found = _json_at(text, at)
    if found is None:
        return None
    value, end = found
    entries = value if isinstance(value, list) else [value]
    calls = [call_of(e, ("arguments", "parameters")) for e in entries]
    if not calls or any(c is None for c in calls):
        return None
    return calls, end        # type: ignore[return-value]


def _named_call(text: str, at: int) -> tuple[list[Call], int] | None:
    """``name[ARGS]{...}`` (``name[CALL_ID]id[ARGS]{...}``) at ``text[at]``."""
    match = _NAMED_CALL.match(text, at)
    if match is None:
        return None
    found = _json_at(text, match.end())
    if found is None:
        return None
    call = call_of({"name": match[1], "arguments": found[0]})
    return ([call], found[1]) if call is not None else None


def _marked_lists(marker: str, named: bool) -> Callable[[str], Parsed]:
    """A parser of calls that follow ``marker`` (each occurrence): a JSON list of calls, or (``named``) Mistral's
    ``name[ARGS]{...}``; an occurrence that does not parse stays in the content."""
    def parse(text: str) -> Parsed:
        calls: list[Call] = []
        kept: list[str] = []
        at = 0
        start = text.find(marker)
        while start >= 0:
            body = start + len(marker)
            found = _list_calls(text, body) or (_named_call(text, body) if named else None)
            if found is None:
                start = text.find(marker, body)
                continue
            kept.append(text[at:start])
            calls.extend(found[0])
            at = found[1]
            start = text.find(marker, at)
        kept.append(text[at:])
        return ("".join(kept) if calls else text).strip(), calls
    return parse


def _list_rules(marker: str) -> Callable[[bool, Callable[[str], str]], str]:
    def rules(parallel: bool, lit: Callable[[str], str]) -> str:
        repeat = ' (", " body)*' if parallel else ""
        return f"start: {lit(marker)} \"[\" body{repeat} \"]\"\n"
    return rules


# --- llama3_json: the answer is JSON calls ----------------------------------------------------------------------

def parse_llama3_json(text: str) -> Parsed:
    """Llama 3.x's calls: JSON objects ``{"name", "parameters"}`` after ``<|python_tag|>`` or opening the answer,
    separated by ``;``, ``,`` or blanks; text after the last call that parses is content, as is the text before
    ``<|python_tag|>``."""
    tag = text.find(PYTHON_TAG)
    if tag >= 0:
        before, at = text[:tag], tag + len(PYTHON_TAG)
    elif text.lstrip().startswith("{"):
        before, at = "", len(text) - len(text.lstrip())
    else:
        return text.strip(), []
    calls: list[Call] = []
    while True:
        found = _json_at(text, at)
        call = call_of(found[0], ("parameters", "arguments")) if found is not None else None
        if call is None:
            break
        calls.append(call)
        at = found[1]                              # type: ignore[index]
        separator = re.compile(r"\s*[;,]?\s*").match(text, at)
        at = separator.end() if separator is not None else at
    if not calls:
        return text.strip(), []
    return (before + text[at:]).strip(), calls


def _llama_rules(parallel: bool, lit: Callable[[str], str]) -> str:
    repeat = ' ("; " body)*' if parallel else ""
    return f"start: body{repeat}\n"


def _llama_detect(source: str) -> bool:
    return PYTHON_TAG in source or bool(_LLAMA_INSTRUCTION.search(source))


FORMATS: dict[str, ToolCallFormat] = {
    "hermes": ToolCallFormat(
        "hermes", (CALL_OPEN,), detect=lambda s: CALL_OPEN in s, parse=parse_tool_calls, forced=_hermes_rules,
        tokens=(CALL_OPEN, CALL_CLOSE), renders=True),
    "mistral": ToolCallFormat(
        "mistral", (MISTRAL_OPEN,), detect=lambda s: MISTRAL_OPEN in s, parse=_marked_lists(MISTRAL_OPEN, True),
        forced=_list_rules(MISTRAL_OPEN), tokens=(MISTRAL_OPEN, MISTRAL_ARGS, MISTRAL_CALL_ID),
        new_call_id=lambda: uuid.uuid4().hex[:9]),
    "llama3_json": ToolCallFormat(
        "llama3_json", (PYTHON_TAG,), detect=_llama_detect, parse=parse_llama3_json, forced=_llama_rules,
        arguments_key="parameters", leading_json=True, tokens=(PYTHON_TAG,)),
    "granite": ToolCallFormat(
        "granite", (GRANITE_OPEN,), detect=lambda s: GRANITE_OPEN in s, parse=_marked_lists(GRANITE_OPEN, False),
        forced=_list_rules(GRANITE_OPEN), tokens=(GRANITE_OPEN,)),
}
HERMES = FORMATS["hermes"]
DETECTION_ORDER = ("hermes", "mistral", "granite", "llama3_json")   # most specific marker first


def template_source(chat_template: str | dict[str, str] | None) -> str:
    """A tokenizer's chat template as one Jinja source (a dict of named templates: all of them)."""
    if isinstance(chat_template, dict):
        return "\n".join(t for t in chat_template.values() if isinstance(t, str))
    return chat_template or ""


def detect(chat_template: str | dict[str, str] | None) -> ToolCallFormat:
    """The format a model trained with ``chat_template`` writes calls in: Hermes for a template that knows no
    tools (the built-in rendering), else the first format whose marker the template's source holds; a template
    that renders tools in none of them gets Hermes (give the format explicitly)."""
    source = template_source(chat_template)
    if not template_supports_tools(source):
        return HERMES
    return next((FORMATS[n] for n in DETECTION_ORDER if FORMATS[n].detect(source)), HERMES)


def resolve(name: str, chat_template: str | dict[str, str] | None, key: str = "data.tool_call_format"
            ) -> ToolCallFormat:
    """The format ``name`` (``auto``: :func:`detect` from ``chat_template``); ValueError naming ``key`` for an
    unknown name, or a format other than Hermes for a template that knows no tools (the built-in rendering
    writes Hermes, so the model could only learn that)."""
    if name == "auto":
        return detect(chat_template)
    if name not in FORMATS:
        raise ValueError(f"{key}: unknown tool call format {name!r}; write auto, {', '.join(TOOL_CALL_FORMATS)}")
    fmt = FORMATS[name]
    if not fmt.renders and not template_supports_tools(template_source(chat_template)):
        raise ValueError(f"{key}: {name} needs a chat template that renders tools itself; this one knows no tools, "
                         "so calls are rendered in the built-in hermes format: write auto or hermes")
    return fmt


def special_marker_ids(tokenizer: Any, fmt: ToolCallFormat) -> dict[str, int]:
    """``fmt``'s marker texts that ``tokenizer`` holds as special tokens -> their ids (a grammar matches such a
    marker as that token, ``<[id]>``: llguidance never matches a special token by its text)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = {t.content: i for i, t in decoder.items() if getattr(t, "special", False)}
    return {m: special[m] for m in fmt.tokens if m in special}

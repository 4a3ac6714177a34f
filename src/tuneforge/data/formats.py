"""Detect a record's format and normalise it to one schema.

Formats (canonical field names; ``columns`` in the config maps them to other column names):

==================  ===========================================  =====================
format              fields                                       becomes
==================  ===========================================  =====================
``messages``        ``messages``: [{role, content}, ...]         the messages as given
``sharegpt``        ``conversations``: [{from, value}, ...]      the messages (LLaMA-Factory's layout)
``alpaca``          ``instruction``, ``input`` (optional), ``output``  user / assistant
``prompt_completion`` ``prompt``, ``completion``                 user / assistant
``text``            ``text``                                     raw text (no template)
``preference``      ``chosen``, ``rejected`` (``prompt`` optional)  preference pair
==================  ===========================================  =====================

A normalised SFT example is :class:`Example` with either ``messages`` or ``text`` set; an assistant message
keeps its ``reasoning_content`` (the chat template renders it, see :mod:`tuneforge.data.turn_spans`). A chat
record may use tools (``tools``, assistant ``tool_calls``, ``tool`` messages, ShareGPT ``function_call`` /
``observation`` turns): :mod:`tuneforge.data.tools` normalises and checks them, and the example keeps ``tools``.
The names of the formats are defined here once (:data:`FORMATS` and the ``Literal`` types for configs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from tuneforge.data.errors import RecordError  # noqa: F401  (the data modules import it from here)
from tuneforge.data.tools import check_conversation, from_sharegpt, normalise_calls, normalise_tools

ChatFormat = Literal["messages", "sharegpt", "alpaca", "prompt_completion"]   # become user/assistant turns
SftFormat = Literal[ChatFormat, "text"]                           # what training reads
Format = Literal[SftFormat, "preference"]                         # what curation reads
CHAT_FORMATS: tuple[str, ...] = get_args(ChatFormat)
SFT_FORMATS: tuple[str, ...] = get_args(SftFormat)
FORMATS: tuple[str, ...] = get_args(Format)
ROLES = ("system", "user", "assistant", "tool")
FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),
    "text": ("text",),
}
KINDS: dict[str, str] = {**dict.fromkeys(CHAT_FORMATS, "chat"), "text": "text", "preference": "preference"}
TASK_KINDS = {"sft": "chat", "pretrain": "text", "preference": "preference"}   # the kind of record each task trains
TASK_KINDS["reward"] = "preference"                                              # a reward model's pairs
TASK_KINDS["distill"] = "chat"                                                   # SFT's records, a teacher's logits
CANONICAL_FIELDS = ("messages", "conversations", "tools",
                    "instruction", "input", "output", "prompt", "completion", "text", "chosen", "rejected",
                    "label")


def check_columns(columns: dict[str, str], key: str = "columns") -> dict[str, str]:
    """Validate a ``{canonical field: source column}`` mapping; raise ValueError naming the bad key."""
    import difflib

    for field_name in columns:
        if field_name not in CANONICAL_FIELDS:
            close = difflib.get_close_matches(field_name, CANONICAL_FIELDS, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"{key} key '{field_name}' is not a field tuneforge knows{hint}; "
                             f"map one of {', '.join(CANONICAL_FIELDS)} to your column name")
    return columns


@dataclass
class Example:
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    tools: list[dict[str, Any]] | None = None     # OpenAI function definitions (tool records only)
    meta: dict[str, Any] = field(default_factory=dict)


def rename_columns(record: dict[str, Any], columns: dict[str, str] | None) -> dict[str, Any]:
    """Return ``record`` with source columns renamed to canonical fields (``columns``: canonical -> source)."""
    if not columns:
        return record
    out = dict(record)
    for canonical, source in columns.items():
        if source in record:
            out[canonical] = record[source]
    return out


def task_kind(task: str, declared_format: str = "auto") -> str:
    """The kind of record (chat, text, preference) a run of ``task`` trains: the task's, or for SFT the kind of a
    declared ``data.format`` (SFT on ``text`` records is allowed when declared)."""
    if task in ("sft", "distill") and declared_format != "auto":
        return KINDS[declared_format]
    return TASK_KINDS[task]


def kind_mismatch(fmt: str, kind: str) -> str | None:
    """Why a record of format ``fmt`` does not belong in data of ``kind``, or None when it does: the message of the
    ``mixed_kinds`` check, the same for ``tuneforge data clean`` (``kind``: the first record's) and training
    (``kind``: :func:`task_kind`)."""
    if KINDS[fmt] == kind:
        return None
    return (f"a {KINDS[fmt]} record ({fmt}) in {kind} data; keep each kind in its own file (chat records train "
            f"with task: sft, text with task: pretrain, chosen/rejected pairs with task: preference)")


# A preference pair may carry a prompt or instruction too: it is recognised before the chat formats.
_DETECTION_ORDER = ("messages", "preference", "sharegpt", "alpaca", "prompt_completion", "text")


def detect_format(record: dict[str, Any]) -> str | None:
    """The format whose required fields ``record`` has, or None."""
    for fmt in _DETECTION_ORDER:
        if all(k in record for k in FORMAT_FIELDS[fmt]):
            return fmt
    return None


def _text_field(record: dict[str, Any], key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError(f"missing field '{key}'", "missing_field")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field '{key}' must be a string, got {type(value).__name__}", "wrong_type")
    return value


def normalise_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RecordError("field 'messages' must be a non-empty list of {role, content} objects", "wrong_type")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError(f"messages[{i}] must be an object with 'role' and 'content'", "wrong_type")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RecordError(f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}", "unknown_role")
        calls = m.get("tool_calls")
        if content is None and calls and role == "assistant":     # OpenAI: a call-only turn has content null
            content = ""
        if not isinstance(content, str):
            raise RecordError(f"messages[{i}].content must be a string, got {type(content).__name__}", "wrong_type")
        message: dict[str, Any] = {"role": role, "content": content}
        if calls:
            if role != "assistant":
                raise RecordError(f"messages[{i}].tool_calls are only for assistant turns", "wrong_type")
            message["tool_calls"] = normalise_calls(calls, f"messages[{i}]")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise RecordError(f"messages[{i}].tool_call_id must be a string", "wrong_type")
            message["tool_call_id"] = call_id
            if isinstance(m.get("name"), str):
                message["name"] = m["name"]
        reasoning = m.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant" or not isinstance(reasoning, str):
                raise RecordError(f"messages[{i}].reasoning_content must be a string on an assistant turn",
                                  "wrong_type")
            message["reasoning_content"] = reasoning
        out.append(message)
    return out


def to_example(record: dict[str, Any], fmt: str, system_prompt: str | None = None,
               tools: list[dict[str, Any]] | None = None) -> Example:
    """Normalise ``record`` (already column-renamed) of format ``fmt`` into an :class:`Example`; ``tools``: the data
    set's (``data.tools``, normalised), used when the record has none of its own.

    Raises :class:`RecordError` naming the field that is wrong.
    """
    if fmt == "messages":
        messages = normalise_messages(record.get("messages"))
    elif fmt == "sharegpt":
        messages = normalise_messages(from_sharegpt(record.get("conversations"), record.get("system")))
    elif fmt == "alpaca":
        instruction = _text_field(record, "instruction")
        extra = _text_field(record, "input", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text_field(record, "output")}]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text_field(record, "prompt")},
                    {"role": "assistant", "content": _text_field(record, "completion")}]
    elif fmt == "text":
        text = _text_field(record, "text")
        if not text.strip():
            raise RecordError("field 'text' is empty", "empty_answer")
        return Example(text=text)
    elif fmt == "preference":
        raise RecordError("preference pairs (chosen/rejected) are for preference training, not SFT", "preference_pair")
    else:
        raise RecordError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}", "unknown_format")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("conversation has no assistant turn: nothing to learn from", "turn_order")
    if messages[-1]["role"] != "assistant":
        raise RecordError("conversation must end with an assistant turn", "turn_order")
    for m in messages:
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise RecordError("an assistant turn is empty", "empty_answer")
    if record.get("tools") is not None:
        tools = normalise_tools(record["tools"])
    if any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        check_conversation(messages, tools)
    return Example(messages=messages, tools=tools or None)

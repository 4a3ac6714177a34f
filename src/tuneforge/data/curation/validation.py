"""Check one raw record: its structure against its format, then quality heuristics.

:func:`check_record` turns a :class:`~tuneforge.data.loaders.RawRecord` into a :class:`Checked`:
the detected format, the record normalised to the clean schema (``{"messages": [...]}``,
``{"text": ...}`` or ``{"chosen", "rejected", "prompt"?}``) and every :class:`Issue` found, each named
after a check in :data:`tuneforge.data.curation.config.CHECKS`. Checks that need the whole data set
(duplicates, token lengths, mixed kinds) run in :mod:`tuneforge.data.curation.clean`.

A chat that passes these checks also passes :func:`tuneforge.data.formats.to_example`, which builds
the normalised messages, so what ``clean`` writes is exactly what training reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tuneforge.data.curation import quality
from tuneforge.data.curation.config import CurationConfig
from tuneforge.data.curation.conflicts import conflict_keys
from tuneforge.data.formats import (
    FORMAT_FIELDS,
    KINDS,
    ROLES,
    RecordError,
    detect_format,
    rename_columns,
    to_example,
)
from tuneforge.data.loaders import RawRecord, error_check
from tuneforge.data.tools import has_tool_content, load_tools_file, message_text


@lru_cache(maxsize=4)
def _tools_file(path: str) -> list[dict[str, Any]]:
    return load_tools_file(path, "tools")


@dataclass
class Issue:
    check: str
    message: str


@dataclass
class Checked:
    """One record after :func:`check_record`."""
    raw: RawRecord
    format: str | None = None
    kind: str | None = None                 # chat | text | preference
    clean: dict[str, Any] | None = None     # normalised record (None when structurally invalid)
    issues: list[Issue] = field(default_factory=list)
    dedup_text: str = ""                    # normalised text that duplicate checks compare
    label: str | None = None                # final answer (for label distributions)
    pii: dict[str, int] = field(default_factory=dict)
    tokens: int = 0                         # token count (set by the pipeline)
    line: str | None = None                 # ``clean`` as a JSON line, when already serialised
    conflict: tuple[int, int] | None = None  # chat: hashes of the prompt and the final answer (conflicting_labels)

    @property
    def where(self) -> str:
        return self.raw.where

    def add(self, check: str, message: str) -> None:
        self.issues.append(Issue(check, message))


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _string_field(rec: dict[str, Any], key: str, out: Checked, required: bool = True) -> str | None:
    if key not in rec or rec[key] is None:
        if required:
            out.add("missing_field", f"missing field '{key}'")
        return None if required else ""
    value = rec[key]
    if not isinstance(value, str):
        out.add("wrong_type", f"field '{key}' must be a string, got {_type_name(value)}")
        return None
    return value


def _check_messages(messages: Any, out: Checked, name: str = "messages", need_final_answer: bool = True
                    ) -> list[dict[str, str]] | None:
    """Validate a list of {role, content} turns; append issues to ``out``; the normalised turns or None."""
    if not isinstance(messages, list):
        out.add("wrong_type", f"field '{name}' must be a list of {{role, content}} objects, got {_type_name(messages)}")
        return None
    if not messages:
        out.add("missing_field", f"field '{name}' is an empty list")
        return None
    turns: list[dict[str, str]] = []
    ok = True
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.add("wrong_type", f"{name}[{i}] must be an object with 'role' and 'content', got {_type_name(m)}")
            ok = False
            continue
        role, content = m.get("role"), m.get("content")
        if role is None:
            out.add("missing_field", f"{name}[{i}] has no 'role'")
            ok = False
        elif role not in ROLES:
            out.add("unknown_role", f"{name}[{i}].role is {str(role)[:40]!r}; expected one of {', '.join(ROLES)}")
            ok = False
        if content is None:
            out.add("missing_field", f"{name}[{i}] has no 'content'")
            ok = False
        elif not isinstance(content, str):
            hint = " (multimodal content parts are not supported)" if isinstance(content, list) else ""
            out.add("wrong_type", f"{name}[{i}].content must be a string, got {_type_name(content)}{hint}")
            ok = False
        if ok:
            turns.append({"role": role, "content": content})
    if not ok:
        return None
    for i, t in enumerate(turns):
        if t["role"] == "system" and i > 0:
            out.add("turn_order", f"{name}[{i}] is a system turn after the first turn")
            return None
        if i and t["role"] == turns[i - 1]["role"]:
            out.add("turn_order", f"{name}[{i - 1}] and {name}[{i}] are both {t['role']} turns")
            return None
    if need_final_answer and turns[-1]["role"] != "assistant":
        out.add("turn_order", f"{name} ends with a {turns[-1]['role']} turn; SFT needs a final assistant answer"
                if any(t["role"] == "assistant" for t in turns) else f"{name} has no assistant turn: nothing to learn")
        return None
    bad = False
    for i, t in enumerate(turns):
        if not t["content"].strip():
            if t["role"] == "assistant":
                out.add("empty_answer", f"{name}[{i}] (assistant) is empty")
            else:
                out.add("empty_turn", f"{name}[{i}] ({t['role']}) is empty")
            bad = bad or t["role"] == "assistant"
    return None if bad else turns


def _describe_fields(rec: dict[str, Any]) -> str:
    keys = ", ".join(repr(k) for k in list(rec)[:8]) + (", ..." if len(rec) > 8 else "")
    wanted = " | ".join("+".join(f) for f in FORMAT_FIELDS.values())
    return f"fields {{{keys}}} match no format; expected {wanted} (map other column names with --columns)"


def _check_preference(rec: dict[str, Any], out: Checked) -> None:
    sides = {}
    for key in ("chosen", "rejected"):
        value = rec.get(key)
        if value is None:
            out.add("missing_field", f"missing field '{key}'")
        elif isinstance(value, str):
            if not value.strip():
                out.add("empty_answer", f"field '{key}' is empty")
            else:
                sides[key] = value
        elif isinstance(value, list):
            turns = _check_messages(value, out, key)
            if turns is not None:
                sides[key] = turns
        else:
            out.add("wrong_type", f"field '{key}' must be a string or a list of messages, got {_type_name(value)}")
    prompt = rec.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list)):
        out.add("wrong_type", f"field 'prompt' must be a string or a list of messages, got {_type_name(prompt)}")
        return
    if isinstance(prompt, list):
        prompt = _check_messages(prompt, out, "prompt", need_final_answer=False)
        if prompt is None:
            return
    structural = ("wrong_type", "missing_field", "unknown_role", "turn_order")
    if len(sides) < 2 or any(i.check in structural for i in out.issues):
        return
    chosen, rejected = sides["chosen"], sides["rejected"]
    if type(chosen) is not type(rejected):
        out.add("wrong_type", "'chosen' and 'rejected' must both be strings or both be message lists")
        return
    out.clean = {"chosen": chosen, "rejected": rejected}
    if prompt:
        out.clean["prompt"] = prompt
    if chosen == rejected:
        out.add("identical_pair", "'chosen' and 'rejected' are identical: the pair teaches nothing")


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(m["content"] for m in value)
    return ""


def check_record(raw: RawRecord, config: CurationConfig) -> Checked:
    """Structure and quality checks of one record (see the module docstring)."""
    out = Checked(raw)
    if raw.error is not None or raw.data is None:
        out.add(error_check(raw.error or ""), raw.error or "record could not be read")
        return out
    rec = rename_columns(raw.data, config.columns)
    fmt = detect_format(rec) if config.format == "auto" else config.format
    if fmt is None:
        out.add("unknown_format", _describe_fields(rec))
        return out
    out.format, out.kind = fmt, KINDS[fmt]

    tools = _tools_file(config.tools) if config.tools else None
    if fmt == "sharegpt" or (fmt == "messages" and (has_tool_content(rec.get("messages"))
                                                    or rec.get("tools") is not None)):
        try:                                      # tool records: formats.py and tools.py are the reference
            example = to_example(rec, fmt, tools=tools)
        except RecordError as e:
            out.add(e.check, str(e))
        else:
            out.clean = {"messages": example.messages, **({"tools": example.tools} if example.tools else {})}
    elif fmt == "messages":
        turns = _check_messages(rec.get("messages"), out)
        if turns is not None:
            out.clean = {"messages": turns, **({"tools": tools} if tools else {})}
    elif fmt in ("alpaca", "prompt_completion"):
        prompt_key, answer_key = ("instruction", "output") if fmt == "alpaca" else ("prompt", "completion")
        prompt = _string_field(rec, prompt_key, out)
        extra = _string_field(rec, "input", out, required=False) if fmt == "alpaca" else ""
        answer = _string_field(rec, answer_key, out)
        if answer is not None and not answer.strip():
            out.add("empty_answer", f"field '{answer_key}' is empty")
        elif prompt is not None and answer is not None and extra is not None:
            if not prompt.strip():
                out.add("empty_turn", f"field '{prompt_key}' is empty")
            try:
                out.clean = {"messages": to_example(rec, fmt).messages}
            except RecordError as e:                      # formats.py is the reference: never disagree with it
                out.add("wrong_type", str(e))
    elif fmt == "text":
        text = _string_field(rec, "text", out)
        if text is not None:
            if text.strip():
                out.clean = {"text": text}
            else:
                out.add("empty_answer", "field 'text' is empty")
    else:
        _check_preference(rec, out)

    if out.clean is not None and isinstance(rec.get("metadata"), dict):
        out.clean["metadata"] = rec["metadata"]   # provenance (e.g. `tuneforge data generate`'s teacher) travels on
    if out.clean is not None:
        _quality(out, config)
    return out


def _quality(out: Checked, config: CurationConfig) -> None:
    """Quality heuristics on a structurally valid record; sets ``dedup_text`` and ``label``."""
    clean = out.clean
    if "messages" in clean:
        turns = clean["messages"]
        answer = message_text(turns[-1])
        answers = "\n".join(message_text(t) for t in turns if t["role"] == "assistant")
        prompts = "\n".join(t["content"] for t in turns if t["role"] != "assistant")
        last_prompt = next((t["content"] for t in reversed(turns) if t["role"] == "user"), "")
        dedup = "\n".join(f"{t['role']}: {message_text(t)}" for t in turns)
        out.label = answer
        if config.action("conflicting_labels") != "off":
            out.conflict = conflict_keys(turns[:-1], answer)
    elif "text" in clean:
        answer = answers = dedup = clean["text"]
        prompts = last_prompt = ""
    else:
        answer = answers = _text_of(clean["chosen"])
        prompts = _text_of(clean.get("prompt"))
        last_prompt = ""
        dedup = "\n".join((prompts, answers, _text_of(clean["rejected"])))
    out.dedup_text = quality.normalise_text(dedup)

    action = config.action
    everything = f"{prompts}\n{answers}" if prompts else answers
    low_everything = everything.lower()
    if not prompts:
        low_answers = low_everything
    elif len(low_everything) == len(everything):              # lower() kept every length: slice it
        low_answers = low_everything[len(everything) - len(answers):]
    else:                                                     # e.g. "İ".lower() is two characters
        low_answers = answers.lower()
    if action("short_answer") != "off" and len(answer.strip()) < config.min_answer_chars:
        out.add("short_answer",
                f"answer is {len(answer.strip())} characters (min_answer_chars={config.min_answer_chars})")
    if action("repeats_prompt") != "off" and last_prompt and quality.repeats_prompt(last_prompt, answer):
        out.add("repeats_prompt", "the answer repeats the prompt")
    if action("refusal") != "off" and quality.is_refusal(answers, low_answers):
        out.add("refusal", "boilerplate refusal / 'as an AI language model' text in the answer")
    if action("placeholder") != "off":
        found = quality.find_placeholder(everything, low_everything)
        if found:
            out.add("placeholder", f"placeholder text {found[:40]!r}")
    if action("control_chars") != "off":
        ch = quality.control_char(everything)
        if ch:
            out.add("control_chars", f"contains control/replacement character {ch!r}")
    if action("non_text") != "off":
        reason = quality.non_text_reason(answers)
        if reason:
            out.add("non_text", f"answer: {reason}")
    if action("pii") != "off" or config.mask_pii:
        found = quality.find_pii(everything)
        if found:
            out.pii = found
            if action("pii") != "off":
                out.add("pii", "possible PII: " + ", ".join(f"{n} {k}" for k, n in sorted(found.items())))


def mask_record(clean: dict[str, Any]) -> dict[str, Any]:
    """``clean`` with PII masked in every text (see :func:`tuneforge.data.curation.quality.mask_pii`)."""
    def mask(value: Any) -> Any:
        if isinstance(value, str):
            return quality.mask_pii(value)
        if isinstance(value, list):
            return [{**m, "content": quality.mask_pii(m["content"])} for m in value]
        return value
    return {k: mask(v) for k, v in clean.items()}

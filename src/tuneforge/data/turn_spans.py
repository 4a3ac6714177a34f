"""Where each assistant turn lies in the one full rendering of a conversation, whatever the chat template.

The conversation is rendered twice with the template, both times whole (no prefix is rendered):

1. as it is: the text that is tokenized and trained on;
2. with every assistant answer, and its reasoning, replaced by **sentinels**: private-use characters no record
   holds (``\\ue000<n>\\ue001``). An answer ``"  Paris\\n"`` becomes ``lead + core + trail`` sentinels, so a
   template that trims (Llama 3, Gemma) or strips newlines (Qwen3) is seen doing it.

The sentinel rendering is the template's own text cut by the sentinels: ``piece0 <s0> piece1 <s1> ...``. The
real rendering must be exactly those pieces with each sentinel filled by what the message put there (a core by
its text; a leading or trailing whitespace run by itself, a part of it, or nothing when the template stripped
it): matching the two gives every answer's exact character span in the real rendering. Nothing is assumed
about prefixes: a template may drop the reasoning of earlier turns (Qwen3), move the system message into
the last user turn (Mistral) or print a date. A core sentinel missing from the sentinel rendering means the
template dropped that text: for an answer the record is refused (``chat_template``), for reasoning it is simply
not there to train.

Reasoning: a message's ``reasoning_content``, or a ``<think>...</think>`` block at the start of its
``content``, is passed to the template as the record has it; the template renders it as it does (Qwen3 puts
it in a ``<think>`` block of the last turns only; a template that knows no reasoning prints a ``<think>``
block in the content verbatim, and drops ``reasoning_content``).

Tool calls, where the template renders them itself (``tool_calls`` passed to a template that knows tools): each
call's function name is a sentinel too, so the calls are located like answers. Such a turn's trained span starts
where the assistant's part starts (after ``header``, the template's generation prompt, e.g.
``<|im_start|>assistant\n``; at its first located part without one) and ends with the first end-of-turn marker
after its last part, so the template's call syntax and the arguments are trained with the names. (Templates
without tool support get the calls as text, :func:`tuneforge.data.tools.to_builtin`: they are answers.)

Each :class:`TurnSpan` is the answer (with whitespace the template kept), the reasoning where rendered, and
the end-of-turn marker that follows the answer (:func:`end_marker_after`): the first of the tokenizer's EOS
and :data:`END_MARKERS` after only whitespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tuneforge.data.formats import RecordError

# end-of-turn markers of the usual templates (ChatML, Llama 3, Phi-3, Gemma, ...; EOS is added per tokenizer)
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "</s>")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_THINK_IN_CONTENT = re.compile(r"(\s*<think>)(.*?)(</think>)(.*)\Z", re.S)
_SENTINEL_PAIRS = [(chr(0xE000 + 2 * k), chr(0xE001 + 2 * k)) for k in range(64)]


@dataclass
class TurnSpan:
    """One assistant turn in the rendering, as ``[start, end)`` character offsets.

    ``answer``: the answer as rendered (with the whitespace around it the template kept); ``reasoning``: the
    reasoning as rendered, or None (none, or the template dropped it); ``think_start``: where the ``<think>``
    tag before the reasoning starts (the reasoning's start when there is no tag); ``end``: the end of the
    end-of-turn marker after the answer, or of the answer when none follows (``closed`` False).
    """

    answer: tuple[int, int]
    reasoning: tuple[int, int] | None
    think_start: int | None
    end: int
    closed: bool

    def trained(self, train_reasoning: bool) -> tuple[int, int]:
        """The span the model learns to write: the answer and its end marker, from the ``<think>`` tag when the
        reasoning is trained and rendered before the answer."""
        start = self.answer[0]
        if train_reasoning and self.reasoning is not None and self.think_start is not None \
                and self.reasoning[1] <= self.answer[0]:
            start = self.think_start
        return start, self.end


def split_reasoning(message: dict[str, Any]) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant message: ``reasoning_content``, else a leading ``<think>`` block of the
    content, else (None, content)."""
    content = message["content"]
    reasoning = message.get("reasoning_content")
    if reasoning is not None:
        return reasoning, content
    m = _THINK_IN_CONTENT.match(content)
    if m is None:
        return None, content
    return m[2], m[4]


def end_marker_after(text: str, end: int, markers: tuple[str, ...]) -> int | None:
    """The end of the first of ``markers`` found at ``end`` after only whitespace, or None."""
    at = end
    while at < len(text) and text[at].isspace():
        at += 1
    for marker in sorted(markers, key=len, reverse=True):
        if marker and text.startswith(marker, at):
            return at + len(marker)
    return None


class _Slots:
    """Sentinels for the parts of the assistant messages, and what each may become in the real rendering."""

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        strings = [str(v) for m in messages for v in m.values() if v is not None]
        self.open, self.close = next((o, c) for o, c in _SENTINEL_PAIRS if not any(o in s or c in s for s in strings))
        self.candidates: list[list[str]] = []      # slot n -> the texts it may stand for, longest first
        self.owner: list[tuple[int, str, str]] = []   # slot n -> (message index, "answer"|"reasoning"|"call", part)

    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.escape(self.open) + r"(\d+)" + re.escape(self.close))

    def _slot(self, texts: list[str], owner: tuple[int, str, str]) -> str:
        self.candidates.append(sorted(set(texts), key=len, reverse=True))
        self.owner.append(owner)
        return f"{self.open}{len(self.candidates) - 1}{self.close}"

    def part(self, raw: str, index: int, kind: str) -> str:
        """``raw`` as sentinels: its leading whitespace, its core and its trailing whitespace (raw when blank)."""
        core = raw.strip()
        if not core:
            return raw
        start = raw.index(core)
        lead, trail = raw[:start], raw[start + len(core):]
        out = self._slot([core], (index, kind, "core"))
        if lead:
            out = self._slot(_stripped(lead), (index, kind, "lead")) + out
        if trail:
            out += self._slot(_stripped(trail), (index, kind, "trail"))
        return out

    def message(self, message: dict[str, Any], index: int, label: str) -> dict[str, Any]:
        reasoning, answer = split_reasoning(message)
        calls = message.get("tool_calls") or []
        out = dict(message)
        if calls:
            out["tool_calls"] = [{**c, "function": {**c["function"], "name": self._slot(
                [c["function"]["name"]], (index, "call", "core"))}} for c in calls]
            if not answer.strip():
                return out
        if not answer.strip():
            raise RecordError(f"{label}: reasoning but no answer after it", "empty_answer")
        if "reasoning_content" in message and message["reasoning_content"] is not None:
            out["reasoning_content"] = self.part(message["reasoning_content"], index, "reasoning")
            out["content"] = self.part(answer, index, "answer")
        elif reasoning is not None:
            m = _THINK_IN_CONTENT.match(message["content"])
            assert m is not None
            out["content"] = m[1] + self.part(m[2], index, "reasoning") + m[3] + self.part(m[4], index, "answer")
        else:
            out["content"] = self.part(answer, index, "answer")
        return out


def _stripped(ws: str) -> list[str]:
    """What a whitespace run may become when a template strips (all of it, its newlines, or nothing)."""
    return [ws, ws.lstrip("\n"), ws.rstrip("\n"), ws.strip("\n"), ws.lstrip(" "), ws.rstrip(" "), ""]


def _fill(text: str, pieces: list[str], slots: list[int], candidates: list[list[str]]) -> list[tuple[int, int]] | None:
    """Positions of each slot in ``text`` = pieces[0] slot0 pieces[1] slot1 ... pieces[-1], or None.

    Depth-first over the candidates of each slot (a core has one; only whitespace slots branch)."""
    found: list[tuple[int, int]] = []

    def walk(k: int, at: int) -> bool:
        if not text.startswith(pieces[k], at):
            return False
        at += len(pieces[k])
        if k == len(slots):
            return at == len(text)
        for option in candidates[slots[k]]:
            if text.startswith(option, at):
                found.append((at, at + len(option)))
                if walk(k + 1, at + len(option)):
                    return True
                found.pop()
        return False

    return found if walk(0, 0) else None


def turn_spans(render: Any, messages: list[dict[str, Any]], markers: tuple[str, ...], header: str | None = None
               ) -> tuple[str, list[TurnSpan]]:
    """The rendered conversation and one :class:`TurnSpan` per assistant message, in order.

    ``render(messages) -> str`` renders a whole conversation with the chat template (no generation prompt).
    Raises :class:`RecordError` (``chat_template``) when the template refuses the conversation, drops or
    repeats an answer, or renders it in a way the sentinel rendering does not explain.
    """
    text = _render(render, messages)
    slots = _Slots(messages)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    labels = {i: f"assistant turn {k} (messages[{i}])" for k, i in enumerate(assistant, 1)}
    stand_ins = [slots.message(m, i, labels[i]) if i in labels else m for i, m in enumerate(messages)]
    cut = slots.pattern().split(_render(render, stand_ins))
    pieces, order = cut[0::2], [int(n) for n in cut[1::2]]
    for n, (index, kind, part) in enumerate(slots.owner):
        seen = order.count(n)
        if kind in ("answer", "call") and part == "core" and seen == 0:
            raise RecordError(f"the chat template drops {labels[index]}: its {kind} is not in the rendering",
                              "chat_template")
        if seen > 1:
            raise RecordError(f"the chat template renders {labels[index]} more than once: which copy the model "
                              "writes is unclear", "chat_template")
    where = _fill(text, pieces, order, slots.candidates)
    if where is None:
        raise RecordError("the chat template changes the answers' text (not only the whitespace around them): the "
                          "trained tokens cannot be located", "chat_template")
    located: dict[tuple[int, str], list[tuple[int, int]]] = {}
    for n, span in zip(order, where, strict=True):
        index, kind, _ = slots.owner[n]
        located.setdefault((index, kind), []).append(span)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        calls = located.get((index, "call"))
        parts = located.get((index, "answer"), []) + (calls or [])
        answer = (min(s for s, _ in parts), max(e for _, e in parts))
        if calls:
            spans.append(_call_turn(text, answer, markers, header, spans[-1].end if spans else 0))
            continue
        reasoning = None
        think_start = None
        if (index, "reasoning") in located:
            rparts = located[(index, "reasoning")]
            reasoning = (min(s for s, _ in rparts), max(e for _, e in rparts))
            before = text[:reasoning[0]].rstrip()
            think_start = len(before) - len(THINK_OPEN) if before.endswith(THINK_OPEN) else reasoning[0]
        end = end_marker_after(text, answer[1], markers)
        spans.append(TurnSpan(answer, reasoning, think_start, end if end is not None else answer[1], end is not None))
    return text, spans


def _call_turn(text: str, parts: tuple[int, int], markers: tuple[str, ...], header: str | None, after: int
               ) -> TurnSpan:
    """The span of a turn whose calls the template rendered: from the end of the last ``header`` (or of ``header``
    without its trailing whitespace) before its first part (not before ``after``, the previous turn's end) to the
    first end marker after its last part."""
    start, last = parts
    for opening in dict.fromkeys((header, (header or "").rstrip())):     # as generated, or with its blank eaten
        at = text.rfind(opening, after, start) if opening else -1
        if at >= 0:
            start = at + len(opening)
            break
    ends = [at + len(m) for m in markers if m and (at := text.find(m, last)) >= 0]
    end = min(ends) if ends else last
    return TurnSpan((start, last), None, None, end, bool(ends))


def _render(render: Any, messages: list[dict[str, Any]]) -> str:
    try:
        return render(messages)
    except Exception as e:  # noqa: BLE001 - a template's raise_exception (roles out of order, ...) or a bug
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RecordError(f"the chat template refused the conversation: {first}", "chat_template") from None

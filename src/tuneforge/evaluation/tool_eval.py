"""Tool records in ``tuneforge eval``: which test records are about tools, what their text metrics compare, and
their call scores per column.

A *tool record* carries ``tools`` (its own or ``data.tools``) or its reference answer (the last assistant turn)
makes ``tool_calls``. Every column renders such a record's prompt with its tools (the generator gets them);
the model's answer is read in the run's tool call format (:mod:`~tuneforge.data.tool_formats`, the run's
``data.tool_call_format``, by default detected from its chat template): its calls are scored against the
reference's with :func:`~tuneforge.evaluation.tool_calls.score_calls` (validators from the record's tools), and
the text metrics compare the content part only (the reference's ``content``, the answer without its calls).
A column's ``tool_calls`` block is :func:`~tuneforge.evaluation.tool_calls.summarise` over the set's tool
records; records without tools in the same set are scored as text only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneforge.data.formats import Example
from tuneforge.data.tool_formats import HERMES, ToolCallFormat
from tuneforge.data.tools import assistant_text
from tuneforge.evaluation.tool_calls import Call, CallScore, score_calls, summarise, tool_validators

PAIRED_METRICS = ("tool_name", "args_exact")
MARGIN_TOKENS = 16      # new tokens allowed beyond the longest reference answer (with its calls)


def is_tool_record(example: Example) -> bool:
    last = (example.messages or [{}])[-1]
    return bool(example.tools) or bool(last.get("tool_calls"))


def reference_calls(example: Example) -> list[Call]:
    return [Call.of(c) for c in (example.messages or [{}])[-1].get("tool_calls") or []]


def content_texts(examples: Sequence[Example], texts: Sequence[str], fmt: ToolCallFormat = HERMES) -> list[str]:
    """The answers the text metrics compare: a tool record's answer without its calls (read in ``fmt``), any other
    as it is."""
    return [fmt.parse(t)[0] if is_tool_record(ex) else t for ex, t in zip(examples, texts, strict=True)]


def score_answers(examples: Sequence[Example], texts: Sequence[str], fmt: ToolCallFormat = HERMES
                  ) -> list[CallScore]:
    """The call scores of the tool records' answers, their calls read in ``fmt`` (records without tools are left
    out)."""
    out, validators = [], {}
    for ex, text in zip(examples, texts, strict=True):
        if not is_tool_record(ex):
            continue
        key = id(ex.tools)
        if key not in validators:
            validators[key] = tool_validators(ex.tools or [])
        predicted = [Call.of(c) for c in fmt.parse(text)[1]]
        out.append(score_calls(predicted, reference_calls(ex), validators[key]))
    return out


def column_block(examples: Sequence[Example], texts: Sequence[str], seed: int, resamples: int,
                 fmt: ToolCallFormat = HERMES) -> tuple[dict[str, Any] | None, dict[str, list[float]]]:
    """A column's ``tool_calls`` block (None: the set has no tool records) and, for the paired bootstrap, the
    per-example values of :data:`PAIRED_METRICS` over the examples that need a call."""
    scores = score_answers(examples, texts, fmt)
    if not scores:
        return None, {}
    values = {m: [v for s in scores if (v := getattr(s, m)) is not None] for m in PAIRED_METRICS}
    return summarise(scores, seed=seed, resamples=resamples), values


def longest_reference_tokens(tokenizer: Any, examples: Sequence[Example]) -> int:
    """The token count of the longest tool record reference answer, its calls rendered in the built-in format."""
    texts = [assistant_text(ex.messages[-1].get("content") or "", ex.messages[-1].get("tool_calls"))
             for ex in examples if is_tool_record(ex)]
    return max((len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts), default=0)

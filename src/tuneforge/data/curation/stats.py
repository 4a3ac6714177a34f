"""What a data set looks like before training: token lengths, turns, answers, truncation at max_length.

:func:`compute_stats` streams a file once. Token lengths are counted with the model's tokenizer
(chats rendered with its chat template, as training sees them) or, with ``model=None``, estimated
from characters. Only the lengths (4 bytes a record) and small counters are kept in memory.

* ``percentiles``: p50/p90/p95/p99/max of the token length;
* ``turns``: conversations by number of messages (chat data);
* ``labels``: counts of each distinct final answer when there are few (classification-like data:
  at most ``max_label_values`` distinct answers of at most 64 characters), else None;
* ``tool_calls``: calls per tool name over the usable records (tool-calling data; empty otherwise);
* ``over_max_length``: records longer than ``max_length`` (training would drop or truncate them);
* ``trained_tokens`` of ``tokens`` (with ``template``: ``tuneforge data stats --template``): the records
  tokenized exactly as a run with that ``template:`` (and ``template_kwargs:``) trains on them, and how many of
  their tokens are trained (the answers; a record training would reject is counted as rendered, untrained).
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data.curation.clean import AnswerLabels, chunked
from tuneforge.data.curation.config import CurationConfig
from tuneforge.data.curation.validation import check_record
from tuneforge.data.loaders import iter_records
from tuneforge.data.token_count import LengthCounter, TokenizerCounter, make_counter
from tuneforge.models.registry import DEFAULT_MODEL

PERCENTILES = (50, 90, 95, 99)


@dataclass
class DatasetStats:
    path: str
    records: int = 0
    valid: int = 0
    invalid: int = 0
    kind: str | None = None
    formats: dict[str, int] = field(default_factory=dict)
    unit: str = "tokens"
    percentiles: dict[str, int] = field(default_factory=dict)
    mean: float = 0.0
    turns: dict[int, int] = field(default_factory=dict)
    tool_calls: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] | None = None
    max_length: int | None = None
    over_max_length: int = 0
    histogram: str | None = None
    tokens: int | None = None
    trained_tokens: int | None = None
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32), repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "lengths"}
        d["turns"] = {str(k): v for k, v in self.turns.items()}
        return d

    def summary(self) -> str:
        lines = [f"{self.path}: {self.records} records, {self.valid} usable, {self.invalid} invalid"
                 + (f" (kind: {self.kind})" if self.kind else "")]
        if self.percentiles:
            lines.append(f"length in {self.unit}: mean {self.mean:.0f}, "
                         + ", ".join(f"{k} {v}" for k, v in self.percentiles.items()))
        if self.max_length is not None:
            share = self.over_max_length / self.valid if self.valid else 0.0
            lines.append(f"longer than max_length {self.max_length}: {self.over_max_length} ({share:.1%})")
        if self.tokens:
            lines.append(f"trained tokens: {self.trained_tokens} of {self.tokens} "
                         f"({(self.trained_tokens or 0) / self.tokens:.1%}, as training with this template)")
        if self.turns:
            lines.append("messages per conversation: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.turns.items())))
        if self.tool_calls:
            lines.append("tool calls: " + ", ".join(f"{k} {v}" for k, v in self.tool_calls.items()))
        if self.labels:
            total = sum(self.labels.values())
            top = list(self.labels.items())[:20]
            lines.append("answers: " + ", ".join(f"{k!r} {v} ({v / total:.0%})" for k, v in top))
        if self.histogram:
            lines.append(f"histogram: {self.histogram}")
        return "\n".join(lines)


def compute_stats(path: str | Path, model: str | None = DEFAULT_MODEL, max_length: int | None = None,
                  config: CurationConfig | None = None, counter: LengthCounter | None = None,
                  chunk_size: int = 512, max_label_values: int = 20, template: str | None = None,
                  template_kwargs: dict[str, Any] | None = None) -> DatasetStats:
    """Statistics of the usable records of ``path`` (see the module docstring); ``template``: count with the chat
    template a run with ``template:`` would use (needs ``model``)."""
    config = (config or CurationConfig()).model_copy(update={"actions": {c: "off" for c in (
        "short_answer", "repeats_prompt", "refusal", "placeholder", "control_chars", "non_text", "pii")}})
    counter = counter or make_counter(model, config.chars_per_token, template, template_kwargs)
    stats = DatasetStats(path=str(path), unit=counter.unit, max_length=max_length)
    lengths, label_ids = array("I"), array("i")
    labels = AnswerLabels(max_label_values)
    turns: Counter = Counter()
    tool_calls: Counter = Counter()
    formats: Counter = Counter()
    for chunk in chunked(iter_records(path), chunk_size):
        checked = [check_record(r, config) for r in chunk]
        stats.records += len(chunk)
        usable = [c for c in checked if c.clean is not None and (stats.kind is None or c.kind == stats.kind)]
        for c in checked:
            formats["unparsable" if c.raw.data is None else (c.format or "unknown")] += 1
        if not usable:
            continue
        stats.kind = stats.kind or usable[0].kind
        usable = [c for c in usable if c.kind == stats.kind]
        lengths.extend(min(n, 2**32 - 1) for n in counter.count([c.clean for c in usable]))
        for c in usable:
            if "messages" in c.clean:
                turns[len(c.clean["messages"])] += 1
                tool_calls.update(call["function"]["name"] for m in c.clean["messages"]
                                  for call in m.get("tool_calls") or [])
            label_ids.append(labels.id(c.label) if c.kind == "chat" else -1)
        stats.valid += len(usable)
    stats.invalid = stats.records - stats.valid
    if isinstance(counter, TokenizerCounter) and counter.training:
        stats.tokens, stats.trained_tokens = counter.counted_tokens, counter.trained_tokens
    stats.formats = dict(formats)
    stats.turns = dict(sorted(turns.items()))
    stats.tool_calls = dict(sorted(tool_calls.items(), key=lambda kv: (-kv[1], kv[0])))
    lens = np.frombuffer(lengths, dtype=np.uint32).copy() if len(lengths) else np.zeros(0, np.uint32)
    stats.lengths = lens
    if len(lens):
        stats.mean = float(lens.mean())
        values = np.percentile(lens, PERCENTILES)
        stats.percentiles = {f"p{p}": int(v) for p, v in zip(PERCENTILES, values, strict=True)}
        stats.percentiles["max"] = int(lens.max())
        if max_length is not None:
            stats.over_max_length = int((lens > max_length).sum())
    if labels.active and len(labels.ids) >= 2 and stats.valid >= 2 * len(labels.ids):
        names = {i: k for k, i in labels.ids.items()}
        ids = np.frombuffer(label_ids, dtype=np.int32)
        counts = np.bincount(ids[ids >= 0], minlength=len(names))
        stats.labels = {names[i]: int(c) for i, c in sorted(enumerate(counts), key=lambda ic: -ic[1]) if c}
    return stats


def plot_histogram(stats: DatasetStats, path: str | Path, bins: int = 50) -> str:
    """Save a histogram of the token lengths (with percentile and max_length markers) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    if len(stats.lengths):
        ax.hist(stats.lengths, bins=bins, color="#4C72B0")
        for name in ("p50", "p95", "p99"):
            ax.axvline(stats.percentiles[name], color="gray", linestyle="--", linewidth=1)
            ax.text(stats.percentiles[name], ax.get_ylim()[1] * 0.95, f" {name}", color="gray", fontsize=8, va="top")
        if stats.max_length is not None:
            ax.axvline(stats.max_length, color="#C44E52", linewidth=1.5, label=f"max_length {stats.max_length}")
            ax.legend()
    ax.set_xlabel(f"length ({stats.unit})")
    ax.set_ylabel("records")
    ax.set_title(f"{Path(stats.path).name}: {stats.valid} records")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    stats.histogram = str(path)
    return str(path)

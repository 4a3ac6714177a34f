"""Split a data file into train and validation files, optionally stratified by a field.

Two streaming passes: the first counts records (and reads the stratification label of each), the
second writes every record, verbatim, to ``train.jsonl`` or ``val.jsonl``. Which records go to
validation is drawn with ``numpy.random.default_rng(seed)``: the same file and seed give the same split.

Stratified: each label value keeps its share in both files (``round(val * n_label)`` of its records go
to validation, at least one when the label has two or more records). The label is a top-level field
of the record, or ``answer`` for the final assistant answer of a chat record.

Records that cannot be parsed are written to ``rejects.jsonl`` with the reason: none is lost.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tuneforge.data import jsonio
from tuneforge.data.formats import CHAT_FORMATS, RecordError, detect_format, to_example
from tuneforge.data.loaders import error_check, iter_records
from tuneforge.data.rejects import Reject, reject_line
from tuneforge.data.sources import source_stem


@dataclass
class SplitResult:
    train: str
    val: str
    rejects: str | None
    n_train: int
    n_val: int
    n_rejected: int
    val_labels: dict[str, int] | None = None


def _label(record: dict[str, Any], field: str) -> str:
    if field == "answer" and "answer" not in record:
        fmt = detect_format(record)
        if fmt in CHAT_FORMATS:
            try:
                return to_example(record, fmt).messages[-1]["content"].strip()
            except RecordError:
                return "<invalid>"
    value = record.get(field)
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def choose_val(n: int, val: float, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask ``(n,)``: True for records that go to validation."""
    if not 0 <= val < 1:
        raise ValueError(f"val must be a fraction in [0, 1), got {val}")
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    if labels is None:
        k = int(round(val * n))
        mask[rng.permutation(n)[:k]] = True
        return mask
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        k = int(round(val * len(members)))
        if k == 0 and val > 0 and len(members) >= 2:
            k = 1
        mask[rng.permutation(members)[:k]] = True
    return mask


def split_file(path: str | Path, val: float = 0.1, seed: int = 0, stratify: str | None = None,
               out_dir: str | Path | None = None) -> SplitResult:
    """Write ``train.jsonl`` and ``val.jsonl`` (and ``rejects.jsonl`` if needed) to ``out_dir``.

    ``out_dir`` defaults to ``./<file stem>_split`` (never next to the input, which may be shared).
    """
    path = Path(path)
    stem = source_stem(path)
    out = Path(out_dir) if out_dir is not None else Path.cwd() / f"{stem}_split"
    label_ids, label_names, n, parsed = array("i"), {}, 0, array("b")
    for r in iter_records(path):
        n += 1
        parsed.append(r.data is not None)
        if stratify is not None:
            if r.data is None:
                label_ids.append(-1)
            else:
                label_ids.append(label_names.setdefault(_label(r.data, stratify), len(label_names)))
    labels = np.frombuffer(label_ids, dtype=np.int32) if stratify is not None else None
    ok = np.frombuffer(parsed, dtype=np.int8).astype(bool) if n else np.zeros(0, bool)
    is_val = np.zeros(n, dtype=bool)
    is_val[ok] = choose_val(int(ok.sum()), val, seed, labels[ok] if labels is not None else None)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0, "rejected": 0}
    rejects_path = out / "rejects.jsonl"
    rejects = None
    with open(out / "train.jsonl", "w", encoding="utf-8") as ft, open(out / "val.jsonl", "w", encoding="utf-8") as fv:
        for i, r in enumerate(iter_records(path)):
            if r.data is None:
                if rejects is None:
                    rejects = open(rejects_path, "w", encoding="utf-8")
                rejects.write(reject_line(Reject.of(r, [(error_check(r.error or ""), r.error or "unreadable")])))
                counts["rejected"] += 1
                continue
            target = "val" if is_val[i] else "train"
            (fv if target == "val" else ft).write(jsonio.dumps_record(r.data) + "\n")
            counts[target] += 1
    if rejects is not None:
        rejects.close()
    val_labels = None
    if labels is not None:
        names = {i: k for k, i in label_names.items()}
        ids, c = np.unique(labels[is_val & (labels >= 0)], return_counts=True)
        val_labels = {names[int(i)]: int(k) for i, k in zip(ids, c, strict=True)}
    return SplitResult(str(out / "train.jsonl"), str(out / "val.jsonl"), str(rejects_path) if rejects else None,
                       counts["train"], counts["val"], counts["rejected"], val_labels)

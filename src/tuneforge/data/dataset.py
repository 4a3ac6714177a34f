"""From the ``data:`` section of a run config to tokenized train and validation examples.

Records that cannot be used are never dropped silently: each goes to ``rejects`` with its file, line
and reason, and the trainer writes them to ``rejects.jsonl`` in the run directory.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tuneforge.config import DataConfig
from tuneforge.data.formats import Example, RecordError, detect_format, rename_columns, to_example
from tuneforge.data.loaders import iter_records
from tuneforge.data.rendering import TokenizedExample, tokenize_example

log = logging.getLogger(__name__)


class DataError(ValueError):
    pass


@dataclass
class Reject:
    source: str
    line: int
    reason: str
    record: object

    def to_json(self) -> str:
        return json.dumps({"file": self.source, "line": self.line, "reasons": [self.reason], "record": self.record},
                          ensure_ascii=False, default=str)


@dataclass
class LoadedFile:
    examples: list[Example] = field(default_factory=list)
    where: list[str] = field(default_factory=list)  # file:line of each example
    rejects: list[Reject] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)


def load_examples(path: str, cfg: DataConfig, task: str = "sft") -> LoadedFile:
    """Read ``path`` and normalise every record (format detected per record unless ``cfg.format`` is set)."""
    out = LoadedFile()
    for rec in iter_records(path):
        if rec.data is None:
            out.rejects.append(Reject(rec.source, rec.line, rec.error or "unreadable", rec.raw))
            continue
        data = rename_columns(rec.data, cfg.columns)
        fmt = "text" if task == "pretrain" else (cfg.format if cfg.format != "auto" else detect_format(data))
        if fmt is None:
            out.rejects.append(Reject(rec.source, rec.line,
                                      f"unknown format: fields {sorted(rec.data)[:8]} match none of messages, "
                                      "instruction/output, prompt/completion, text (map columns with data.columns)",
                                      rec.data))
            continue
        try:
            example = to_example(data, fmt, cfg.system_prompt)
        except RecordError as e:
            out.rejects.append(Reject(rec.source, rec.line, f"{fmt}: {e}", rec.data))
            continue
        example.meta["where"] = rec.where
        out.examples.append(example)
        out.formats[fmt] = out.formats.get(fmt, 0) + 1
    return out


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    rejects: list[Reject]
    formats: dict[str, int]
    truncated: int = 0

    @property
    def train_tokens(self) -> int:
        return sum(len(e) for e in self.train)

    def to_payload(self) -> dict:
        """Plain lists and dicts (what the token cache stores)."""
        return {"train": [(e.input_ids, e.trained) for e in self.train],
                "validation": [(e.input_ids, e.trained) for e in self.validation],
                "rejects": [{"source": r.source, "line": r.line, "reason": r.reason, "record": json.dumps(r.record, default=str)}
                            for r in self.rejects],
                "formats": self.formats, "truncated": self.truncated}

    @classmethod
    def from_payload(cls, payload: dict) -> "PreparedData":
        return cls([TokenizedExample(list(i), list(t)) for i, t in payload["train"]],
                   [TokenizedExample(list(i), list(t)) for i, t in payload["validation"]],
                   [Reject(r["source"], r["line"], r["reason"], json.loads(r["record"])) for r in payload["rejects"]],
                   dict(payload["formats"]), payload["truncated"])


def tokenize_examples(loaded: LoadedFile, tokenizer, cfg: DataConfig, rejects: list[Reject]) -> tuple[list[TokenizedExample], int]:
    """Tokenize ``loaded.examples``; unusable or over-long ones go to ``rejects``. Returns (examples, truncated count)."""
    out, truncated = [], 0
    for example in loaded.examples:
        source, _, line = example.meta["where"].rpartition(":")
        try:
            tok = tokenize_example(example, tokenizer, cfg.train_on)
        except RecordError as e:
            rejects.append(Reject(source, int(line), str(e), example.messages or example.text))
            continue
        if len(tok) > cfg.max_length:
            if cfg.too_long == "error":
                raise DataError(f"{example.meta['where']}: {len(tok)} tokens > data.max_length={cfg.max_length}; "
                                "raise max_length or set data.too_long to drop/truncate")
            if cfg.too_long == "drop":
                rejects.append(Reject(source, int(line), f"too long: {len(tok)} tokens > max_length {cfg.max_length}",
                                      example.messages or example.text))
                continue
            tok = TokenizedExample(tok.input_ids[: cfg.max_length], tok.trained[: cfg.max_length])
            truncated += 1
        if tok.num_trained == 0:
            rejects.append(Reject(source, int(line), "no trained tokens left (answer truncated away?)",
                                  example.messages or example.text))
            continue
        out.append(tok)
    return out, truncated


RENDER_VERSION = 1  # bump when rendering/tokenization changes, to invalidate cached tokenized data


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, task: str = "sft",
                 use_cache: bool = True) -> PreparedData:
    """Load, normalise, split and tokenize the data of a run; cached by content hash.

    The cache key holds the data files' SHA-256, the tokenizer's fingerprint (vocabulary, special tokens,
    chat template), every ``data:`` setting, the seed (which decides the split) and the task, so a second
    run on unchanged data and tokenizer does not tokenize again, and any change does.
    """
    from tuneforge.data.token_cache import cached_tokenize, file_sha256, tokenizer_fingerprint

    settings = cfg.model_dump(mode="json", exclude={"train", "validation"})
    key = {"render_version": RENDER_VERSION, "task": task, "seed": seed, "settings": settings,
           "train": file_sha256(cfg.train), "validation": file_sha256(cfg.validation) if cfg.validation else None,
           "tokenizer": tokenizer_fingerprint(tokenizer)}
    payload = cached_tokenize(key, lambda: _prepare(cfg, tokenizer, seed, task).to_payload(), enabled=use_cache)
    return PreparedData.from_payload(payload)


def _prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, task: str) -> PreparedData:
    train_file = load_examples(cfg.train, cfg, task)
    rejects = list(train_file.rejects)
    formats = dict(train_file.formats)
    if not train_file.examples:
        first = rejects[0] if rejects else None
        hint = f"; first problem: {first.source}:{first.line}: {first.reason}" if first else ""
        raise DataError(f"{cfg.train}: no usable training records ({len(rejects)} rejected){hint}")
    if cfg.validation:
        val_file = load_examples(cfg.validation, cfg, task)
        rejects += val_file.rejects
        train_examples, val_examples = train_file, val_file
    elif cfg.val_fraction > 0 and len(train_file.examples) >= 2:
        order = list(range(len(train_file.examples)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(order) * cfg.val_fraction))
        val_idx = set(order[:n_val])
        train_examples = LoadedFile([e for i, e in enumerate(train_file.examples) if i not in val_idx])
        val_examples = LoadedFile([e for i, e in enumerate(train_file.examples) if i in val_idx])
    else:
        train_examples, val_examples = train_file, LoadedFile()
    train, truncated = tokenize_examples(train_examples, tokenizer, cfg, rejects)
    validation, truncated_val = tokenize_examples(val_examples, tokenizer, cfg, rejects)
    if not train:
        raise DataError(f"{cfg.train}: every record was rejected after tokenization (see rejects.jsonl)")
    if rejects:
        log.warning("%d records rejected (first: %s:%d: %s); all are listed in rejects.jsonl",
                    len(rejects), rejects[0].source, rejects[0].line, rejects[0].reason)
    return PreparedData(train, validation, rejects, formats, truncated + truncated_val)


def write_rejects(rejects: list[Reject], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(r.to_json() + "\n")

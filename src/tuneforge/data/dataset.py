"""From the ``data:`` section of a run config to tokenized train and validation examples.

Records that cannot be used are never dropped silently: each goes to ``rejects`` with its file, line,
reasons (each named by a check of :data:`TRAINING_CHECKS`) and the record as read, and the trainer writes
them to ``rejects.jsonl`` in the run directory (schema: :mod:`tuneforge.data.rejects`).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from tuneforge.data.errors import DataError
from tuneforge.data.formats import (
    Example,
    task_kind,
)
from tuneforge.data.loaders import data_sha256, iter_records
from tuneforge.data.mixture import Mixture, MixtureSource, examples_per_epoch
from tuneforge.data.record_checks import (  # noqa: F401  (TRAINING_CHECKS: read from here too)
    TRAINING_CHECKS,
    data_tools,
    normalise_record,
    tokenize_record,
)
from tuneforge.data.rejects import (
    Reason,
    Reject,
    log_rejects,
    write_rejects,  # noqa: F401  (the trainer imports it from here)
)
from tuneforge.data.rendering import TokenizedExample
from tuneforge.data.settings import DataConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedFile:
    examples: list[Example] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)


def load_examples(path: str, cfg: DataConfig, task: str = "sft") -> LoadedFile:
    """Read ``path`` and normalise every record (format detected per record unless ``cfg.format`` is set).

    A record of another kind than the task trains (:func:`~tuneforge.data.formats.task_kind`: a text record in
    an SFT run, ...) is rejected as ``mixed_kinds``, as ``tuneforge data clean`` rejects it.
    Each example's ``meta`` holds ``where`` (``file:line``) and ``raw`` (the :class:`RawRecord`, for its reject).
    ``path`` may be any source of :mod:`tuneforge.data.sources` (a folder of shards, a ``save_to_disk`` folder, a Hub
    id): the same records, numbered by row where there are no lines.
    """
    out = LoadedFile()
    kind = task_kind(task, cfg.format)
    tools = data_tools(cfg)
    for rec in iter_records(path):
        got = normalise_record(rec, cfg, kind, tools)
        if isinstance(got, Reject):
            out.rejects.append(got)
            continue
        example, fmt = got
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
    mixture: Mixture | None = None      # data.train as a list of sources: where each source's examples are

    @property
    def train_tokens(self) -> int:
        return sum(len(e) for e in self.train)

    @property
    def epoch_length(self) -> int:
        """The training examples of one epoch: ``len(train)``, or a mixture's per-epoch draw."""
        return self.mixture.epoch_length if self.mixture is not None else len(self.train)

    def epoch_examples(self, seed: int, epoch: int) -> tuple[Sequence[TokenizedExample], list[int]]:
        """The examples epoch ``epoch`` draws from (the trainer shuffles them), and the index into ``train`` of each:
        ``train`` itself, or a mixture's draw (:meth:`~tuneforge.data.mixture.Mixture.epoch_indices`)."""
        if self.mixture is None:
            return self.train, list(range(len(self.train)))
        indices = self.mixture.epoch_indices(seed, epoch)
        return [self.train[i] for i in indices], indices

    def to_payload(self) -> dict:
        """Plain lists and dicts (what the token cache stores)."""
        return {"train": [(e.input_ids, e.trained) for e in self.train],
                "validation": [(e.input_ids, e.trained) for e in self.validation],
                "rejects": [{"source": r.source, "line": r.line, "reasons": [list(reason) for reason in r.reasons],
                             "record": json.dumps(r.record, default=str), "raw": r.raw} for r in self.rejects],
                "formats": self.formats, "truncated": self.truncated}

    @classmethod
    def from_payload(cls, payload: dict) -> "PreparedData":
        return cls([TokenizedExample(list(i), list(t)) for i, t in payload["train"]],
                   [TokenizedExample(list(i), list(t)) for i, t in payload["validation"]],
                   [Reject(r["source"], r["line"], [Reason(*reason) for reason in r["reasons"]],
                           json.loads(r["record"]), r["raw"]) for r in payload["rejects"]],
                   dict(payload["formats"]), payload["truncated"])


def tokenize_examples(loaded: LoadedFile, tokenizer, cfg: DataConfig, rejects: list[Reject],
                      ) -> tuple[list[TokenizedExample], int]:
    """Tokenize ``loaded.examples``; unusable or over-long ones go to ``rejects``.

    Returns (examples, truncated count)."""
    out, truncated = [], 0
    for example in loaded.examples:
        got = tokenize_record(example, tokenizer, cfg)
        if isinstance(got, Reject):
            rejects.append(got)
            continue
        tok, was_truncated = got
        truncated += was_truncated
        out.append(tok)
    return out, truncated


RENDER_VERSION = 5  # bump when rendering/tokenization or the cached payload changes, to invalidate cached data


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, task: str = "sft",
                 use_cache: bool = True) -> PreparedData:
    """Load, normalise, split and tokenize the data of a run; cached by content hash.

    The cache key holds the data files' SHA-256, the tokenizer's fingerprint (vocabulary, special tokens,
    chat template), every ``data:`` setting, the seed (which decides the split) and the task, so a second
    run on unchanged data and tokenizer does not tokenize again, and any change does. A list of sources in
    ``data.train`` is a mixture (:func:`tuneforge.data.mixture.prepare_mixture`: each source cached on its own).
    ``data.streaming``: a :class:`tuneforge.data.streaming.StreamingData` over a memory-mapped token store, filled
    in the background (:mod:`tuneforge.data.streaming`).
    """
    from tuneforge.data.token_cache import cached_tokenize, tokenizer_fingerprint
    from tuneforge.fileutil import file_sha256

    if cfg.sources is not None:
        return prepare_mixture(cfg, tokenizer, seed, task, use_cache)
    train = cfg.train_file()

    settings = cfg.model_dump(mode="json", exclude={"train", "validation", "tools", "streaming", "shuffle_block"})
    key = {"render_version": RENDER_VERSION, "task": task, "seed": seed, "settings": settings,
           "tools": file_sha256(cfg.tools) if cfg.tools else None,
           "train": data_sha256(train), "validation": data_sha256(cfg.validation) if cfg.validation else None,
           "tokenizer": tokenizer_fingerprint(tokenizer)}
    if cfg.streaming:
        from tuneforge.data.streaming import prepare_streaming

        # the store folder (<key>.store) is apart from the in-memory entry (<key>.pt) of the same key
        return prepare_streaming(cfg, tokenizer, seed, task, key, use_cache=use_cache)  # type: ignore[return-value]
    payload = cached_tokenize(key, lambda: _prepare(cfg, tokenizer, seed, task).to_payload(), enabled=use_cache)
    data = PreparedData.from_payload(payload)
    log_rejects(data.rejects, "records")
    return data


def prepare_mixture(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, task: str = "sft",
                    use_cache: bool = True) -> PreparedData:
    """Each source prepared as a one-file ``data.train`` (its own cache entry), joined one after another, with the
    :class:`Mixture` that says how an epoch draws from them."""
    sources = cfg.sources or []
    parts = []
    for s in sources:
        one = cfg.model_copy(update={"train": s.spec, "validation": s.validation,
                                     "format": s.format if s.format is not None else cfg.format,
                                     "columns": s.columns if s.columns is not None else cfg.columns})
        parts.append(prepare_data(one, tokenizer, seed, task, use_cache=use_cache))
    counts = examples_per_epoch(sources, [len(p.train) for p in parts])
    data = PreparedData([], [], [], {}, 0)
    mixture = Mixture()
    for s, part, count in zip(sources, parts, counts, strict=True):
        mixture.sources.append(MixtureSource(s.label, s.spec, s.weight, s.epochs, len(data.train), len(part.train),
                                            len(data.validation), len(part.validation), count, part.train_tokens))
        data.train += part.train
        data.validation += part.validation
        data.rejects += part.rejects
        data.truncated += part.truncated
        for fmt, n in part.formats.items():
            data.formats[fmt] = data.formats.get(fmt, 0) + n
    data.mixture = mixture
    return data


def _warn_if_formats_differ(cfg: DataConfig, train: dict[str, int], validation: dict[str, int]) -> None:
    """A validation file in other formats (other fields) than the training file is likely another task's."""
    if validation and set(validation) != set(train):
        log.warning("%s is %s but the validation file %s is %s: validation loss (and keep_best) may measure "
                    "another task; set data.validation to held-out records of your training data, or null to split "
                    "them off it", cfg.train, "/".join(sorted(train)), cfg.validation, "/".join(sorted(validation)))


def _prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, task: str) -> PreparedData:
    train_file = load_examples(cfg.train_file(), cfg, task)
    rejects = list(train_file.rejects)
    formats = dict(train_file.formats)
    if not train_file.examples:
        first = rejects[0] if rejects else None
        hint = f"; first problem: {first.source}:{first.line}: {first.reason}" if first else ""
        raise DataError(f"{cfg.train}: no usable training records ({len(rejects)} rejected){hint}")
    if cfg.validation:
        val_file = load_examples(cfg.validation, cfg, task)
        rejects += val_file.rejects
        _warn_if_formats_differ(cfg, train_file.formats, val_file.formats)
        train_examples, val_examples = train_file, val_file
    elif cfg.val_fraction > 0 and len(train_file.examples) >= 2:
        order = list(range(len(train_file.examples)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(order) * cfg.val_fraction))
        if cfg.val_max_examples is not None:
            n_val = min(n_val, cfg.val_max_examples)
        val_idx = set(order[:n_val])
        train_examples = LoadedFile([e for i, e in enumerate(train_file.examples) if i not in val_idx])
        val_examples = LoadedFile([e for i, e in enumerate(train_file.examples) if i in val_idx])
    else:
        train_examples, val_examples = train_file, LoadedFile()
    train, truncated = tokenize_examples(train_examples, tokenizer, cfg, rejects)
    validation, truncated_val = tokenize_examples(val_examples, tokenizer, cfg, rejects)
    if not train:
        raise DataError(f"{cfg.train}: every record was rejected after tokenization (see rejects.jsonl)")
    return PreparedData(train, validation, rejects, formats, truncated + truncated_val)

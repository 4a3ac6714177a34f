"""The ``data:`` section of the run config: which files, which format, which tokens are trained.

It lives with the data stage (the run config composes it, as it composes each method's section) so that
the data stage never imports the run config.

``data.train`` is one file, or a list of :class:`SourceConfig` (a mixture: :mod:`tuneforge.data.mixture`
says how the sources' weights and epochs make up an epoch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tuneforge.data.formats import SftFormat
from tuneforge.schema import Settings


class SourceConfig(Settings):
    """One source of a mixture (an item of ``data.train``)."""

    path: str = Field(description="the source's data file (.jsonl, .json, .csv, .parquet, also .gz), a folder of "
                      "them (every such file in it, by name; one format), a datasets save_to_disk folder, or a Hub "
                      "dataset id (hf://owner/name or owner/name)")
    split: str | None = Field(None, description="the split of a save_to_disk DatasetDict or a Hub dataset; default: "
                              "train")
    revision: str | None = Field(None, description="the revision (branch, tag or commit) of a Hub dataset; default: "
                                 "the latest")
    name: str | None = Field(None, description="the source's name in logs, metrics and run.json; default: the file "
                             "or folder name without its suffixes")
    weight: float | None = Field(None, description="the source's share of the examples of each epoch (see the "
                                 "data guide: how weights and epochs make up an epoch); not with epochs")
    epochs: float | None = Field(None, description="passes over the source in each epoch (fractions: a seeded "
                                 "subsample, another each epoch); not with weight. Neither set: epochs 1")
    validation: str | None = Field(None, description="held-out file of this source; default: split off it by "
                                   "data.val_fraction")
    format: Literal["auto"] | SftFormat | None = Field(None, description="the source's records' format; default: "
                                                       "data.format")
    columns: dict[str, str] | None = Field(None, description="the source's column names for the format's fields; "
                                           "default: data.columns")

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        from tuneforge.data.formats import check_columns

        return None if v is None else check_columns(v, "columns")

    @property
    def spec(self) -> str:
        """``path`` with ``split`` and ``revision`` as its query (:func:`tuneforge.data.sources.with_options`)."""
        from tuneforge.data.sources import with_options

        return with_options(self.path, self.split, self.revision)

    @property
    def label(self) -> str:
        """The source's name: ``name``, or the file or folder name up to its first dot."""
        return self.name or Path(self.path.partition("?")[0]).name.split(".")[0] or self.path


class DataConfig(Settings):
    train: str | list[SourceConfig] = Field(
        description="the training data: a file (.jsonl, .json (array), .csv or .parquet, also .gz), a folder of "
                    "such shards (one format), a datasets save_to_disk folder or a Hub dataset id (hf://owner/name; "
                    "options after ?: split=NAME, revision=REF); or a list of sources to mix, each {path, weight or "
                    "epochs, name, validation, format, columns, split, revision}")
    validation: str | None = Field(None, description="held-out data of the same task (any path data.train takes, "
                                   "e.g. hf://owner/name?split=test); default: split off train by val_fraction")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of the training file held out for validation "
                                "when data.validation is not set")
    val_max_examples: int | None = Field(200, ge=1, description="at most this many examples are held out by "
                                         "val_fraction (None: no cap)")
    format: Literal["auto"] | SftFormat = Field("auto", description="the records' format; auto: detected per "
                                                                   "record (messages, alpaca, prompt_completion, text)")
    columns: dict[str, str] = Field({}, description="your column names for the format's fields, e.g. "
                                                    "{prompt: question, completion: answer}")
    tools: str | None = Field(None, description="a JSON file holding one list of tool definitions (OpenAI function "
                              "schemas) for every record; a record's own tools replace it")
    tool_call_format: Literal["auto", "hermes", "mistral", "llama3_json", "granite"] = Field(
        "auto", description="the format the model writes tool calls in, which tuneforge eval parses (tuneforge serve "
        "detects it from the saved template or takes --tool-call-format): auto (detected from the chat template: "
        "<tool_call> hermes, [TOOL_CALLS] mistral, <|python_tag|> or a \"parameters\" instruction llama3_json, "
        "<|tool_call|> granite; a template that knows no tools gets the built-in hermes rendering), or one of them "
        "(anything but hermes needs a template that renders tools itself)")
    system_prompt: str | None = Field(None, description="a system message put first in every record that has none")
    train_on: Literal["assistant", "all"] = Field("assistant", description="the tokens trained: the assistant "
                                                  "turns (with their end-of-turn token), or every token")
    train_reasoning: bool = Field(True, description="train an answer's reasoning (reasoning_content, or a <think> "
                                  "block opening the content) where the template renders it; false: the reasoning "
                                  "is context and only the answer is trained")
    max_length: int = Field(1024, ge=8, description="tokens an example may have")
    too_long: Literal["drop", "truncate", "error"] = Field("drop", description="an example over max_length: "
                                                           "dropped (to rejects.jsonl), truncated, or an error")
    streaming: bool = Field(False, description="read and tokenize data.train lazily, in a background thread, into a "
                            "memory-mapped token store in the cache; training starts once the first examples are "
                            "tokenized and memory stays bounded (SFT and pretrain, one data.train; needs max_steps). "
                            "See the data guide: streaming")
    shuffle_block: int = Field(4096, ge=1, description="data.streaming: the examples shuffled together, in blocks of "
                               "this many in file order (the first epoch takes the blocks in order, later epochs in a "
                               "seeded order)")

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        from tuneforge.data.formats import check_columns

        return check_columns(v, "data.columns")

    @field_validator("train")
    @classmethod
    def _sources(cls, v: str | list[SourceConfig]) -> str | list[SourceConfig]:
        if isinstance(v, list):
            check_sources(v)
        return v

    @model_validator(mode="after")
    def _mixture(self) -> "DataConfig":
        if isinstance(self.train, list):
            if self.validation is not None:
                raise ValueError("data.validation: with a list of sources in data.train, give each source its own "
                                 "validation file (or leave it to data.val_fraction)")
            if self.streaming:
                raise ValueError("data.streaming reads one data.train (a file or a folder of shards), not a list of "
                                 "sources: set data.streaming: false for a mixture")
        return self

    @property
    def sources(self) -> list[SourceConfig] | None:
        """The mixture's sources; None for the one-file form."""
        return self.train if isinstance(self.train, list) else None

    def train_file(self, what: str = "this") -> str:
        """The one training file; a mixture is a ValueError naming ``what`` needs one file."""
        if isinstance(self.train, list):
            raise ValueError(f"{what} reads one training file: data.train is a list of sources")
        return self.train

    def train_paths(self) -> list[str]:
        """Every training path: the file, or each source's path."""
        return [s.spec for s in self.train] if isinstance(self.train, list) else [self.train]


def check_sources(sources: Sequence[SourceConfig]) -> None:
    """Refuse a mixture that cannot be drawn: one line (ValueError) naming the source and the key."""
    if not sources:
        raise ValueError("an empty list of sources: give a file, or at least one {path: FILE} (got [])")
    seen: dict[str, int] = {}
    for i, s in enumerate(sources, 1):
        where = f"source {i} ({s.label})"
        if s.weight is not None and s.epochs is not None:
            raise ValueError(f"{where}: give weight or epochs, not both (got weight {s.weight:g}, epochs "
                             f"{s.epochs:g})")
        if s.weight is not None and not (math.isfinite(s.weight) and s.weight >= 0):
            raise ValueError(f"{where}: weight must be a number >= 0 (got {s.weight:g})")
        if s.epochs is not None and not (math.isfinite(s.epochs) and s.epochs > 0):
            raise ValueError(f"{where}: epochs must be a number > 0 (got {s.epochs:g}); drop the source to leave it "
                             "out")
        if s.label in seen:
            raise ValueError(f"{where}: the name {s.label!r} is source {seen[s.label]}'s too: set name: on one of "
                             f"them (got two sources named {s.label!r})")
        seen[s.label] = i
    weighted = [s for s in sources if s.weight is not None]
    total = sum(s.weight for s in weighted if s.weight is not None)
    if weighted and total <= 0:
        names = ", ".join(s.label for s in weighted)
        raise ValueError(f"the weights of {names} sum to 0: give at least one a weight > 0 (got {total:g})")
    if weighted and len(weighted) < len(sources) and total >= 1:
        raise ValueError(f"beside sources with epochs, weights are shares of the whole epoch and must sum to less "
                         f"than 1 (got {total:g}): lower them, or give every source a weight")

"""What ``tuneforge data check/clean`` look for, and what they do with what they find.

Every check has a name (the key in reports, ``--reject``/``--warn``/``--off`` flags and YAML) and an
action: ``reject`` (the record goes to ``rejects.jsonl``), ``warn`` (counted and listed in the report,
the record is kept) or ``off``. Structural checks make a record unusable, so they always reject.

A YAML file holds the same keys as :class:`CurationConfig`, e.g.::

    max_length: 2048
    too_long: truncate
    near_dup_threshold: 0.85
    actions: {refusal: reject, pii: warn}
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tuneforge.data.formats import Format, check_columns
from tuneforge.data.tools import TOOL_CHECKS

Action = Literal["reject", "warn", "off"]


@dataclass(frozen=True)
class CheckInfo:
    name: str
    group: str          # structure | length | duplicates | quality | dataset
    default: str        # default action
    fixed: bool         # structural: always rejects
    description: str


CHECKS: dict[str, CheckInfo] = {c.name: c for c in [
    CheckInfo("not_json", "structure", "reject", True, "line is not valid JSON / CSV row is malformed"),
    CheckInfo("truncated_file", "structure", "reject", True,
              "the file's compressed stream breaks off (truncated / corrupt .gz): nothing after that point is read"),
    CheckInfo("invalid_utf8", "structure", "reject", True, "bytes that are not valid UTF-8 (or lone surrogates)"),
    CheckInfo("not_object", "structure", "reject", True, "record is not a JSON object"),
    CheckInfo("unknown_format", "structure", "reject", True, "record has the fields of no known format"),
    CheckInfo("missing_field", "structure", "reject", True, "a required field of the format is missing"),
    CheckInfo("wrong_type", "structure", "reject", True, "a field has the wrong type"),
    CheckInfo("unknown_role", "structure", "reject", True, "a message role other than system/user/assistant/tool"),
    CheckInfo("turn_order", "structure", "reject", True,
              "system not first, two turns of one role in a row, or no final assistant turn"),
    CheckInfo("empty_answer", "structure", "reject", True, "an assistant turn / completion / text is empty"),
    CheckInfo("mixed_kinds", "structure", "reject", True,
              "record is of another kind (chat / text / preference) than the rest of the data"),
    *(CheckInfo(name, "structure", "reject", True, description) for name, description in TOOL_CHECKS.items()),
    CheckInfo("empty_turn", "structure", "reject", False, "a user or system turn is empty"),
    CheckInfo("identical_pair", "structure", "reject", False, "preference pair with chosen == rejected"),
    CheckInfo("short_answer", "length", "warn", False, "answer shorter than min_answer_chars"),
    CheckInfo("too_long", "length", "reject", False, "longer than max_length tokens (see too_long)"),
    CheckInfo("exact_duplicate", "duplicates", "reject", False,
              "same text as an earlier record (case/space-insensitive)"),
    CheckInfo("near_duplicate", "duplicates", "reject", False,
              "MinHash similarity >= near_dup_threshold to an earlier record"),
    CheckInfo("leakage", "duplicates", "reject", False, "exact or near duplicate of a record in an --against file"),
    CheckInfo("conflicting_labels", "duplicates", "warn", False,
              "same prompt as another record (case, spaces, a final .?! ignored), another final answer; "
              "reject keeps the majority answer (a tie: the first in file order)"),
    CheckInfo("repeats_prompt", "quality", "warn", False, "the answer repeats or copies the prompt"),
    CheckInfo("refusal", "quality", "warn", False, "boilerplate refusal ('As an AI language model ...')"),
    CheckInfo("placeholder", "quality", "warn", False,
              "placeholder text (lorem ipsum, TODO, <placeholder>, [insert ...])"),
    CheckInfo("control_chars", "quality", "reject", False,
              "control characters or U+FFFD (binary garbage, text decoded with the wrong encoding)"),
    CheckInfo("non_text", "quality", "warn", False, "an answer of mostly non-letter content"),
    CheckInfo("pii", "quality", "warn", False,
              "emails, phone numbers, Luhn-valid card numbers (--mask-pii masks them)"),
]}

DATASET_CHECKS: dict[str, str] = {
    "few_examples": "fewer than min_examples clean records",
    "label_imbalance": "classification-like data whose most common answer is imbalance_ratio times the rarest",
    "long_tail": "the 99th length percentile is more than long_tail_ratio times the median",
}


class CurationConfigError(ValueError):
    """A curation setting that cannot be used; the message says what to write instead."""


class CurationConfig(BaseModel):
    """Settings of ``tuneforge data check/clean/stats`` (all optional)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    format: Literal["auto", Format] = "auto"
    columns: dict[str, str] = {}
    tools: str | None = Field(None, description="a JSON file of tool definitions for every record (as data.tools)")
    model: str | None = Field(None, description="tokenizer for exact token counts; None: estimate from characters")
    chars_per_token: float = Field(4.5, gt=0, description="character estimate of token counts when model is None")
    max_length: int | None = Field(2048, ge=8, description="tokens; None disables the too_long check")
    too_long: Literal["drop", "truncate", "keep"] = Field(
        "drop", description="drop: reject; truncate: shorten the last answer (never to nothing); keep: warn only")
    min_answer_chars: int = Field(2, ge=0)
    near_dup: bool = True
    near_dup_threshold: float = Field(0.8, gt=0, le=1)
    num_perm: int = Field(128, ge=16, le=512)
    shingle_words: int = Field(3, ge=1, le=10)
    template_share: float = Field(
        0.1, ge=0, le=1, description="word n-grams in at least this share of the records are template text (a shared "
        "system prompt, tool list, preamble) and do not make records near duplicates; 0 turns this off")
    short_text_words: int = Field(
        40, ge=0, description="records with fewer words than this (template text not counted) are compared on their "
        "word 1- to short_text_ngrams-grams, which see a word added to a short text; 0: shingle_words for every record")
    short_text_ngrams: int = Field(3, ge=1, le=5, description="short records: n-grams of 1 to this many words")
    template_sample: int = Field(5000, ge=100, description="records (the first ones) the template share is measured on")
    mask_pii: bool = False
    min_examples: int = Field(500, ge=0)
    imbalance_ratio: float = Field(10.0, gt=1)
    long_tail_ratio: float = Field(4.0, gt=1)
    max_label_values: int = Field(20, ge=2, description="at most this many distinct short answers: classification-like")
    actions: dict[str, Action] = {}
    max_examples: int = Field(10, ge=0, description="example records listed per check in the report")

    @field_validator("actions")
    @classmethod
    def _known_checks(cls, v: dict[str, str]) -> dict[str, str]:
        for name, action in v.items():
            if name not in CHECKS:
                close = difflib.get_close_matches(name, CHECKS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown check '{name}'{hint}; checks: {', '.join(CHECKS)}")
            if CHECKS[name].fixed and action != "reject":
                raise ValueError(f"check '{name}' is structural: such records cannot be used, so it always rejects")
        return v

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: dict[str, str]) -> dict[str, str]:
        return check_columns(v)

    def action(self, check: str) -> str:
        """The action for ``check``; ``too_long`` follows ``too_long`` unless set explicitly."""
        if check in self.actions:
            return self.actions[check]
        if check == "too_long":
            return "off" if self.max_length is None else ("warn" if self.too_long == "keep" else "reject")
        if check == "near_duplicate" and not self.near_dup:
            return "off"
        return CHECKS[check].default


def load_curation_config(path: str | Path | None = None, **overrides: Any) -> CurationConfig:
    """A :class:`CurationConfig` from a YAML file (optional) with ``overrides`` applied on top (None values ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise CurationConfigError(f"{path}: cannot read curation config: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise CurationConfigError(f"{path}: a curation config is a mapping of settings, "
                                      f"got {type(loaded).__name__}")
        data.update(loaded or {})
    actions = dict(data.get("actions") or {})
    actions.update(overrides.pop("actions", None) or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    if actions:
        data["actions"] = actions
    try:
        return CurationConfig(**data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(str(err["loc"][0]), CurationConfig.model_fields, n=1)
                msg = "unknown setting" + (f" (did you mean '{close[0]}'?)" if close else "")
            lines.append(f"{key}: {msg}")
        raise CurationConfigError("; ".join(lines)) from None

"""The run config's ``eval:`` section (``tuneforge eval`` reads it from the run; flags override it)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from tuneforge.schema import Settings

COLUMNS = ("base", "fewshot", "rag", "tuned", "tuned+rag")
BASE_COLUMNS = ("base", "fewshot", "rag")     # computed by the base model


def check_columns(columns: list[str]) -> list[str]:
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(unknown)}; choose from {', '.join(COLUMNS)}")
    return list(dict.fromkeys(columns))


class ForgettingSettings(Settings):
    """MMLU cloze and general-text perplexity, base vs tuned."""
    enabled: bool = False
    data: str | None = Field(None, description="MMLU folder (the original release's CSVs; holds test/)")
    split: str = "test"
    per_subject: int | None = Field(10, ge=1, description="questions a subject (fixed subset); null: all")
    max_drop: float = Field(0.02, ge=0, le=1, description="fail the check when tuned accuracy drops more")
    general_text: str | None = Field(None, description="text file (.txt, or .jsonl of text records) for the "
                                                       "perplexity check; default: the one shipped with tuneforge")


class JudgeSettings(Settings):
    """LLM-as-judge through any OpenAI-compatible endpoint (pairwise, both orders)."""
    url: str
    model: str = "judge"
    api_key: str = "none"
    against: str = Field("base", description="base (tuned vs the base column) or reference")
    max_examples: int = Field(50, ge=1)
    timeout_s: float = Field(60.0, gt=0)


class EvalSettings(Settings):
    """What ``tuneforge eval`` computes; see docs/guides/evaluation.md."""
    columns: list[str] = Field(["base", "tuned"], description="what is compared on the same prompts: base, fewshot, "
                                                              "rag, tuned, tuned+rag")
    data: str | None = Field(None, description="test file; default: data.validation")
    extra: dict[str, str] = Field({}, description="more held-out files, reported apart: {name: file}")
    docs: str | None = Field(None, description="folder of .md/.txt documents (or a .jsonl of title/text records) "
                                               "for the rag columns")
    fewshot_k: int = Field(3, ge=0, description="training examples put in the prompt by the fewshot column")
    rag_k: int = Field(2, ge=1, description="documents retrieved (BM25) into the prompt by the rag columns")
    max_examples: int | None = Field(None, ge=1, description="score at most this many examples of each test file "
                                                            "(null: all)")
    max_new_tokens: int | None = Field(None, ge=1, description="tokens generated per answer at most; default 64")
    batch_size: int = Field(16, ge=1, description="prompts generated together (length-sorted, left-padded)")
    labels: list[str] | None = Field(None, description="label set: an answer outside it counts as an invalid "
                                                       "format")
    json_schema: dict[str, Any] | str | None = Field(None, description="a JSON Schema (or its file) answers must meet")
    regex: str | None = Field(None, description="a regular expression the whole (stripped) answer must match")
    user_metric: str | None = Field(None, description="module:function(prediction, reference) -> float")
    samples: int = Field(0, ge=0, description="output variability: samples per prompt (0: off)")
    temperature: float = Field(0.7, gt=0, description="sampling temperature of the variability samples")
    variability_examples: int = Field(30, ge=1, description="prompts sampled for output variability")
    bootstrap_resamples: int = Field(1000, ge=100, description="resamples behind each 95% interval")
    viewer_examples: int = Field(80, ge=1, description="answers shown per column in the HTML report's viewer")
    seed: int = Field(0, description="seeds the bootstrap, the few-shot picks and sampling")
    forgetting: ForgettingSettings = ForgettingSettings()
    judge: JudgeSettings | None = None
    after_training: bool = Field(False, description="tuneforge train runs the evaluation at the end")

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, v: list[str]) -> list[str]:
        return check_columns(v)

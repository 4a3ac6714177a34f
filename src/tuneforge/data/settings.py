"""The ``data:`` section of the run config: which files, which format, which tokens are trained.

It lives with the data stage (the run config composes it, as it composes each method's section) so that
the data stage never imports the run config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tuneforge.data.formats import SftFormat
from tuneforge.schema import Settings


class DataConfig(Settings):
    train: str = Field(description="the training file: .jsonl, .json (array), .csv or .parquet (also .gz)")
    validation: str | None = Field(None, description="held-out file of the same task; default: split off train by "
                                                     "val_fraction")
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

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        from tuneforge.data.formats import check_columns

        return check_columns(v, "data.columns")

"""The per-record checks every training path runs: a record read from a file to an :class:`Example` (or the reject
that says why not), and an example to its tokens (or its reject). :func:`tuneforge.data.dataset.prepare_data` runs
them over a whole file in memory; :mod:`tuneforge.data.streaming` record by record in the background. Each reason is
named by a check of :data:`TRAINING_CHECKS`."""

from __future__ import annotations

from tuneforge.data.errors import DataError
from tuneforge.data.formats import (
    FORMAT_FIELDS,
    SFT_FORMATS,
    Example,
    RecordError,
    detect_format,
    kind_mismatch,
    rename_columns,
    to_example,
)
from tuneforge.data.loaders import RawRecord
from tuneforge.data.rejects import Reject
from tuneforge.data.rendering import TokenizedExample, tokenize_example
from tuneforge.data.settings import DataConfig
from tuneforge.data.tools import TOOL_CHECKS, load_tools_file

TRAINING_CHECKS: dict[str, str] = {     # the ``check`` of each reason a training record is rejected for
    "truncated_file": "the file's compressed stream breaks off (truncated / corrupt .gz): nothing after it is read",
    "not_json": "line is not valid JSON / CSV row is malformed",
    "invalid_utf8": "bytes that are not valid UTF-8",
    "not_object": "record is not a JSON object",
    "unknown_format": "record has the fields of no known format",
    "mixed_kinds": "record is of another kind (chat / text / preference) than the run's task trains",
    "missing_field": "a required field of the format is missing",
    "wrong_type": "a field has the wrong type",
    "unknown_role": "a message role other than system/user/assistant/tool",
    "turn_order": "no assistant turn, or the conversation does not end with one",
    "empty_answer": "an assistant turn / text is empty",
    "preference_pair": "a preference pair (chosen/rejected) in SFT data",
    **TOOL_CHECKS,
    "chat_template": "the chat template refuses the conversation, or drops or changes an assistant answer",
    "too_long": "longer than data.max_length tokens with data.too_long: drop",
    "no_trained_tokens": "no token left to train on (the answer was truncated away)",
}
_KNOWN_FIELDS = ", ".join("/".join(FORMAT_FIELDS[f]) for f in SFT_FORMATS)



def normalise_record(rec: RawRecord, cfg: DataConfig, kind: str, tools: list[dict] | None,
                     ) -> tuple[Example, str] | Reject:
    """One record read from a file as an :class:`Example` and its format, or the :class:`Reject` that says why it
    cannot be used (the per-record checks of :data:`TRAINING_CHECKS` before tokenization). ``kind``:
    :func:`~tuneforge.data.formats.task_kind` of the run; ``tools``: :func:`data_tools`."""
    if rec.data is None:
        return Reject.unreadable(rec)
    data = rename_columns(rec.data, cfg.columns)
    fmt = cfg.format if cfg.format != "auto" else detect_format(data)
    if fmt is None:
        return Reject.of(rec, [("unknown_format", f"fields {sorted(rec.data)[:8]} match none of "
                                f"{_KNOWN_FIELDS} (map columns with data.columns)")])
    if (mismatch := kind_mismatch(fmt, kind)) is not None:
        return Reject.of(rec, [("mixed_kinds", mismatch)])
    try:
        example = to_example(data, fmt, cfg.system_prompt, tools)
    except RecordError as e:
        return Reject.of(rec, [(e.check, f"{fmt}: {e}")])
    example.meta["where"] = rec.where
    example.meta["raw"] = rec
    return example, fmt


def data_tools(cfg: DataConfig) -> list[dict] | None:
    """The tools of ``data.tools`` (normalised), or None; a file that cannot be used is a ConfigError."""
    from tuneforge.errors import ConfigError

    if cfg.tools is None:
        return None
    try:
        return load_tools_file(cfg.tools)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def tokenize_record(example: Example, tokenizer, cfg: DataConfig) -> tuple[TokenizedExample, bool] | Reject:
    """``example`` tokenized and whether it was truncated to ``data.max_length``, or the :class:`Reject` of an
    example that cannot be rendered, is over-long (``too_long: drop``) or has no trained token left. An over-long
    example with ``too_long: error`` raises :class:`DataError`."""
    raw: RawRecord = example.meta["raw"]
    try:
        tok = tokenize_example(example, tokenizer, cfg.train_on, cfg.train_reasoning)
    except RecordError as e:
        return Reject.of(raw, [(e.check, str(e))])
    truncated = False
    if len(tok) > cfg.max_length:
        if cfg.too_long == "error":
            raise DataError(f"{example.meta['where']}: {len(tok)} tokens > data.max_length={cfg.max_length}; "
                            "raise max_length or set data.too_long to drop/truncate")
        if cfg.too_long == "drop":
            return Reject.of(raw, [("too_long", f"{len(tok)} tokens > max_length {cfg.max_length}")])
        tok = TokenizedExample(tok.input_ids[: cfg.max_length], tok.trained[: cfg.max_length])
        truncated = True
    if tok.num_trained == 0:
        return Reject.of(raw, [("no_trained_tokens", "no trained tokens left (answer truncated away?)")])
    return tok, truncated

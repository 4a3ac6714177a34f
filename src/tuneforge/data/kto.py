"""KTO data (``task: kto``): single completions labelled desirable or not (thumbs up / down), no pairs.

Accepted records (field names as in ``data.columns``; ``label`` is mapped like any other field):

* TRL's unpaired preference format: ``prompt`` (a string, an HH prompt, or chat messages) + ``completion`` (a
  string, one assistant message, or a one-message list) + ``label``;
* a chosen/rejected pair (any format ``task: preference`` reads): it becomes two examples, the chosen answer
  desirable and the rejected one not, as TRL's ``unpair_preference_dataset`` does.

``label``: ``true`` / ``false``, ``1`` / ``0``, or (any case) ``"desirable"`` / ``"undesirable"``, ``"up"`` /
``"down"``, ``"thumbs_up"`` / ``"thumbs_down"``, ``"good"`` / ``"bad"``, ``"yes"`` / ``"no"``, ``"true"`` /
``"false"``, ``"1"`` / ``"0"``, ``"👍"`` / ``"👎"``.

Each example is ``prompt + completion`` rendered as a preference side is (:func:`~tuneforge.data.preference.
tokenize_side`: only the completion and its end-of-turn token trained) and fitted to ``data.max_length``. It
records where its completion starts, so that a micro-batch can build KTO's mismatched sequences, prompt ``i``
with another example's completion, from tokens (as TRL does: :func:`mismatched_sequence`).

Records that cannot be trained go to rejects with one reason each: no ``label`` (``missing_field``), a label that
is none of the above (``wrong_type``), a record of another kind (``mixed_kinds``), and what a preference side is
rejected for (an empty answer, a prompt ending in an assistant turn, too long, ...). No usable record at all is a
:class:`DataError` naming the file and the first problem (the CLI exits with status 2, before a model loads).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from tuneforge.data.dataset import DataError, PreparedData
from tuneforge.data.formats import KINDS, RecordError, detect_format, normalise_messages, rename_columns
from tuneforge.data.loaders import RawRecord, iter_records
from tuneforge.data.preference import (
    cache_key,
    fit_to_length,
    prompt_messages,
    split_validation,
    to_preference,
    tokenize_each,
    tokenize_side,
)
from tuneforge.data.rejects import Reject, log_rejects
from tuneforge.data.rendering import TokenizedExample
from tuneforge.data.settings import DataConfig

log = logging.getLogger(__name__)

DESIRABLE = {"desirable", "true", "1", "yes", "good", "up", "thumbs_up", "thumbsup", "positive", "👍"}
UNDESIRABLE = {"undesirable", "false", "0", "no", "bad", "down", "thumbs_down", "thumbsdown", "negative", "👎"}
KTO_FORMATS = ("kto_unpaired", "kto_from_pair")


@dataclass
class KTOExample(TokenizedExample):
    """``prompt + completion`` (``input_ids[:prompt_len]`` then ``input_ids[prompt_len:]``), the completion's tokens
    trained; ``desirable`` its label. ``reference``: the reference model's log-probability of the completion,
    ``(logp,)`` (set on first use, as :attr:`tuneforge.data.preference.TokenizedPair.reference`)."""

    prompt_len: int = 0
    desirable: bool = True
    reference: tuple[float, ...] | None = None

    @property
    def prompt(self) -> TokenizedExample:
        return TokenizedExample(self.input_ids[:self.prompt_len], self.trained[:self.prompt_len])

    @property
    def completion(self) -> TokenizedExample:
        return TokenizedExample(self.input_ids[self.prompt_len:], self.trained[self.prompt_len:])


def mismatched_sequence(prompt_of: KTOExample, completion_of: KTOExample, max_length: int) -> TokenizedExample:
    """The prompt of one example followed by the completion of another (its tokens trained), cut to ``max_length``
    (the end goes, as TRL's ``keep_start``; a completion cut away entirely adds 0 to the KL estimate)."""
    prompt, completion = prompt_of.prompt, completion_of.completion
    ids, trained = prompt.input_ids + completion.input_ids, [False] * len(prompt) + completion.trained
    return TokenizedExample(ids[:max_length], trained[:max_length])


# ------------------------------------------------------------------------------------------ normalising


@dataclass
class KTORecord:
    """A normalised example: the conversation before the completion, the completion (an assistant turn), its
    label."""

    prompt: list[dict[str, str]]
    completion: dict[str, str]
    desirable: bool
    format: str
    meta: dict[str, Any] = field(default_factory=dict)


def parse_label(value: Any) -> bool:
    """``True`` for a desirable label, ``False`` for an undesirable one; :class:`RecordError` otherwise."""
    if value is None:
        raise RecordError("missing field 'label': KTO needs each completion marked desirable (true, 1, 'desirable', "
                          "'up') or undesirable (false, 0, 'undesirable', 'down')", "missing_field")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in DESIRABLE | UNDESIRABLE:
        return value.strip().lower() in DESIRABLE
    raise RecordError(f"field 'label' is {value!r}: write true/false, 1/0, 'desirable'/'undesirable' or 'up'/'down'",
                      "wrong_type")


def _completion_turn(completion: Any) -> dict[str, str]:
    if isinstance(completion, str):
        turn = {"role": "assistant", "content": completion}
    elif isinstance(completion, (dict, list)):
        messages = normalise_messages([completion] if isinstance(completion, dict) else completion)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise RecordError("field 'completion' must be one assistant message (or a string); put the conversation "
                              "before it in 'prompt'", "turn_order")
        turn = messages[0]
    else:
        raise RecordError(f"field 'completion' must be a string or an assistant message, got "
                          f"{type(completion).__name__}", "wrong_type")
    if not turn["content"].strip() and not turn.get("tool_calls"):
        raise RecordError("the 'completion' is empty", "empty_answer")
    return turn


def to_kto(record: dict[str, Any], system_prompt: str | None = None) -> list[KTORecord]:
    """Normalise one (column-renamed) record into its examples (two for a chosen/rejected pair); raise
    :class:`RecordError` naming what is wrong."""
    if "chosen" in record or "rejected" in record:
        pair = to_preference(record, system_prompt)
        return [KTORecord(pair.prompt, pair.chosen, True, "kto_from_pair"),
                KTORecord(pair.prompt, pair.rejected, False, "kto_from_pair")]
    desirable = parse_label(record.get("label"))
    for key in ("prompt", "completion"):
        if record.get(key) is None:
            raise RecordError(f"missing field '{key}'", "missing_field")
    messages = prompt_messages(record["prompt"])
    if messages[-1]["role"] == "assistant":
        raise RecordError("the prompt ends with an assistant turn: the completion must follow a user turn",
                          "turn_order")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return [KTORecord(messages, _completion_turn(record["completion"]), desirable, "kto_unpaired")]


def tokenize_kto(example: KTORecord, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> tuple[KTOExample, bool]:
    """``example`` tokenized and fitted to ``cfg.max_length``, and whether it was truncated; raises
    :class:`RecordError` for an unusable one."""
    tok = tokenize_side(example.prompt, example.completion, tokenizer, cfg.train_reasoning)
    if tok.num_trained == 0:
        raise RecordError("the completion has no tokens after the chat template", "empty_answer")
    tok, cut = fit_to_length(tok, "completion", cfg)
    start = tok.trained.index(True)
    return KTOExample(tok.input_ids, tok.trained, prompt_len=start, desirable=example.desirable), cut


# ------------------------------------------------------------------------------------------ files


def load_kto(path: str, cfg: DataConfig) -> tuple[list[tuple[KTORecord, RawRecord]], list[Reject], dict[str, int]]:
    """(examples with their records, rejects, formats) of ``path``; unusable records become rejects naming file,
    line and reason."""
    examples: list[tuple[KTORecord, RawRecord]] = []
    rejects: list[Reject] = []
    formats: dict[str, int] = {}
    for rec in iter_records(path):
        if rec.data is None:
            rejects.append(Reject.unreadable(rec))
            continue
        record = rename_columns(rec.data, cfg.columns)
        fmt = detect_format(record)
        if "label" not in record and fmt is not None and fmt not in ("prompt_completion", "preference"):
            rejects.append(Reject.of(rec, [("mixed_kinds", f"a {KINDS[fmt]} record ({fmt}) in KTO data: task kto "
                                            "reads prompt/completion/label records (or chosen/rejected pairs)")]))
            continue
        try:
            found = to_kto(record, cfg.system_prompt)
        except RecordError as e:
            rejects.append(Reject.of(rec, [(e.check, str(e))]))
            continue
        for example in found:
            example.meta["where"] = rec.where
            examples.append((example, rec))
            formats[example.format] = formats.get(example.format, 0) + 1
    return examples, rejects, formats


KTO_RENDER_VERSION = 1  # bump when rendering or the cached payload changes


def prepare_kto(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, use_cache: bool = True) -> PreparedData:
    """Train and validation examples of a KTO run (validation: ``cfg.validation``, or ``cfg.val_fraction`` split off
    with ``seed``, records before unpairing so both halves of a pair stay on one side), cached by content hash like
    SFT data. Raises :class:`DataError` when no record is usable."""
    from tuneforge.data.token_cache import cached_tokenize

    key = cache_key("kto", KTO_RENDER_VERSION, cfg, tokenizer, seed)
    payload = cached_tokenize(key, lambda: _payload(_prepare(cfg, tokenizer, seed)), enabled=use_cache)
    data = _from_payload(payload)
    log_rejects(data.rejects, "KTO records")
    _log_balance(data.train)
    return data


def _prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    train_examples, rejects, formats = load_kto(cfg.train_file(), cfg)
    val_examples = None
    if cfg.validation:
        val_examples, val_rejects, _ = load_kto(cfg.validation, cfg)
        rejects += val_rejects
    # split records, not examples: a pair's two halves share a line
    by_line: dict[tuple[str, int], list[tuple[KTORecord, RawRecord]]] = {}
    for item in train_examples:
        by_line.setdefault((item[1].source, item[1].line), []).append(item)
    given = [val_examples] if val_examples is not None else None
    train_groups, val_groups = split_validation(list(by_line.values()), given, cfg, seed)
    def tokenize(example: KTORecord) -> tuple[KTOExample, bool]:
        return tokenize_kto(example, tokenizer, cfg)

    train, truncated = tokenize_each([e for g in train_groups for e in g], tokenize, rejects)
    validation, truncated_val = tokenize_each([e for g in val_groups for e in g], tokenize, rejects)
    if not train:
        first = rejects[0] if rejects else None
        hint = f"; first problem: {first.source}:{first.line}: {first.reason}" if first else ""
        raise DataError(f"{cfg.train}: no usable KTO records (prompt, completion, label; {len(rejects)} rejected, all "
                        f"listed in rejects.jsonl){hint}")
    return PreparedData(list(train), list(validation), rejects, formats, truncated + truncated_val)


def _log_balance(train: list[Any]) -> None:
    """Warn when one label is missing, and give the KTO paper's range of weights (eq. 8) for unbalanced labels."""
    desirable = sum(1 for e in train if e.desirable)
    undesirable = len(train) - desirable
    if not desirable or not undesirable:
        log.warning("all %d KTO train examples are %s: the loss only %s completions", len(train),
                    "desirable" if desirable else "undesirable", "raises" if desirable else "lowers")
    elif desirable != undesirable:
        log.info("KTO labels: %d desirable, %d undesirable; the paper's advice: kto.desirable_weight x %d / "
                 "(kto.undesirable_weight x %d) between 1 and 4/3", desirable, undesirable, desirable, undesirable)


def _payload(data: PreparedData) -> dict:
    payload = data.to_payload()
    for part in ("train", "validation"):
        payload[f"{part}_kto"] = [(e.prompt_len, e.desirable) for e in getattr(data, part)]
    return payload


def _from_payload(payload: dict) -> PreparedData:
    data = PreparedData.from_payload(payload)
    for part in ("train", "validation"):
        examples = [KTOExample(e.input_ids, e.trained, prompt_len, desirable)
                    for e, (prompt_len, desirable) in zip(getattr(data, part), payload[f"{part}_kto"], strict=True)]
        setattr(data, part, examples)
    return data

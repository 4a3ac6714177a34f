"""Preference pairs: from ``prompt`` / ``chosen`` / ``rejected`` records to two tokenized sequences each.

Accepted records (field names as in ``data.columns``):

* ``prompt`` + ``chosen`` + ``rejected`` as strings: the prompt is one user turn, each answer one
  assistant turn; a ``prompt`` that is an HH dialogue (``"\\n\\nHuman: ...\\n\\nAssistant:"``) becomes its turns.
* ``chosen`` + ``rejected`` as whole Anthropic HH dialogues (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``, no
  ``prompt``): split at the **last** ``"\\n\\nAssistant:"`` of each; the two dialogues must agree on every
  turn before it. Never at a character-level common prefix ("It is blue" / "It is black" must not give
  the prompt "It is bl").
* message lists (UltraFeedback, TRL's conversational format): ``chosen`` / ``rejected`` are whole
  conversations ending in the assistant reply (they must share every turn but the last), or just the
  assistant reply with the conversation so far in ``prompt`` (a string or a message list).

Any of them may carry a numeric ``margin`` (how much better the chosen answer is), kept on the pair for the reward
model's loss (``task: reward``); the DPO family ignores it.

Each side is ``prompt + answer`` rendered with the model's chat template through SFT's path
(:func:`tuneforge.data.rendering.tokenize_example`: no added special tokens, so no doubled BOS; the
template's end-of-turn token closes the answer, EOS appended only when the template has none), and only
the final answer's tokens (with its end-of-turn token) are trained: earlier assistant turns of the prompt
are context. A pair is a :class:`TokenizedPair`: the chosen sequence then the rejected one, with where
one ends, which packing turns into two examples of one row (``training/objectives/preference.py``).

Pairs that cannot be trained go to rejects, each with one reason: a record of another kind (a chat or text
record: ``mixed_kinds``, as ``tuneforge data clean`` says), a missing field, chosen == rejected,
an empty answer, prompts that differ between the two sides, a ``margin`` that is not a number, a side over
``data.max_length`` (``drop``), or an answer truncated away (``truncate``). No usable pair at all is a
:class:`DataError`.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

from tuneforge.data.dataset import DataError, PreparedData
from tuneforge.data.formats import (
    TASK_KINDS,
    Example,
    RecordError,
    detect_format,
    kind_mismatch,
    normalise_messages,
    rename_columns,
)
from tuneforge.data.loaders import RawRecord, data_sha256, iter_records
from tuneforge.data.rejects import Reject, log_rejects
from tuneforge.data.rendering import TokenizedExample, tokenize_example
from tuneforge.data.settings import DataConfig

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
PREFERENCE_FORMATS = ("preference_text", "hh_dialogue", "preference_messages")


@dataclass
class PreferenceExample:
    """A normalised pair: the conversation before the answer, and the two answers (assistant turns)."""

    prompt: list[dict[str, str]]
    chosen: dict[str, str]
    rejected: dict[str, str]
    format: str
    meta: dict[str, Any] = field(default_factory=dict)
    margin: float | None = None


@dataclass
class TokenizedPair(TokenizedExample):
    """The chosen sequence followed by the rejected one (``input_ids[:split]`` and ``input_ids[split:]``), each
    ``prompt + answer`` on its own; ``trained`` marks each side's answer tokens. ``reference``: the reference
    model's log-probabilities of the two answers (set before training; None for reference-free losses).
    ``margin``: the record's ``margin`` (how much better the chosen answer is, which the reward model's loss
    subtracts), None when it has none."""

    split: int = 0
    reference: tuple[float, float] | None = None
    margin: float | None = None

    @classmethod
    def of(cls, chosen: TokenizedExample, rejected: TokenizedExample) -> TokenizedPair:
        return cls(chosen.input_ids + rejected.input_ids, chosen.trained + rejected.trained, len(chosen))

    @property
    def chosen(self) -> TokenizedExample:
        return TokenizedExample(self.input_ids[:self.split], self.trained[:self.split])

    @property
    def rejected(self) -> TokenizedExample:
        return TokenizedExample(self.input_ids[self.split:], self.trained[self.split:])


# ------------------------------------------------------------------------------------------ normalising


def hh_turns(text: str) -> list[dict[str, str]]:
    """An HH dialogue (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) as chat messages (user / assistant)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RecordError(f"text before the first '\\n\\nHuman:' turn: {parts[0].strip()[:40]!r}", "turn_order")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2], strict=True)]


def split_hh(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """(prompt messages, chosen answer, rejected answer) of two whole HH dialogues, split at the last
    ``"\\n\\nAssistant:"`` of each (never at their common character prefix)."""
    c_at, r_at = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if c_at < 0 or r_at < 0:
        side = "chosen" if c_at < 0 else "rejected"
        raise RecordError(f"'{side}' has no '\\n\\nAssistant:' turn", "turn_order")
    if chosen[:c_at] != rejected[:r_at]:
        raise RecordError("'chosen' and 'rejected' differ before their last '\\n\\nAssistant:' turn: not one prompt "
                          "with two answers", "prompt_mismatch")
    prompt = hh_turns(chosen[:c_at])
    if not prompt:
        raise RecordError("nothing before the last '\\n\\nAssistant:' turn: the pair has no prompt", "missing_field")
    return prompt, chosen[c_at + len(HH_ASSISTANT):].strip(), rejected[r_at + len(HH_ASSISTANT):].strip()


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """A record's ``prompt`` as chat messages: a message list, an HH dialogue, or one user turn (also KTO's)."""
    if isinstance(prompt, list):
        return normalise_messages(prompt)
    if not isinstance(prompt, str):
        raise RecordError(f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}",
                          "wrong_type")
    if prompt.startswith("\n\nHuman:"):                      # an HH prompt, e.g. "\n\nHuman: hi\n\nAssistant:"
        text = prompt.rstrip()
        return hh_turns(text[:-len(HH_ASSISTANT)] if text.endswith(HH_ASSISTANT) else text)
    if not prompt.strip():
        raise RecordError("field 'prompt' is empty", "empty_turn")
    return [{"role": "user", "content": prompt}]


def to_preference(record: dict[str, Any], system_prompt: str | None = None) -> PreferenceExample:
    """Normalise one (column-renamed) record; raise :class:`RecordError` naming what is wrong."""
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise RecordError(f"missing field '{key}'", "missing_field")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            if HH_ASSISTANT not in chosen:
                raise RecordError("no 'prompt' field, and 'chosen' is not an HH dialogue ('\\n\\nHuman: ...\\n\\n"
                                  "Assistant: ...'): add the prompt", "missing_field")
            messages, chosen_text, rejected_text = split_hh(chosen, rejected)
            fmt = "hh_dialogue"
        else:
            messages, chosen_text, rejected_text, fmt = prompt_messages(prompt), chosen, rejected, "preference_text"
        chosen_turn = {"role": "assistant", "content": chosen_text}
        rejected_turn = {"role": "assistant", "content": rejected_text}
    elif isinstance(chosen, list) and isinstance(rejected, list):
        c_msgs, r_msgs = normalise_messages(chosen), normalise_messages(rejected)
        for side, msgs in (("chosen", c_msgs), ("rejected", r_msgs)):
            if msgs[-1]["role"] != "assistant":
                raise RecordError(f"'{side}' must end with the assistant's answer", "turn_order")
        if all(m["role"] == "assistant" for m in c_msgs + r_msgs) and len(c_msgs) == len(r_msgs) == 1:
            if prompt is None:
                raise RecordError("'chosen' and 'rejected' hold only the answers: add the conversation before "
                                  "them as 'prompt'", "missing_field")
            messages = prompt_messages(prompt)
        else:
            if c_msgs[:-1] != r_msgs[:-1]:
                raise RecordError("'chosen' and 'rejected' differ before their last turn: not one prompt with two "
                                  "answers", "prompt_mismatch")
            messages = c_msgs[:-1]
            if prompt is not None and not messages:
                messages = prompt_messages(prompt)
        chosen_turn, rejected_turn, fmt = c_msgs[-1], r_msgs[-1], "preference_messages"
    else:
        raise RecordError("'chosen' and 'rejected' must both be strings or both be message lists, got "
                          f"{type(chosen).__name__} and {type(rejected).__name__}", "wrong_type")
    if not messages:
        raise RecordError("the pair has no prompt", "missing_field")
    if messages[-1]["role"] == "assistant":
        raise RecordError("the prompt ends with an assistant turn: the answer must follow a user turn", "turn_order")
    for side, turn in (("chosen", chosen_turn), ("rejected", rejected_turn)):
        if not turn["content"].strip():
            raise RecordError(f"the '{side}' answer is empty", "empty_answer")
    if chosen_turn["content"] == rejected_turn["content"]:
        raise RecordError("'chosen' and 'rejected' answers are identical: the pair teaches nothing", "identical_pair")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return PreferenceExample(messages, chosen_turn, rejected_turn, fmt, margin=_margin(record.get("margin")))


def _margin(value: Any) -> float | None:
    """A record's optional ``margin``: a finite number (task: reward subtracts it from the reward difference)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(f"field 'margin' must be a finite number, got {value!r}", "wrong_type")
    return float(value)


# ------------------------------------------------------------------------------------------ tokenizing


def last_answer_only(tok: TokenizedExample) -> TokenizedExample:
    """Keep only the last run of trained tokens (the final answer and its end-of-turn token): SFT's rendering
    trains every assistant turn, a preference pair compares the final answers only."""
    trained = list(tok.trained)
    last = max((j for j, t in enumerate(trained) if t), default=-1)
    start = last
    while start > 0 and trained[start - 1]:
        start -= 1
    return TokenizedExample(tok.input_ids, [start <= j <= last for j in range(len(trained))])


def tokenize_side(prompt: list[dict[str, str]], answer: dict[str, str],
                  tokenizer: PreTrainedTokenizerBase, train_reasoning: bool = True) -> TokenizedExample:
    """``prompt + answer`` through SFT's rendering, only the answer trained."""
    return last_answer_only(tokenize_example(Example(messages=prompt + [answer]), tokenizer, "assistant",
                                             train_reasoning))


def fit_to_length(tok: TokenizedExample, side: str, cfg: DataConfig) -> tuple[TokenizedExample, bool]:
    """``tok`` within ``cfg.max_length`` (``data.too_long``), and whether it was truncated."""
    if len(tok) <= cfg.max_length:
        return tok, False
    if cfg.too_long == "drop":
        raise RecordError(f"the {side} side is {len(tok)} tokens > data.max_length {cfg.max_length}", "too_long")
    if cfg.too_long == "error":
        raise DataError(f"the {side} side is {len(tok)} tokens > data.max_length={cfg.max_length}; raise max_length "
                        "or set data.too_long to drop/truncate")
    cut = TokenizedExample(tok.input_ids[:cfg.max_length], tok.trained[:cfg.max_length])
    if cut.num_trained == 0:
        raise RecordError(f"the {side} answer is truncated away by data.max_length {cfg.max_length} (the prompt alone "
                          f"is {len(tok) - tok.num_trained} tokens)", "no_trained_tokens")
    return cut, True


def tokenize_pair(example: PreferenceExample, tokenizer: PreTrainedTokenizerBase,
                  cfg: DataConfig) -> tuple[TokenizedPair, bool]:
    """Both sides of ``example``, each fitted to ``cfg.max_length``, and whether one was truncated; raises
    :class:`RecordError` for an unusable pair."""
    sides, truncated = [], False
    for side, answer in (("chosen", example.chosen), ("rejected", example.rejected)):
        tok = tokenize_side(example.prompt, answer, tokenizer, cfg.train_reasoning)
        if tok.num_trained == 0:
            raise RecordError(f"the {side} answer has no tokens after the chat template", "empty_answer")
        tok, cut = fit_to_length(tok, side, cfg)
        sides.append(tok)
        truncated = truncated or cut
    pair = TokenizedPair.of(*sides)
    pair.margin = example.margin
    return pair, truncated


# ------------------------------------------------------------------------------------------ files


@dataclass
class LoadedPairs:
    examples: list[tuple[PreferenceExample, RawRecord]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)


def _other_kind(record: dict[str, Any]) -> str | None:
    """The ``mixed_kinds`` message for a record that is no pair at all (neither ``chosen`` nor ``rejected``) but of
    another format (chat, text), as ``tuneforge data clean`` gives it; None otherwise."""
    fmt = None if "chosen" in record or "rejected" in record else detect_format(record)
    return None if fmt is None else kind_mismatch(fmt, TASK_KINDS["preference"])


def load_pairs(path: str, cfg: DataConfig) -> LoadedPairs:
    """Read and normalise every record of ``path``; unusable ones become rejects naming file, line and reason."""
    out = LoadedPairs()
    for rec in iter_records(path):
        if rec.data is None:
            out.rejects.append(Reject.unreadable(rec))
            continue
        record = rename_columns(rec.data, cfg.columns)
        if (mismatch := _other_kind(record)) is not None:
            out.rejects.append(Reject.of(rec, [("mixed_kinds", mismatch)]))
            continue
        try:
            example = to_preference(record, cfg.system_prompt)
        except RecordError as e:
            out.rejects.append(Reject.of(rec, [(e.check, str(e))]))
            continue
        example.meta["where"] = rec.where
        out.examples.append((example, rec))
        out.formats[example.format] = out.formats.get(example.format, 0) + 1
    return out


T = TypeVar("T")
E = TypeVar("E")


def tokenize_each(loaded: list[tuple[E, RawRecord]], tokenize: Callable[[E], tuple[T, bool]],
                  rejects: list[Reject]) -> tuple[list[T], int]:
    """``tokenize`` each loaded record: (the tokenized ones, how many were truncated); a record it cannot tokenize
    (a :class:`RecordError`) goes to ``rejects`` with the reason."""
    out, truncated = [], 0
    for example, raw in loaded:
        try:
            tokenized, cut = tokenize(example)
        except RecordError as e:
            rejects.append(Reject.of(raw, [(e.check, str(e))]))
            continue
        truncated += cut
        out.append(tokenized)
    return out, truncated


def tokenize_pairs(loaded: list[tuple[PreferenceExample, RawRecord]], tokenizer: PreTrainedTokenizerBase,
                   cfg: DataConfig, rejects: list[Reject]) -> tuple[list[TokenizedPair], int]:
    """(pairs, how many were truncated); unusable pairs go to ``rejects``."""
    return tokenize_each(loaded, lambda example: tokenize_pair(example, tokenizer, cfg), rejects)


def split_validation(train: list[T], validation: list[T] | None, cfg: DataConfig, seed: int) -> tuple[list[T], list[T]]:
    """(train, validation) records of a run: ``validation`` (from ``cfg.validation``) when given, else
    ``cfg.val_fraction`` of ``train`` held out with ``seed`` (at most ``cfg.val_max_examples``, as SFT's split)."""
    if validation is not None:
        return train, validation
    if cfg.val_fraction <= 0 or len(train) < 2:
        return train, []
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * cfg.val_fraction))
    cap = getattr(cfg, "val_max_examples", None)
    held_out = set(order[:n_val if cap is None else min(n_val, cap)])
    return ([e for i, e in enumerate(train) if i not in held_out], [e for i, e in enumerate(train) if i in held_out])


PREFERENCE_RENDER_VERSION = 4  # bump when rendering or the cached payload changes


def cache_key(task: str, version: int, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> dict:
    """The token-cache key of a single-file data set of ``task`` (preference pairs, KTO examples): its rendering
    ``version``, the data settings, the files' content hashes, the tokenizer and the seed of the split."""
    from tuneforge.data.token_cache import tokenizer_fingerprint

    return {"render_version": version, "task": task, "seed": seed,
            "settings": cfg.model_dump(mode="json", exclude={"train", "validation"}),
            "train": data_sha256(cfg.train_file()),
            "validation": data_sha256(cfg.validation) if cfg.validation else None,
            "tokenizer": tokenizer_fingerprint(tokenizer)}


def prepare_pairs(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                  use_cache: bool = True) -> PreparedData:
    """Train and validation pairs of a run (validation: ``cfg.validation``, or ``cfg.val_fraction`` split off with
    ``seed``), cached by content hash like SFT data. Raises :class:`DataError` when no pair is usable."""
    from tuneforge.data.token_cache import cached_tokenize

    key = cache_key("preference", PREFERENCE_RENDER_VERSION, cfg, tokenizer, seed)
    payload = cached_tokenize(key, lambda: _payload(_prepare(cfg, tokenizer, seed)), enabled=use_cache)
    data = _from_payload(payload)
    log_rejects(data.rejects, "preference records")
    return data


def _prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    train_file = load_pairs(cfg.train_file(), cfg)
    rejects = list(train_file.rejects)
    val_file = load_pairs(cfg.validation, cfg) if cfg.validation else None
    rejects += val_file.rejects if val_file else []
    train_examples, val_examples = split_validation(train_file.examples, val_file.examples if val_file else None,
                                                    cfg, seed)
    train, truncated = tokenize_pairs(train_examples, tokenizer, cfg, rejects)
    validation, truncated_val = tokenize_pairs(val_examples, tokenizer, cfg, rejects)
    if not train:
        first = rejects[0] if rejects else None
        hint = f"; first problem: {first.source}:{first.line}: {first.reason}" if first else ""
        raise DataError(f"{cfg.train}: no usable preference pairs ({len(rejects)} rejected, all listed in "
                        f"rejects.jsonl){hint}")
    return PreparedData(list(train), list(validation), rejects, train_file.formats, truncated + truncated_val)


def _payload(data: PreparedData) -> dict:
    payload = data.to_payload()
    for part in ("train", "validation"):
        payload[f"{part}_split"] = [p.split for p in getattr(data, part) if isinstance(p, TokenizedPair)]
        payload[f"{part}_margin"] = [p.margin for p in getattr(data, part) if isinstance(p, TokenizedPair)]
    return payload


def _from_payload(payload: dict) -> PreparedData:
    data = PreparedData.from_payload(payload)
    for part in ("train", "validation"):
        pairs = [TokenizedPair(e.input_ids, e.trained, split, margin=margin)
                 for e, split, margin in zip(getattr(data, part), payload[f"{part}_split"], payload[f"{part}_margin"],
                                             strict=True)]
        setattr(data, part, pairs)
    return data


def is_preference_file(path: str, columns: dict[str, str] | None = None) -> bool:
    """Whether the first readable record of ``path`` is a chosen/rejected pair."""
    for rec in iter_records(path):
        if rec.data is not None:
            data = rename_columns(rec.data, columns)
            return "chosen" in data and "rejected" in data
    return False

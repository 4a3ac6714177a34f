"""GRPO prompts (``task: grpo``): records with a prompt and the fields the reward functions read.

Accepted records (field names as in ``data.columns``):

* ``prompt``: a string, an HH prompt, or chat messages ending with a user turn;
* ``messages``: a conversation; when it ends with an assistant turn, that turn is taken off the prompt and its text
  becomes the record's ``answer`` (unless the record has one), the reference the match rewards compare with, and
  its ``tool_calls`` the record's ``tool_calls`` (unless it has them), the reference of the ``tool_call`` reward.

A record's ``tools`` (OpenAI tool definitions) are rendered into its prompt as training renders them.

Every other field of the record (``answer``, ``label``, a schema, ...) is kept and handed to the reward functions
(:mod:`tuneforge.training.grpo_rewards`). A record without a field a reward needs goes to rejects
(``missing_field``, naming the reward); so do records whose prompt is too long to leave room for a completion
(``data.max_length`` minus ``grpo.max_completion_length``), and those that cannot be read. No usable record is a
:class:`DataError` naming the file and the first problem (the CLI exits with status 2, before a model loads).

A prompt is tokenized as generation sees it (:func:`tuneforge.data.rendering.prompt_ids`: the chat template with
its generation prompt); no token of it is trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from tuneforge.data.dataset import DataError, PreparedData
from tuneforge.data.formats import RecordError, normalise_messages, rename_columns
from tuneforge.data.loaders import iter_records
from tuneforge.data.preference import prompt_messages, split_validation
from tuneforge.data.rejects import Reject, log_rejects
from tuneforge.data.rendering import TokenizedExample, prompt_ids
from tuneforge.data.settings import DataConfig

PROMPT_KEYS = ("prompt", "messages")


@dataclass
class GRPOPrompt(TokenizedExample):
    """A prompt's tokens (``input_ids``, none trained), its ``messages`` and the record's other ``fields``; ``where``
    is ``file:line``."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def to_prompt(record: dict[str, Any], system_prompt: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(prompt messages, other fields) of one (column-renamed) record; :class:`RecordError` naming what is wrong."""
    fields = {k: v for k, v in record.items() if k not in PROMPT_KEYS}
    if record.get("prompt") is not None:
        messages = prompt_messages(record["prompt"])
    elif record.get("messages") is not None:
        messages = normalise_messages(record["messages"])
        if messages and messages[-1]["role"] == "assistant":
            fields.setdefault("answer", messages[-1]["content"])
            if messages[-1].get("tool_calls"):
                fields.setdefault("tool_calls", messages[-1]["tool_calls"])
            messages = messages[:-1]
    else:
        raise RecordError("missing field 'prompt' (or 'messages'): GRPO samples completions for a prompt",
                          "missing_field")
    if not messages or messages[-1]["role"] == "assistant":
        raise RecordError("the prompt must end with a user turn", "turn_order")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages, fields


def load_prompts(path: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, needs: Mapping[str, Sequence[str]],
                 max_prompt: int) -> tuple[list[GRPOPrompt], list[Reject]]:
    """(prompts, rejects) of ``path``. ``needs``: reward name -> the record fields it reads; ``max_prompt``: the
    longest prompt in tokens."""
    out: list[GRPOPrompt] = []
    rejects: list[Reject] = []
    for rec in iter_records(path):
        if rec.data is None:
            rejects.append(Reject.unreadable(rec))
            continue
        record = rename_columns(rec.data, cfg.columns)
        try:
            messages, fields = to_prompt(record, cfg.system_prompt)
            missing = [(name, key) for name, keys in needs.items() for key in keys if fields.get(key) is None]
            if missing:
                name, key = missing[0]
                raise RecordError(f"missing field '{key}', which reward {name} reads", "missing_field")
            tools = fields.get("tools")
            ids = prompt_ids(tokenizer, messages, tools=tools if isinstance(tools, list) and tools else None)
            if len(ids) > max_prompt:
                raise RecordError(f"the prompt has {len(ids)} tokens; at most {max_prompt} leave room for "
                                  "grpo.max_completion_length within data.max_length", "too_long")
        except RecordError as e:
            rejects.append(Reject.of(rec, [(e.check, str(e))]))
            continue
        out.append(GRPOPrompt(ids, [False] * len(ids), messages, fields, rec.where))
    return out, rejects


def prepare_prompts(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, needs: Mapping[str, Sequence[str]],
                    max_completion_length: int) -> PreparedData:
    """Train and validation prompts (validation: ``cfg.validation``, or ``cfg.val_fraction`` split off with
    ``seed``). Raises :class:`DataError` when no record is usable, naming the first problem."""
    max_prompt = cfg.max_length - max_completion_length
    if max_prompt < 1:
        raise DataError(f"data.max_length {cfg.max_length} leaves no room for a prompt beside "
                        f"grpo.max_completion_length {max_completion_length}: raise data.max_length")
    train, rejects = load_prompts(cfg.train, cfg, tokenizer, needs, max_prompt)
    validation = None
    if cfg.validation:
        validation, more = load_prompts(cfg.validation, cfg, tokenizer, needs, max_prompt)
        rejects += more
    train, validation_list = split_validation(train, validation, cfg, seed)
    if not train:
        first = rejects[0] if rejects else None
        hint = f"; first problem: {first.source}:{first.line}: {first.reason}" if first else ""
        raise DataError(f"{cfg.train}: no usable GRPO prompt records ({len(rejects)} rejected, all listed in "
                        f"rejects.jsonl){hint}")
    log_rejects(rejects, "GRPO prompt records")
    return PreparedData(list(train), list(validation_list), rejects, {"grpo_prompt": len(train)}, 0)

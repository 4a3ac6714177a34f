"""GRPO's rollouts: ``G`` completions sampled per prompt with the current policy, scored, packed for training.

:func:`sample` draws the completions with the project's batched, KV-cached generation path
(:func:`tuneforge.methods.method_generate`, left-padded, as :mod:`tuneforge.evaluation.generation`), through the
method's merged weight copies where it has them (``grpo.merged_sampling``: LoRA's one matmul per linear), in eval mode
and without grad (the training mode is restored after), with its own seeded RNG (the global streams, e.g. dropout's,
are left as they were): the same seed and weights give the same completions, which is what makes a resumed run
sample what the uninterrupted one did. A completion is its tokens up to and including the first end-of-turn token
(EOS or the template's end of turn), or ``max_new_tokens`` tokens when it did not stop (truncated); its text is
decoded without special tokens, except the run's tool-call markers (``keep``: e.g. Mistral's ``[TOOL_CALLS]``, so the
``tool_call`` reward reads calls as serving does).

:func:`completion_logps` gives the per-token log-probabilities of the completions of a packed row of
prompt + completion sequences (or of prompts each followed by their completions:
:func:`tuneforge.data.packing.pack_shared_prompts`) as ``[n, T]`` (``T`` the longest completion, 0 beyond each),
from the logits divided by the sampling temperature (as TRL).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from tuneforge.data.packing import PackedBatch
from tuneforge.data.templates import end_of_turn_ids
from tuneforge.methods import method_generate
from tuneforge.methods.dispatch import method_forward
from tuneforge.methods.registry import Generates, get_method

if TYPE_CHECKING:
    from tuneforge.config import RunConfig


@dataclass
class Samples:
    """``n`` completions: their token ids (end-of-turn token included where they stopped), texts (decoded without
    it) and whether each stopped before the limit."""

    ids: list[list[int]]
    texts: list[str]
    stopped: list[bool]


def end_ids(tokenizer: Any) -> set[int]:
    """The tokens that end a completion: EOS and the chat template's end-of-turn tokens, and ``<|im_end|>`` (as
    :mod:`tuneforge.evaluation.generation`, which a training module does not import)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    return {i for i in (*end_of_turn_ids(tokenizer), im_end) if i is not None}


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """A block whose torch RNG (CPU, and the device's) is seeded with ``seed``; the streams are restored after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], config: RunConfig, seed: int,
           greedy: bool = False, keep: frozenset[int] = frozenset()) -> Samples:
    """One completion of each of ``prompts`` (token ids; repeat a prompt for several), sampled with
    ``config.grpo``'s temperature and top_p (``greedy``: the most likely tokens), all in one left-padded batch;
    ``keep``: special token ids kept in the texts (the tool-call markers)."""
    grpo = config.grpo
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ends = end_ids(tokenizer)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling: dict[str, Any] = ({"do_sample": False} if greedy else
                                {"do_sample": True, "temperature": grpo.temperature, "top_p": grpo.top_p, "top_k": 0})
    was_training = model.training
    model.eval()
    try:
        with seeded(seed, device), merged_sampling(model, config):
            out = method_generate(cast(Generates, model), config, input_ids=input_ids, attention_mask=attention,
                                  max_new_tokens=grpo.max_completion_length, eos_token_id=sorted(ends),
                                  pad_token_id=pad, use_cache=True, **sampling)
    finally:
        model.train(was_training)
    ids, texts, stopped = [], [], []
    for row in out[:, width:].tolist():
        end = next((j for j, t in enumerate(row) if t in ends), None)
        kept = row if end is None else row[:end + 1]
        ids.append(kept)
        texts.append(decode(tokenizer, kept if end is None else kept[:-1], keep))
        stopped.append(end is not None)
    return Samples(ids, texts, stopped)


def merged_sampling(model: torch.nn.Module, config: RunConfig) -> contextlib.AbstractContextManager[bool]:
    """The method's merged weight copies for sampling (``Method.merged_sampling``, e.g. LoRA's
    :func:`tuneforge.methods.lora.sampling.merged_copies`) when ``grpo.merged_sampling`` is on; else nothing."""
    hook = get_method(config.method).merged_sampling
    if not config.grpo.merged_sampling or hook is None:
        return contextlib.nullcontext(False)
    return hook(model)


def decode(tokenizer: Any, ids: list[int], keep: frozenset[int] = frozenset()) -> str:
    """``ids`` as stripped text without special tokens, except those in ``keep``."""
    if not keep:
        return str(tokenizer.decode(ids, skip_special_tokens=True)).strip()
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return str(tokenizer.decode([i for i in ids if i in keep or i not in special], skip_special_tokens=False)).strip()


def completion_logps(model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> torch.Tensor:
    """fp32 ``[n, T]``: the log-probability of each completion token of the ``n`` sequences of ``batch`` (their
    trained tokens), left-aligned, 0 beyond each completion. With grad where the caller has it."""
    assert batch.loss_example is not None
    logits = method_forward(model, config, batch.input_ids, batch.position_ids, batch.loss_positions,
                            lengths=batch.lengths or None, cu_seqlens=batch.cu_seqlens, tree=batch.tree)
    logits = logits.float() / config.grpo.temperature
    targets = batch.loss_targets if batch.loss_targets is not None else batch.targets[0, batch.loss_positions]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
    return to_padded(logps, batch.loss_example, batch.num_examples)


def to_padded(values: torch.Tensor, example: torch.Tensor, n: int) -> torch.Tensor:
    """``values [L]`` of ``n`` examples' consecutive positions (``example [L]``: whose each is, ascending) as
    ``[n, T]``, left-aligned and 0-filled."""
    counts = torch.bincount(example, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    column = torch.arange(values.numel(), device=values.device) - starts[example]
    out = values.new_zeros(n, int(counts.max().item()) if n else 0)
    return out.index_put((example, column), values)


def completion_mask(batch: PackedBatch) -> torch.Tensor:
    """``[n, T]`` float: 1 on each sequence's completion tokens (as :func:`completion_logps` lays them out)."""
    assert batch.loss_example is not None
    ones = torch.ones(batch.loss_example.numel(), device=batch.loss_example.device)
    return to_padded(ones, batch.loss_example, batch.num_examples)

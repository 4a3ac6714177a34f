"""Logit distillation (``task: distill``): the student learns a frozen teacher's token distributions (GKD).

The data are SFT's (chat / instruction records, :func:`tuneforge.data.dataset.prepare_data`) in the same
padding-free packed rows; the teacher (:mod:`tuneforge.training.distill_teacher`: a model folder, a built-in name
or a tuneforge run, sharing the student's tokenizer, checked before the student loads) runs on the *same* packed
row, with the same example boundaries, so both models see each example alone. At each of the row's ``L`` trained
(answer) positions the loss is::

    (1 - alpha) x D_beta(teacher || student at temperature T) + alpha x cross-entropy(answer token)

with ``D_beta`` GKD's generalised JSD (:func:`tuneforge.training.distill_losses.generalized_jsd`: ``forward_kl``
is beta 0, ``reverse_kl`` beta 1, ``jsd`` the configured beta). The loss sum is summed over the positions and the
normaliser is the number of trained tokens, as SFT's: the step's loss is the mean over all its trained tokens
whatever the accumulation (TRL's ``batchmean``). Logged: ``divergence`` and ``ce`` (per trained token), and on
validation ``eval_loss`` (which picks the best checkpoint), ``eval_divergence``, ``eval_ce``.

**The teacher's outputs.** By default (``distill.cache_top_k`` unset) the teacher runs, no grad, on every
micro-batch, over the full vocabulary. With ``cache_top_k: k`` its top-k log-probs and token ids at every trained
position of the train and validation examples are computed once before step 1 and kept in the token cache
(:class:`~tuneforge.training.distill_teacher.TopKCache`); a second run loads them without loading the teacher, and
the divergence is over those ``k`` tokens (exact at ``k = V``).

**Memory.** With the chunked loss (``chunked_loss``: auto when the ``[L, V]`` fp32 logits pass 256 MiB, or ``on``;
for model types whose LM head is a plain linear layer) the student's forward stops at the final hidden states
``[L, H]`` and so does the teacher's (``[L, H_t]``, no grad); the logits of both are then made chunk by chunk of
positions (:func:`tuneforge.kernels.chunked_loss.chunk_positions`: at most 1024 positions and 256 MiB of fp32
logits each) inside :func:`torch.utils.checkpoint.checkpoint`, so at any time one chunk's student and teacher
logits and their softmaxes exist (about ``6 x chunk x V`` fp32 values), and backward recomputes the chunk (one
more LM-head matmul of each model over the ``L`` positions). Without it both ``[L, V]`` logits (the student's
with its autograd graph, the teacher's without) and their log-softmaxes are held at once, as SFT holds the
student's. A cached top-k holds ``[L, k]`` teacher log-probs and ids in place of the teacher's logits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import checkpoint

from tuneforge.data.token_cache import cached_tokenize
from tuneforge.kernels.chunked_loss import chunk_positions, lm_head_bypassed, use_chunked_loss
from tuneforge.methods.dispatch import method_forward
from tuneforge.training.distill_losses import generalized_jsd, loss_beta, token_cross_entropy
from tuneforge.training.distill_teacher import (
    Teacher,
    TopKCache,
    build_top_k,
    cache_key_parts,
    check_teacher_tokenizer,
)
from tuneforge.training.objectives.base import Objective, ObjectiveOutput

if TYPE_CHECKING:
    from tuneforge.config import RunConfig
    from tuneforge.data.dataset import PreparedData
    from tuneforge.data.packing import PackedBatch

log = logging.getLogger(__name__)
METRICS = ("divergence", "ce")
# a chunk of positions' teacher distribution: (logits or log-probs [c, V or k], token ids [c, k] or None)
TeacherChunk = Callable[[int, int], tuple[torch.Tensor, torch.Tensor | None]]


def chunk_sums(student_logits: torch.Tensor, teacher: torch.Tensor, support: torch.Tensor | None,
               targets: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
    """``[2]`` fp32: the chunk's summed divergence and summed cross-entropy (``student_logits [c, V]``)."""
    divergence = generalized_jsd(student_logits, teacher, beta, temperature, support).sum()
    return torch.stack([divergence.float(), token_cross_entropy(student_logits, targets).sum()])


class DistillObjective(Objective):
    """Logit distillation (module docstring)."""

    eval_metric = "eval_loss"
    higher_is_better = False

    def __init__(self, task: str) -> None:
        super().__init__(task)
        self.teacher: Teacher | None = None
        self.cache: TopKCache | None = None
        self.cache_seconds = 0.0

    def prepare_data(self, config: RunConfig, tokenizer: Any) -> PreparedData:
        """SFT's data; first the teacher's tokenizer against the student's (before any weights load)."""
        from tuneforge.data.dataset import prepare_data

        assert config.distill.teacher is not None
        check_teacher_tokenizer(tokenizer, config.distill.teacher, config.trust_remote_code)
        return prepare_data(config.data, tokenizer, config.seed, self.task)

    def before_training(self, model: torch.nn.Module, data: PreparedData, config: RunConfig,
                        device: torch.device) -> None:
        """The teacher (loaded on first use, in the dtype of the student's frozen weights); with ``cache_top_k`` the
        cache of every train and validation example, loaded or computed now."""
        frozen = [p for p in model.parameters() if not p.requires_grad] or list(model.parameters())
        assert config.distill.teacher is not None
        self.teacher = Teacher(config.distill.teacher, device, frozen[0].dtype, config.trust_remote_code)
        self.cache = None
        k = config.distill.cache_top_k
        if k is None:
            return
        examples = [*data.train, *data.validation]
        started = time.perf_counter()
        per_row = config.eval_batch_size or 4 * config.batch_size
        teacher = self.teacher
        payload = cached_tokenize(cache_key_parts(teacher.spec, k, examples),
                                  lambda: build_top_k(teacher, examples, k, per_row, config.progress))
        self.cache = TopKCache(payload)
        self.cache_seconds = time.perf_counter() - started
        log.info("distill: the teacher's top-%d log-probs of %d examples (%d trained tokens) %s in %.1fs", self.cache.k,
                 len(self.cache.where), self.cache.logps.shape[0],
                 f"computed ({teacher.forwards} teacher forwards)" if teacher.forwards else "loaded from the cache",
                 self.cache_seconds)

    def after_training(self) -> None:
        if self.teacher is not None:
            log.info("distill: %d teacher forwards in this run%s", self.teacher.forwards,
                     " (top-k from the cache)" if self.cache is not None else "")

    def normaliser(self, batch: PackedBatch) -> float:
        return batch.num_loss_tokens

    # ---------------------------------------------------------------- the loss

    def _teacher_chunks(self, batch: PackedBatch, hidden: bool) -> TeacherChunk:
        """The teacher's distribution at positions ``[s, e)`` of the row's trained positions: sliced from the cached
        top-k, from its ``[L, V]`` logits, or (``hidden``, where its head is a plain linear one) its head applied to
        those positions' hidden states."""
        if self.cache is not None:
            logps, ids = self.cache.gather(batch, batch.input_ids.device)
            return lambda s, e: (logps[s:e], ids[s:e])
        assert self.teacher is not None
        head = self.teacher.lm_head if hidden else None
        out = self.teacher.forward(batch, hidden=head is not None)
        if head is None:
            return lambda s, e: (out[s:e], None)

        def chunk(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            with torch.no_grad():
                return head(out[s:e]), None
        return chunk

    def token_sums(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> torch.Tensor:
        """``[2]`` fp32 with autograd: the row's divergence and cross-entropy, summed over its trained tokens."""
        distill = config.distill
        beta, temperature = loss_beta(distill.loss, distill.beta), distill.temperature
        targets = batch.targets[0, batch.loss_positions]
        chunked = use_chunked_loss(model, targets.numel(), config.chunked_loss)
        teacher = self._teacher_chunks(batch, hidden=chunked)

        def student() -> torch.Tensor:         # the student's forward on the row: [L, V] logits, or [L, H] hidden
            return method_forward(model, config.method, batch.input_ids, batch.position_ids, batch.loss_positions,
                                  lengths=batch.lengths or None, cu_seqlens=batch.cu_seqlens)

        if chunked:
            with lm_head_bypassed(model) as head:
                hidden = student()
            size = chunk_positions(head.out_features)

            def part(h: torch.Tensor, s: int, e: int) -> torch.Tensor:
                t, support = teacher(s, e)
                return chunk_sums(head(h), t, support, targets[s:e], beta, temperature)

            total = torch.zeros(2, device=hidden.device)
            for s in range(0, hidden.shape[0], size):
                e = min(s + size, hidden.shape[0])
                total = total + checkpoint(part, hidden[s:e], s, e, use_reentrant=False)
            return total
        logits = student()
        t, support = teacher(0, logits.shape[0])
        return chunk_sums(logits, t, support, targets, beta, temperature)

    def _combine(self, sums: torch.Tensor, config: RunConfig) -> torch.Tensor:
        alpha = config.distill.alpha
        return (1 - alpha) * sums[0] + alpha * sums[1]

    def loss(self, model: torch.nn.Module, batch: PackedBatch, config: RunConfig) -> ObjectiveOutput:
        sums = self.token_sums(model, batch, config)
        metrics = dict(zip(METRICS, sums.detach().tolist(), strict=True))
        return ObjectiveOutput(self._combine(sums, config), batch.num_loss_tokens, metrics)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batches: list[PackedBatch], device: torch.device,
                 config: RunConfig) -> dict[str, float]:
        """``eval_loss`` (the distillation loss per trained token), ``eval_divergence``, ``eval_ce``."""
        was_training = model.training
        model.eval()
        sums, tokens = torch.zeros(2, dtype=torch.float64), 0
        for batch in batches:
            batch = batch.to(device)
            if batch.num_loss_tokens == 0:
                continue
            sums += self.token_sums(model, batch, config).double().cpu()
            tokens += batch.num_loss_tokens
        model.train(was_training)
        mean = sums / max(tokens, 1)
        return {"eval_loss": float(self._combine(mean, config)), "eval_divergence": float(mean[0]),
                "eval_ce": float(mean[1])}

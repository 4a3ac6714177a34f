"""Next-token cross-entropy: supervised fine-tuning (``task: sft``) and continued pretraining (``task: pretrain``).

Both minimise ``sum of token cross-entropies / number of target tokens in the optimizer step``; they
differ only in which tokens are targets, which the data decides (assistant turns with their end-of-turn
token for SFT's ``train_on: assistant``, every token for raw text). The LM head runs only at target
positions (``methods/loss.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tuneforge.methods.loss import evaluate_loss, packed_loss_sum
from tuneforge.training.objectives.base import Objective, ObjectiveOutput


class CausalLMObjective(Objective):
    eval_metric = "eval_loss"
    higher_is_better = False

    def prepare_data(self, config, tokenizer: Any):
        from tuneforge.data.dataset import prepare_data

        return prepare_data(config.data, tokenizer, config.seed, self.task)

    def uniform_loss(self, vocab_size: int | None) -> float | None:
        """ln(V): the cross-entropy of equal probabilities over the vocabulary."""
        return math.log(vocab_size) if vocab_size else None

    def normaliser(self, batch) -> float:
        return batch.num_loss_tokens

    def loss(self, model: torch.nn.Module, batch, config) -> ObjectiveOutput:
        loss_sum = packed_loss_sum(model, batch, config.method, config.chunked_loss)
        return ObjectiveOutput(loss_sum, batch.num_loss_tokens)

    def evaluate(self, model: torch.nn.Module, batches, device: torch.device, config) -> dict[str, float]:
        return {"eval_loss": evaluate_loss(model, batches, device, config.method, config.chunked_loss)}

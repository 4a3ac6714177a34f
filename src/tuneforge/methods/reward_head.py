"""A reward model's scalar head: ``score``, a linear map of the final hidden state of a sequence's last token.

The reward of a sequence ``x_1..x_L`` is ``w . h_L`` where ``h_L [H]`` is the backbone's final (normed) hidden
state at its last token and ``w [1, H]`` the head's weight (no bias), as transformers' ``*ForSequenceClassification``
with ``num_labels=1`` (whose weight is also called ``score.weight``). The head is attached to the model the method
made (``model.score``), so the optimizer trains it with the method's parameters and a resumed run restores it;
it is saved on its own in every checkpoint (:data:`HEAD_FILE`), beside the method's files (an adapter, or a full
model, whose ``model.safetensors`` then also holds ``score.weight``: the folder loads as transformers'
``AutoModelForSequenceClassification``).

The last token is found from the example boundaries, never from a pad id (SmolLM2's pad token is its EOS, which
ends every sequence): in a packed row at ``cu_seqlens[1:] - 1``, in a padded batch at the last position whose
attention mask is 1. The hidden states come from the method's own forward with the LM head bypassed
(:func:`tuneforge.kernels.chunked_loss.lm_head_bypassed`: model types whose forward leaves the logits as the head
made them), so every method's forward (prefix and prompt tuning's packed forward included) computes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tuneforge.data.packing import PackedBatch
from tuneforge.kernels.chunked_loss import lm_head_bypassed, output_head
from tuneforge.methods.dispatch import method_forward

HEAD_FILE = "reward_head.safetensors"
HEAD_ATTR = "score"


NOT_GENERATIVE = ("is a reward model (task: reward): it scores text with its head ({file}) and does not generate; "
                  "{action} would drop the head. Score with tuneforge.evaluation.reward_model.RewardModel.from_run")


def is_reward_model(folder: str | Path) -> bool:
    """Whether ``folder`` (a run, checkpoint or package) holds a reward model's head."""
    return (Path(folder) / HEAD_FILE).is_file()


def not_generative(folder: str | Path, action: str) -> str:
    """The one-line reason why ``action`` (serving, merging, GGUF export) refuses the reward model in ``folder``."""
    return f"{folder} " + NOT_GENERATIVE.format(file=HEAD_FILE, action=action)


def hidden_size(model: torch.nn.Module) -> int:
    config: Any = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def score_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The head :func:`add_score_head` attached to ``model``, or None."""
    head = model._modules.get(HEAD_ATTR)
    return head if isinstance(head, torch.nn.Linear) else None


def add_score_head(model: torch.nn.Module, init_std: float | None = None) -> torch.nn.Linear:
    """Attach a trainable fp32 ``score`` head ``[1, H]`` to ``model`` (on its device), initialised as transformers
    initialises a classification head (normal, std ``initializer_range``, default 0.02); returns it. A head already
    there is returned as it is. Raises ``ValueError`` for a model whose hidden states cannot be read (its forward
    changes the logits after the LM head: soft-capping, scaling)."""
    head = score_head(model)
    if head is not None:
        return head
    if output_head(model) is None:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"task 'reward' reads the final hidden states through the LM head's place, which model type "
                         f"{kind} does not allow (its forward changes the logits after the head, or the head is not a "
                         "plain linear layer); use a llama, mistral, qwen2, qwen3 or gemma3 model")
    config = getattr(model, "config", None)
    std = init_std if init_std is not None else float(getattr(config, "initializer_range", 0.02) or 0.02)
    device = next(model.parameters()).device
    head = torch.nn.Linear(hidden_size(model), 1, bias=False, device=device, dtype=torch.float32)
    torch.nn.init.normal_(head.weight, std=std)
    model.add_module(HEAD_ATTR, head)
    return head


def _head(model: torch.nn.Module) -> torch.nn.Linear:
    head = score_head(model)
    if head is None:
        raise ValueError("the model has no reward head (tuneforge.methods.reward_head.add_score_head)")
    return head


def _apply(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """``[n]`` fp32 rewards of ``hidden [n, H]``: the head in fp32 whatever the run's precision (it is tiny)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.float()).squeeze(-1)


def packed_rewards(model: torch.nn.Module, batch: PackedBatch, method: str = "lora") -> torch.Tensor:
    """``[n]`` fp32: the reward of each example of a packed row (the head at its last token, ``cu_seqlens[1:] - 1``),
    from one forward of the method's model (examples never see each other); the gradient flows."""
    head = _head(model)
    if batch.cu_seqlens is None:
        raise ValueError("rewards of a packed row need its example boundaries (tuneforge.data.packing.pack)")
    last = batch.cu_seqlens[1:] - 1
    with lm_head_bypassed(model):
        hidden = method_forward(model, method, batch.input_ids, batch.position_ids, last,
                                lengths=batch.lengths or None, cu_seqlens=batch.cu_seqlens)      # [n, H]
    return _apply(head, hidden)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` long: each row's last position whose ``attention_mask [B, T]`` is 1 (right or left padding alike;
    never found from a pad id, which may be the EOS that ends the sequence)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if bool((attention_mask.sum(1) == 0).any()):
        raise ValueError("a row of the batch is all padding: it has no token to score")
    return (positions * attention_mask.long()).argmax(1)


def padded_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` fp32: the reward of each row of a padded batch ``input_ids [B, T]`` (padding on either side, marked 0
    in ``attention_mask [B, T]``), read at :func:`last_token_index`; positions count the row's own tokens only.
    For methods whose plain call takes an attention mask (not prefix or prompt tuning: use :func:`packed_rewards`)."""
    head = _head(model)
    position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    with lm_head_bypassed(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = out.logits[torch.arange(input_ids.shape[0], device=input_ids.device), last_token_index(attention_mask)]
    return _apply(head, hidden)


def save_score_head(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write the head's weight ``[1, H]`` (fp32) to ``folder``/:data:`HEAD_FILE`; returns the file."""
    path = Path(folder) / HEAD_FILE
    save_file({"weight": _head(model).weight.detach().float().cpu().contiguous()}, str(path),
              metadata={"format": "tuneforge.reward_head", "hidden_size": str(hidden_size(model))})
    return path


def load_score_head(model: torch.nn.Module, folder: str | Path) -> torch.nn.Linear:
    """Attach (or fill) ``model``'s head with the weight saved in ``folder``/:data:`HEAD_FILE`; ``ValueError`` in one
    line when there is none or its width is not the model's."""
    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        raise ValueError(f"{folder} has no {HEAD_FILE}: not a reward model run (task: reward)")
    weight = load_file(str(path))["weight"]
    if tuple(weight.shape) != (1, hidden_size(model)):
        raise ValueError(f"{path}: head of shape {tuple(weight.shape)} does not fit a model of hidden size "
                         f"{hidden_size(model)} (is this run's base model the one it was trained on?)")
    head = add_score_head(model)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head

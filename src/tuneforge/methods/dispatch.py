"""What the rest of tuneforge calls to use a method: each function looks the method up in the registry.

The training loop calls :func:`apply_method` once, then :func:`method_forward` for every packed row,
then :func:`save_trained`; serving calls :func:`load_trained` and :func:`method_generate`. None of them
branches on a method's name: the :class:`~tuneforge.methods.registry.Method` record says what to do.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from tuneforge.kernels.packed_attention import uses_packed_attention
from tuneforge.methods.registry import Generates, Method, SavesPretrained, get_method, method_for_saved_type

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig


def _method(config: RunConfig | str) -> Method:
    return get_method(config if isinstance(config, str) else config.method)


def apply_method(model: PreTrainedModel, config: RunConfig, tokenizer: Any = None) -> torch.nn.Module:
    """Return the trainable model for ``config.method`` (base weights frozen unless ``full``).

    ``tokenizer`` is needed only by ``prompt`` with ``prompt.init_text``. For ``qlora`` the model may
    come from :func:`load_base_model` (already quantized) or be a full-precision model (quantized here).
    """
    return _method(config).apply(model, config, tokenizer)


def load_base_model(config: RunConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    ) -> PreTrainedModel:
    """The base model as ``config.method`` wants it (QLoRA: quantized while loading; else plain). A model that
    ships its own code is refused here, for every method, unless ``config.trust_remote_code``."""
    from tuneforge.models.registry import resolve_model
    from tuneforge.models.remote_code import check_remote_code

    trust = bool(getattr(config, "trust_remote_code", False))
    check_remote_code(config.model, resolve_model(config.model), trust)
    method = _method(config)
    if method.load_base is not None:
        return method.load_base(config, dtype, device)
    from tuneforge.models.loading import load_model

    return load_model(config.model, dtype=dtype, device=device, trust_remote_code=trust)


def method_forward(model: torch.nn.Module, config: RunConfig | str, input_ids: torch.Tensor,
                   position_ids: torch.Tensor, keep_idx: torch.Tensor, lengths: list[int] | None = None,
                   cu_seqlens: torch.Tensor | None = None,
                   tree: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Logits ``[K, V]`` at row positions ``keep_idx [K]`` of one packed row ``input_ids [1, T]``.

    ``position_ids [1, T]`` restart at 0 for each example; no attention mask is passed, so transformers
    (or tuneforge's packed attention) keeps examples apart. The example boundaries, when the caller has
    them (a :class:`~tuneforge.data.packing.PackedBatch`'s ``lengths`` and ``cu_seqlens``), are handed on
    so that nothing recomputes them: to the method's own forward (prefix and prompt tuning, whose plain
    call cannot keep examples apart), or to tuneforge's packed attention as ``cu_seq_lens_q``.
    ``config`` may be ``"base"`` for a model without a method. ``tree``: a shared-prompt row's masks
    (:func:`tuneforge.data.packing.pack_shared_prompts`), for models on tuneforge's packed attention whose method
    has no forward of its own (:func:`shares_prompts`).
    """
    method = None if config == "base" else _method(config)
    if tree is not None and not shares_prompts(model, config):
        raise ValueError("a shared-prompt row needs tuneforge's packed attention and a method without its own "
                         "forward (shares_prompts)")
    if method is not None and method.forward is not None:
        return method.forward(model, input_ids, position_ids, keep_idx, lengths)
    kwargs: dict[str, Any] = {}
    if cu_seqlens is not None and uses_packed_attention(model):
        kwargs["cu_seq_lens_q"] = cu_seqlens
    if tree is not None:
        kwargs["tuneforge_tree"] = tree
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=keep_idx, **kwargs)
    return out.logits.squeeze(0)   # a view: indexing [0] would zero-fill a (1, K, V) gradient in backward


def shares_prompts(model: torch.nn.Module, config: RunConfig | str) -> bool:
    """Whether :func:`method_forward` can compute shared-prompt rows for ``model``: its attention is tuneforge's
    packed attention (which reads the masks) and the method has no forward of its own (prefix and prompt tuning
    re-pack rows with their virtual tokens)."""
    method = None if config == "base" else _method(config)
    return uses_packed_attention(model) and (method is None or method.forward is None)


def method_generate(model: Generates, config: RunConfig | str | None, **kwargs: Any) -> Any:
    """``model.generate(**kwargs)`` as the method needs it (``None`` or ``"base"``: a plain model).

    Prefix and prompt tuning generate through their own path (see ``methods/prefix_tuning/model.py``);
    every other method (and the base model) through transformers' / peft's ``generate``.
    """
    method = None if config is None or config == "base" else _method(config)
    if method is not None and method.generate is not None:
        return method.generate(model, **kwargs)
    return model.generate(**kwargs)


_DISABLED = "_tuneforge_method_disabled"


@contextlib.contextmanager
def method_disabled(model: torch.nn.Module, config: RunConfig | str) -> Iterator[None]:
    """Within the block ``model`` computes exactly its base model (the method's ``disable``). Nested blocks are
    safe: an inner one (a reference pass inside the evaluation of the base model) leaves the method disabled when
    it ends, whatever the method's own ``disable`` would do."""
    method = _method(config)
    if method.disable is None:
        raise ValueError(f"method {method.name!r} cannot be disabled: it changes the base weights themselves "
                         "(keep a separate copy of the base model as the reference)")
    if getattr(model, _DISABLED, False):
        yield
        return
    with method.disable(model):
        setattr(model, _DISABLED, True)
        try:
            yield
        finally:
            setattr(model, _DISABLED, False)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once.

    Quantized 4-bit weights are counted by their number of elements as stored (two values per byte), so
    ``total`` under ``qlora`` undercounts the base; ``trainable`` is exact.
    """
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def save_trained(model: torch.nn.Module, out_dir: str | Path, config: RunConfig | None = None) -> None:
    """Save what the method trained into ``out_dir``.

    ``full``: a complete transformers model folder (``config.json`` + ``model.safetensors``). Every other
    method: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format; the bottleneck adapter
    writes the same two files with ``"adapter_type": "tuneforge.bottleneck_adapter"``).
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    cast(SavesPretrained, model).save_pretrained(str(out_dir), safe_serialization=True)


def saved_method(adapter_dir: str | Path) -> str:
    """The method that saved ``adapter_dir``, from its files (``full``, ``adapter`` or the peft type's method)."""
    folder = Path(adapter_dir)
    cfg_file = folder / "adapter_config.json"
    if cfg_file.is_file():
        data = json.loads(cfg_file.read_text())
        saved_type = str(data.get("adapter_type") or data.get("peft_type"))
        method = method_for_saved_type(saved_type)
        return method.name if method is not None else saved_type
    if (folder / "config.json").is_file():
        method = method_for_saved_type("full")
        return method.name if method is not None else "full"
    raise FileNotFoundError(f"{folder} holds neither adapter_config.json nor config.json: not a saved run")


def load_trained(base: torch.nn.Module, adapter_dir: str | Path, config: RunConfig | None = None,
                 is_trainable: bool = False) -> torch.nn.Module:
    """Load what :func:`save_trained` wrote onto a freshly loaded ``base`` (for inference by default).

    ``full`` returns the saved model itself, in ``base``'s dtype (``base`` only supplies the dtype).
    ``qlora`` adapters load onto whatever ``base`` is given: a quantized one (as trained) or a
    full-precision one (as merged).
    """
    method = get_method(config.method if config is not None else saved_method(adapter_dir))
    return method.load_trained(base, adapter_dir, is_trainable=is_trainable)


def load_weights_into(model: torch.nn.Module, folder: str | Path, config: RunConfig) -> None:
    """``init_from``: the weights a run of ``config.method`` saved in ``folder``, copied exactly into ``model`` (what
    :func:`apply_method` made with that run's settings), which then trains them. ``ValueError`` with one line when
    the method cannot continue a run or the weights do not fit."""
    method = _method(config)
    if method.load_weights is None:
        raise ValueError(f"method {method.name!r} cannot continue from a run's saved weights")
    method.load_weights(model, Path(folder))


def mergeable_methods() -> tuple[str, ...]:
    from tuneforge.methods.registry import methods

    return tuple(m.name for m in methods() if m.mergeable)


def not_mergeable_methods() -> tuple[str, ...]:
    from tuneforge.methods.registry import methods

    return tuple(m.name for m in methods() if not m.mergeable and not m.is_full_model)

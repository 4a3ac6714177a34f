"""The method registry: every fine-tuning method is one :class:`Method` record, registered once.

Each built-in method lives in its own folder, ``methods/<method>/``, with the same shape (peft's
``tuners/<method>/`` is the model): ``config.py`` (its settings: a section of the run config),
``model.py`` (apply it to a base model, load it back), ``layer.py`` where it has layers of its own, and
``__init__.py`` whose one :func:`register_method` call is all the rest of tuneforge knows about it. The
run config's method sections, ``tuneforge.methods.apply_method`` / ``method_forward`` / ``load_trained``,
merge and its refusals, and the trainer's optimizer all read these records, and so do serving (``serving.py``
in a method's folder: :mod:`tuneforge.methods.serving_hooks`) and packaging / GGUF export (:class:`Runtimes`);
nothing branches on a method's name. Adding a method: one folder and one registration (``docs/ARCHITECTURE.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from pydantic import BaseModel

from tuneforge.methods.memory import MemoryHook

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from tuneforge.config import RunConfig
    from tuneforge.methods.serving_hooks import MethodServing, ServingHost

# The model a method's functions receive is the one its ``apply`` returned (a peft ``PeftModel`` for prefix
# and prompt tuning, a ``BottleneckAdapterModel``, ...): only the method knows which, so the records take it
# as ``Any`` and each method annotates its own functions with its own type.
Apply = Callable[["PreTrainedModel", "RunConfig", Any], torch.nn.Module]
LoadTrained = Callable[..., torch.nn.Module]          # (base, folder, is_trainable=False) -> model
LoadWeights = Callable[[Any, Path], None]               # (the model apply made, folder) -> None
LoadBase = Callable[["RunConfig", torch.dtype, "str | torch.device"], "PreTrainedModel"]
Forward = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, "list[int] | None"], torch.Tensor]
Disable = Callable[[Any], contextlib.AbstractContextManager]


class Generates(Protocol):
    """A model with transformers' ``generate``: a causal LM (transformers declares ``generate`` on
    ``GenerationMixin``, not on ``PreTrainedModel``) or a wrapper that passes it on (``PeftModel``,
    ``BottleneckAdapterModel``)."""

    def generate(self, *args: Any, **kwargs: Any) -> Any: ...


class SavesPretrained(Protocol):
    """A model that saves with ``save_pretrained(folder)``, as every method's model must (see :class:`Method`)."""

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> Any: ...


class AdapterSwitch(Protocol):
    """A model whose adapters can be switched off for a block: peft's ``PeftModel``, ``BottleneckAdapterModel``."""

    def disable_adapter(self) -> contextlib.AbstractContextManager: ...


@dataclass(frozen=True)
class Runtimes:
    """What runtimes outside tuneforge make of a method's saved adapter; each hook takes its ``adapter_config.json``.

    Attributes:
        vllm: ``adapter_config -> {"loads": True, ...}`` or ``{"loads": False, "reason": ...}``; None: vLLM serves
            no adapter of this method.
        gguf_lora: ``adapter_config -> problems`` that keep it out of llama.cpp's LoRA GGUF (``[]``: it can be
            written, ``tuneforge export --format gguf-lora``); None: the method has no such file.
    """

    vllm: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    gguf_lora: Callable[[dict[str, Any]], list[str]] | None = None


DEFAULT_LEARNING_RATE = 2e-4
"""The learning rate of a method that declares none of its own (:attr:`Method.learning_rate`)."""


@dataclass(frozen=True)
class Method:
    """What tuneforge needs to know about a fine-tuning method.

    Attributes:
        name: the value of ``method:`` in the run config.
        summary: one line for listings and errors.
        settings: run-config sections this method owns, ``{key: pydantic model}`` (``{"lora": LoraConfig}``);
            a method may also read another method's section (``qlora`` reads ``lora``: :attr:`reads`).
        reads: the other methods' sections it reads (``qlora``: ``("lora",)``).
        apply: ``(base model, run config, tokenizer) -> trainable model`` (base weights frozen unless full).
        load_trained: ``(base, folder, is_trainable=False) -> model``: what :attr:`save` wrote, onto a fresh base.
        load_weights: ``(model, folder) -> None``: the weights a run of this method saved in ``folder``, copied
            exactly into ``model``, which ``apply`` made with that run's settings (``init_from``: the run's adapter
            keeps training); ``ValueError`` with one line naming the tensor when they do not fit. None: a run of
            this method cannot be continued that way (full fine-tuning: its folder is a model, for ``model:``).
        saved_types: values of ``peft_type`` / ``adapter_type`` in ``adapter_config.json`` that mean this
            method (``("LORA",)``); ``("full",)`` for a full model folder.
        load_base: ``(config, dtype, device) -> base model`` when the method needs a special one (QLoRA
            quantizes while loading); default: the plain model.
        forward: ``(model, input_ids [1, T], position_ids [1, T], keep_idx [K], lengths) -> logits [K, V]``
            for a packed row of examples of ``lengths`` when the plain call would let examples see each other
            (prefix and prompt tuning).
        generate: ``(model, **generate_kwargs)`` when transformers'/peft's ``model.generate`` is not right.
        make_optimizer: ``(config, params) -> optimizer`` when the method brings its own (QLoRA's 8-bit).
        memory: ``MemoryInputs -> MemoryTerms`` (:mod:`tuneforge.methods.memory`): its part of the memory estimate
            (weights, trained parameters, what its layers save for backward); None: ``tuneforge estimate`` and
            ``tuneforge plan`` refuse it.
        engines: the engines that train it (:mod:`tuneforge.methods.engines`: ``single``, ``ddp``, ``fsdp2``,
            ``deepspeed``); the others refuse it in one line. Default: one process only.
        engine_notes: ``{engine: why}`` for an engine not in ``engines`` whose refusal says more than "not tested".
        check_config: ``config -> None``, raising ``ValueError`` with one line for a run config this method cannot
            train (run when the config loads).
        leaner: a method that trains the same settings in less memory, which ``tuneforge plan`` tries when this one
            does not fit (``lora``: ``qlora``); "" none.
        mergeable: folds into the base weights (``tuneforge merge``).
        not_mergeable_reason: why not, for the refusal (unused when mergeable).
        disable: ``model -> context manager`` within which the model computes exactly its base model (a
            reference model for preference training, the base for serving); None: cannot be disabled.
        mixed_batches: one batch at inference may use different adapters of this method per row.
        is_full_model: saves a complete model (no adapter).
        serving: ``host -> MethodServing`` (a :class:`~tuneforge.methods.serving_hooks.MethodServing` subclass): runs
            this method's adapters on their own rows of the server's mixed batches; None: refused by the server.
        runtimes: which runtimes outside tuneforge load its saved adapter (:class:`Runtimes`; default: none).
        merge_reversible: merging into the weights in memory can be undone exactly (evaluation scores merged,
            checked); False for QLoRA (merging into 4-bit weights is lossy). Unused when not mergeable.
        merged_sampling: ``model -> context manager`` yielding whether, within it, the model computes through
            merged copies of its weights (faster sampling), the originals put back untouched after (GRPO's rollouts,
            ``grpo.merged_sampling``); None: sampling always runs the adapter's own forward.
        learning_rate: the peak learning rate a run of this method trains with when its config sets none
            (``RunConfig.learning_rate`` unset); default :data:`DEFAULT_LEARNING_RATE`.
        learning_rate_source: where :attr:`learning_rate` was measured (a file under ``benchmarks/results/``), for
            the log, the run's ``config.yaml`` and ``tuneforge init``'s comment; "" (the general default): not
            measured for this method, and ``tuneforge init`` writes its LoRA recipe's measured rate instead.
    """

    name: str
    summary: str
    settings: dict[str, type[BaseModel]]
    apply: Apply
    load_trained: LoadTrained
    saved_types: tuple[str, ...]
    reads: tuple[str, ...] = ()
    load_weights: LoadWeights | None = None
    load_base: LoadBase | None = None
    forward: Forward | None = None
    generate: Callable[..., Any] | None = None
    make_optimizer: Callable[["RunConfig", list[torch.nn.Parameter]], torch.optim.Optimizer] | None = None
    memory: MemoryHook | None = None
    engines: frozenset[str] = frozenset({"single"})
    engine_notes: dict[str, str] = field(default_factory=dict)
    check_config: Callable[["RunConfig"], None] | None = None
    leaner: str = ""
    mergeable: bool = False
    not_mergeable_reason: str = ""
    disable: Disable | None = None
    mixed_batches: bool = False
    is_full_model: bool = False
    serving: Callable[[ServingHost], MethodServing] | None = None
    runtimes: Runtimes = Runtimes()
    merge_reversible: bool = True
    merged_sampling: Callable[[torch.nn.Module], contextlib.AbstractContextManager[bool]] | None = None
    learning_rate: float = DEFAULT_LEARNING_RATE
    learning_rate_source: str = ""

_METHODS: dict[str, Method] = {}
_SETTINGS: dict[str, type[BaseModel]] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (a name or settings key registered twice is an error)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    for key, model in method.settings.items():
        if key in _SETTINGS and _SETTINGS[key] is not model:
            raise ValueError(f"method {method.name!r}: settings section {key!r} is already owned by another method")
    _METHODS[method.name] = method
    _SETTINGS.update(method.settings)
    return method


def unregister_method(name: str) -> None:
    """Remove a method (and the settings sections only it owned); for tests that register toy methods."""
    method = _METHODS.pop(name)
    owned = {k for m in _METHODS.values() for k in m.settings}
    for key in method.settings:
        if key not in owned:
            _SETTINGS.pop(key, None)


def get_method(name: str) -> Method:
    """The record of ``name``; an unknown name gets the closest registered one in the message."""
    if name not in _METHODS:
        import difflib

        close = difflib.get_close_matches(name, list(_METHODS), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; methods: {', '.join(_METHODS)}")
    return _METHODS[name]


def methods() -> Iterator[Method]:
    return iter(list(_METHODS.values()))


def method_names() -> list[str]:
    return list(_METHODS)


def settings_sections() -> dict[str, type[BaseModel]]:
    """Every run-config section a registered method owns: ``{key: pydantic model}``."""
    return dict(_SETTINGS)


def method_for_saved_type(saved_type: str) -> Method | None:
    return next((m for m in _METHODS.values() if saved_type in m.saved_types), None)

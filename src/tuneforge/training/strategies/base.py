"""What the training loop asks of the engine that runs it: one small interface, one strategy per engine.

As Lightning's strategies (and litgpt through them): :class:`Strategy` is the interface and the defaults of a
model every process holds whole (one process, DDP); :class:`Parallel` adds what every multi-process engine
shares (accelerate's process group, the wrapped forward with the loss inside it, the collectives). The
engines override what they do differently: ``single.py``, ``ddp.py``, ``fsdp2.py``, ``deepspeed.py``.
``training/distributed.py`` picks one for the launch (:func:`~tuneforge.training.distributed.setup_distributed`).

The loop's calls, in the order it makes them: :meth:`Strategy.check` (refuse what the engine is not proven
to train), :meth:`~Strategy.prepare` (wrap the model, build the optimizer), per micro-batch
:meth:`~Strategy.forward_backward`, per step :meth:`~Strategy.clip_grad_norm`, :meth:`~Strategy.optimizer_step`
and :meth:`~Strategy.zero_grad`; :meth:`~Strategy.run` for an evaluation; :meth:`~Strategy.gather` and
:meth:`~Strategy.save_engine_state` for a checkpoint; :meth:`~Strategy.load_trained` and
:meth:`~Strategy.load_optimizer` on resume, after :meth:`~Strategy.launch_of` has refused a checkpoint
another engine wrote. The collectives (:meth:`~Strategy.sum`, :meth:`~Strategy.all_gather_objects`, ...) where the
loop, or an objective through its ``processes``, combines what each process computed.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from tuneforge.methods import save_trained
from tuneforge.training.precision import Precision

# how :meth:`Strategy.launch_of` names a run whose optimizer state any process can load (one process, DDP)
WHOLE = "neither FSDP2 nor DeepSpeed"

BuildOptimizer = Callable[[Any, list[torch.nn.Parameter]], torch.optim.Optimizer]   # (config, params)


class ObjectiveModule(torch.nn.Module):
    """The model and the objective's loss as one module, so a DDP/FSDP wrapper runs forward, LM head and loss
    inside its hooks: ``wrapped(batch)`` returns the objective's :class:`ObjectiveOutput`. ``wrapped(run=fn)``
    returns ``fn(model)`` computed inside the wrapper's forward (FSDP2: evaluation, see :meth:`Strategy.run`)."""

    def __init__(self, model: torch.nn.Module, objective: Any, config: Any):
        super().__init__()
        self.model = model
        self.objective = objective
        self.run_config = config
        # the model's transformers config, where engines look for it (accelerate fills DeepSpeed's "auto" bucket
        # sizes from config.hidden_size)
        self.config = getattr(model, "config", None)
        # the model's layer classes: what accelerate's TRANSFORMER_BASED_WRAP shards one by one when the
        # accelerate config names none (peft's wrapper passes the attribute on from the base model)
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, batch: Any = None, run: Any = None) -> Any:
        if run is not None:
            return run(self.model)
        return self.objective.loss(self.model, batch, self.run_config)


def save_gathered(model: torch.nn.Module, folder: Any, state_dict: dict[str, Any]) -> None:
    """``save_trained``'s files from a gathered state dict (FSDP2, DeepSpeed, whose model holds only shards). The
    methods they train save through ``save_pretrained`` (peft's for ``lora``, transformers' for ``full``), which
    writes the state dict it is given instead of the model's own."""
    cast(Any, model).save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)


@dataclass
class Gathered:
    """What a checkpoint writes of the model and the optimizer, as :meth:`Strategy.gather` collected it.

    ``weights``: the gathered state dict (names as in the model), or None where the model holds its weights whole
    on the main process (one process, DDP). ``optimizer``: what ``trainer_state.pt`` keeps of the optimizer, or
    None for ``optimizer.state_dict()``."""
    model: torch.nn.Module
    config: Any
    weights: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None

    def save_model(self, folder: Path) -> None:
        """The method's files (``save_trained``'s), on the main process."""
        if self.weights is None:
            save_trained(self.model, folder, self.config)
        else:
            save_gathered(self.model, folder, self.weights)

    def trained(self) -> dict[str, torch.Tensor]:
        """The trained parameters, whole, on the CPU (``trainable.safetensors``: what resume loads back)."""
        return {n: (p.detach().cpu() if self.weights is None else self.weights[n]).contiguous()
                for n, p in self.model.named_parameters() if p.requires_grad}


def trained_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Strategy(ABC):
    """One process of a run and the engine that trains it. The defaults are those of a model each process
    holds whole (one process, DDP); the engines override what they do otherwise."""

    engine = "single"                        # its name in the methods' engine table (tuneforge.methods.engines)

    # set by prepare()
    model: torch.nn.Module                   # the model, its method applied
    objective: Any
    config: Any                              # the run config
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]         # the trained parameters, as the engine left them (FSDP2: shards)

    def __init__(self, accelerator: Any = None, rank: int = 0, world: int = 1) -> None:
        self.accelerator = accelerator        # accelerate's Accelerator; None on one process
        self.rank = rank
        self.world = world
        self.wrapped: torch.nn.Module | None = None     # the engine's wrapper of ObjectiveModule(model); None alone
        # autocast, loss scaling (training/precision.py); the trainer sets the run's before prepare()
        self.precision = Precision.fp32()

    @property
    def precision_by_engine(self) -> bool:
        """Whether the engine brings its own mixed precision (FSDP2's policy, DeepSpeed's bf16), set in the
        accelerate config's ``mixed_precision``: tuneforge's ``precision:`` then stays fp32."""
        return False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launch(self) -> str:
        """What this run's checkpoints depend on, in words (:meth:`launch_of`)."""
        return WHOLE

    @property
    def reentrant_checkpointing(self) -> bool:
        """Whether activation checkpointing must be torch's reentrant kind (DeepSpeed ZeRO-3)."""
        return False

    def device(self) -> torch.device | None:
        """The device the launch gave this process; None: the run config's choice."""
        return None

    # ------------------------------------------------------------------------------------ set-up

    def check(self, config: Any) -> None:
        """Refuse, with one line, a run this engine is not proven to train (may adjust a setting, logged): here a
        method whose record does not list :attr:`engine` (:func:`tuneforge.methods.engines.engine_refusal`); the
        engines add their own checks after this one."""
        from tuneforge.errors import ConfigError
        from tuneforge.methods.engines import engine_refusal

        refusal = engine_refusal(config.method, self.engine)
        if refusal:
            raise ConfigError(refusal)

    def prepare(self, model: torch.nn.Module, objective: Any, config: Any,
                build_optimizer: BuildOptimizer) -> torch.optim.Optimizer:
        """Wrap ``model`` (with ``objective``'s loss) for the engine and build the optimizer over its trained
        parameters with ``build_optimizer(config, params)``, in the order the engine needs; returns the optimizer."""
        self.model, self.objective, self.config = model, objective, config
        self.optimizer = self.setup(build_optimizer)
        self.params = trained_parameters(model)
        return self.optimizer

    @abstractmethod
    def setup(self, build_optimizer: BuildOptimizer) -> torch.optim.Optimizer:
        """:meth:`prepare`'s engine part: ``self.wrapped`` and the optimizer."""

    # ------------------------------------------------------------------------------------ a step

    @abstractmethod
    def forward_backward(self, batch: Any, normaliser: float, last: bool) -> Any:
        """The loss of one micro-batch and its gradient, ``loss_sum / normaliser`` (the step's normaliser over all
        processes); ``last``: the step's last micro-batch on this process. Returns the objective's output, or
        None for a micro-batch skipped."""

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the gradient to ``max_norm`` (unscaled first under loss scaling); returns the whole gradient's norm
        (``inf``: measure only)."""
        self.precision.unscale(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)

    def optimizer_step(self) -> None:
        """The optimizer's step (called for a finite loss only; under loss scaling the scaler skips a step whose
        gradients overflowed: ``precision.last_skipped``)."""
        self.precision.step(self.optimizer)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """``fn(model)``, e.g. an evaluation, on every process."""
        return fn(self.model)

    # ------------------------------------------------------------------------------------ checkpoints

    def gather(self, with_optimizer: bool) -> Gathered:
        """The trained weights (and, ``with_optimizer``, the optimizer's state) as the main process writes them. A
        collective where the engine splits them: every process calls it."""
        return Gathered(self.model, self.config)

    def save_engine_state(self, folder: Path) -> None:
        """Write what each process holds of the run's state into ``folder`` (a collective); nothing here."""
        return None

    def load_trained(self, folder: Path, read: Callable[[str], torch.Tensor], names: set[str]) -> None:
        """Resume: the checkpoint ``folder``'s trained tensors (``read(name)`` for each of ``names``) into the
        model, on every process."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in names:
                params[name].copy_(read(name))

    def load_optimizer(self, state: dict[str, Any]) -> None:
        """Resume: what ``trainer_state.pt`` saved of the optimizer, into the optimizer."""
        self.optimizer.load_state_dict(state)

    def launch_of(self, optimizer_state: dict[str, Any] | None = None) -> str:
        """What a checkpoint's optimizer state depends on, in words: of this run, or of a saved
        ``optimizer_state`` (FSDP2 keys it by parameter names; DeepSpeed's record names stage and processes;
        one process and DDP save alike). A resume whose two differ is refused."""
        if optimizer_state is None:
            return self.launch
        return saved_launch(optimizer_state)

    @staticmethod
    def saved_launch(optimizer_state: dict[str, Any]) -> str | None:
        """This engine's :attr:`launch` when it saved ``optimizer_state``, else None (the default: one process
        and DDP save a plain optimizer state, which any engine that is neither of the others reads)."""
        return None

    # ------------------------------------------------------------------------------------ processes

    @abstractmethod
    def barrier(self) -> None: ...

    @abstractmethod
    def broadcast(self, value: Any) -> Any:
        """The main process's ``value``, on every process."""

    @abstractmethod
    def sum(self, value: float) -> float:
        """``value`` summed over the processes."""

    @abstractmethod
    def sum_each(self, values: dict[str, float]) -> dict[str, float]:
        """Each of ``values`` summed over the processes."""

    @abstractmethod
    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable), in rank order, on every process."""

    @abstractmethod
    def main_process_first(self) -> contextlib.AbstractContextManager[None]:
        """The main process runs the block first (e.g. filling the tokenized-data cache), then the others."""


class Parallel(Strategy):
    """Several processes through accelerate (its ``Accelerator`` owns the process group): the loss runs inside
    the engine's wrapper (:class:`ObjectiveModule`), gradients are synchronised at the step's last micro-batch."""

    def device(self) -> torch.device | None:
        return self.accelerator.device

    def forward_backward(self, batch: Any, normaliser: float, last: bool) -> Any:
        # the engine averages gradients over processes: each scales its loss back to the step's sum. Every
        # process runs every micro-batch, also one without a trained token (the engine's collectives need all); a
        # step without any (GRPO: every group filtered out) gets a zero gradient
        with self.no_sync(skip=not last):
            with self.precision.autocast():
                out = cast(torch.nn.Module, self.wrapped)(batch)
            self.backward(out.loss_sum * (self.world / normaliser if normaliser else 0.0))
        return out

    @contextlib.contextmanager
    def no_sync(self, skip: bool) -> Iterator[None]:
        """No gradient synchronisation inside the block when ``skip`` (every micro-batch but the step's last)."""
        if skip:
            with self.accelerator.no_sync(self.wrapped):
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.backward(loss)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def broadcast(self, value: Any) -> Any:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def sum_each(self, values: dict[str, float]) -> dict[str, float]:
        return {k: self.sum(v) for k, v in sorted(values.items())}      # one order on every process

    def all_gather_objects(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        with self.accelerator.main_process_first():
            yield


def saved_launch(optimizer_state: dict[str, Any]) -> str:
    """The launch (:attr:`Strategy.launch`) of the run that saved ``optimizer_state`` (a checkpoint's): each
    engine whose optimizer state only it can load (every :class:`Strategy` subclass that overrides
    :meth:`Strategy.saved_launch`) recognises its own; one process and DDP save alike."""
    todo = list(Strategy.__subclasses__())
    while todo:
        engine = todo.pop()
        todo.extend(engine.__subclasses__())
        launch = engine.saved_launch(optimizer_state)
        if launch is not None:
            return launch
    return WHOLE


"""The reference model of the preference losses: the model the policy started from, frozen, with no second copy
of the base in memory.

- A run from the base model: the policy with its method disabled (:func:`tuneforge.methods.method_disabled`),
  i.e. the base model itself.
- A run from an SFT run (``init_from``): the base with the SFT adapter, as it was before the first step. The
  policy's trained parameters at that moment (the loaded adapter) are kept as one frozen copy, the adapter's
  size (:class:`FrozenWeights`), and swapped in for the reference forward: each trained parameter is pointed at
  its frozen tensor and back (no copy, no second model, the policy's own forward code), so the reference is
  exactly the SFT model at every step. Loading the adapter a second time as another named adapter would cost the
  same memory but need every method's adapter switching (peft's ``set_adapter`` also flips ``requires_grad``)
  and would be saved with the run.
- Full fine-tuning (which can be neither disabled nor kept twice without doubling the weights): the weights as
  they are, so its reference log-probabilities must all be computed before the first step.

Always without grad and with dropout off (eval mode; the training mode is restored after).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from tuneforge.methods import get_method, method_disabled

if TYPE_CHECKING:
    from tuneforge.config import RunConfig


class FrozenWeights:
    """A frozen copy of ``model``'s trained parameters as they are now (``[p.detach().clone()]``: the adapter's
    size in memory), which :meth:`swapped_in` puts in their place for a block."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.frozen = [p.detach().clone() for p in self.params]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.frozen)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block every trained parameter holds its frozen value (the tensors behind the parameters are
        swapped, and swapped back after; the parameters, their gradients and the optimizer's state are untouched).
        Autocast keeps lower-precision casts of trained parameters for the rest of its block, keyed by the
        parameter: they are cleared on the way in and out, so neither model computes with the other's casts."""
        live = [p.data for p in self.params]
        torch.clear_autocast_cache()
        try:
            for p, frozen in zip(self.params, self.frozen, strict=True):
                p.data = frozen
            yield
        finally:
            for p, tensor in zip(self.params, live, strict=True):
                p.data = tensor
            torch.clear_autocast_cache()


@contextlib.contextmanager
def reference_model(model: torch.nn.Module, config: RunConfig, init: FrozenWeights | None = None) -> Iterator[None]:
    """Within the block ``model`` computes the reference: no grad, dropout off, and ``init`` swapped in (a run from
    ``init_from``), else the method disabled (the base model), else (full fine-tuning) the model as it is."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if init is not None:
                with init.swapped_in():
                    yield
            elif get_method(config.method).disable is None:
                yield
            else:
                with method_disabled(model, config):
                    yield
    finally:
        model.train(was_training)

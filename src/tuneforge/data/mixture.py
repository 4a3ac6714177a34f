"""Mixtures: ``data.train`` as a list of sources, each with a ``weight`` or ``epochs``.

Each source is prepared as a one-file ``data.train`` would be (:func:`tuneforge.data.dataset.prepare_data`: its
own validation split or file, its own token-cache entry keyed by its content), so changing a weight never
tokenizes again. Its ``n_i`` training examples then give ``c_i`` examples to each epoch:

* ``epochs: e``: ``c_i = round(e * n_i)`` (at least 1);
* ``weight: w``, when every source has a weight: the weights are normalised to shares ``p_i = w_i / sum(w)``
  and an epoch is one pass over the *anchor*, the first source with a positive weight (put your own data first):
  ``N = n_a / p_a`` examples, of which source ``i`` gives ``c_i = round(N * p_i)``;
* ``weight`` beside ``epochs`` sources: the weights are shares of the whole epoch and must sum to less than 1;
  the ``epochs`` sources make up the rest, ``N = C / (1 - sum(w))`` with ``C`` their examples, and a weighted
  source gives ``c_i = round(N * w_i)``.

A source gives its ``c_i`` examples as ``c_i // n_i`` full passes over its examples plus a sample without
replacement of ``c_i % n_i`` of them, drawn from ``(seed, epoch, source)``: a fractional share sees other
examples each epoch. An epoch's examples (:meth:`Mixture.epoch_indices`) are a pure function of ``(seed, epoch)``
and the sources' sizes; the trainer shuffles them by ``(seed, epoch)`` like a one-file epoch
(:func:`tuneforge.data.packing.epoch_order`), so a resumed run draws what the uninterrupted run drew.

:func:`tuneforge.data.dataset.prepare_mixture` prepares the sources (every source's training examples one after
another in ``train``, likewise ``validation``) and :class:`Mixture` says where each source's are; the checks of a
list of sources are :func:`tuneforge.data.settings.check_sources`.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pathlib import Path

    from tuneforge.data.settings import DataConfig, SourceConfig

T = TypeVar("T")


def examples_per_epoch(sources: Sequence[SourceConfig], sizes: Sequence[int]) -> list[int]:
    """``c_i``: the examples each source gives to an epoch, from its ``n_i`` training examples (module docstring)."""
    counts = [0] * len(sources)
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    for i, s in enumerate(sources):
        if s.weight is None:
            counts[i] = max(1, round((s.epochs if s.epochs is not None else 1.0) * sizes[i]))
    if not weighted:
        return counts
    weights = {i: float(sources[i].weight or 0.0) for i in weighted}
    if len(weighted) == len(sources):
        total = sum(weights.values())
        anchor = next(i for i in weighted if weights[i] > 0)
        length = sizes[anchor] * total / weights[anchor]
        shares = {i: w / total for i, w in weights.items()}
    else:
        length = sum(counts) / (1 - sum(weights.values()))
        shares = weights
    for i in weighted:
        counts[i] = round(length * shares[i])
    return counts


@dataclass
class MixtureSource:
    """Where one source's examples sit in :class:`~tuneforge.data.dataset.PreparedData` and what it gives an
    epoch: ``train[start:start + size]``, ``validation[val_start:val_start + val_size]``, ``per_epoch``
    examples."""

    name: str
    path: str
    weight: float | None
    epochs: float | None
    start: int
    size: int
    val_start: int
    val_size: int
    per_epoch: int
    train_tokens: int = 0       # tokens of the source's training examples (once each)

    def record(self) -> dict[str, Any]:
        """The source as ``run.json``'s ``sources`` lists it (the counts seen are added by the trainer)."""
        out: dict[str, Any] = {"name": self.name, "path": self.path}
        out.update({"weight": self.weight} if self.weight is not None else {"epochs": self.epochs or 1.0})
        out.update({"train_examples": self.size, "validation_examples": self.val_size,
                    "train_tokens": self.train_tokens, "examples_per_epoch": self.per_epoch})
        return out


@dataclass
class Mixture:
    """The sources of a mixture, in ``data.train``'s order, and how an epoch draws from them."""

    sources: list[MixtureSource] = field(default_factory=list)

    @property
    def epoch_length(self) -> int:
        return sum(s.per_epoch for s in self.sources)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def epoch_indices(self, seed: int, epoch: int) -> list[int]:
        """Indices into ``train`` of epoch ``epoch``'s examples, source by source (unshuffled: the trainer's
        :func:`~tuneforge.data.packing.epoch_order` shuffles them): ``per_epoch // size`` full passes over each
        source, then ``per_epoch % size`` of its examples drawn without replacement from ``(seed, epoch, source)``."""
        out: list[int] = []
        for k, s in enumerate(self.sources):
            passes, rest = divmod(s.per_epoch, s.size)
            for _ in range(passes):
                out.extend(range(s.start, s.start + s.size))
            if rest:
                rng = random.Random((seed * 1_000_003 + epoch) * 1_009 + k)
                out.extend(s.start + j for j in sorted(rng.sample(range(s.size), rest)))
        return out

    def source_of(self, index: int) -> int:
        """The number (0-based) of the source whose training example ``index`` is."""
        return bisect.bisect_right([s.start for s in self.sources], index) - 1

    def validation_of(self, validation: Sequence[T]) -> list[tuple[str, list[T]]]:
        """``validation`` (the prepared data's) cut into each source's examples, as ``(name, examples)``."""
        return [(s.name, list(validation[s.val_start:s.val_start + s.val_size])) for s in self.sources]


def resolve_sources(cfg: DataConfig, base: Path, config_name: str) -> None:
    """Each source's ``path`` (a file or folder) and ``validation`` (a file) resolved from the current folder, then
    ``base`` (the config's folder); one that is in neither is a ConfigError naming the source."""
    from tuneforge.data.sources import resolve_source
    from tuneforge.errors import ConfigError

    for i, s in enumerate(cfg.sources or [], 1):
        for key, value in (("path", s.path), ("validation", s.validation)):
            if value is None:
                continue
            found = resolve_source(value, base)
            if found is None:
                kind = "file or folder" if key == "path" else "file"
                raise ConfigError(f"{config_name}: 'data.train' source {i} ({s.label}): {key}: {kind} "
                                  f"{value!r} not found (relative paths are tried from the current folder and from "
                                  f"{base}/; a Hub dataset is hf://owner/name)")
            setattr(s, key, found)

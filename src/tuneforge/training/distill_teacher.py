"""The teacher of ``task: distill``: loaded as training loads a model, frozen, checked against the student's
tokenizer; and its top-k log-probs cached on disk.

- :func:`check_teacher_tokenizer`: the teacher's tokenizer (a run's saved one, or the model's) must have the
  student's vocabulary, token for token; otherwise :class:`~tuneforge.errors.ConfigError` naming
  ``distill.teacher`` (exit status 2), before the student's weights load.
- :class:`Teacher`: ``distill.teacher`` is a tuneforge run directory (``config.yaml``: its base model with its
  trained adapter or full weights, through :func:`tuneforge.runs.load_run`, as evaluation loads a run), or a model
  folder / built-in name (:func:`tuneforge.models.loading.load_model`, as training loads a base). Loaded on first
  use, in eval mode, every parameter ``requires_grad=False``, and only ever run under ``torch.no_grad``;
  :attr:`Teacher.forwards` counts its forwards.
- :class:`TopKCache`: for ``distill.cache_top_k = k``, the teacher's ``k`` largest log-probabilities (temperature
  1; fp32) and their token ids (int32) at every trained position of every train and validation example, computed
  once, in packed rows, and saved in the token cache (:mod:`tuneforge.data.token_cache`) under a key of the
  teacher's weights (:func:`teacher_fingerprint`), ``k`` and the examples' tokens: a second run (or a resumed one)
  loads them and never loads the teacher. An example is known by its tokens and targets
  (:func:`example_keys`), so a row's top-k is found whatever row the example is packed in (the examples of a
  packed row never attend to each other, so an example's teacher outputs do not depend on its row).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tuneforge.data.packing import IGNORE, PackedBatch, pack
from tuneforge.errors import ConfigError
from tuneforge.kernels.chunked_loss import chunk_positions, lm_head_bypassed, output_head
from tuneforge.methods.dispatch import method_forward

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def is_run(teacher: str) -> bool:
    return (Path(teacher).expanduser() / "config.yaml").is_file()


def teacher_tokenizer(teacher: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer the teacher was trained with: a run's saved one, else the model's."""
    if is_run(teacher):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(teacher)
    from tuneforge.models.loading import load_tokenizer

    return load_tokenizer(teacher, trust_remote_code=trust_remote_code)


def check_teacher_tokenizer(student_tokenizer: Any, teacher: str, trust_remote_code: bool = False) -> None:
    """Raise :class:`ConfigError` (one line naming ``distill.teacher``) unless the teacher's vocabulary (token ->
    id) is the student's: logit distillation compares the two models' probabilities of the same token ids."""
    try:
        theirs = teacher_tokenizer(teacher, trust_remote_code).get_vocab()
    except (OSError, ValueError) as e:
        raise ConfigError(f"distill.teacher: {teacher!r}: its tokenizer does not load ({str(e).splitlines()[0]})"
                          ) from None
    ours = student_tokenizer.get_vocab()
    if theirs != ours:
        only_teacher = len(theirs.keys() - ours.keys())
        moved = sum(1 for tok, i in ours.items() if tok in theirs and theirs[tok] != i)
        raise ConfigError(f"distill.teacher: {teacher!r} has another tokenizer than the student's model ({len(theirs)} "
                          f"tokens against {len(ours)}; {only_teacher} only the teacher's, {moved} with other ids): "
                          "logit distillation needs one vocabulary; use a teacher of the student's family, or "
                          "distil its generated answers with task: sft")


def teacher_fingerprint(teacher: str) -> str:
    """SHA-256 naming the teacher's weights: a run's trained files (``*.safetensors`` / ``*.bin`` in its folder),
    its method and its base model's; a model's weights (:func:`tuneforge.runs.base_model_sha256`); a hub id not
    available locally, its name."""
    from tuneforge.fileutil import file_sha256
    from tuneforge.runs import base_model_sha256

    folder = Path(teacher).expanduser()
    if is_run(teacher):
        from tuneforge.config import load_config

        config = load_config(folder / "config.yaml", check_files=False)
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        parts = [f"method {config.method}", f"base {base_model_sha256(config.model)}",
                 *(f"{p.name} {file_sha256(p)}" for p in files)]
    else:
        parts = [f"model {base_model_sha256(teacher) or teacher}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def example_keys(batch: PackedBatch) -> list[str]:
    """One key per example of the packed row: SHA-1 of its tokens and targets (what decides the teacher's outputs
    at its trained positions)."""
    ids, targets = batch.input_ids[0].cpu(), batch.targets[0].cpu()
    bounds = torch.tensor([0, *batch.lengths]).cumsum(0).tolist()
    return [hashlib.sha1(ids[s:e].numpy().tobytes() + targets[s:e].numpy().tobytes()).hexdigest()
            for s, e in zip(bounds, bounds[1:], strict=False)]


class Teacher:
    """The frozen teacher (module docstring), loaded on first use onto ``device`` in ``dtype``."""

    def __init__(self, spec: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False) -> None:
        self.spec, self.device, self.dtype, self.trust_remote_code = spec, device, dtype, trust_remote_code
        self._model: torch.nn.Module | None = None
        self.method: Any = "base"           # what method_forward runs: "base", or the run's config (its method)
        self.forwards = 0

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            started = time.perf_counter()
            if is_run(self.spec):
                from tuneforge.runs import load_run

                loaded = load_run(self.spec, device=str(self.device))
                model, self.method = loaded.model, loaded.config
            else:
                from tuneforge.models.loading import load_model

                model = load_model(self.spec, dtype=self.dtype, device=self.device,
                                   trust_remote_code=self.trust_remote_code)
            model.eval()
            model.requires_grad_(False)
            self._model = model
            log.info("distill.teacher %s loaded (frozen, eval mode) in %.1fs", self.spec, time.perf_counter() - started)
        return self._model

    @property
    def lm_head(self) -> torch.nn.Linear | None:
        """The teacher's plain linear LM head, when its logits can be computed chunk by chunk from hidden states."""
        found = output_head(self.model)
        return None if found is None else getattr(*found)

    @torch.no_grad()
    def forward(self, batch: PackedBatch, hidden: bool = False) -> torch.Tensor:
        """At the row's ``L`` trained positions: the final hidden states ``[L, H]`` when ``hidden`` (and the head is
        a plain linear one: :attr:`lm_head`), else the logits ``[L, V]``. Eval mode, no grad."""
        model = self.model
        self.forwards += 1
        if hidden:
            with lm_head_bypassed(model):
                return method_forward(model, self.method, batch.input_ids, batch.position_ids, batch.loss_positions,
                                      lengths=batch.lengths or None, cu_seqlens=batch.cu_seqlens)
        return method_forward(model, self.method, batch.input_ids, batch.position_ids, batch.loss_positions,
                              lengths=batch.lengths or None, cu_seqlens=batch.cu_seqlens)

    @torch.no_grad()
    def top_k(self, batch: PackedBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([L, k] fp32 log-probs, [L, k] long token ids)`` of the row's trained positions, sorted by
        probability; the logits computed in chunks of positions where the head allows."""
        head = self.lm_head
        out = self.forward(batch, hidden=head is not None)
        chunk = chunk_positions(head.out_features) if head is not None else max(1, out.shape[0])
        values, indices = [], []
        for s in range(0, out.shape[0], chunk):
            logits = (head(out[s:s + chunk]) if head is not None else out[s:s + chunk]).float()
            top = torch.log_softmax(logits, dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
            values.append(top.values)
            indices.append(top.indices)
        if not values:
            width = min(k, head.out_features if head is not None else out.shape[-1])
            return (torch.zeros(0, width, device=out.device), torch.zeros(0, width, dtype=torch.long,
                                                                          device=out.device))
        return torch.cat(values), torch.cat(indices)


class TopKCache:
    """Each example's teacher top-k (module docstring), looked up by :func:`example_keys`."""

    def __init__(self, payload: dict[str, Any]) -> None:
        self.logps: torch.Tensor = payload["logps"]
        self.indices: torch.Tensor = payload["indices"]
        counts = payload["counts"].tolist()
        starts = [0, *torch.tensor(counts, dtype=torch.long).cumsum(0).tolist()]
        self.where = {key: (starts[i], starts[i + 1]) for i, key in enumerate(payload["keys"])}

    @property
    def k(self) -> int:
        return int(self.logps.shape[1])

    def gather(self, batch: PackedBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``([L, k] fp32 log-probs, [L, k] long ids)`` of the row's trained positions, in row order."""
        spans = []
        for key in example_keys(batch):
            if key not in self.where:
                raise RuntimeError("distill.cache_top_k: an example of this micro-batch is not in the teacher's "
                                   "top-k cache (it was built from other data); delete the cache entry or unset "
                                   "cache_top_k")
            spans.append(self.where[key])
        logps = torch.cat([self.logps[s:e] for s, e in spans]) if spans else self.logps[:0]
        indices = torch.cat([self.indices[s:e] for s, e in spans]) if spans else self.indices[:0]
        return logps.to(device), indices.to(device=device, dtype=torch.long)


def build_top_k(teacher: Teacher, examples: Sequence[Any], k: int, per_row: int, progress: bool = False
                ) -> dict[str, Any]:
    """The cache payload of ``examples`` (each once, by key): packed ``per_row`` examples a row, the teacher's
    :meth:`Teacher.top_k` split back into examples."""
    from tqdm.auto import tqdm

    keys: list[str] = []
    counts: list[int] = []
    logps: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    seen: set[str] = set()
    rows = [examples[i:i + per_row] for i in range(0, len(examples), per_row)]
    for row in tqdm(rows, desc="teacher top-k", unit="row", disable=not progress):
        batch = pack(row)
        values, ids = teacher.top_k(batch.to(teacher.device), k)
        values, ids = values.cpu(), ids.cpu().to(torch.int32)
        trained = (batch.targets[0] != IGNORE).long()
        bounds = torch.tensor([0, *batch.lengths]).cumsum(0).tolist()
        offset = 0
        for key, s, e in zip(example_keys(batch), bounds, bounds[1:], strict=False):
            n = int(trained[s:e].sum())
            if key not in seen:
                seen.add(key)
                keys.append(key)
                counts.append(n)
                logps.append(values[offset:offset + n])
                indices.append(ids[offset:offset + n])
            offset += n
    width = logps[0].shape[1] if logps else k
    return {"keys": keys, "counts": torch.tensor(counts, dtype=torch.long),
            "logps": torch.cat(logps) if logps else torch.zeros(0, width),
            "indices": torch.cat(indices) if indices else torch.zeros(0, width, dtype=torch.int32)}


def cache_key_parts(teacher: str, k: int, examples: Sequence[Any]) -> dict[str, Any]:
    """What names a top-k cache entry: the teacher's weights, ``k`` and every example's key."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(example_keys(pack([ex]))[0].encode())
    return {"kind": "distill_teacher_top_k", "version": CACHE_VERSION, "teacher": teacher_fingerprint(teacher),
            "k": k, "examples": h.hexdigest()}

"""A local teacher for ``tuneforge data generate``: a run directory, a package or a model folder (or a registry
name) answering prompts through our batched, KV-cached generation (:func:`tuneforge.evaluation.generation.generate`).

It has the :class:`tuneforge.data.teacher.Teacher` interface: ``batch_size`` prompts a call, one call at a time
(``max_concurrency`` 1: one model, one device). ``n`` answers a prompt are ``n`` sampled passes, pass ``k`` seeded
``seed + k``; greedy (``temperature`` 0) gives one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.data.teacher import TeacherError
from tuneforge.evaluation import generation
from tuneforge.runs.loading import LoadedModel, load_base, load_run


class LocalTeacher:
    max_concurrency = 1

    def __init__(self, loaded: LoadedModel, name: str, temperature: float = 0.0, max_tokens: int = 512, n: int = 1,
                 batch_size: int = 16, seed: int = 0):
        if n < 1 or max_tokens < 1 or batch_size < 1:
            raise TeacherError(f"--n, --max-tokens and --batch-size must be >= 1 (got {n}, {max_tokens}, "
                               f"{batch_size})")
        if n > 1 and temperature <= 0:
            raise TeacherError(f"--n {n} answers a prompt need --temperature > 0 (at 0 they would be the same)")
        self.loaded, self.name = loaded, name
        self.temperature, self.max_tokens, self.n = temperature, max_tokens, n
        self.batch_size, self.seed = batch_size, seed
        self.method = loaded.config.method if loaded.config is not None else None

    @classmethod
    def from_path(cls, path: str | Path, device: str = "auto", **settings: Any) -> LocalTeacher:
        """A run directory or package (``config.yaml``: its base model with what it trained), else a model folder
        or registry name (the model alone)."""
        folder = Path(path).expanduser()
        try:
            loaded = load_run(folder, device=device) if (folder / "config.yaml").is_file() else load_base(
                str(path), device=device)
        except (OSError, ValueError) as e:
            raise TeacherError(f"--teacher {path}: not a run directory, a model folder nor a model name this machine "
                               f"has ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return cls(loaded, str(path), **settings)

    def settings(self) -> dict[str, Any]:
        base = self.loaded.config.model if self.loaded.config is not None else None
        return {"name": self.name, "kind": "local", "base_model": base, "method": self.method,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "n": self.n, "seed": self.seed}

    def answer(self, prompts: list[list[dict]]) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in prompts]
        for k in range(self.n):
            gens = generation.generate(self.loaded.model, self.loaded.tokenizer, prompts, self.method,
                                       max_new_tokens=self.max_tokens, batch_size=len(prompts),
                                       temperature=self.temperature, seed=self.seed + k)
            for answers, text in zip(out, gens.texts, strict=True):
                answers.append(text)
        return out

    def is_transient(self, error: BaseException) -> bool:
        return False

"""Base model vs tuned run on a held-out split: exact match, valid-format rate and validation loss."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from tuneforge.config import RunConfig
from tuneforge.data.dataset import LoadedFile, load_examples, tokenize_examples
from tuneforge.data.packing import micro_batches
from tuneforge.evaluation.exact_match import GenerationEval, evaluate_generation
from tuneforge.serving.inference import LoadedModel, load_base, load_run
from tuneforge.training.loss import evaluate_loss

log = logging.getLogger(__name__)


@dataclass
class ModelScore:
    name: str
    exact_match: float
    valid_format: float | None
    validation_loss: float | None


def heldout_conversations(config: RunConfig, file: str) -> list[list[dict]]:
    loaded = load_examples(file, config.data, config.task)
    if loaded.rejects:
        r = loaded.rejects[0]
        raise ValueError(f"{r.source}:{r.line}: test record unusable: {r.reason}")
    return [ex.messages for ex in loaded.examples][: config.eval_task.max_examples if config.eval_task else None]


def validation_loss(loaded: LoadedModel, config: RunConfig) -> float | None:
    if not config.data.validation:
        return None
    file = load_examples(config.data.validation, config.data, config.task)
    examples, _ = tokenize_examples(LoadedFile(file.examples), loaded.tokenizer, config.data, [])
    batches = list(micro_batches(examples, config.batch_size, config.seed, 0, shuffle=False))
    return evaluate_loss(loaded.model, batches, loaded.device, config.method if loaded.config else "base")


def score(name: str, loaded: LoadedModel, config: RunConfig,
          conversations: list[list[dict]]) -> tuple[ModelScore, GenerationEval]:
    task = config.eval_task
    gen = evaluate_generation(loaded, conversations, labels=task.labels if task else None,
                              max_new_tokens=task.max_new_tokens if task else 32)
    return ModelScore(name, gen.exact_match, gen.valid_format, validation_loss(loaded, config)), gen


def compare_base_and_run(config: RunConfig, run_dir: str | Path,
                         base_score: tuple[ModelScore, GenerationEval] | None = None,
                         test_file: str | None = None) -> list[ModelScore]:
    """Score the base model and the tuned run on the held-out test file; write ``eval.json`` in the run."""
    test_file = test_file or (config.eval_task.file if config.eval_task else None)
    if not test_file:
        raise ValueError("no held-out test file: set eval_task.file in the config or pass one")
    conversations = heldout_conversations(config, test_file)
    if base_score is None:
        base_score = score("base", load_base(config.model, config.dtype, config.device), config, conversations)
    tuned_score = score("tuned", load_run(run_dir), config, conversations)
    out = {"test_file": test_file, "n": len(conversations),
           "scores": [asdict(base_score[0]), asdict(tuned_score[0])],
           "predictions": {"base": base_score[1].predictions, "tuned": tuned_score[1].predictions}}
    (Path(run_dir) / "eval.json").write_text(json.dumps(out, indent=2))
    return [base_score[0], tuned_score[0]]


def format_table(scores: list[ModelScore], n: int) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:5.1f}%"

    def num(v):
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"held-out test: {n} examples",
             f"| {'model':<7} | exact match | valid format | validation loss |",
             f"|{'-' * 9}|{'-' * 13}|{'-' * 14}|{'-' * 17}|"]
    for s in scores:
        lines.append(f"| {s.name:<7} | {pct(s.exact_match):>11} | {pct(s.valid_format):>12} "
                     f"| {num(s.validation_loss):>15} |")
    return "\n".join(lines)

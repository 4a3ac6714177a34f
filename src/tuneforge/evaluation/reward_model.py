"""A trained reward model (a ``task: reward`` run) as a Python object that scores completions.

    rm = RewardModel.from_run("runs/rm")
    rm.score(["What is 2 + 2?"], ["4."])          # -> [1.37]: one float per (prompt, completion)
    rm.pairwise_accuracy("held_out_pairs.jsonl")  # -> {"accuracy": Interval(...), "pairs": 120, ...}

Each (prompt, completion) is rendered exactly as training rendered a pair's side (the run's chat template and
``data.system_prompt``; the completion one assistant turn closed by its end-of-turn token) and scored by the run's
model with its head (:mod:`tuneforge.methods.reward_head`), in padding-free packed rows of ``batch_size``
sequences: the same forward as training's, so a pair scores here as it scored in validation. Used by GRPO's
rewards and by ``tuneforge eval`` on a reward run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.config import RunConfig, load_config
from tuneforge.data.formats import normalise_messages
from tuneforge.data.packing import pack
from tuneforge.data.preference import tokenize_side
from tuneforge.data.rendering import TokenizedExample
from tuneforge.evaluation.bootstrap import RESAMPLES, Interval, interval
from tuneforge.methods.reward_head import load_score_head, packed_rewards, padded_rewards
from tuneforge.runs.layout import RunDir

Prompt = str | Sequence[dict[str, Any]]


class NotARewardRun(ValueError):
    """The folder is not a reward model run (``task: reward``)."""


@dataclass
class RewardModel:
    """A reward run's model (its method applied, the head attached), tokenizer and config, in eval mode."""

    model: torch.nn.Module
    tokenizer: Any
    config: RunConfig

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto") -> RewardModel:
        """Load the reward run (or checkpoint folder of one) in ``run_dir``: its base model, trained method and head.
        :class:`NotARewardRun` in one line for another kind of run."""
        from tuneforge.runs import load_run

        run = RunDir(run_dir)
        if not run.config.is_file():
            raise NotARewardRun(f"{run.path} is not a tuneforge run directory (no config.yaml)")
        task = load_config(run.config, check_files=False).task
        if task != "reward":
            raise NotARewardRun(f"{run.path} is a task: {task} run, not a reward model (train one with task: reward)")
        loaded = load_run(run.path, device=device)
        assert loaded.config is not None
        load_score_head(loaded.model, run.path)
        loaded.model.eval()
        return cls(loaded.model, loaded.tokenizer, loaded.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompt: Prompt, completion: str) -> TokenizedExample:
        """``prompt`` (a user turn, or the conversation so far as messages) + ``completion`` (the assistant's answer)
        as training rendered one side of a pair."""
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else normalise_messages(list(prompt)))
        system = self.config.data.system_prompt
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        return tokenize_side(messages, {"role": "assistant", "content": completion}, self.tokenizer,
                             self.config.data.train_reasoning)

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str], batch_size: int = 16) -> list[float]:
        """The reward of each ``(prompt, completion)``, ``batch_size`` sequences per packed forward."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: give one prompt each")
        sequences = [self.tokenize(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.score_tokenized(sequences, batch_size)

    @torch.no_grad()
    def score_tokenized(self, sequences: Sequence[TokenizedExample], batch_size: int = 16) -> list[float]:
        """The reward of each tokenized sequence (read at its last token), ``batch_size`` per packed forward."""
        out: list[float] = []
        for start in range(0, len(sequences), batch_size):
            batch = pack(sequences[start:start + batch_size]).to(self.device)
            out += packed_rewards(self.model, batch, self.config.method).tolist()
        return out

    @torch.no_grad()
    def score_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` rewards of a padded batch of token ids (either side padded; ``attention_mask`` 0 on padding), e.g.
        a generator's prompt + completion tensors. Not for prefix or prompt tuning runs (use :meth:`score`)."""
        return padded_rewards(self.model, input_ids.to(self.device), attention_mask.to(self.device))

    def pairwise_accuracy(self, file: str | Path, batch_size: int = 16, resamples: int = RESAMPLES,
                          seed: int = 0) -> dict[str, Any]:
        """Held-out pairs of ``file`` (any format ``task: preference`` reads, the run's ``data.columns``): the share
        whose chosen side scores higher, with a percentile bootstrap interval over pairs, the mean margin, and how
        many records were rejected (and why, the first of them)."""
        from tuneforge.data.preference import load_pairs, tokenize_pairs

        cfg = self.config.data.model_copy(update={"train": str(file), "validation": None})
        loaded = load_pairs(str(file), cfg)
        rejects = list(loaded.rejects)
        pairs, _ = tokenize_pairs(loaded.examples, self.tokenizer, cfg, rejects)
        if not pairs:
            raise ValueError(f"{file}: no usable preference pair ({len(rejects)} rejected"
                             + (f"; first: line {rejects[0].line}: {rejects[0].reason})" if rejects else ")"))
        rewards = self.score_tokenized([side for p in pairs for side in (p.chosen, p.rejected)], batch_size)
        chosen, rejected = rewards[0::2], rewards[1::2]
        wins = [float(c > r) for c, r in zip(chosen, rejected, strict=True)]
        accuracy: Interval = interval(wins, resamples=resamples, seed=seed)
        return {"pairs": len(pairs), "rejected": len(rejects), "accuracy": accuracy,
                "margin": sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(pairs),
                "chosen": chosen, "rejected_rewards": rejected}


def evaluate_reward(run_dir: str | Path, file: str | Path, out_dir: str | Path, max_examples: int | None = None,
                    batch_size: int = 16, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """``tuneforge eval`` on a reward run: the held-out pairwise accuracy of the pairs in ``file`` (the first
    ``max_examples``) with its 95% bootstrap interval, written as ``report.json`` / ``report.md`` / ``report.html``
    in ``out_dir``; returns the report. The generation columns of a causal LM's evaluation do not apply."""
    from tuneforge.fileutil import file_sha256
    from tuneforge.runs.records import EvalReport

    path = Path(file)
    if not path.is_file():
        raise ValueError(f"test file {path}: not found")
    rm = RewardModel.from_run(run_dir)
    if max_examples is not None:
        lines = [line for line in path.read_text().splitlines() if line.strip()][:max_examples]
        path = Path(out_dir) / f".{path.stem}.first-{max_examples}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in lines))
    result = rm.pairwise_accuracy(path, batch_size, resamples, seed)
    acc: Interval = result["accuracy"]
    report = {"tuneforge_eval": 1, "run": str(run_dir), "main_metric": "pairwise_accuracy", "columns": ["tuned"],
              "sets": {"test": {"file": str(file), "sha256": file_sha256(str(file)), "n": result["pairs"],
                                "rejected": result["rejected"], "pairwise_accuracy": acc.to_dict(),
                                "mean_margin": result["margin"]}},
              "metadata": {"task": "reward", "bootstrap_resamples": resamples, "seed": seed}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    EvalReport.model_validate(report).write(out / "report.json")
    text = reward_table(report)
    (out / "report.md").write_text(f"# Reward model evaluation\n\nRun: `{run_dir}`\n\n{text}\n")
    (out / "report.html").write_text(f"<html><body><h1>Reward model evaluation</h1><pre>{text}</pre></body></html>\n")
    if path != Path(file):
        path.unlink()
    return report


def reward_table(report: dict[str, Any], set_name: str = "test") -> str:
    """The pairwise accuracy of a reward run's report as a Markdown table."""
    entry = report["sets"][set_name]
    acc = entry["pairwise_accuracy"]
    return ("| pairs | pairwise accuracy | 95% interval | mean margin | rejected |\n|---|---|---|---|---|\n"
            f"| {entry['n']} | {100 * acc['value']:.1f}% | {100 * acc['low']:.1f}-{100 * acc['high']:.1f}% | "
            f"{entry['mean_margin']:.3f} | {entry['rejected']} |")

"""``metrics.jsonl`` (one JSON object per logged step) and the loss-curve plot next to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO


class MetricsLog:
    """Appends one JSON row per logged step to ``path``.

    ``keep_rows``: resume an existing log, keeping its first ``keep_rows`` rows (those written up to the
    checkpoint the run resumes from; later ones are dropped, so no step appears twice); None starts anew.
    """

    def __init__(self, path: Path | None, keep_rows: int | None = None):
        self.path = path
        self.rows: list[dict] = []
        self._file: IO[str] | None = None
        if path is None:          # a process that keeps the rows but writes no file (not the main one)
            return
        if keep_rows is not None and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()[:keep_rows]
            self.rows = [json.loads(line) for line in lines]
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        self._file = open(path, "a" if keep_rows is not None else "w", encoding="utf-8")

    def log(self, **row) -> None:
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def plot_loss_curve(rows: list[dict], out: Path, title: str = "") -> None:
    """Training loss per step and validation loss at each evaluation, saved as a PNG; for preference runs
    (rows with ``rewards/margins``) the reward margins, train and validation, in a second panel beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    margins = [(r["step"], r["rewards/margins"]) for r in rows if r.get("rewards/margins") is not None]
    if margins:
        fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 4), dpi=110)
        right.plot(*zip(*margins, strict=True), label="train reward margin", color="tab:green", alpha=0.8)
        eval_margins = [(r["step"], r["eval_rewards/margins"]) for r in rows if "eval_rewards/margins" in r]
        if eval_margins:
            right.plot(*zip(*eval_margins, strict=True), "o-", label="validation reward margin", color="tab:red")
        right.axhline(0, color="grey", lw=0.8)
        right.set_xlabel("optimizer step")
        right.set_ylabel("reward margin (chosen - rejected)")
        right.set_title("reward margins")
        right.grid(alpha=0.3)
        right.legend()
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", alpha=0.8)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("preference loss (mean over pairs)" if margins else "cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)

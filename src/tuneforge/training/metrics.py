"""``metrics.jsonl`` (one JSON object per logged step) and the loss-curve plot next to it."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends one JSON row per logged step to ``path``.

    ``keep_rows``: resume an existing log, keeping its first ``keep_rows`` rows (those written up to the
    checkpoint the run resumes from; later ones are dropped, so no step appears twice); None starts anew.
    """

    def __init__(self, path: Path, keep_rows: int | None = None):
        self.path = path
        self.rows: list[dict] = []
        if keep_rows is not None and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()[:keep_rows]
            self.rows = [json.loads(line) for line in lines]
            path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        self._file = open(path, "a" if keep_rows is not None else "w", encoding="utf-8")

    def log(self, **row) -> None:
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def plot_loss_curve(rows: list[dict], out: Path, title: str = "") -> None:
    """Training loss per step and validation loss at each evaluation, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", alpha=0.8)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)

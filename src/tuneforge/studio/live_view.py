"""The Train tab's live view of a run directory: the status line, the loss points and the log's tail, read
incrementally so that a tick with nothing new costs a few ``stat`` calls and nothing else.

The page asks every second while a run trains, on the cores the run trains on, so :meth:`LiveView.tick` keeps what
it has read (one :class:`LiveView` per page, in a ``gr.State``):

- ``metrics.jsonl`` is parsed from where the last tick stopped (the byte after its last complete line); a file that
  shrank or was replaced (a resumed run drops the rows after its checkpoint) is read again from the start;
- the log (``studio.log``, appended to by every start) likewise: only the bytes appended, into a 64 KB tail;
- the status line is rebuilt only when one of its inputs changed (the rows, the pid file's process, ``run.json``,
  the config's ``max_steps``).

A tick answers :class:`Changes`: ``None`` for each output that did not change, and the points for the loss curve
only when new ones arrived, at most every ``plot_every_s`` seconds while the run trains (and once more when it
ends). The curve is an inline SVG (:func:`loss_svg`, as the evaluation report draws it): a string built in a few
hundred Python calls, where the matplotlib PNG it replaced took ~100,000 and Gradio then copied and hashed the file.

The page is sent the view's strings as they are (``status_line``, ``curve_html``, ``log_text``), changed or not:
counted in Python calls (``sys.setprofile``) with Gradio 6.31, post-processing the tick's outputs took ~1,150 calls
with the three strings and ~4,400 with three ``gr.skip()`` (a skip is a property update: Gradio rebuilds the
component and its config), and the page does not redraw a value equal to the one it shows.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from tuneforge.runs.layout import RunDir
from tuneforge.studio import process
from tuneforge.studio.runs_tab import run_status

STUDIO_CONFIG = "studio.yaml"
LOG_TAIL_BYTES = 64_000
LOG_LINES = 30
MAX_CURVE_POINTS = 1000


@dataclass
class Progress:
    """What the live view shows of a run: the loss points (``(step, loss)``), the last step, tokens/s and the
    seconds left."""

    status: str
    train: list[tuple[int, float]]
    validation: list[tuple[int, float]]
    step: int = 0
    total_steps: int | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None

    def line(self) -> str:
        parts = [self.status, f"step {self.step}" + (f" / {self.total_steps}" if self.total_steps else ""),
                 f"loss points: {len(self.train)} train, {len(self.validation)} validation"]
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.0f} tokens/s")
        if self.eta_s is not None and self.status == "running":
            parts.append(f"ETA {self.eta_s:.0f} s")
        return " · ".join(parts)


@functools.lru_cache(maxsize=64)
def _max_steps_of(path: str, mtime_ns: int) -> int | None:
    """``max_steps`` of a config file, parsed once per version of the file (a whole resolved config takes
    pure-Python YAML ~10-25 ms)."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return int(tree["max_steps"]) if isinstance(tree, dict) and isinstance(tree.get("max_steps"), int) else None


def _config_version(run_dir: Path) -> tuple[str, int] | None:
    """The config the run trains on (``studio.yaml``, else ``config.yaml``) and its mtime."""
    for name in (STUDIO_CONFIG, "config.yaml"):
        try:
            return str(run_dir / name), (run_dir / name).stat().st_mtime_ns
        except OSError:
            continue
    return None


def _stat(path: Path) -> tuple[int, int, int] | None:
    """``(inode, size, mtime_ns)`` of ``path``; None when it does not exist."""
    try:
        s = path.stat()
    except OSError:
        return None
    return s.st_ino, s.st_size, s.st_mtime_ns


@dataclass
class Changes:
    """One tick's answer: each field None when that output did not change since the last tick."""

    status: str | None = None
    points: Progress | None = None      # the loss points to draw (only when new ones arrived and a drawing is due)
    log: str | None = None


@dataclass
class LiveView:
    """What one page has read of one run directory (see the module docstring); :meth:`tick` brings it up to date.
    ``status_line``, ``curve_html`` and ``log_text``: what the page shows, as of the last tick.

    ``reads`` counts the times ``metrics.jsonl`` or the log was opened: a tick on unchanged files opens neither."""

    run_dir: str = ""
    train: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    last_row: dict[str, Any] = field(default_factory=dict)
    metrics_at: int = 0                                 # bytes of metrics.jsonl parsed (complete lines)
    metrics_stat: tuple[int, int, int] | None = None
    log_at: int = 0
    log_stat: tuple[int, int, int] | None = None
    log_bytes: bytes = b""                              # the log's last LOG_TAIL_BYTES
    inputs: tuple[Any, ...] = ()                        # what the status line was built from
    drawn: tuple[int, int] = (0, 0)                     # the points (train, validation) last drawn
    drawn_at: float = float("-inf")
    status_line: str = ""
    log_text: str = ""
    curve_html: str = ""
    reads: int = 0

    def tick(self, run_dir: str, now: float, plot_every_s: float = 5.0) -> Changes:
        """Bring the view of ``run_dir`` up to date; ``now``: a monotonic clock's seconds (for the plot's pace)."""
        fresh = run_dir != self.run_dir
        if fresh:                                           # another run: everything anew
            self.__dict__.update(LiveView(run_dir=run_dir, reads=self.reads).__dict__)
        path = Path(run_dir)
        running = process.read_pid(path) is not None
        if running and self.inputs and not self.inputs[0]:  # it started again: a resume rewrites its rows
            self.metrics_stat = None
        self._read_metrics(RunDir(path).metrics)
        log = self._read_log(path / process.LOG_FILE)
        changes = Changes(log="" if fresh and log is None else log)
        if changes.log is not None:
            self.log_text = changes.log
        record = _stat(RunDir(path).record)
        config = _config_version(path)
        inputs = (running, self.metrics_at, record, config)
        if inputs != self.inputs:
            self.inputs = inputs
            changes.status = self.status_line = self.progress().line()
        points = (len(self.train), len(self.validation))
        due = not running or now - self.drawn_at >= plot_every_s
        if points != self.drawn and any(points) and due:
            self.drawn, self.drawn_at = points, now
            changes.points = self.progress()
            self.curve_html = loss_svg(changes.points)
        return changes

    def progress(self) -> Progress:
        """What the view has read, as of the last tick."""
        running, config = (self.inputs[0], self.inputs[3]) if self.inputs else (False, None)
        p = Progress("running" if running else run_status(self.run_dir), list(self.train), list(self.validation),
                     total_steps=_max_steps_of(*config) if config is not None else None)
        if self.last_row:
            p.step = int(self.last_row.get("step", 0))
            p.tokens_per_s = self.last_row.get("avg_tokens_per_s")
            elapsed = self.last_row.get("elapsed_s")
            if p.total_steps and elapsed and p.step:
                p.eta_s = max(0.0, (p.total_steps - p.step) * float(elapsed) / p.step)
        return p

    def _read_metrics(self, path: Path) -> None:
        """Parse the complete lines appended to ``metrics.jsonl`` since the last tick (a half-written last line
        waits for the next one)."""
        stat = _stat(path)
        if stat == self.metrics_stat:
            return
        if stat is None or self.metrics_stat is None or stat[0] != self.metrics_stat[0] or stat[1] < self.metrics_at:
            self.train, self.validation, self.last_row, self.metrics_at = [], [], {}, 0      # new or rewritten
        self.metrics_stat = stat
        if stat is None:
            return
        self.reads += 1
        with open(path, "rb") as f:
            f.seek(self.metrics_at)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.metrics_at += len(complete)
        for line in complete.splitlines():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(row, dict):
                continue
            if row.get("loss") is not None:
                self.train.append((row["step"], row["loss"]))
            if row.get("eval_loss") is not None:
                self.validation.append((row["step"], row["eval_loss"]))
            self.last_row = row

    def _read_log(self, path: Path) -> str | None:
        """The log's last :data:`LOG_LINES` lines when it grew since the last tick, else None."""
        stat = _stat(path)
        if stat == self.log_stat:
            return None
        if stat is None or self.log_stat is None or stat[0] != self.log_stat[0] or stat[1] < self.log_at:
            self.log_at, self.log_bytes = 0, b""
        self.log_stat = stat
        if stat is None:
            return ""
        self.reads += 1
        start = max(self.log_at, stat[1] - LOG_TAIL_BYTES)
        if start > self.log_at:                         # it grew by more than the tail: the old tail is gone
            self.log_bytes = b""
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
            self.log_at = f.tell()
        self.log_bytes = (self.log_bytes + data)[-LOG_TAIL_BYTES:]
        return process.tail_lines(self.log_bytes.decode("utf-8", "replace"), LOG_LINES)


def thinned(points: list[tuple[int, float]], most: int = MAX_CURVE_POINTS) -> list[tuple[int, float]]:
    """At most ``most`` of ``points``, evenly spaced, the last one kept (a long run's curve stays a small SVG)."""
    if len(points) <= most:
        return points
    stride = -(-len(points) // most)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def loss_svg(p: Progress) -> str:
    """The loss points as an inline SVG, drawn as the evaluation report's loss curve is
    (:func:`~tuneforge.evaluation.report.loss_curve_svg`: train loss per step, validation loss at each evaluation):
    a few hundred Python calls and a string, where a matplotlib PNG took ~100,000 calls each time it was drawn."""
    from tuneforge.evaluation.report import loss_curve_svg

    rows = [{"step": s, "loss": v} for s, v in thinned(p.train)] + \
        [{"step": s, "eval_loss": v} for s, v in thinned(p.validation)]
    return loss_curve_svg(rows)

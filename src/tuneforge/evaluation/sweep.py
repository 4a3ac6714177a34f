"""``tuneforge sweep CONFIG --grid lora.r=4,16,64 [--grid learning_rate=1e-4,3e-4]``: train and evaluate each
point of a grid, then one table and one plot of quality against cost.

Each point is its own run folder under the sweep folder (``<output_dir>-sweep/`` by default), named by its
settings; it is trained and evaluated in a child process (``tuneforge train``, then ``tuneforge eval``), so
its peak memory is that process's own peak RSS (``os.wait4``), and a crash in one point does not take the
sweep down. Resumable: a point whose ``eval/report.json`` exists is not rerun (delete its folder to redo
it). Quality is the tuned column's main metric on the test file; cost is trainable parameters, training
seconds, peak memory (RSS of the training process) and the adapter's size on disk.
"""

from __future__ import annotations

import html
import io
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tuneforge.runs import EvalReport, NotARunError, RunDir, RunRecord

log = logging.getLogger(__name__)

WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")


class SweepError(ValueError):
    """A grid or sweep setting that cannot be used; the message names it."""


@dataclass
class Point:
    name: str
    overrides: list[str]
    quality: float | None = None
    quality_low: float | None = None
    quality_high: float | None = None
    trainable_params: int | None = None
    train_seconds: float | None = None
    peak_rss_mib: float | None = None
    adapter_mib: float | None = None
    status: str = "pending"


def parse_grid(items: list[str]) -> list[list[str]]:
    """``["lora.r=4,16", "learning_rate=1e-4,3e-4"]`` -> every combination as ``--set`` overrides."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not options:
            raise SweepError(f"--grid {item!r}: write KEY=V1,V2,... e.g. --grid lora.r=4,16,64")
        axes.append([f"{key.strip()}={v}" for v in options])
    if not axes:
        raise SweepError("give at least one --grid KEY=V1,V2")
    return [list(combo) for combo in itertools.product(*axes)]


def point_name(overrides: list[str]) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9_.+-]", "-", o.replace("=", "-")) for o in overrides)


def _run_child(args: list[str], log_file: Path) -> tuple[int, float]:
    """Run ``tuneforge ARGS`` in a child; (exit code, the child's peak RSS in MiB)."""
    with open(log_file, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", *args], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024


def _size_mib(run_dir: Path) -> float:
    return sum((run_dir / f).stat().st_size for f in WEIGHT_FILES if (run_dir / f).is_file()) / 2**20


def _collect(point: Point, run_dir: Path) -> None:
    report = EvalReport.from_file(EvalReport.path_in(run_dir))
    run = RunRecord.from_file(RunRecord.path_in(run_dir))
    tuned = report.score("test", "tuned", str(report.main_metric))
    if tuned is None:
        raise NotARunError(f"{EvalReport.path_in(run_dir)}: no {report.main_metric} of the tuned column on the test "
                           "set; delete the point's folder to redo it")
    point.quality, point.quality_low, point.quality_high = tuned.value, tuned.low, tuned.high
    point.trainable_params = run.trainable_params
    point.train_seconds = run.wall_time_s
    point.adapter_mib = round(_size_mib(run_dir), 3)
    sweep_meta = run_dir / "sweep_point.json"
    if sweep_meta.is_file():
        point.peak_rss_mib = json.loads(sweep_meta.read_text()).get("peak_rss_mib")


def sweep(config_path: str | Path, grid: list[str], out: str | Path | None = None, overrides: list[str] | None = None,
          eval_args: list[str] | None = None) -> tuple[Path, list[Point]]:
    """Train and evaluate every grid point (skipping finished ones); write ``sweep.md``, ``sweep.json`` and
    ``sweep.png`` (and ``sweep.html``: the table and the plot as inline SVG) in the sweep folder and return it
    with the points."""
    from tuneforge.config import load_config

    combos = parse_grid(grid)
    config = load_config(config_path, [*(overrides or []), *combos[0]])    # fail on a bad key before any work
    folder = Path(out) if out else Path(f"{config.output_dir.rstrip('/')}-sweep")
    folder.mkdir(parents=True, exist_ok=True)
    points = []
    for i, combo in enumerate(combos, 1):
        load_config(config_path, [*(overrides or []), *combo])            # every point's config is valid
        point = Point(point_name(combo), combo)
        run_dir = folder / point.name
        points.append(point)
        if RunDir(run_dir).report.is_file() and RunDir(run_dir).record.is_file():
            print(f"[{i}/{len(combos)}] {point.name}: done before, kept")
            _collect(point, run_dir)
            point.status = "kept"
            continue
        print(f"[{i}/{len(combos)}] {point.name}: training")
        started = time.time()
        code, peak = _run_child(["train", str(config_path), *sum((["--set", o] for o in overrides or []), []),
                                 *sum((["--set", o] for o in combo), []), "--set", f"output_dir={run_dir}",
                                 "--set", "progress=false"], folder / f"{point.name}.log")
        if code != 0:
            point.status = f"training failed (exit {code}, see {folder / (point.name + '.log')})"
            print(f"  {point.status}")
            continue
        (run_dir / "sweep_point.json").write_text(json.dumps({"peak_rss_mib": round(peak, 1), "overrides": combo,
                                                              "seconds": round(time.time() - started, 1)}))
        print(f"[{i}/{len(combos)}] {point.name}: evaluating")
        code, _ = _run_child(["eval", str(run_dir), "--no-progress", *(eval_args or ["--columns", "tuned"])],
                             folder / f"{point.name}.log")
        if code not in (0, 1):
            point.status = f"evaluation failed (exit {code}, see {folder / (point.name + '.log')})"
            print(f"  {point.status}")
            continue
        _collect(point, run_dir)
        point.status = "done"
    write_summary(folder, points)
    return folder, points


def table(points: list[Point]) -> str:
    lines = ["| point | quality [95% CI] | trainable params | train s | peak RSS MiB | adapter MiB | status |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        q = ("n/a" if p.quality is None or p.quality_low is None or p.quality_high is None
             else f"{100 * p.quality:.1f}% [{100 * p.quality_low:.1f}, {100 * p.quality_high:.1f}]")
        lines.append(f"| {' '.join(p.overrides)} | {q} | {p.trainable_params or 'n/a'} | {p.train_seconds or 'n/a'} "
                     f"| {p.peak_rss_mib or 'n/a'} | {p.adapter_mib if p.adapter_mib is not None else 'n/a'} "
                     f"| {p.status} |")
    return "\n".join(lines)


def write_summary(folder: Path, points: list[Point]) -> None:
    (folder / "sweep.json").write_text(json.dumps([asdict(p) for p in points], indent=2))
    (folder / "sweep.md").write_text(table(points) + "\n")
    done = [p for p in points if p.quality is not None]
    if not done:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    costs = [("trainable_params", "trainable parameters"), ("train_seconds", "training seconds"),
             ("peak_rss_mib", "peak RSS (MiB)"), ("adapter_mib", "adapter on disk (MiB)")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharey=True)
    for ax, (key, label) in zip(axes, costs, strict=True):
        xs = [getattr(p, key) for p in done]
        ys = [100 * p.quality for p in done]
        errs = [[100 * (p.quality - p.quality_low) for p in done], [100 * (p.quality_high - p.quality) for p in done]]
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None]
        if pts:
            ax.errorbar([x for x, _ in pts], [y for _, y in pts],
                        yerr=[[e for e, x in zip(errs[0], xs, strict=True) if x is not None],
                              [e for e, x in zip(errs[1], xs, strict=True) if x is not None]], fmt="o", capsize=3)
            for p, x, y in zip(done, xs, ys, strict=True):
                if x is not None:
                    ax.annotate(" ".join(o.split("=")[-1] for o in p.overrides), (x, y), fontsize=8,
                                textcoords="offset points", xytext=(4, 4))
            positive = [x for x, _ in pts if x > 0]
            if positive and max(positive) / min(positive) > 8:      # ranks 4..64: a log axis spreads them
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())           # minor labels overlap
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("quality (tuned, %)")
    fig.suptitle("quality against cost")
    fig.tight_layout()
    fig.savefig(folder / "sweep.png", dpi=110)
    svg = io.StringIO()
    fig.savefig(svg, format="svg")        # glyphs as paths: the page needs no font and no network
    plt.close(fig)
    (folder / "sweep.html").write_text(summary_html(points, svg.getvalue()))


def summary_html(points: list[Point], plot_svg: str) -> str:
    """The sweep's table and its quality-against-cost plot (inline SVG) as one page that opens offline."""
    def cell(v: object) -> str:
        return html.escape("n/a" if v is None else str(v))

    rows = []
    for p in points:
        q = ("n/a" if p.quality is None or p.quality_low is None or p.quality_high is None
             else f"{100 * p.quality:.1f}% [{100 * p.quality_low:.1f}, {100 * p.quality_high:.1f}]")
        rows.append("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in (
            " ".join(p.overrides), q, p.trainable_params, p.train_seconds, p.peak_rss_mib, p.adapter_mib,
            p.status)) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("point", "quality [95% CI]", "trainable params", "train s",
                                              "peak RSS MiB", "adapter MiB", "status"))
    plot = plot_svg[plot_svg.find("<svg"):]           # without the XML prolog and doctype
    plot = re.sub(r"<metadata>.*?</metadata>", "", plot, flags=re.S)      # matplotlib's RDF block (a date, names)
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tuneforge sweep</title><style>"
            "body{font:14px system-ui,sans-serif;margin:24px}table{border-collapse:collapse}"
            "td,th{border:1px solid #d6dbe4;padding:4px 8px}th{background:#eef1f5}</style></head><body>"
            f"<h1>Sweep: quality against cost</h1><table class='sweep'><thead><tr>{head}</tr></thead><tbody>"
            f"{''.join(rows)}</tbody></table><div class='plot'>{plot}</div></body></html>")

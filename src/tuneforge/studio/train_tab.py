"""The Train tab: the run-config form (:mod:`tuneforge.studio.form`), the memory plan for its settings
(:func:`tuneforge.estimate.plan.plan_for_config`, as ``tuneforge plan``), and Start / Stop / Resume of
``tuneforge train`` as its own process (:mod:`tuneforge.studio.process`), watched through its run directory:
the loss curve (train and validation rows of ``metrics.jsonl``), tokens/s, ETA and the log's tail.

Start writes the validated config, every key resolved (:func:`tuneforge.config.dump_config`), to
``<run>/studio.yaml`` and runs ``tuneforge train <run>/studio.yaml``; Resume runs it again with ``--resume``
(the trainer continues from the ``last`` checkpoint its SIGTERM wrote). One run trains at a time: a Start or
Resume while a run under the studio's folder is training is refused.
"""

from __future__ import annotations

import functools
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from tuneforge.config import dump_config
from tuneforge.studio import process
from tuneforge.studio.form import FormField, schema_fields, validate
from tuneforge.studio.runs_tab import has_last_checkpoint, is_run_dir, last_metrics, list_runs, run_status

STUDIO_CONFIG = "studio.yaml"


class Refused(RuntimeError):
    """A start the studio will not make (invalid settings, a run already training); the message says why."""


def running_run(folder: str | Path) -> Path | None:
    """The run under ``folder`` that is training now, if any: a run directory whose ``studio.pid`` process is alive
    (only the pid files are read: the live view asks every second)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    return next((p for p in candidates if (p / process.PID_FILE).is_file() and is_run_dir(p)
                 and process.read_pid(p) is not None), None)


def form_fields() -> list[FormField]:
    """The schema's fields in the form's order (the ``data:`` section, the top-level keys, then every other section):
    the order of the Start button's inputs after the run name."""
    groups: dict[str, list[FormField]] = {}
    for f in schema_fields():
        groups.setdefault(f.section, []).append(f)
    order = ["data", ""] + [s for s in groups if s not in ("data", "")]
    return [f for section in order for f in groups[section]]


def start_run(folder: str | Path, name: str, fields: list[FormField], values: list[Any]) -> tuple[Path, dict]:
    """Validate the form and start ``tuneforge train`` on it in ``folder/name``; ``(run dir, {})`` when it started,
    ``(run dir, errors)`` (:func:`~tuneforge.studio.form.validate`'s) when nothing started. Raises
    :class:`Refused` while another run trains or when ``name`` holds a run already."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        return Path(folder), {"": f"run name {name!r}: use letters, digits, '.', '_' or '-' (a folder under "
                                  f"{folder})"}
    run_dir = Path(folder) / name
    config, errors = validate(fields, values, str(run_dir))
    if errors:
        return run_dir, errors
    busy = running_run(folder)
    if busy is not None:
        raise Refused(f"{busy.name} is training: stop it before starting another run")
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "run.json").exists():
        raise Refused(f"{run_dir} holds a run already: choose another run name (or Resume that run)")
    assert config is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STUDIO_CONFIG).write_text(dump_config(config))
    process.start(run_dir, ["train", str(run_dir / STUDIO_CONFIG)])
    return run_dir, {}


def resume_run(folder: str | Path, run_dir: str | Path) -> None:
    """``tuneforge train --resume`` on a stopped run (the config it started with)."""
    run_dir = Path(run_dir)
    busy = running_run(folder)
    if busy is not None:
        raise Refused(f"{busy.name} is training: stop it before resuming a run")
    config = run_dir / STUDIO_CONFIG if (run_dir / STUDIO_CONFIG).is_file() else run_dir / "config.yaml"
    if not config.is_file():
        raise Refused(f"{run_dir}: no config to resume from (not a run directory)")
    if not has_last_checkpoint(run_dir):
        raise Refused(f"{run_dir}: no `last` checkpoint to resume from (Stop writes one after the current step)")
    process.start(run_dir, ["train", str(config), "--resume"])


@dataclass
class Progress:
    """What the live view shows of a run: the loss points, the last step, tokens/s and the seconds left."""

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
    """``max_steps`` of a config file, parsed once per version of the file (the live view asks every second; a
    whole resolved config takes pure-Python YAML ~10-25 ms)."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return int(tree["max_steps"]) if isinstance(tree, dict) and isinstance(tree.get("max_steps"), int) else None


def _total_steps(run_dir: Path) -> int | None:
    for name in (STUDIO_CONFIG, "config.yaml"):
        try:
            mtime_ns = (run_dir / name).stat().st_mtime_ns
        except OSError:
            continue
        steps = _max_steps_of(str(run_dir / name), mtime_ns)
        if steps is not None:
            return steps
    return None


def progress(run_dir: str | Path) -> Progress:
    """The live view of ``run_dir`` from its files."""
    run_dir = Path(run_dir)
    rows = last_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    validation = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    p = Progress(run_status(run_dir), train, validation, total_steps=_total_steps(run_dir))
    if rows:
        last = rows[-1]
        p.step = int(last.get("step", 0))
        p.tokens_per_s = last.get("avg_tokens_per_s")
        elapsed = last.get("elapsed_s")
        if p.total_steps and elapsed and p.step:
            p.eta_s = max(0.0, (p.total_steps - p.step) * float(elapsed) / p.step)
    return p


def loss_plot(p: Progress, out: Path) -> Path:
    """The loss points drawn as the run's own ``loss_curve.png`` is (:func:`~tuneforge.training.metrics.
    plot_loss_curve`: train loss per step, validation loss at each evaluation), into the PNG ``out``."""
    from tuneforge.training.metrics import plot_loss_curve

    rows = [{"step": s, "loss": v} for s, v in p.train] + [{"step": s, "eval_loss": v} for s, v in p.validation]
    plot_loss_curve(rows, out, title="loss (live, from metrics.jsonl)")
    return out


def build(folder: str, defaults: dict[str, Any] | None = None, refresh_s: float = 1.0,
          plot_every_s: float = 5.0) -> None:
    """The tab's components; ``defaults``: initial form values by dotted key (e.g. the quickstart's data).

    The status line and the log refresh every ``refresh_s`` seconds; the loss plot (drawn with matplotlib, the live
    view's only real work in the studio's process) at most every ``plot_every_s`` seconds while the run trains, and
    once more when it ends, so the page open beside a run takes next to nothing from the cores it trains on."""
    import gradio as gr

    from tuneforge.studio.form import _yaml_text

    defaults = defaults or {}
    plots = Path(tempfile.mkdtemp(prefix="tuneforge-studio-"))        # the live loss plots, one per change
    components: list[Any] = []
    fields = form_fields()                  # in the order of ``components``
    groups: dict[str, list[FormField]] = {}
    for f in fields:
        groups.setdefault(f.section, []).append(f)
    with gr.Row():
        name = gr.Textbox(f"run-{time.strftime('%Y%m%d-%H%M%S')}", label=f"run name (a folder under {folder})",
                          elem_id="train-name", scale=3)
        check = gr.Button("Check + plan", elem_id="train-check", scale=1)
        start = gr.Button("Start", variant="primary", elem_id="train-start", scale=1)
        stop = gr.Button("Stop", variant="stop", elem_id="train-stop", scale=1)
        resume = gr.Button("Resume", elem_id="train-resume", scale=1)
    message = gr.Markdown(elem_id="train-message")
    with gr.Row():
        run_pick = gr.Dropdown([str(r.path) for r in list_runs(folder)], label="watching run",
                               allow_custom_value=True, elem_id="train-run", scale=2)
        status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        curve = gr.Image(label="loss", elem_id="train-curve", type="filepath", interactive=False, scale=3,
                         height=300)
        log = gr.Textbox(label="log (studio.log)", lines=10, max_lines=10, elem_id="train-log", autoscroll=True,
                         scale=2)
    plan_box = gr.Textbox(label="memory plan (tuneforge plan)", lines=4, elem_id="train-plan")
    for section in groups:
        title = {"": "run", "data": "data"}.get(section, section)
        opened = ("", "data", str(defaults.get("method", "lora")))    # the default method's section too
        with gr.Accordion(title, open=section in opened):
            with gr.Row(equal_height=False):
                for f in groups[section]:
                    value = defaults.get(f.key, f.default)
                    value = _yaml_text(value) if f.kind == "text" and not isinstance(value, str) else value
                    kwargs: dict[str, Any] = {"label": f.key, "info": f.description, "min_width": 260,
                                              "elem_id": "cfg-" + f.key.replace(".", "-")}
                    if f.kind == "bool":
                        components.append(gr.Checkbox(value=value, **kwargs))
                    elif f.kind == "choice":
                        components.append(gr.Dropdown(list(f.choices), value=value, **kwargs))
                    else:
                        components.append(gr.Textbox(value=value, **kwargs))

    def field_updates(errors: dict[str, str]) -> list[Any]:
        return [gr.update(info=("⚠ " + errors[f.key]) if f.key in errors else f.description) for f in fields]

    def on_check(*values: Any) -> list[Any]:
        config, errors = validate(fields, list(values), str(Path(folder) / "check"))
        if errors:
            text = "**invalid, nothing started:** " + "; ".join(f"`{k}`: {v}" if k else v for k, v in errors.items())
            return [text, ""] + field_updates(errors)
        from tuneforge.estimate.plan import plan_for_config

        assert config is not None
        try:
            table = plan_for_config(config).table()
        except Exception as e:         # a method or model the estimator does not model: one line
            table = f"no plan: {e}"
        return ["settings valid", table] + field_updates({})

    def on_start(run_name: str, *values: Any) -> list[Any]:
        try:
            run_dir, errors = start_run(folder, run_name.strip() or "run", fields, list(values))
        except (Refused, process.AlreadyRunning) as e:
            return [f"**refused:** {e}", gr.update()] + field_updates({})
        if errors:
            text = "**invalid, nothing started:** " + "; ".join(f"`{k}`: {v}" if k else v for k, v in errors.items())
            return [text, gr.update()] + field_updates(errors)
        runs = [str(r.path) for r in list_runs(folder)]
        return [f"started `tuneforge train` in {run_dir}", gr.update(choices=runs, value=str(run_dir))] + \
            field_updates({})

    def on_stop(run_dir: str | None) -> str:
        if not run_dir or not process.stop(run_dir):
            return "no run is training there"
        return f"stopping {Path(run_dir).name}: it finishes its step and saves a checkpoint (then Resume continues)"

    def on_resume(run_dir: str | None) -> str:
        if not run_dir:
            return "choose the run to resume"
        try:
            resume_run(folder, run_dir)
        except (Refused, process.AlreadyRunning) as e:
            return f"**refused:** {e}"
        return f"resumed {Path(run_dir).name}"

    def on_tick(run_dir: str | None, seen: str) -> tuple:
        """The live view; the curve is redrawn only when its points changed (``seen``: the run and its counts at the
        last drawing, ``@`` its time), so a finished run's plot stays still."""
        picked: Any = gr.update()           # never written back: a Start's choice must not race with a tick
        if not run_dir:
            busy = running_run(folder)
            if busy is None:
                return picked, "no run chosen", gr.update(), "", seen
            run_dir = picked = str(busy)
        p = progress(run_dir)
        key = f"{run_dir}:{len(p.train)}:{len(p.validation)}"
        seen_key, _, drawn_at = seen.partition("@")
        due = p.status != "running" or time.monotonic() - float(drawn_at or 0) >= plot_every_s
        curve_value = gr.update()
        if key != seen_key and (p.train or p.validation) and due:
            for old in plots.glob("loss-*.png"):        # Gradio has its own copy of the one shown
                old.unlink(missing_ok=True)
            curve_value = str(loss_plot(p, plots / f"loss-{abs(hash(key))}.png"))
            seen = f"{key}@{time.monotonic()}"
        return picked, p.line(), curve_value, process.log_tail(run_dir), seen

    check.click(on_check, components, [message, plan_box, *components])
    start.click(on_start, [name, *components], [message, run_pick, *components])
    stop.click(on_stop, run_pick, message)
    resume.click(on_resume, run_pick, message)
    seen = gr.State("")
    gr.Timer(refresh_s).tick(on_tick, [run_pick, seen], [run_pick, status, curve, log, seen], show_progress="hidden")

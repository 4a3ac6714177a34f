"""The Train tab: the run-config form (:mod:`tuneforge.studio.form`), the memory plan for its settings
(:func:`tuneforge.estimate.plan.plan_for_config`, as ``tuneforge plan``), and Start / Stop / Resume of
``tuneforge train`` as its own process (:mod:`tuneforge.studio.process`), watched through its run directory
(:mod:`tuneforge.studio.live_view`, which reads only what was appended): the loss curve (train and validation rows
of ``metrics.jsonl``), tokens/s, ETA and the log's tail.

Start writes the validated config, every key resolved (:func:`tuneforge.config.dump_config`), to
``<run>/studio.yaml`` and runs ``tuneforge train <run>/studio.yaml``; Resume runs it again with ``--resume``
(the trainer continues from the ``last`` checkpoint its SIGTERM wrote). One run trains at a time: a Start or
Resume while a run under the studio's folder is training is refused.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from tuneforge.config import dump_config
from tuneforge.studio import process
from tuneforge.studio.form import FormField, schema_fields, validate
from tuneforge.studio.live_view import STUDIO_CONFIG, LiveView, Progress
from tuneforge.studio.runs_tab import has_last_checkpoint, is_run_dir, list_runs


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


def _training_now(folder: str | Path) -> str | None:
    """The "watching run" a page opens with: the run training now, if any."""
    busy = running_run(folder)
    return None if busy is None else str(busy)


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


def progress(run_dir: str | Path) -> Progress:
    """The live view of ``run_dir`` from its files, read once (the tab keeps a :class:`~tuneforge.studio.live_view.
    LiveView` that reads only what changed)."""
    view = LiveView()
    view.tick(str(run_dir), now=0.0)
    return view.progress()


def build(folder: str, defaults: dict[str, Any] | None = None, refresh_s: float = 1.0,
          plot_every_s: float = 5.0) -> list[Any]:
    """The tab's components; ``defaults``: initial form values by dotted key (e.g. the quickstart's data). Returns
    the tab's timers.

    Every ``refresh_s`` seconds the live view (:mod:`tuneforge.studio.live_view`) reads what was appended to the run's
    files: the status line, the log's tail, and the loss curve (an inline SVG, as the evaluation report's) drawn when
    new points arrived, at most every ``plot_every_s`` seconds while the run trains and once more when it ends, so a
    page open beside a run takes next to nothing from the cores it trains on."""
    import gradio as gr

    from tuneforge.studio.form import _yaml_text

    defaults = defaults or {}
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
                               value=lambda: _training_now(folder), allow_custom_value=True, elem_id="train-run",
                               scale=2)
        status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        curve = gr.HTML(label="loss", elem_id="train-curve", min_height=240)
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

    def on_stop(run_dir: str | None, view: LiveView) -> str:
        run_dir = run_dir or view.run_dir           # none picked: the run the live view shows
        if not run_dir or not process.stop(run_dir):
            return "no run is training there"
        return f"stopping {Path(run_dir).name}: it finishes its step and saves a checkpoint (then Resume continues)"

    def on_resume(run_dir: str | None, view: LiveView) -> str:
        run_dir = run_dir or view.run_dir
        if not run_dir:
            return "choose the run to resume"
        try:
            resume_run(folder, run_dir)
        except (Refused, process.AlreadyRunning) as e:
            return f"**refused:** {e}"
        return f"resumed {Path(run_dir).name}"

    def on_tick(run_dir: str | None, view: LiveView) -> tuple:
        """The live view (:class:`~tuneforge.studio.live_view.LiveView`) of the run picked, else of the run training
        now, else of the one shown last. Its strings are sent as they are, changed or not: in Gradio 6 a
        ``gr.skip()`` costs the server more than an unchanged string (see :mod:`~tuneforge.studio.live_view`). The
        dropdown is not an output: an update would rebuild it every tick (and race with a Start's choice)."""
        if not run_dir:
            busy = running_run(folder)
            run_dir = str(busy) if busy is not None else view.run_dir
            if not run_dir:
                return "no run chosen", "", "", view
        view.tick(run_dir, time.monotonic(), plot_every_s)
        return view.status_line, view.curve_html, view.log_text, view

    check.click(on_check, components, [message, plan_box, *components])
    start.click(on_start, [name, *components], [message, run_pick, *components])
    view = gr.State(LiveView())            # per page: what its live view has read
    stop.click(on_stop, [run_pick, view], message)
    resume.click(on_resume, [run_pick, view], message)
    timer = gr.Timer(refresh_s)     # active from the start: a tab's select pauses the others (app.py), never starts it
    timer.tick(on_tick, [run_pick, view], [status, curve, log, view], show_progress="hidden")
    return [timer]

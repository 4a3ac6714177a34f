"""The Evaluate tab: ``tuneforge eval`` on a run as its own process (columns and test set chosen here), its log,
and the run's ``eval/report.html`` embedded once written. Two runs' reports side by side: pick a second run."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from tuneforge.runs.layout import RunDir
from tuneforge.studio import process
from tuneforge.studio.runs_tab import list_runs

PID, LOG = "studio-eval.pid", "studio-eval.log"
COLUMNS = ["base", "fewshot", "rag", "tuned", "tuned+rag"]


def eval_args(run_dir: str, columns: list[str], data: str | None, max_examples: int | None) -> list[str]:
    """``tuneforge eval``'s arguments for these choices."""
    args = ["eval", run_dir, "--no-progress"]
    if columns:
        args += ["--columns", ",".join(columns)]
    if data:
        args += ["--data", data]
    if max_examples:
        args += ["--max-examples", str(max_examples)]
    return args


def report_frame(run_dir: str | None, height: int = 700) -> str:
    """The run's ``report.html`` in an iframe (its own page: the report's styles stay its own); else a note."""
    if not run_dir:
        return ""
    report = RunDir(run_dir).eval_dir / "report.html"
    if not report.is_file():
        return f"<p>{html.escape(Path(run_dir).name)}: no report yet (run the evaluation)</p>"
    return (f'<iframe title="report" style="width:100%;height:{height}px;border:1px solid #ccc" '
            f'srcdoc="{html.escape(report.read_text(encoding="utf-8"), quote=True)}"></iframe>')


def build(folder: str, tab: Any = None) -> list[Any]:
    """The tab's components; ``tab``: its Tab, whose selection refreshes the lists of runs. Returns the tab's timers
   ."""
    import gradio as gr

    def finished() -> list[str]:
        return [str(r.path) for r in list_runs(folder) if r.status.startswith("finished")]

    with gr.Row():
        run = gr.Dropdown(finished(), label="run", allow_custom_value=True, elem_id="eval-run", scale=3)
        other = gr.Dropdown(finished(), label="compare with (optional)", allow_custom_value=True,
                            elem_id="eval-other", scale=3)
        refresh = gr.Button("Refresh runs", scale=1)
    with gr.Row():
        columns = gr.CheckboxGroup(COLUMNS, value=["base", "tuned"], label="columns", elem_id="eval-columns")
        data = gr.Textbox(label="test file (default: the config's eval.data, else data.validation)",
                          elem_id="eval-data")
        max_examples = gr.Number(0, label="max examples per set (0: all)", precision=0, minimum=0,
                                 elem_id="eval-max")
        go = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
    message = gr.Markdown(elem_id="eval-message")
    log = gr.Textbox(label="log", lines=6, max_lines=6, elem_id="eval-log")
    with gr.Row():
        report = gr.HTML(elem_id="eval-report")
        report_other = gr.HTML(elem_id="eval-report-other")

    def on_go(run_dir: str | None, cols: list[str], test: str, limit: float | None) -> str:
        if not run_dir:
            return "choose a finished run"
        if not Path(run_dir).is_dir():
            return f"**refused:** {run_dir} is not a folder: choose a finished run"
        if not cols:
            return "**refused:** choose at least one column"
        try:
            process.start(run_dir, eval_args(run_dir, cols, test.strip() or None, int(limit) if limit else None),
                          name=PID, log_name=LOG)
        except process.AlreadyRunning as e:
            return f"**refused:** {e}"
        return f"evaluating {Path(run_dir).name} (tuneforge eval); the report appears below when written"

    def on_tick(run_dir: str | None, second: str | None) -> tuple[Any, ...]:
        if not run_dir:
            return "", "", ""
        running = process.read_pid(run_dir, PID) is not None
        tail = process.log_tail(run_dir, 12, log_name=LOG)
        return tail, gr.update() if running else report_frame(run_dir), report_frame(second) if second else ""

    go.click(on_go, [run, columns, data, max_examples], message)
    run.change(lambda r: report_frame(r), run, report)
    other.change(lambda r: report_frame(r), other, report_other)
    refresh.click(lambda: (gr.update(choices=finished()), gr.update(choices=finished())), outputs=[run, other])
    if tab is not None:
        tab.select(lambda: (gr.update(choices=finished()), gr.update(choices=finished())), outputs=[run, other])
    timer = gr.Timer(3.0)           # active from the start: a tab's select pauses the others (app.py), never starts it
    timer.tick(on_tick, [run, other], [log, report, report_other], show_progress="hidden")
    return [timer]

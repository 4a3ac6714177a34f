"""The Ship tab: ``tuneforge package`` and ``tuneforge export`` (GGUF, with the quantization chosen) of a run, and
``tuneforge serve`` with the chosen runs as adapters, started and stopped here, with its URL and the curl and
openai-client lines that call it. Each runs as its own process (:mod:`tuneforge.studio.process`): packaging and
export with their output in the run's ``studio-ship.log``, the server's pid and log under ``<folder>/.serve`` (with
``serve.json``: its port and model, so a reopened studio shows where it listens)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneforge.studio import process
from tuneforge.studio.runs_tab import list_runs

PID, LOG = "studio-ship.pid", "studio-ship.log"
SERVE_DIR = ".serve"
QUANTS = ["f16", "q8_0", "q4_0"]
SERVE_INFO = "serve.json"


def serve_args(base: str, runs: list[str], port: int) -> list[str]:
    args = ["serve", "--base", base, "--host", "127.0.0.1", "--port", str(port)]
    for r in runs:
        args += ["--adapter", f"{Path(r).name}={r}"]
    return args


def snippets(port: int, model: str) -> str:
    """How to call the server: its URL, a curl line and the openai client's lines (markdown)."""
    url = f"http://127.0.0.1:{port}"
    return (f"serving at **{url}** (model `{model}`)\n\n```bash\ncurl {url}/v1/chat/completions -H 'Content-Type: "
            f"application/json' -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": "
            f"\"Hello\"}}]}}'\n```\n\n```python\nfrom openai import OpenAI\nclient = OpenAI(base_url=\"{url}/v1\", "
            f"api_key=\"none\")\nprint(client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": "
            f"\"user\", \"content\": \"Hello\"}}]).choices[0].message.content)\n```")


def serve_status(serve_dir: Path) -> str:
    """One line: the server's pid and URL while it runs, else that none runs."""
    pid = process.read_pid(serve_dir)
    if pid is None:
        return "no server running"
    try:
        info = json.loads((serve_dir / SERVE_INFO).read_text())
        where = f" at http://127.0.0.1:{int(info['port'])} (model `{info['model']}`)"
    except (OSError, ValueError, KeyError, TypeError):
        where = ""
    return f"server running (pid {pid}){where}"


def build(folder: str, model: str | None = None, tab: Any = None) -> list[Any]:
    """The tab's components; ``tab``: its Tab, whose selection refreshes the lists of runs. Returns the tab's timers
   ."""
    import gradio as gr

    from tuneforge.models.registry import DEFAULT_MODEL

    serve_dir = Path(folder) / SERVE_DIR

    def finished() -> list[str]:
        return [str(r.path) for r in list_runs(folder) if r.status.startswith("finished")]

    with gr.Row():
        run = gr.Dropdown(finished(), label="run (or a package, for Export)", allow_custom_value=True,
                          elem_id="ship-run", scale=3)
        refresh = gr.Button("Refresh runs", scale=1)
    with gr.Row():
        out = gr.Textbox(label="package folder (default: <run>-package)", elem_id="ship-out", scale=3)
        package = gr.Button("Package", elem_id="ship-package", scale=1)
    with gr.Row():
        quant = gr.Dropdown(QUANTS, value="q8_0", label="GGUF quantization", elem_id="ship-quant", scale=3)
        export = gr.Button("Export GGUF", elem_id="ship-export", scale=1)
    message = gr.Markdown(elem_id="ship-message")
    ship_log = gr.Textbox(label="package / export log (studio-ship.log)", lines=6, max_lines=6, elem_id="ship-log")
    gr.Markdown("### Serve")
    with gr.Row():
        base = gr.Textbox(model or DEFAULT_MODEL, label="base model", scale=2)
        adapters = gr.Dropdown(finished(), multiselect=True, label="adapters", allow_custom_value=True,
                               elem_id="ship-adapters", scale=3)
        port = gr.Number(8000, label="port", precision=0, minimum=1, maximum=65535, elem_id="ship-port", scale=1)
    with gr.Row():
        start = gr.Button("Start server", variant="primary", elem_id="ship-serve")
        stop = gr.Button("Stop server", variant="stop", elem_id="ship-serve-stop")
    serving = gr.Markdown(elem_id="ship-serving")
    status = gr.Markdown(serve_status(serve_dir), elem_id="ship-serve-status")
    serve_log = gr.Textbox(label="server log", lines=6, max_lines=6, elem_id="ship-serve-log")

    def not_a_folder(run_dir: str | None) -> str | None:
        if not run_dir:
            return "choose a finished run"
        if not Path(run_dir).is_dir():
            return f"**refused:** {run_dir} is not a folder: choose a finished run"
        return None

    def on_package(run_dir: str | None, folder_out: str) -> str:
        if (refused := not_a_folder(run_dir)) is not None:
            return refused
        assert run_dir is not None
        target = folder_out.strip() or f"{run_dir}-package"
        try:
            process.start(run_dir, ["package", run_dir, "--out", target], name=PID, log_name=LOG)
        except process.AlreadyRunning as e:
            return f"**refused:** {e}"
        return f"packaging {Path(run_dir).name} into {target} (tuneforge package; its output in the log below)"

    def on_export(run_dir: str | None, q: str) -> str:
        if (refused := not_a_folder(run_dir)) is not None:
            return refused
        assert run_dir is not None
        try:
            process.start(run_dir, ["export", run_dir, "--format", "gguf", "--quant", q], name=PID, log_name=LOG)
        except process.AlreadyRunning as e:
            return f"**refused:** {e}"
        return f"exporting {Path(run_dir).name} to GGUF ({q}) under {run_dir}/export"

    def on_serve(base_model: str, runs: list[str] | None, p: float | None) -> str:
        runs, port_n = list(runs or []), int(p or 8000)
        model_name = Path(runs[0]).name if runs else base_model
        try:
            process.start(serve_dir, serve_args(base_model, runs, port_n))
        except process.AlreadyRunning as e:
            return f"**refused:** {e}"
        (serve_dir / SERVE_INFO).write_text(json.dumps({"port": port_n, "model": model_name}))
        return snippets(port_n, model_name)

    def on_stop() -> str:
        if not process.stop(serve_dir, wait_s=10):
            return "no server running"
        if process.read_pid(serve_dir) is not None:
            return "stopping the server: it finishes the requests in flight (the line below says when it ended)"
        return "server stopped"

    def on_tick(run_dir: str | None) -> tuple[Any, Any, Any]:
        return (process.log_tail(run_dir, 12, log_name=LOG) if run_dir else "",
                process.log_tail(serve_dir, 12), serve_status(serve_dir))

    package.click(on_package, [run, out], message)
    export.click(on_export, [run, quant], message)
    start.click(on_serve, [base, adapters, port], serving)
    stop.click(on_stop, outputs=serving)
    refresh.click(lambda: (gr.update(choices=finished()), gr.update(choices=finished())), outputs=[run, adapters])
    if tab is not None:
        tab.select(lambda: (gr.update(choices=finished()), gr.update(choices=finished())), outputs=[run, adapters])
    timer = gr.Timer(3.0)           # active from the start: a tab's select pauses the others (app.py), never starts it
    timer.tick(on_tick, run, [ship_log, serve_log, status], show_progress="hidden")
    return [timer]

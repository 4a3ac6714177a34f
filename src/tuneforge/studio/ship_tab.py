"""The Ship tab: ``tuneforge package`` and ``tuneforge export`` (GGUF, with the quantization chosen) of a run, and
``tuneforge serve`` with the chosen runs as adapters, started and stopped here, with its URL and the curl and
openai-client lines that call it. Each runs as its own process (:mod:`tuneforge.studio.process`): packaging and
export with their output in the run's ``studio-ship.log``, the server's pid and log under ``<folder>/.serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneforge.studio import process
from tuneforge.studio.runs_tab import list_runs

PID, LOG = "studio-ship.pid", "studio-ship.log"
SERVE_DIR = ".serve"
QUANTS = ["f16", "q8_0", "q4_0"]


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


def build(folder: str, model: str | None = None, tab: Any = None) -> None:
    """The tab's components; ``tab``: its Tab, whose selection refreshes the lists of runs."""
    import gradio as gr

    from tuneforge.models.registry import DEFAULT_MODEL

    serve_dir = Path(folder) / SERVE_DIR

    def finished() -> list[str]:
        return [str(r.path) for r in list_runs(folder) if r.status.startswith("finished")]

    with gr.Row():
        run = gr.Dropdown(finished(), label="run", allow_custom_value=True, elem_id="ship-run", scale=3)
        refresh = gr.Button("Refresh runs", scale=1)
    with gr.Row():
        out = gr.Textbox(label="package folder (default: <run>-package)", scale=3)
        package = gr.Button("Package", elem_id="ship-package", scale=1)
    with gr.Row():
        quant = gr.Dropdown(QUANTS, value="q8_0", label="GGUF quantization", scale=3)
        export = gr.Button("Export GGUF", elem_id="ship-export", scale=1)
    ship_log = gr.Textbox(label="package / export log", lines=6, max_lines=6)
    gr.Markdown("### Serve")
    with gr.Row():
        base = gr.Textbox(model or DEFAULT_MODEL, label="base model", scale=2)
        adapters = gr.Dropdown(finished(), multiselect=True, label="adapters", allow_custom_value=True, scale=3)
        port = gr.Number(8000, label="port", precision=0, minimum=1, maximum=65535, scale=1)
    with gr.Row():
        start = gr.Button("Start server", variant="primary", elem_id="ship-serve")
        stop = gr.Button("Stop server", variant="stop", elem_id="ship-serve-stop")
    serving = gr.Markdown(elem_id="ship-serving")
    serve_log = gr.Textbox(label="server log", lines=6, max_lines=6)

    def on_package(run_dir: str | None, folder_out: str) -> str:
        if not run_dir:
            return "choose a finished run"
        target = folder_out.strip() or f"{run_dir}-package"
        try:
            process.start(run_dir, ["package", run_dir, "--out", target], name=PID, log_name=LOG)
        except process.AlreadyRunning as e:
            return f"refused: {e}"
        return f"packaging into {target}"

    def on_export(run_dir: str | None, q: str) -> str:
        if not run_dir:
            return "choose a finished run"
        try:
            process.start(run_dir, ["export", run_dir, "--format", "gguf", "--quant", q], name=PID, log_name=LOG)
        except process.AlreadyRunning as e:
            return f"refused: {e}"
        return f"exporting {Path(run_dir).name} to GGUF ({q}) under {run_dir}/export"

    def on_serve(base_model: str, runs: list[str] | None, p: float | None) -> str:
        runs = list(runs or [])
        try:
            process.start(serve_dir, serve_args(base_model, runs, int(p or 8000)))
        except process.AlreadyRunning as e:
            return f"**refused:** {e}"
        return snippets(int(p or 8000), Path(runs[0]).name if runs else base_model)

    def on_stop() -> str:
        return "server stopped" if process.stop(serve_dir, wait_s=10) else "no server running"

    def on_tick(run_dir: str | None) -> tuple[Any, Any]:
        return (process.log_tail(run_dir, 12, log_name=LOG) if run_dir else "",
                process.log_tail(serve_dir, 12))

    package.click(on_package, [run, out], ship_log)
    export.click(on_export, [run, quant], ship_log)
    start.click(on_serve, [base, adapters, port], serving)
    stop.click(on_stop, outputs=serving)
    refresh.click(lambda: (gr.update(choices=finished()), gr.update(choices=finished())), outputs=[run, adapters])
    if tab is not None:
        tab.select(lambda: (gr.update(choices=finished()), gr.update(choices=finished())), outputs=[run, adapters])
    gr.Timer(3.0).tick(on_tick, run, [ship_log, serve_log], show_progress="hidden")

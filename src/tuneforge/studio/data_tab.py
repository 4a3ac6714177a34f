"""The Data tab: a data file's preview with the trained tokens marked (:func:`tuneforge.data.preview.preview`, as
``tuneforge data preview``) and its curation report (:func:`tuneforge.data.curation.clean.check_files`, as
``tuneforge data check``): the checks that fired, counts, the rejected records with their reasons and a histogram
of the records' lengths in tokens (:func:`tuneforge.data.curation.stats.compute_stats`)."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.data.curation.clean import CurationReport, check_files
from tuneforge.data.curation.config import CurationConfig
from tuneforge.data.preview import END, START, preview

REJECT_COLUMNS = ["check", "where", "reason"]
CHECK_COLUMNS = ["check", "found", "action"]


@dataclass
class DataView:
    """What the tab shows for one file: ``preview_html`` (trained tokens in ``<mark>``), the report's summary,
    its checks and rejects as rows, the lengths (tokens per usable record) and an error line (else empty)."""

    preview_html: str = ""
    summary: str = ""
    checks: list[list[Any]] | None = None
    rejects: list[list[Any]] | None = None
    lengths: list[int] | None = None
    error: str = ""


def preview_html(file: str, model: str, n: int = 3) -> str:
    """The preview of ``file``'s first ``n`` records as HTML: each trained run of tokens in ``<mark>``."""
    from tuneforge.data.settings import DataConfig
    from tuneforge.data.templates import apply_template
    from tuneforge.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    apply_template(tokenizer, "auto", model, needs_chat=True)
    text = preview(file, tokenizer, DataConfig.model_validate({"train": file}), n=n, color=True)
    marked = (html.escape(text).replace(html.escape(START + "[["), '<mark class="trained">')
              .replace(html.escape("]]" + END), "</mark>"))
    return ('<pre class="tf-preview" style="white-space: pre-wrap">' + marked + "</pre>"
            '<p>highlighted: the tokens the loss trains on</p>')


def report_rows(report: CurationReport) -> tuple[list[list[Any]], list[list[Any]]]:
    """The checks (name, found, action) and the rejected records' examples (check, where, reason)."""
    checks = [[name, c["found"], c["action"]] for name, c in report.checks.items() if c["found"]]
    rejects = [[name, ex.get("where", ""), ex.get("message", "")] for name, c in report.checks.items()
               if c["action"] == "reject" for ex in report.examples.get(name, [])]
    return checks, rejects


def inspect_file(file: str, model: str, n: int = 3) -> DataView:
    """The tab's whole view of ``file``; a file that is not data gives its curation error and nothing else."""
    from tuneforge.data.curation.stats import compute_stats

    try:
        report = check_files(file, CurationConfig.model_validate({"model": model}), workers=1)
    except (ValueError, OSError) as e:         # DataError, CurationConfigError, a missing file: one line each
        return DataView(error=f"{Path(file).name}: {e}")
    checks, rejects = report_rows(report)
    view = DataView(summary=report.summary(), checks=checks, rejects=rejects)
    try:
        view.lengths = [int(x) for x in compute_stats(file, model=model).lengths]
        view.preview_html = preview_html(file, model, n)
    except (ValueError, OSError) as e:
        view.error = f"{Path(file).name}: {e}"
    return view


def histogram(lengths: list[int] | None, bins: int = 30) -> Any:
    """A matplotlib figure of the lengths (tokens per record)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.8), dpi=100)
    if lengths:
        ax.hist(lengths, bins=bins, color="tab:blue")
    ax.set_xlabel("tokens per record (chat template applied)")
    ax.set_ylabel("records")
    ax.set_title("length histogram")
    fig.tight_layout()
    plt.close(fig)
    return fig


def data_files(*folders: str | Path) -> list[str]:
    """The ``.jsonl``/``.json``/``.csv``/``.parquet`` files directly in ``folders`` (the pick list)."""
    out: list[str] = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_dir():
            out += sorted(str(p) for p in folder.iterdir() if p.suffix in (".jsonl", ".json", ".csv", ".parquet"))
    return out


def build(model: str, files: list[str]) -> Any:
    """The tab's components; returns the path box (other tabs read the chosen file from it)."""
    import gradio as gr

    with gr.Row():
        picked = gr.Dropdown(files, value=files[0] if files else None, label="data file", allow_custom_value=True,
                             elem_id="data-file", scale=3)
        upload = gr.File(label="or upload", file_types=[".jsonl", ".json", ".csv", ".parquet"], scale=2,
                         elem_id="data-upload")
    with gr.Row():
        tokenizer = gr.Textbox(model, label="tokenizer (model)", elem_id="data-model", scale=3)
        n = gr.Number(3, label="records to preview", precision=0, minimum=1, maximum=50, scale=1)
        go = gr.Button("Load", variant="primary", elem_id="data-load", scale=1)
    error = gr.Markdown(elem_id="data-error")
    preview_box = gr.HTML(elem_id="data-preview")
    with gr.Row():
        summary = gr.Textbox(label="curation report", lines=8, elem_id="data-summary")
        plot = gr.Plot(label="lengths", elem_id="data-histogram")
    with gr.Row():
        checks = gr.Dataframe(headers=CHECK_COLUMNS, label="checks that fired", interactive=False)
        rejects = gr.Dataframe(headers=REJECT_COLUMNS, label="rejected records (first of each check)",
                               interactive=False, wrap=True)

    def load(file: str | None, model_name: str, count: float | None) -> tuple:
        if not file:
            return "**choose or upload a data file**", "", "", None, None, None
        view = inspect_file(file, model_name, int(count or 3))
        return (f"**error:** {view.error}" if view.error else "", view.preview_html, view.summary,
                histogram(view.lengths) if view.lengths is not None else None, view.checks, view.rejects)

    outputs = [error, preview_box, summary, plot, checks, rejects]
    go.click(load, [picked, tokenizer, n], outputs)
    upload.upload(lambda f: f, upload, picked).then(load, [picked, tokenizer, n], outputs)
    return picked

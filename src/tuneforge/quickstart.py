"""The quickstart: fine-tune SmolLM2-135M-Instruct with LoRA to route support tickets, then show it worked.

A pipeline run (:mod:`tuneforge.pipeline`): curate the training tickets, train with the quickstart config,
``tuneforge eval`` the run (base, few-shot, RAG and tuned columns on the held-out test split and on hand-written
tickets), check the gates (:data:`QUICKSTART_PIPELINE`), package; print the tables and the pipeline's table. The
report is in ``<run>/eval/`` (``report.json`` holds every score and prediction, ``report.html`` shows them), the
pipeline summary in ``<run>/pipeline/``. A second run with nothing changed skips every stage.

The config and its ticket data ship inside the package (``tuneforge/recipes/quickstart.yaml`` and
``tuneforge/recipes/data/``; a clone's ``examples/`` links there), so the quickstart runs the same after
``pip install .`` from any folder. It only reads them: the run goes to ``output_dir`` (``runs/quickstart``),
relative to the current folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tuneforge.config import EvalSettings, RunConfig, load_config
from tuneforge.config.pipeline import PipelineSettings
from tuneforge.errors import ConfigError
from tuneforge.runs import EvalReport, RunDir

_DATA_KEYS = (("data", "train"), ("data", "validation"), ("eval", "data"))


def quickstart_config() -> Path:
    """Path of the quickstart config installed with tuneforge; its data lies in ``data/`` next to it."""
    path = resources.files("tuneforge.recipes").joinpath("quickstart.yaml")
    if not isinstance(path, Path) or not path.is_file():
        raise FileNotFoundError(f"the quickstart config is missing from the installed package ({path}): "
                                "reinstall tuneforge, or pass --config")
    return path


def printable_config(config_path: str | Path | None = None) -> str:
    """The config's text, comments kept, with its relative data paths made absolute.

    Saved anywhere (``tuneforge quickstart --print-config > my.yaml``), the copy trains on the same files:
    relative data paths are resolved from the config's own folder, which a copy no longer shares.
    """
    config_path = Path(config_path) if config_path else quickstart_config()
    text = config_path.read_text()
    tree = yaml.safe_load(text) or {}
    for section, key in _DATA_KEYS:
        value = (tree.get(section) or {}).get(key)
        if not value or Path(value).expanduser().is_absolute():
            continue
        absolute = (config_path.parent / value).resolve()
        old, new = f"{key}: {value}", f"{key}: {absolute}"
        if text.count(old) != 1:
            raise ConfigError(f"{config_path}: cannot rewrite '{section}.{key}: {value}' (write it on one line, once)")
        text = text.replace(old, new)
        tree[section][key] = str(absolute)
    if yaml.safe_load(text) != tree:  # the rewrite touched nothing but the data paths
        raise ConfigError(f"{config_path}: rewriting the data paths changed other keys")
    return text


QUICKSTART_COLUMNS = ["base", "fewshot", "rag", "tuned"]

QUICKSTART_PIPELINE = {
    "stages": ["curate", "train", "evaluate", "gates", "package"],
    # the splits come from one generator and share its templates by design (the test split measures behaviour
    # change, the hand-written set generalisation): duplicates and near-duplicates across splits are reported in
    # pipeline/curated/report.json, not removed, so the quickstart trains on all its tickets
    "curate": {"settings": {"actions": {"exact_duplicate": "warn", "near_duplicate": "warn", "leakage": "warn"}}},
    "gates": {
        "beats_baselines": {"against": ["fewshot", "rag"], "set": "test", "max_p_not_better": 0.05},
        "failures": {"column": "tuned", "set": "test", "caps": {"never_stopped": 0.05, "refusal": 0.05}},
        "min_score": {"set": "handwritten", "column": "tuned", "min": 0.5},
        "loss": {"max_final_over_first": 1.0},
    },
}
"""The quickstart's pipeline when its config has no ``pipeline:`` section: curation checks every ticket (the
generator's shared templates are warnings, not rejects); tuned must beat few-shot and RAG on the test split (paired
bootstrap, level 0.05), stop and not refuse, score at least 50% on the hand-written tickets, and its training loss
must not end above where it started."""


def quickstart_run_config(config_path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The run config the quickstart runs: the given (or shipped) config with, unless it sets them, the four
    columns (``--set eval.columns=...`` keeps yours), the ticket docs for the rag column, the hand-written set and
    :data:`QUICKSTART_PIPELINE`."""
    config = load_config(config_path if config_path else quickstart_config(), overrides)
    data = quickstart_config().parent / "data"
    settings = config.eval or EvalSettings()
    update: dict = {}
    if "eval.columns" not in " ".join(overrides or []):
        update["columns"] = QUICKSTART_COLUMNS
    if not settings.docs:
        update["docs"] = str(data / "tickets_docs.jsonl")
    if not settings.extra:
        update["extra"] = {"handwritten": str(data / "tickets_handwritten.jsonl")}
    config.eval = EvalSettings.model_validate({**settings.model_dump(), **update})
    if config.pipeline is None:
        config.pipeline = PipelineSettings.model_validate(QUICKSTART_PIPELINE)
    return config


def run_quickstart(config_path: str | Path | None = None, overrides: list[str] | None = None,
                   accept: dict[str, str] | None = None, **pipeline_args: Any) -> str:
    """Curate, train, evaluate base, few-shot, RAG and tuned side by side, check the gates, package: a pipeline
    run (:func:`tuneforge.pipeline.run_pipeline`) of :func:`quickstart_run_config`; return the tables (printed).

    ``config_path``: a run config; default: the one shipped with tuneforge (:func:`quickstart_config`).
    ``overrides``: ``key=value`` strings as for ``--set``, e.g. ``["max_steps=2"]``. The evaluation scores the
    generated test split and, reported apart, the hand-written tickets (``data/tickets_handwritten.jsonl``,
    phrasings the generator never produces); the rag column retrieves from one page per queue
    (``data/tickets_docs.jsonl``). ``--set eval.forgetting.enabled=true --set eval.forgetting.data=MMLU_DIR``
    adds the forgetting check. The report lands in ``<run>/eval/``, the pipeline summary in ``<run>/pipeline/``.
    ``accept`` and ``pipeline_args`` (``from_stage``, ``until``, ``force``) are :func:`run_pipeline`'s. A failed
    gate or stage raises as there, after the tables are printed.
    """
    from tuneforge.pipeline import GateFailed, run_pipeline

    config = quickstart_run_config(config_path, overrides)
    run = RunDir(config.output_dir)
    print(f"quickstart: {config.method} on {config.data.train}, run directory {run.path}")
    try:
        result = run_pipeline(config, accept=accept, **pipeline_args)
    except GateFailed:
        print(_set_tables(run))
        raise
    tables = _set_tables(run)
    print(tables)
    print(result.table())
    print(f"run directory: {run.path}  (report: {run.eval_dir / 'report.html'}, loss curve: {run.loss_curve}, "
          f"pipeline summary: {result.summary_md})")
    return tables + "\n\n" + result.table()


def _set_tables(run: RunDir) -> str:
    """Each test set's table of the columns' scores (empty before the evaluation ran)."""
    from tuneforge.evaluation.report import main_table_md

    report = EvalReport.load(run.path) if run.report.is_file() else None
    if report is None:
        return ""
    tables = []
    for scores in report.set_scores():
        tables.append(f"{scores.name}: {scores.n} tickets ({Path(str(scores.file)).name})\n"
                      f"{main_table_md(report.to_dict(), scores.name)}")
    return "\n\n".join(tables)

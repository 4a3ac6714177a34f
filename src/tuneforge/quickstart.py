"""The quickstart: fine-tune SmolLM2-135M-Instruct with LoRA to route support tickets, then show it worked.

Steps: train with the quickstart config, then ``tuneforge eval`` the run (base, few-shot, RAG and tuned
columns on the held-out test split and on hand-written tickets), print the tables; the report is in
``<run>/eval/`` (``report.json`` holds every score and prediction, ``report.html`` shows them).

The config and its ticket data ship inside the package (``tuneforge/recipes/quickstart.yaml`` and
``tuneforge/recipes/data/``; a clone's ``examples/`` links there), so the quickstart runs the same after
``pip install .`` from any folder. It only reads them: the run goes to ``output_dir`` (``runs/quickstart``),
relative to the current folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.runs import RunDir

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


def run_quickstart(config_path: str | Path | None = None, overrides: list[str] | None = None) -> str:
    """Train, then evaluate base, few-shot, RAG and tuned side by side; return the tables (also printed).

    ``config_path``: a run config; default: the one shipped with tuneforge (:func:`quickstart_config`).
    ``overrides``: ``key=value`` strings as for ``--set``, e.g. ``["max_steps=2"]``. The evaluation scores the
    generated test split and, reported apart, the hand-written tickets (``data/tickets_handwritten.jsonl``,
    phrasings the generator never produces); the rag column retrieves from one page per queue
    (``data/tickets_docs.jsonl``). ``--set eval.forgetting.enabled=true --set eval.forgetting.data=MMLU_DIR``
    adds the forgetting check. The report lands in ``<run>/eval/``.
    """
    from tuneforge.evaluation.api import evaluate
    from tuneforge.training.trainer import train

    config = load_config(config_path if config_path else quickstart_config(), overrides)
    data = quickstart_config().parent / "data"
    print(f"[1/2] training {config.method} on {config.data.train}")
    result = train(config)
    print(f"[2/2] evaluating base, few-shot, RAG and tuned (run: {result.run_dir}, {result.steps} steps, "
          f"{result.wall_time_s:.0f} s)")
    settings = config.eval
    report = evaluate(result.run_dir, columns=None if settings and "eval.columns" in " ".join(overrides or [])
                      else QUICKSTART_COLUMNS,
                      docs=(settings.docs if settings and settings.docs else str(data / "tickets_docs.jsonl")),
                      extra=(settings.extra if settings and settings.extra
                             else {"handwritten": str(data / "tickets_handwritten.jsonl")}),
                      progress=config.progress)
    tables = []
    for scores in report.record.set_scores():
        tables.append(f"{scores.name}: {scores.n} tickets ({Path(str(scores.file)).name})\n{report.table(scores.name)}")
    table = "\n\n".join(tables)
    print(table)
    print(f"run directory: {result.run_dir}  (report: {report.out_dir / 'report.html'}, loss curve: "
          f"{RunDir(result.run_dir).loss_curve})")
    return table


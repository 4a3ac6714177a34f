"""The quickstart: fine-tune SmolLM2-135M-Instruct with LoRA to route support tickets, then show it worked.

Steps: score the base model on the held-out test split, train with the quickstart config, score the
tuned model, print a table and write ``eval.json`` next to the run.

The config and its ticket data ship inside the package (``tuneforge/recipes/quickstart.yaml`` and
``tuneforge/recipes/data/``; a clone's ``examples/`` links there), so the quickstart runs the same after
``pip install .`` from any folder. It only reads them: the run goes to ``output_dir`` (``runs/quickstart``),
relative to the current folder.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from tuneforge.config import ConfigError, load_config

_DATA_KEYS = (("data", "train"), ("data", "validation"), ("eval_task", "file"))


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


def run_quickstart(config_path: str | Path | None = None, overrides: list[str] | None = None) -> str:
    """Score the base model, train, score the tuned model; return the table (also printed).

    ``config_path``: a run config; default: the one shipped with tuneforge (:func:`quickstart_config`).
    ``overrides``: ``key=value`` strings as for ``--set``, e.g. ``["max_steps=2"]``.
    """
    from tuneforge.evaluation.compare import compare_base_and_run, format_table, heldout_conversations, score
    from tuneforge.serving.inference import load_base
    from tuneforge.training.trainer import train

    config = load_config(config_path if config_path else quickstart_config(), overrides)
    conversations = heldout_conversations(config, config.eval_task.file)
    print(f"[1/3] scoring the base model on {len(conversations)} held-out tickets")
    base = score("base", load_base(config.model, config.dtype, config.device), config, conversations)
    print(f"[2/3] training {config.method} on {config.data.train}")
    result = train(config)
    print(f"[3/3] scoring the tuned model (run: {result.run_dir}, {result.steps} steps, {result.wall_time_s:.0f} s)")
    scores = compare_base_and_run(config, result.run_dir, base_score=base)
    table = format_table(scores, len(conversations))
    print(table)
    print(f"run directory: {result.run_dir}  (loss curve: {result.run_dir / 'loss_curve.png'}, "
          f"predictions: {result.run_dir / 'eval.json'})")
    return table

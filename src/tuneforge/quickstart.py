"""The quickstart: fine-tune SmolLM2-135M-Instruct with LoRA to route support tickets, then show it worked.

Steps: make sure the generated ticket data exists, score the base model on the held-out test split,
train with ``examples/quickstart.yaml``, score the tuned model, print a table and write
``eval.json`` next to the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tuneforge.config import load_config
from tuneforge.data.synthetic_tickets import write_splits
from tuneforge.evaluation.compare import compare_base_and_run, format_table, heldout_conversations, score
from tuneforge.serving.inference import load_base
from tuneforge.training.trainer import train

log = logging.getLogger(__name__)
DEFAULT_CONFIG = Path("examples/quickstart.yaml")


def run_quickstart(config_path: str | Path = DEFAULT_CONFIG, overrides: list[str] | None = None) -> str:
    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: run the quickstart from the repository root, or pass --config")
    data_dir = config_path.parent / "data"
    if not (data_dir / "tickets_train.jsonl").is_file():
        log.info("generating the ticket-routing data into %s", data_dir)
        write_splits(data_dir)
    config = load_config(config_path, overrides)
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

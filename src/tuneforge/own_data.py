"""Training on your own data without a borrowed config: ``tuneforge train --data FILE`` and ``tuneforge init FILE``.

Both start from one commented config (:func:`own_data_config_text`): the defaults for a user's file, with
validation split off that file (never another task's file), a capped validation split and evaluations sized
to about 10% of the training compute. The task is chosen from the records' formats (chat/instruction
records: SFT; ``text`` records: continued pretraining; ``chosen``/``rejected`` pairs: preference).
``tuneforge init`` writes that config for the user to read and edit; ``tuneforge train --data FILE`` trains
with it directly (``--set`` overrides apply on top).

How the defaults were chosen is in docs/guides/own-data.md ("How the defaults were chosen").
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from tuneforge.config import RunConfig, load_config
from tuneforge.data.dataset import DataError
from tuneforge.data.formats import detect_format, rename_columns
from tuneforge.data.loaders import iter_records
from tuneforge.errors import ConfigError
from tuneforge.models.registry import DEFAULT_MODEL

SAMPLE_RECORDS = 200      # records read to pick the task

_TASK_OF_FORMAT = {"messages": "sft", "alpaca": "sft", "prompt_completion": "sft", "text": "pretrain",
                   "preference": "preference"}


def detect_task(path: str | Path, columns: dict[str, str] | None = None) -> tuple[str, Counter]:
    """The task for the data in ``path`` from the formats of its first :data:`SAMPLE_RECORDS` records, and
    those formats' counts. Raises :class:`DataError` (one line) when none of them has a known format."""
    formats: Counter = Counter()
    for n, raw in enumerate(iter_records(path)):
        if n >= SAMPLE_RECORDS:
            break
        if isinstance(raw.data, dict):
            record = rename_columns(raw.data, columns)
            # chosen/rejected make a pair even beside a `messages` field (UltraFeedback-binarized files)
            fmt = "preference" if "chosen" in record and "rejected" in record else detect_format(record)
            formats[fmt or "unknown"] += 1
    known = Counter({f: c for f, c in formats.items() if f != "unknown"})
    if not known:
        raise DataError(f"{path}: none of the first {sum(formats.values())} records has a format tuneforge reads "
                        "(fields messages; instruction + output; prompt + completion; text; chosen + rejected); "
                        "map your column names with data.columns, e.g. --set data.columns.prompt=question")
    tasks = Counter()
    for fmt, count in known.items():
        tasks[_TASK_OF_FORMAT[fmt]] += count
    return tasks.most_common(1)[0][0], formats


def own_data_config_text(data: str | Path, task: str = "sft", output_dir: str | None = None,
                         model: str = DEFAULT_MODEL) -> str:
    """The commented run config for the user's file ``data`` (a YAML text; every key is a real setting)."""
    output_dir = output_dir or f"runs/{Path(data).stem}"
    preference = """
preference:                  # chosen/rejected pairs (task: preference)
  loss: sigmoid              # DPO; also ipo, hinge, robust, simpo, orpo
  beta: 0.1
""" if task == "preference" else ""
    return f"""# A tuneforge run config for {Path(data).name} (written by `tuneforge init`; every key is documented in
# docs/reference/config.md). Train with `tuneforge train THIS_FILE`; override a key with --set KEY=VALUE.
model: {model}
method: lora                 # full, lora (use_dora/use_rslora), qlora, adapter, prefix, prompt, ia3
task: {task}                 # sft (chat/instruction records), pretrain (text), preference (chosen/rejected)
output_dir: {output_dir}
seed: 0

data:
  train: {Path(data).resolve()}
  validation: null           # null: hold out val_fraction of the training file (at most val_max_examples);
                             # or a file of held-out records of the SAME task and format
  val_fraction: 0.1
  val_max_examples: 200
  train_on: assistant        # loss on the answers (and their end-of-turn token) only; `all` for everything
  max_length: 1024           # tokens; longer examples go to rejects.jsonl (too_long: truncate to keep them)

lora:
  r: 16
  alpha: 32
  dropout: 0.05
  target_modules: all-linear
{preference}
learning_rate: 1.0e-3        # LoRA on a small model; full fine-tuning wants ~1e-5
lr_scheduler: cosine
warmup_ratio: 0.05
batch_size: 4                # examples per optimizer step, packed into one padding-free row
max_steps: 100               # a time budget: 400 examples, ~5 min on 2 CPU cores for ~250-token records. Chosen
                             # by time to quality on two tasks (docs/guides/own-data.md, "How the defaults were
                             # chosen"). On a small file that is several epochs (the best validation checkpoint is
                             # kept); on a large one, part of an epoch: raise it, or set it to null to train `epochs`
epochs: 1                    # used when max_steps is null

eval_share: 0.1              # validation costs at most ~10% of training compute (a fixed subset if needed)
keep_best: true              # the run ends with the weights of its best validation score
"""


def own_data_config(data: str | Path, overrides: list[str] | None = None, validation: str | None = None,
                    task: str | None = None) -> RunConfig:
    """The run config :func:`own_data_config_text` writes for ``data``, validated, with ``overrides``."""
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"{data}: data file not found")
    task = task or detect_task(path)[0]
    tree = yaml.safe_load(own_data_config_text(path, task))
    if validation:
        tree["data"]["validation"] = validation
    return load_config(data=tree, overrides=overrides)


def write_init_config(data: str | Path, out: str | Path, force: bool = False) -> tuple[Path, str]:
    """Write the commented config for ``data`` to ``out`` (refusing to overwrite unless ``force``); checks
    that it loads. Returns the path and the task chosen."""
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists: choose another --out, or --force to overwrite it")
    if not Path(data).is_file():
        raise ConfigError(f"{data}: data file not found")
    task, _ = detect_task(data)
    text = own_data_config_text(data, task)
    load_config(data=yaml.safe_load(text))          # what we write must load
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out, task

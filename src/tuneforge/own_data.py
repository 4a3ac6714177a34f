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

_TASK_OF_FORMAT = {"messages": "sft", "sharegpt": "sft", "alpaca": "sft", "prompt_completion": "sft",
                   "text": "pretrain", "preference": "preference", "kto": "kto"}


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
            if fmt == "prompt_completion" and "label" in record:       # thumbs up / down: KTO, never SFT on both
                fmt = "kto"
            formats[fmt or "unknown"] += 1
    known = Counter({f: c for f, c in formats.items() if f != "unknown"})
    if not known:
        raise DataError(f"{path}: none of the first {sum(formats.values())} records has a format tuneforge reads "
                        "(fields messages; conversations; instruction + output; prompt + completion; text; "
                        "chosen + rejected); "
                        "map your column names with data.columns, e.g. --set data.columns.prompt=question")
    tasks = Counter()
    for fmt, count in known.items():
        tasks[_TASK_OF_FORMAT[fmt]] += count
    return tasks.most_common(1)[0][0], formats


LORA_RECIPE_LEARNING_RATE = 1e-3
"""The recipe's learning rate for a method with no measured default of its own (:attr:`Method.learning_rate_source`
empty): measured for LoRA with this recipe (docs/guides/own-data.md, "How the defaults were chosen")."""

_LORA_SECTION = """
lora:
  r: 16
  alpha: 32
  dropout: 0.05
  target_modules: all-linear
"""


def recipe_learning_rate(method: str) -> tuple[float, str]:
    """The learning rate ``tuneforge init`` writes for ``method`` and where it comes from: the method's own
    default where it was measured (:attr:`Method.learning_rate_source`), else the LoRA recipe's measured 1e-3."""
    from tuneforge.methods.registry import get_method

    record = get_method(method)
    if record.learning_rate_source:
        return record.learning_rate, f"method {method}'s default, measured: {record.learning_rate_source}"
    return LORA_RECIPE_LEARNING_RATE, "measured for LoRA with this recipe: docs/guides/own-data.md"


def _method_sections(method: str) -> str:
    """The settings sections ``method`` reads, with their defaults (LoRA's as the recipe chose them)."""
    from tuneforge.methods.registry import get_method

    recipe_method = RunConfig.model_fields["method"].default        # the method the recipe was measured with
    recipe = get_method(recipe_method)
    # the recipe's method and its leaner variant (which trains the same settings: QLoRA) get the recipe's section
    same_settings = method in (recipe_method, recipe.leaner)
    text = _LORA_SECTION if same_settings else ""
    for key, model in get_method(method).settings.items():
        if not (same_settings and key in recipe.settings):
            text += "\n" + yaml.safe_dump({key: model().model_dump(mode="json")}, sort_keys=False)
    return text


def own_data_config_text(data: str | Path, task: str = "sft", output_dir: str | None = None,
                         model: str = DEFAULT_MODEL, method: str = "lora") -> str:
    """The commented run config for the user's file ``data`` training ``method`` (a YAML text; every key is a real
    setting)."""
    output_dir = output_dir or f"runs/{Path(data).stem}"
    lr, lr_source = recipe_learning_rate(method)
    preference = """
preference:                  # chosen/rejected pairs (task: preference)
  loss: sigmoid              # DPO; also ipo, hinge, robust, simpo, orpo
  beta: 0.1
""" if task == "preference" else """
kto:                         # completions labelled desirable or not (task: kto)
  loss: kto                  # or apo_zero_unpaired (no KL term)
  beta: 0.1
  desirable_weight: 1.0      # with unbalanced labels: see docs/guides/preference.md, KTO
  undesirable_weight: 1.0
""" if task == "kto" else ""
    return f"""# A tuneforge run config for {Path(data).name} (written by `tuneforge init`; every key is documented in
# docs/reference/config.md). Train with `tuneforge train THIS_FILE`; override a key with --set KEY=VALUE.
model: {model}
method: {method:<21}# full, lora (use_dora/use_rslora), qlora, adapter, prefix, prompt, ia3
task: {task}                 # sft (chat/instruction records), pretrain (text), preference (chosen/rejected),
                             # kto (prompt/completion/label)
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
{_method_sections(method)}{preference}
learning_rate: {yaml.safe_dump(lr).splitlines()[0]:<14}# {lr_source}
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


def _method_of(overrides: list[str] | None) -> str:
    """The method a ``--set method=...`` override names (the last one wins), else ``lora``."""
    named = [o.split("=", 1)[1].strip() for o in overrides or [] if o.split("=", 1)[0].strip() == "method"]
    return named[-1] if named else "lora"


def _check_method(method: str) -> None:
    from tuneforge.methods.registry import get_method

    try:
        get_method(method)
    except ValueError as e:
        raise ConfigError(f"method: {e}") from None


def own_data_config(data: str | Path, overrides: list[str] | None = None, validation: str | None = None,
                    task: str | None = None) -> RunConfig:
    """The run config :func:`own_data_config_text` writes for ``data``, validated, with ``overrides``; a
    ``method=...`` override writes that method's config (its sections and learning rate), as ``tuneforge init
    --method`` does."""
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"{data}: data file not found")
    task = task or detect_task(path)[0]
    method = _method_of(overrides)
    _check_method(method)
    tree = yaml.safe_load(own_data_config_text(path, task, method=method))
    if validation:
        tree["data"]["validation"] = validation
    return load_config(data=tree, overrides=overrides)


def write_init_config(data: str | Path, out: str | Path, force: bool = False, method: str = "lora"
                      ) -> tuple[Path, str]:
    """Write the commented config for ``data`` training ``method`` to ``out`` (refusing to overwrite unless
    ``force``); checks that it loads. Returns the path and the task chosen."""
    _check_method(method)
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists: choose another --out, or --force to overwrite it")
    if not Path(data).is_file():
        raise ConfigError(f"{data}: data file not found")
    task, _ = detect_task(data)
    text = own_data_config_text(data, task, method=method)
    load_config(data=yaml.safe_load(text))          # what we write must load
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out, task

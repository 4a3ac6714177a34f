"""``init_from: RUN``: the run (or package) whose trained adapter a new run loads and keeps training, read and
checked before any model loads.

The rules, each refusal one line naming ``init_from`` and what to write instead (:class:`ConfigError`, exit 2):

- ``RUN`` is a finished run directory (``tuneforge train``'s ``output_dir``) or a package (``tuneforge package``):
  a ``config.yaml`` and the trained adapter (``adapter_config.json``). A full fine-tune run is refused: its folder
  is a complete model, to be given as ``model:``.
- The same method: ``method:`` must be the run's (a QLoRA run continues as ``qlora``, a LoRA run as ``lora``),
  and the method must be one that can load a run's weights into a fresh model (its record's ``load_weights``).
- The run's method settings: the method's sections (its own, e.g. ``lora:``, and those it reads: ``qlora`` reads
  ``lora:``) are taken from the run's ``config.yaml``, because they fix the adapter's shape and what it computes
  (rank, alpha, targets, scaling). A config may leave them out or repeat the run's values; a value it sets that
  differs from the run's is refused (merge the run, ``tuneforge merge``, to start a fresh adapter on top instead).
- The run's base model: the sha256 of ``model:``'s weights must be the one the run recorded (``run.json`` or
  ``tuneforge.json``); where either is unknown, the two ``model:`` specs must resolve to the same folder.

:func:`resolve_init_from` does all of it and puts the run's sections into the config; the trainer calls it first
thing, then loads the adapter's weights (``tuneforge.methods.load_weights_into``) onto the model the method
built, and records :meth:`InitRun.record` in ``run.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.errors import ConfigError
from tuneforge.runs.base_model import RecordedBase, base_model_sha256, recorded_base_model
from tuneforge.runs.errors import NotARunError
from tuneforge.runs.layout import RunDir
from tuneforge.runs.records import InitFromRecord, RunRecord

if TYPE_CHECKING:
    from tuneforge.config import RunConfig

log = logging.getLogger(__name__)

WHAT_TO_GIVE = "give the output_dir of a finished `tuneforge train` run or a `tuneforge package` folder"


@dataclass(frozen=True)
class InitRun:
    """The run ``init_from`` names, as its files say.

    Attributes:
        path: its folder (absolute).
        method: the method it trained (its ``config.yaml``'s ``method:``).
        task: the task it trained (``sft``, ``preference``, ...), where recorded.
        config: its ``config.yaml`` as read (the method sections are taken from it).
        base: the base model it names (spec and sha256, :func:`recorded_base_model`).
        adapter_sha256: the sha256 of its ``adapter_model.safetensors`` (None where it has no such file).
    """

    path: Path
    method: str
    task: str | None
    config: dict[str, Any]
    base: RecordedBase | None
    adapter_sha256: str | None

    def record(self) -> InitFromRecord:
        """``run.json``'s ``init_from``."""
        return InitFromRecord(path=str(self.path), method=self.method, task=self.task,
                              adapter_sha256=self.adapter_sha256)


def read_init_run(value: str | Path) -> InitRun:
    """The run or package in ``value``; :class:`ConfigError` (one line) for a folder that is not one, or a full
    fine-tune run."""
    import yaml  # type: ignore[import-untyped]

    from tuneforge.fileutil import file_sha256
    from tuneforge.methods.registry import get_method

    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"init_from: {value} is not a folder: {WHAT_TO_GIVE}")
    run = RunDir(folder.resolve())
    if not run.config.is_file():
        raise ConfigError(f"init_from: {folder} is not a tuneforge run or package (no config.yaml): {WHAT_TO_GIVE}")
    try:
        config = yaml.safe_load(run.config.read_text())
        record = RunRecord.load(run.path)
    except (yaml.YAMLError, UnicodeDecodeError, NotARunError) as e:
        raise ConfigError(f"init_from: {folder} cannot be read ({str(e).splitlines()[0]}): {WHAT_TO_GIVE}") from None
    method = config.get("method") if isinstance(config, dict) else None
    if not isinstance(method, str):
        raise ConfigError(f"init_from: {run.config} names no method: {WHAT_TO_GIVE}")
    try:
        is_full = get_method(method).is_full_model
    except ValueError as e:
        raise ConfigError(f"init_from: {folder} trained {e}") from None
    if is_full or (run.model_config.is_file() and not run.adapter_config.is_file()):
        raise ConfigError(f"init_from: {folder} is a full fine-tune run (its folder is a complete model, not an "
                          f"adapter): use it as model: {folder} instead, and leave init_from out")
    if not run.adapter_config.is_file():
        raise ConfigError(f"init_from: {folder} holds no trained adapter (no adapter_config.json): the run has not "
                          "finished, or ended without writing weights (run.json status: regressed); "
                          f"{WHAT_TO_GIVE}")
    task = config.get("task") if isinstance(config.get("task"), str) else (record.task if record else None)
    sha = file_sha256(run.adapter_weights) if run.adapter_weights.is_file() else None
    return InitRun(run.path, method, task, config, recorded_base_model(run.path), sha)


def check_base_model(init: InitRun, model: str) -> None:
    """Refuse ``model`` unless it is the base model ``init`` was trained on (see the module docstring)."""
    from tuneforge.models.registry import resolve_model

    recorded = init.base
    if recorded is None:
        return
    theirs, ours = recorded.sha256, base_model_sha256(model)
    if theirs and ours:
        if theirs != ours:
            raise ConfigError(f"init_from: {init.path} was trained on base model {recorded.spec} (sha256 "
                              f"{theirs[:12]}...), but model: {model} has sha256 {ours[:12]}...: set model: to the "
                              "run's base model")
        return
    if Path(resolve_model(recorded.spec)).resolve() != Path(resolve_model(model)).resolve():
        raise ConfigError(f"init_from: {init.path} was trained on base model {recorded.spec}, but this config has "
                          f"model: {model}: set model: {recorded.spec}")


def method_sections(init: InitRun, config: RunConfig) -> dict[str, Any]:
    """The run's settings sections of ``config.method`` (``{key: settings model}``), after checking that ``config``
    sets no value in them that differs from the run's."""
    from pydantic import ValidationError

    from tuneforge.methods.registry import get_method, settings_sections

    method, models = get_method(config.method), settings_sections()
    out: dict[str, Any] = {}
    for key in dict.fromkeys([*method.settings, *method.reads]):
        saved = init.config.get(key)
        try:
            theirs = models[key].model_validate(saved if isinstance(saved, dict) else {})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in (key, *first["loc"]))
            raise ConfigError(f"init_from: {init.path / 'config.yaml'}: '{where}': {first['msg']}: the run was "
                              "written by another tuneforge; re-train it or continue it with that version") from None
        ours = config.section(key)
        for name in sorted(ours.model_fields_set):
            if getattr(ours, name) != getattr(theirs, name):
                raise ConfigError(f"init_from: {init.path} trained with {key}.{name}: {getattr(theirs, name)!r}, "
                                  f"this config sets {getattr(ours, name)!r}: a continued adapter keeps the run's "
                                  f"settings; remove {key}.{name} from the config (or merge the run with `tuneforge "
                                  "merge` and train a fresh adapter on the merged model)")
        out[key] = theirs
    return out


def resolve_init_from(config: RunConfig) -> InitRun | None:
    """``config.init_from``, read and checked (module docstring); the run's method sections are put into ``config``.
    None when ``init_from`` is unset. Raises :class:`ConfigError` with one line."""
    if not config.init_from:
        return None
    from tuneforge.methods.registry import get_method

    init = read_init_run(config.init_from)
    if init.method != config.method:
        raise ConfigError(f"init_from: {init.path} trained method {init.method}, this config has method: "
                          f"{config.method}: set method: {init.method} (a run continues its own adapter)")
    if get_method(config.method).load_weights is None:
        raise ConfigError(f"init_from: method {config.method} cannot continue from a run's saved weights; train it "
                          "from model: instead")
    check_base_model(init, config.model)
    for key, section in method_sections(init, config).items():
        setattr(config, key, section)
    template = init.config.get("template")
    if isinstance(template, str) and template != config.template:
        log.warning("init_from: %s was trained with template: %s, this run has template: %s: the continued adapter "
                    "will see its prompts rendered differently", init.path, template, config.template)
    return init

"""The JSON records of a run directory and a package, typed and versioned: the one place that reads and writes them.

=====================  =========================  ================================================
record                 file                       written by
=====================  =========================  ================================================
:class:`RunRecord`     ``run.json``               ``tuneforge train`` (the recipe's ``finish``)
:class:`EvalReport`    ``eval/report.json``       ``tuneforge eval`` (its top-level keys; the
                                                  per-set content is the evaluation's)
:class:`PackageManifest`  ``tuneforge.json``      ``tuneforge package``
:class:`PipelineState`    ``pipeline/state.json`` ``tuneforge pipeline``
=====================  =========================  ================================================

Versions: every record has a ``schema_version`` (:data:`SCHEMA_VERSION` today), written first on save. A file
without one was written before records were versioned and is version 1. A file with a newer version than this
tuneforge reads is refused in one line (:class:`~tuneforge.runs.errors.NewerSchemaError`) that names the file
and says to upgrade; a file that is not JSON, not an object or holds a value of the wrong type is refused in one
line (:class:`~tuneforge.runs.errors.NotARunError`) that names the file and the command that writes it.

Nothing is lost or changed: keys this tuneforge does not know are kept (``model_extra``) and written back after
the known ones; a key missing from a file stays missing on save (only the fields a file or a writer set are
written), and numbers stay as written (an ``int`` stays an ``int``). So ``load -> save`` gives the same JSON
plus ``schema_version``, and the writers write the same keys and values as before plus ``schema_version`` (and
the keys added since, optional in older files: ``run.json``'s ``template``, ``trust_remote_code``,
``learning_rate``, ``learning_rate_default`` and ``init_from``).
Saving is atomic: a hidden temporary file beside the destination, then one ``os.replace``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from tuneforge.runs import layout
from tuneforge.runs.errors import NewerSchemaError, NotARunError

SCHEMA_VERSION = 1
"""The version of the records this tuneforge writes, and the newest it reads."""

Number = int | float        # an int stays an int (pydantic's smart union keeps the exact type)

R = TypeVar("R", bound="Record")


class Part(BaseModel):
    """A nested part of a record: unknown keys kept, only the keys that were set written back."""

    model_config = ConfigDict(extra="allow")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class Record(Part):
    """A versioned JSON file of a run directory or package (see the module docstring)."""

    FILE: ClassVar[str]                 # the file's path inside the run directory (or package)
    WRITTEN_BY: ClassVar[str]           # the command that writes it, for error messages
    INDENT: ClassVar[int] = 2
    FINAL_NEWLINE: ClassVar[bool] = False

    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls: type[R], data: Any, source: str | os.PathLike = "") -> R:
        """The record of ``data`` as read from a file (``source`` names it in errors); no ``schema_version``
        means version 1, a newer one than :data:`SCHEMA_VERSION` is refused."""
        where = str(source) or cls.FILE
        if not isinstance(data, dict):
            raise NotARunError(f"{where}: expected a JSON object; re-create it with `{cls.WRITTEN_BY}`")
        version = data.get("schema_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise NotARunError(f"{where}: schema_version {version!r} is not a version number (1, 2, ...); "
                               f"re-create it with `{cls.WRITTEN_BY}`")
        if version > SCHEMA_VERSION:
            raise NewerSchemaError(f"{where}: schema_version {version} was written by a newer tuneforge (this one "
                                   f"reads up to {SCHEMA_VERSION}): upgrade tuneforge (pip install -U tuneforge)")
        try:
            return cls.model_validate({**data, "schema_version": version})
        except ValidationError as e:
            first = e.errors()[0]
            key = ".".join(str(k) for k in first["loc"])
            raise NotARunError(f"{where}: {key}: {first['msg']} (got {first.get('input')!r:.60}); re-create it "
                               f"with `{cls.WRITTEN_BY}`") from None

    @classmethod
    def from_file(cls: type[R], path: str | os.PathLike) -> R:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise NotARunError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); re-create it with "
                               f"`{cls.WRITTEN_BY}`") from None
        except UnicodeDecodeError:
            raise NotARunError(f"{path}: not a text file; re-create it with `{cls.WRITTEN_BY}`") from None
        return cls.from_dict(data, path)

    @classmethod
    def path_in(cls, run_dir: str | os.PathLike) -> Path:
        return Path(run_dir) / cls.FILE

    @classmethod
    def load(cls: type[R], run_dir: str | os.PathLike) -> R | None:
        """The record in the run directory (or package) ``run_dir``; None when it has none."""
        path = cls.path_in(run_dir)
        return cls.from_file(path) if path.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: ``schema_version`` first, then the keys that were set, unknown keys last."""
        body = self.model_dump(exclude_unset=True)
        body.pop("schema_version", None)
        return {"schema_version": self.schema_version, **body}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=self.INDENT, default=self._json_default) + \
            ("\n" if self.FINAL_NEWLINE else "")

    @staticmethod
    def _json_default(value: Any) -> Any:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    def write(self, path: str | os.PathLike) -> Path:
        """Write the record to ``path`` atomically (a hidden temporary file, then ``os.replace``)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write the record to its place in the run directory (or package) ``run_dir``."""
        path = self.path_in(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        return self.write(path)


# ------------------------------------------------------------------------------------------------- parts


class BaseModelRecord(Part):
    """``run.json``'s ``base_model``: the ``model:`` spec, the folder it resolved to and its fingerprint
    (``models.registry.model_fingerprint``: a converted GGUF's ``gguf``/``gguf_sha256``/``name``, else the
    folder's ``weights_sha256`` per file, else the ``hub_id`` of a model not available locally)."""

    spec: str | None = None
    path: str | None = None
    gguf: str | None = None
    gguf_sha256: str | None = None
    name: str | None = None
    folder: str | None = None
    weights_sha256: dict[str, str] | None = None
    hub_id: str | None = None

    def sha256(self) -> str | None:
        """The base model's sha256 as :func:`tuneforge.runs.base_model.base_model_sha256` defines it."""
        import hashlib

        if self.gguf_sha256:
            return str(self.gguf_sha256)
        weights = self.weights_sha256 or {}
        if len(weights) == 1:
            return str(next(iter(weights.values())))
        if weights:
            return hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(weights.items())).encode()).hexdigest()
        return None


class TemplateRecord(Part):
    """``run.json``'s ``template``: the ``template:`` the run trained with (``auto``, a built-in name or a file),
    where its text came from (``tokenizer``, ``builtin``, ``file``; ``none``: no template), the text's sha256 and
    ``kwargs``, the ``template_kwargs:`` it rendered with (absent: none). The text itself is the run's saved
    tokenizer's (``chat_template.jinja``)."""

    name: str | None = None
    source: str | None = None
    sha256: str | None = None
    kwargs: dict[str, Any] | None = None


class DataFile(Part):
    """A data file of a run (``run.json``: ``path``, ``sha256``) or a package (with ``name`` and ``role``)."""

    name: str | None = None
    path: str | None = None
    role: str | None = None
    sha256: str | None = None


class ExampleCounts(Part):
    """How many examples the run used: train, validation, rejected, truncated, and per detected format."""

    train: int | None = None
    validation: int | None = None
    rejected: int | None = None
    truncated: int | None = None
    formats: dict[str, int] | None = None


class InitFromRecord(Part):
    """``run.json``'s ``init_from``: the run or package whose adapter the run started from (``init_from:``): its
    ``path``, ``method``, ``task`` and the sha256 of its ``adapter_model.safetensors`` (None where it has none)."""

    path: str | None = None
    method: str | None = None
    task: str | None = None
    adapter_sha256: str | None = None


class PackageBaseModel(Part):
    """``tuneforge.json``'s ``base_model``: the ``model:`` of the run, its sha256, the Hub id for the card and the
    base model's licence/terms files that the package carries (``terms``: their names in the package)."""

    name: str | None = None
    sha256: str | None = None
    hub_id: str | None = None
    terms: list[str] | None = None


# ------------------------------------------------------------------------------------------------- run.json


class RunRecord(Record):
    """``run.json``: what produced a run and how it went (written once, at the end of training).

    The fields, in the order they are written: ``base_model`` (spec and fingerprint), ``template`` (the chat
    template trained with), ``trust_remote_code``, ``method``, ``task``, ``init_from`` (only in a run that
    continued another run's adapter: :class:`InitFromRecord`),
    ``data`` (files and sha256), ``examples``, ``sources`` (only in a run on a mixture: each source's ``name``,
    ``path``, ``weight`` or ``epochs``, ``train_examples``, ``validation_examples``, ``train_tokens``,
    ``examples_per_epoch``, ``examples_seen`` and ``tokens_seen``), ``seed``, ``device``, ``dtype`` and
    ``dtype_reason``,
    ``precision`` (mode, the dtype of base and trained weights, autocast, loss scaling; ``scaler_skipped_steps``
    under fp16-mixed), ``steps``,
    parameter counts, ``final_train_loss``, ``eval_metric``, ``best_eval_loss``, ``best_step``,
    ``base_eval_loss`` (the model before training), ``weights_from_step``, ``status`` (``ok`` or
    ``regressed``) and ``problems``, tokens seen, times in seconds, ``processes``, ``eval_examples`` and the
    library ``versions``. Every field may be missing from a file (None).
    """

    FILE: ClassVar[str] = layout.RUN_RECORD
    WRITTEN_BY: ClassVar[str] = "tuneforge train"

    tuneforge_run: int | None = None
    base_model: BaseModelRecord | None = None
    template: TemplateRecord | None = None
    trust_remote_code: bool | None = None
    method: str | None = None
    task: str | None = None
    init_from: InitFromRecord | None = None
    learning_rate: Number | None = None
    learning_rate_default: bool | None = None
    data: list[DataFile] | None = None
    examples: ExampleCounts | None = None
    sources: list[dict[str, Any]] | None = None
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    dtype_reason: str | None = None
    precision: dict[str, Any] | None = None
    scaler_skipped_steps: int | None = None
    steps: int | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    final_train_loss: Number | None = None
    eval_metric: str | None = None
    best_eval_loss: Number | None = None
    best_step: int | None = None
    base_eval_loss: Number | None = None
    weights_from_step: int | None = None
    status: str | None = None
    problems: list[str] | None = None
    train_tokens_seen: int | None = None
    wall_time_s: Number | None = None
    processes: int | None = None
    eval_time_s: Number | None = None
    base_eval_seconds: Number | None = None
    eval_examples: int | None = None
    versions: dict[str, str] | None = None

    @property
    def regressed(self) -> bool:
        """The run ended worse than it started (``status: regressed``)."""
        return self.status == "regressed"

    def base_sha256(self) -> str | None:
        """The recorded base model's sha256 (None when the run recorded none)."""
        return self.base_model.sha256() if self.base_model is not None else None


# ------------------------------------------------------------------------------------------ tuneforge.json


class PackageManifest(Record):
    """``tuneforge.json``: what a package holds, the base model it needs (by sha256), where it came from and
    which runtimes load it. ``README.md`` (the model card) is written from it, so card and manifest agree."""

    FILE: ClassVar[str] = layout.MANIFEST
    WRITTEN_BY: ClassVar[str] = "tuneforge package"
    FINAL_NEWLINE: ClassVar[bool] = True

    tuneforge_package: int | None = None
    name: str | None = None
    kind: str | None = None                                 # "adapter" or "full_model"
    method: str | None = None
    method_variants: list[str] | None = None
    task: str | None = None
    rank: int | None = None
    adapter: dict[str, Any] | None = None
    library_name: str | None = None
    base_model: PackageBaseModel | None = None
    data: list[DataFile] | None = None
    examples: ExampleCounts | None = None
    rejects_by_check: dict[str, int] | None = None
    hyperparameters: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    evaluation: list[dict[str, Any]] | None = None          # model-index results (export/package.py)
    runtimes: dict[str, dict[str, Any]] | None = None       # runtime -> {"loads", "reason" | "how", ...}
    versions: dict[str, Any] | None = None                  # {"training": {...}, "packaging": {...}}
    intended_use: str | None = None
    files: dict[str, str] | None = None                     # file name -> sha256

    @property
    def is_full_model(self) -> bool:
        return self.kind == "full_model"

    def base_sha256(self) -> str | None:
        return self.base_model.sha256 if self.base_model is not None else None


# ---------------------------------------------------------------------------------------- eval/report.json


@dataclass(frozen=True)
class Score:
    """One metric of a report column: the bootstrap interval's ``value``, with ``low``/``high`` when recorded."""

    value: Any
    low: Any = None
    high: Any = None
    has_bounds: bool = False

    @classmethod
    def of(cls, raw: Any) -> Score:
        if isinstance(raw, dict):
            return cls(raw.get("value"), raw.get("low"), raw.get("high"), "low" in raw)
        return cls(raw)

    @property
    def number(self) -> float | None:
        """``value`` as a float; None when it is missing, not a number, or NaN."""
        value = self.value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            return float(value)
        return None


@dataclass(frozen=True)
class Failure:
    """A failure category of a column: how many answers fell in it and its first example (answer, reference)."""

    category: str
    count: Any
    example: tuple[str, str] | None = None


@dataclass(frozen=True)
class ColumnScores:
    metrics: dict[str, Score] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)

    @classmethod
    def of(cls, raw: Any) -> ColumnScores:
        raw = raw if isinstance(raw, dict) else {}
        fails = raw.get("failures") or {}
        examples = fails.get("examples") or {}
        return cls({m: Score.of(iv) for m, iv in (raw.get("metrics") or {}).items()},
                   [Failure(cat, count, (str(examples[cat][0].get("answer", "")),
                                         str(examples[cat][0].get("reference", ""))) if examples.get(cat) else None)
                    for cat, count in (fails.get("counts") or {}).items()])


@dataclass(frozen=True)
class SetScores:
    """One test set of the report: its file, size and the scores of each column that ran."""

    name: str
    file: str | None
    n: Any
    columns: dict[str, ColumnScores]


@dataclass(frozen=True)
class ForgettingScores:
    """The forgetting check: MMLU cloze accuracy of the base and the tuned model."""

    questions: Any
    data: str | None
    base: Score
    tuned: Score


class EvalReport(Record):
    """``eval/report.json``: the top-level record of ``tuneforge eval``'s report.

    ``sets`` (test set name -> file, sha256, n, columns -> metrics, failures, answers, ..., paired, loss),
    ``variability``, ``forgetting``, ``judge``, ``metadata`` and ``loss_curve`` are the evaluation's content,
    kept as written; :meth:`set_scores`, :meth:`score` and :meth:`forgetting_scores` read what other stages
    need of them.
    """

    FILE: ClassVar[str] = f"{layout.EVAL}/{layout.REPORT}"
    WRITTEN_BY: ClassVar[str] = "tuneforge eval"
    INDENT: ClassVar[int] = 1

    tuneforge_eval: int | None = None
    run: str | None = None
    main_metric: str | None = None
    columns: list[str] | None = None
    sets: dict[str, dict[str, Any]] | None = None
    variability: dict[str, Any] | None = None
    forgetting: dict[str, Any] | None = None
    judge: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    loss_curve: list[dict[str, Any]] | None = None

    @staticmethod
    def _json_default(value: Any) -> Any:
        """numpy and torch scalars as numbers, anything else as its text (as the report always wrote them)."""
        if hasattr(value, "item"):
            return value.item()
        return str(value)

    def set_scores(self) -> list[SetScores]:
        """Each test set with the scores of its columns (columns that recorded nothing are left out)."""
        out = []
        for name, entry in (self.sets or {}).items():
            columns = entry.get("columns") or {}
            out.append(SetScores(name, entry.get("file"), entry.get("n"),
                                 {c: ColumnScores.of(raw) for c, raw in columns.items() if raw}))
        return out

    def score(self, set_name: str, column: str, metric: str) -> Score | None:
        """One metric of one column of one test set; None when the report does not hold it."""
        for s in self.set_scores():
            if s.name == set_name and column in s.columns:
                return s.columns[column].metrics.get(metric)
        return None

    def forgetting_scores(self) -> ForgettingScores | None:
        f = self.forgetting
        if not isinstance(f, dict):
            return None
        return ForgettingScores(f.get("questions"), f.get("data"), Score.of(f.get("base")), Score.of(f.get("tuned")))


# ------------------------------------------------------------------------------------- pipeline/state.json


class StageRecord(Part):
    """One stage of ``tuneforge pipeline``: ``status`` (``ok``, ``failed`` or ``serving``), ``inputs`` (name ->
    sha256 of the stage's config section, data files and upstream outputs), ``outputs`` (path -> sha256),
    ``seconds`` (wall time of its last run), ``finished`` (unix time), ``error`` (a failed stage's reason) and,
    for the gates stage, ``gates`` (each gate's name, threshold, numbers, verdict, and an acceptance's reason)."""

    status: str | None = None
    inputs: dict[str, str] | None = None
    outputs: dict[str, str] | None = None
    seconds: Number | None = None
    finished: Number | None = None
    error: str | None = None
    gates: list[dict[str, Any]] | None = None


class PipelineState(Record):
    """``pipeline/state.json``: what each stage of ``tuneforge pipeline`` last read and wrote; a rerun skips a
    stage whose inputs and outputs still have the recorded hashes."""

    FILE: ClassVar[str] = f"{layout.PIPELINE}/{layout.PIPELINE_STATE}"
    WRITTEN_BY: ClassVar[str] = "tuneforge pipeline"
    FINAL_NEWLINE: ClassVar[bool] = True

    tuneforge_pipeline: int | None = None
    stages: dict[str, StageRecord] | None = None

"""The base model a run was trained on: its sha256, its record in ``run.json``, and the check that a package
meets the base model it was trained on.

The base model's sha256 (:func:`base_model_sha256`) is the hash of the bytes its weights came from: the GGUF
file for models tuneforge converted from GGUF (``tuneforge_source.json``), the one ``*.safetensors`` file of a
single-file folder, else the sha256 of the lines ``"<file name> <sha256>\\n"`` of its sorted weight files.
``run.json`` records the fingerprint those hashes come from (:func:`base_model_record`), a package's
``tuneforge.json`` the sha256 itself; :func:`verify_base_model` compares the latter with the model at hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tuneforge.runs.records import BaseModelRecord, PackageManifest


class BaseModelMismatch(ValueError):
    """A package was trained on another base model than the one it is being loaded onto."""


def base_model_sha256(model: str | Path) -> str | None:
    """The sha256 identifying the weights of ``model`` (a spec accepted by ``resolve_model`` or a folder).

    None for a hub id that is not available locally (nothing to hash).
    """
    from tuneforge.fileutil import file_sha256
    from tuneforge.models.registry import resolve_model

    folder = Path(resolve_model(str(model)))
    if not folder.is_dir():
        return None
    source = folder / "tuneforge_source.json"
    if source.is_file():
        digest = json.loads(source.read_text()).get("gguf_sha256")
        if digest:
            return str(digest)
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        return None
    if len(weights) == 1:
        return file_sha256(weights[0])
    lines = "".join(f"{p.name} {file_sha256(p)}\n" for p in weights)
    return hashlib.sha256(lines.encode()).hexdigest()


def base_model_record(spec: str, path: str | Path) -> BaseModelRecord:
    """``run.json``'s ``base_model``: the ``model:`` spec, the folder it resolved to, and its fingerprint."""
    from tuneforge.models.registry import model_fingerprint

    return BaseModelRecord.model_validate({"spec": spec, "path": str(path), **model_fingerprint(path)})


def verify_base_model(adapter_dir: str | Path, base_model_path: str | Path) -> None:
    """Refuse to load the package in ``adapter_dir`` onto ``base_model_path`` unless the base model hashes agree.

    Raises :class:`BaseModelMismatch` (one line naming both sha256) when the package's ``tuneforge.json``
    names another base model hash than that of ``base_model_path``. A folder without ``tuneforge.json``
    (a plain peft adapter, a run folder), a packaged full model or a manifest without a hash is accepted:
    there is nothing to check. A ``tuneforge.json`` that cannot be read raises
    :class:`~tuneforge.runs.errors.NotARunError` (one line naming the file).
    """
    manifest = PackageManifest.load(adapter_dir)
    if manifest is None or manifest.is_full_model:   # a full model needs no base
        return
    expected = manifest.base_sha256()
    if not expected:
        return
    actual = base_model_sha256(base_model_path)
    if actual is None or actual == expected:
        return
    raise BaseModelMismatch(f"{adapter_dir} was trained on base model sha256 {expected}, but {base_model_path} "
                            f"has sha256 {actual}: load it onto the base model it was trained on")


def run_trusts_remote_code(run_dir: str | Path, config_value: bool = False) -> bool:
    """Whether the run (or package) in ``run_dir`` opted in to ``trust_remote_code``: ``run.json``'s record, else
    its ``config.yaml``'s value (``config_value``). Loading its base model again (load, merge, export, serve) uses
    this and nothing else, so a run that did not opt in never runs a model's own code."""
    from tuneforge.runs.records import RunRecord

    record = RunRecord.load(run_dir)
    if record is not None and record.trust_remote_code is not None:
        return bool(record.trust_remote_code)
    return bool(config_value)


@dataclass(frozen=True)
class RecordedBase:
    """The base model a run or package names: ``spec`` (its ``model:``), the base's ``sha256`` where recorded, and
    the file that said so."""

    spec: str
    sha256: str | None
    source: str


def recorded_base_model(folder: str | Path) -> RecordedBase | None:
    """The base model the run or package in ``folder`` was trained on: its ``config.yaml``'s ``model:`` (else
    ``run.json``'s or ``tuneforge.json``'s record, else a peft adapter's ``base_model_name_or_path``), with the
    sha256 ``run.json`` or ``tuneforge.json`` recorded. None when the folder names none."""
    import yaml  # type: ignore[import-untyped]

    from tuneforge.runs.records import RunRecord

    folder = Path(folder)
    manifest, record = PackageManifest.load(folder), RunRecord.load(folder)
    sha = manifest.base_sha256() if manifest is not None else record.base_sha256() if record is not None else None
    config = folder / "config.yaml"
    if config.is_file():
        spec = (yaml.safe_load(config.read_text()) or {}).get("model")
        if isinstance(spec, str) and spec:
            return RecordedBase(spec, sha, str(config))
    if record is not None and record.base_model is not None and record.base_model.spec:
        return RecordedBase(record.base_model.spec, sha, str(RunRecord.path_in(folder)))
    if manifest is not None and manifest.base_model is not None and manifest.base_model.name:
        return RecordedBase(manifest.base_model.name, sha, str(PackageManifest.path_in(folder)))
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file():
        try:
            spec = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        except (ValueError, AttributeError):
            return None
        if isinstance(spec, str) and spec:
            return RecordedBase(spec, None, str(adapter_config))
    return None

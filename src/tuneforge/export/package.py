"""Package a run for sharing and serving, and check that a package meets the base model it was trained on.

A package is a folder that peft, vLLM and tuneforge load unchanged: the adapter in peft's layout
(``adapter_config.json`` + ``adapter_model.safetensors``), the tokenizer and chat template used in training,
the base model's licence and terms files (``LICENSE``, ``NOTICE.md``, Gemma's ``GEMMA_TERMS.html`` ...: whatever
of :data:`~tuneforge.models.registry.BASE_TERMS_FILES` its folder holds; they travel with anything derived
from it), a model card (``README.md``) and ``tuneforge.json``, the manifest that names the base model by its sha256
(:class:`~tuneforge.runs.records.PackageManifest`).

The base model's sha256 and the check that a package meets it are :mod:`tuneforge.runs.base_model`'s
(:func:`base_model_sha256`, :func:`verify_base_model`); this module imports them, so the names stay importable
from here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.methods.reward_head import HEAD_FILE, is_reward_model
from tuneforge.models.registry import base_terms_files
from tuneforge.runs import (
    BaseModelMismatch,
    EvalReport,
    ExampleCounts,
    NotARunError,
    PackageManifest,
    RunDir,
    RunRecord,
    base_model_sha256,
    verify_base_model,
)
from tuneforge.runs.layout import MANIFEST
from tuneforge.runs.records import ColumnScores

log = logging.getLogger(__name__)

__all__ = ["MANIFEST", "BaseModelMismatch", "NotARunError", "PackageReport", "base_model_sha256", "evaluation_results",
           "package_run", "runtime_support", "verify_base_model"]


# ---------------------------------------------------------------------------------------------- packaging

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_MODEL_FILES = ("config.json", "generation_config.json")
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}
LICENSES = {"smollm2-135m-instruct": "apache-2.0", "gemma3-270m": "gemma"}
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


def _run_files(run_dir: Path, allow_regressed: bool = False) -> tuple[Any, Any, RunRecord]:
    """(config, method record, run.json) of a finished run; :class:`NotARunError` when it is not one, or when it
    ended worse than it started (``run.json``'s ``status: regressed``; ``allow_regressed`` takes it all the same)."""
    from tuneforge.config import load_config
    from tuneforge.errors import ConfigError
    from tuneforge.methods.registry import get_method

    run = RunDir(run_dir)
    if not run_dir.is_dir():
        raise NotARunError(f"{run_dir} is not a folder: give a run folder written by `tuneforge train`")
    if not run.config.is_file():
        raise NotARunError(f"{run_dir} is not a tuneforge run (no config.yaml); train one with `tuneforge train`")
    try:
        config = load_config(run.config, check_files=False)
    except ConfigError as e:
        raise NotARunError(f"{run.config}: {e}") from None
    try:
        method = get_method(config.method)
    except ValueError as e:
        raise NotARunError(f"{run.config}: {e}") from None
    record = RunRecord.load(run_dir) or RunRecord()
    if record.regressed and not allow_regressed:
        raise NotARunError(f"{run_dir} ended worse than it started ({'; '.join(record.problems or [])}): it is "
                           "not shipped. Retrain it (lower learning_rate, check the data), or pass --allow-regressed")
    needed = FULL_MODEL_FILES[:1] if method.is_full_model else ADAPTER_FILES
    missing = [f for f in needed if not (run_dir / f).is_file()]
    if method.is_full_model and not list(run_dir.glob("*.safetensors")):
        missing.append("model.safetensors")
    if missing:
        raise NotARunError(f"{run_dir} has no {', '.join(missing)}: the run did not finish (train it to the end, "
                           "or resume it with `tuneforge train CONFIG --resume`)")
    return config, method, record


def runtime_support(kind: str, method: str, adapter_config: dict[str, Any], mergeable: bool) -> dict[str, dict]:
    """Which runtimes load the package, and why not where they refuse it.

    What vLLM and llama.cpp's LoRA GGUF make of an adapter, the record of ``method`` says (``Method.runtimes``: LoRA
    only; vLLM's ``PEFTHelper`` refuses DoRA, ``modules_to_save`` and LoRA biases, and a rank above its default
    ``--max-lora-rank`` of 16 needs that flag raised: ``methods/lora/export.py``).
    """
    from tuneforge.methods import get_method

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
    runtimes = get_method(method).runtimes
    vllm: dict[str, Any] = (
        runtimes.vllm(adapter_config) if runtimes.vllm is not None else
        {"loads": False, "reason": f"vLLM serves LoRA adapters only (this is {peft_type or method})"})
    llama = ({"loads": True, "how": gguf + " (the adapter folded into the base)"} if mergeable else
             {"loads": False, "reason": f"method '{method}' cannot be merged into the base weights"})
    if llama["loads"] and runtimes.gguf_lora is not None and not runtimes.gguf_lora(adapter_config):
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
    path = RunDir(run_dir).rejects
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
    report = EvalReport.load(run_dir)
    return _report_results(report) if report is not None else []


def _report_results(report: EvalReport) -> list[dict[str, Any]]:
    """Results of ``tuneforge eval``'s ``eval/report.json``: per test set, the ``tuned`` column's metrics
    (bootstrap ``value``; ``low``/``high`` kept), the ``base`` column as baseline, the failure categories,
    and the forgetting check (MMLU cloze accuracy of base and tuned) when it ran."""
    results = []
    for scores in report.set_scores():
        tuned = scores.columns.get("tuned")
        if tuned is None:
            continue

        def metrics(column: ColumnScores | None) -> list[dict[str, Any]]:
            out = []
            for metric, score in (column.metrics if column is not None else {}).items():
                value = score.number
                if value is not None:
                    out.append({"type": metric, "value": round(value, 6),
                                **({"low": score.low, "high": score.high} if score.has_bounds else {})})
            return out

        failures = [{"category": f.category, "count": f.count,
                     "example": (f"answered `{f.example[0][:60]}` for `{f.example[1][:40]}`" if f.example else "")}
                    for f in tuned.failures]
        results.append({"task": f"tuneforge eval ({scores.name})",
                        "dataset": Path(str(scores.file or scores.name)).name, "n": scores.n, "metrics": metrics(tuned),
                        "baseline": metrics(scores.columns.get("base")), "failures": failures})
    forgetting = report.forgetting_scores()
    tuned_acc = forgetting.tuned.number if forgetting is not None else None
    if forgetting is not None and tuned_acc is not None:
        base_acc = forgetting.base.number
        results.append({"task": "forgetting (MMLU cloze)", "n": forgetting.questions,
                        "dataset": Path(str(forgetting.data or "mmlu")).name,
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
    from tuneforge.runs import DataFile, library_versions

    run_dir, out = Path(run_dir), Path(out_dir)
    config, method, record = _run_files(run_dir, allow_regressed)
    if out.exists() and any(out.iterdir()) and not RunDir(out).is_package:
        raise NotARunError(f"{out} exists and is not a tuneforge package: give an empty or new folder as --out")
    kind = "full_model" if method.is_full_model else "adapter"

    base_sha = base_model_sha256(config.model)
    recorded = record.base_sha256()
    if recorded and base_sha and recorded != base_sha:
        raise BaseModelMismatch(f"{run_dir} was trained on base model sha256 {recorded}, but {config.model} now has "
                                f"sha256 {base_sha}: the base model changed since training")
    base_sha = base_sha or recorded

    adapter_config = {} if method.is_full_model else json.loads(RunDir(run_dir).adapter_config.read_text())
    rank, variants, settings = _method_summary(method, adapter_config)
    runtimes = runtime_support(kind, method.name, adapter_config, method.mergeable)

    if method.is_full_model:
        names = [n for n in (*FULL_MODEL_FILES, "model.safetensors.index.json") if (run_dir / n).is_file()]
        names += sorted(p.name for p in run_dir.glob("*.safetensors"))
    else:
        names = list(ADAPTER_FILES) + ([HEAD_FILE] if is_reward_model(run_dir) else [])   # a reward model's head
    names += [n for n in TOKENIZER_FILES if (run_dir / n).is_file()]
    terms = base_terms_files(config.model)
    clash = [p.name for p in terms if p.name in names]
    if clash:
        raise NotARunError(f"{run_dir} holds {', '.join(clash)}, the name of the base model's terms file: rename it")

    data = [DataFile(name=Path(str(d.path)).name, path=d.path, role=role, sha256=d.sha256)
            for d, role in zip(record.data or [], ["train"] * len(config.data.train_paths()) + ["validation"],
                               strict=False)]
    if not data:
        data = [DataFile(name=Path(p).name, path=p, role=role, sha256=file_sha256(p))
                for p, role in ((*((t, "train") for t in config.data.train_paths()),
                                 (config.data.validation, "validation")))
                if p and Path(p).is_file()]
    hyper = {k: v for k, v in config.model_dump(mode="json").items() if k in TRAINING_KEYS and v is not None}
    hyper.update({"method": config.method, **{f"adapter.{k}": v for k, v in settings.items()},
                  "data.max_length": config.data.max_length, "data.train_on": config.data.train_on})
    training = {"steps": record.steps, "train_tokens_seen": record.train_tokens_seen,
                "final_train_loss": record.final_train_loss, "best_eval_loss": record.best_eval_loss,
                "best_step": record.best_step, "trainable_params": record.trainable_params,
                "total_params": record.total_params, "wall_time_s": record.wall_time_s, "device": record.device}
    manifest = PackageManifest(
        tuneforge_package=1,
        name=out.name,
        kind=kind,
        method=config.method,
        method_variants=variants,
        task=config.task,
        rank=rank,
        adapter=settings,
        library_name="transformers" if method.is_full_model else ("peft" if runtimes["peft"]["loads"]
                                                                  else "tuneforge"),
        base_model={"name": config.model, "sha256": base_sha, "hub_id": base_model_id or HUB_IDS.get(config.model),
                    **({"terms": [p.name for p in terms]} if terms else {})},
        data=data,
        examples=record.examples or ExampleCounts(),
        rejects_by_check=_rejects_by_check(run_dir),
        hyperparameters=hyper,
        training={k: v for k, v in training.items() if v is not None},
        evaluation=evaluation_results(run_dir),
        runtimes=runtimes,
        versions={"training": record.versions or {}, "packaging": library_versions()},
        intended_use=intended_use,
        files={},
    )

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    _copy_files(run_dir, partial, names)
    for path in terms:                      # the base model's licence and terms travel with what is derived from it
        shutil.copy2(path, partial / path.name)
    names += [p.name for p in terms]
    RunDir(partial).config.write_text(dump_config(config))
    manifest.files = {n: file_sha256(partial / n) for n in sorted(names)}
    manifest.save(partial)
    card_base = base_model_id or HUB_IDS.get(config.model) or config.model
    (partial / "README.md").write_text(model_card(manifest, license or LICENSES.get(config.model, "other"),
                                                  card_base))
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    log.info("packaged %s -> %s", run_dir, out)
    return PackageReport(out, config.method, kind, base_sha, manifest.files, runtimes)

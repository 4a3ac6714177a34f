"""The model card (``README.md``) of a package: Hugging Face Hub front matter and a body a reviewer can act on.

The front matter holds the keys the Hub reads: ``base_model``, ``base_model_relation`` (``adapter``, or
``finetune`` for a full fine-tune), ``library_name``, ``license``, ``datasets``, ``tags`` (with the method),
``pipeline_tag`` and, when the run holds evaluation results, ``model-index``. The body: intended use,
training data (files, sha256, example counts, rejects by check), hyperparameters, metrics, known risks, and
how to load the package with peft, vLLM and tuneforge. Everything is read from the manifest
(``tuneforge.json``, :class:`~tuneforge.runs.records.PackageManifest`) that :mod:`tuneforge.export.package`
builds, so card and manifest cannot disagree.
"""

from __future__ import annotations

from typing import Any

import yaml

from tuneforge.runs import PackageManifest
from tuneforge.runs.records import PackageBaseModel

# the metric names of tuneforge eval's report.json (evaluation/metrics.py) and the forgetting check
METRIC_NAMES = {"label": "Label accuracy", "valid_label": "Valid label", "label_named": "Label named",
                "exact": "Exact match", "normalised": "Normalised exact match", "token_f1": "Token F1",
                "rouge_l": "ROUGE-L", "chrf": "chrF", "json_valid": "JSON valid", "schema_valid": "Schema valid",
                "regex": "Regex match", "user": "User metric", "mmlu_cloze_accuracy": "MMLU cloze accuracy"}


def _manifest(manifest: PackageManifest | dict[str, Any]) -> PackageManifest:
    """The record (a dict is read as a ``tuneforge.json`` of this version)."""
    return manifest if isinstance(manifest, PackageManifest) else PackageManifest.model_validate(manifest)


def front_matter(manifest: PackageManifest | dict[str, Any], license: str, base_model_id: str) -> dict[str, Any]:
    """The YAML front matter as a dict (keys in the order the Hub documents them)."""
    manifest = _manifest(manifest)
    data_names = [d.name for d in manifest.data or []]
    runtimes = manifest.runtimes or {}
    meta: dict[str, Any] = {
        "base_model": base_model_id,
        "base_model_relation": "finetune" if manifest.is_full_model else "adapter",
        "library_name": manifest.library_name,
        "license": license,
        "datasets": data_names,
        "pipeline_tag": "text-generation",
        "tags": ["tuneforge", manifest.method, *(manifest.method_variants or []), manifest.task,
                 *(["peft"] if runtimes["peft"]["loads"] else [])],
    }
    results = manifest.evaluation or []
    if results:
        meta["model-index"] = [{"name": manifest.name, "results": [
            {"task": {"type": "text-generation", "name": r["task"]},
             "dataset": {"name": r["dataset"], "type": r["dataset"]},
             "metrics": [{"type": m["type"], "name": METRIC_NAMES.get(m["type"], m["type"]), "value": m["value"]}
                         for m in r["metrics"]]}
            for r in results]}]
    return meta


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _data_section(manifest: PackageManifest) -> str:
    ex = manifest.examples
    rows = [(d.name, _given(d.role, ""), f"`{d.sha256}`") for d in manifest.data or []]
    out = [_table(("file", "role", "sha256"), rows) if rows else "The data files are not recorded in the run.", ""]
    if ex is not None and ex.to_dict():
        out.append(f"Examples used: {_given(ex.train, '?')} for training, {_given(ex.validation, '?')} for "
                   f"validation; {_given(ex.rejected, 0)} records rejected, {_given(ex.truncated, 0)} truncated"
                   + (f" (formats: {', '.join(f'{k} {v}' for k, v in ex.formats.items())})."
                      if ex.formats else "."))
    rejects = manifest.rejects_by_check or {}
    if rejects:
        out.append("Rejected records by check: " + ", ".join(f"`{k}` {v}" for k, v in rejects.items())
                   + " (the run's `rejects.jsonl` holds each with its file, line and reasons).")
    return "\n".join(out)


def _given(value: Any, missing: Any) -> Any:
    return missing if value is None else value


def _metrics_section(manifest: PackageManifest) -> str:
    out = []
    run = manifest.training or {}
    if run:
        out.append(_table(("quantity", "value"), [(k.replace("_", " "), _fmt(v)) for k, v in run.items()
                                                   if v is not None]))
    for r in manifest.evaluation or []:
        out.append("")
        out.append(f"Held-out evaluation on `{r['dataset']}` ({r.get('n', '?')} examples):")
        out.append("")
        baseline = {m["type"]: m["value"] for m in r.get("baseline") or []}
        rows = [(METRIC_NAMES.get(m["type"], m["type"]), _fmt(m["value"]), _fmt(baseline.get(m["type"], "n/a")))
                for m in r["metrics"]]
        out.append(_table(("metric", "this model", "base model"), rows))
    return "\n".join(out) if out else "No metrics were recorded in the run."


def _risks_section(manifest: PackageManifest) -> str:
    trained_on = _given(manifest.examples.train if manifest.examples else None, "an unrecorded number of")
    lines = [f"- **Narrow training data.** The {str(manifest.kind).replace('_', ' ')} was trained on "
             f"{trained_on} examples from the files above; inputs unlike them "
             "(other domains, languages, formats) may be answered worse than by the base model.",
             "- **Forgetting.** Fine-tuning can degrade abilities of the base model that the data does not "
             "exercise; compare with the base model on your own general prompts before replacing it."]
    for r in manifest.evaluation or []:
        base = {m["type"]: m["value"] for m in r.get("baseline") or []}
        for m in r["metrics"]:
            if m["type"] == "mmlu_cloze_accuracy" and m["type"] in base:
                lines.append(f"- **Measured forgetting.** MMLU cloze accuracy {base[m['type']]:.3f} (base) -> "
                             f"{m['value']:.3f} (this model) on {r.get('n', '?')} questions.")
        for f in r.get("failures") or []:
            lines.append(f"- **Failure category: {f['category']}.** {f['count']} of {r.get('n', '?')} held-out "
                         f"examples{': ' + f['example'] if f.get('example') else ''}.")
    if manifest.rejects_by_check:
        lines.append("- **Rejected data.** Some training records were rejected (see above); the model never saw them.")
    base_name = manifest.base_model.name if manifest.base_model is not None else None
    lines.append(f"- **Base model.** Everything the base model (`{base_name}`) gets wrong or "
                 "should not say, this model may too.")
    return "\n".join(lines)


def _load_section(manifest: PackageManifest, base_model_id: str) -> str:
    rt = manifest.runtimes or {}
    name = manifest.name
    base = manifest.base_model or PackageBaseModel()
    out = []
    if manifest.is_full_model:
        out += ["This package is a **full model** (every weight was trained), not an adapter: load it on its own.",
                "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{name}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")  # the chat template used in training',
                "```", ""]
    elif rt["peft"]["loads"]:
        out += ["**peft**", "", "```python", "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'base = AutoModelForCausalLM.from_pretrained("{base_model_id}")',
                f'model = PeftModel.from_pretrained(base, "{name}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")  # the chat template used in training',
                "```", ""]
    else:
        out += [f"**peft**: {rt['peft']['reason']}.", ""]
    if rt["vllm"]["loads"]:
        cmd = (f"vllm serve {name}" if manifest.is_full_model else
               f"vllm serve {base_model_id} --enable-lora --lora-modules {name}={name}"
               + (f" --max-lora-rank {rt['vllm']['max_lora_rank']}" if rt["vllm"].get("max_lora_rank") else ""))
        out += ["**vLLM**", "", "```bash", cmd, "```", ""]
        if not manifest.is_full_model:
            out += [f'then ask for `"model": "{name}"` in `/v1/chat/completions` requests.', ""]
    else:
        out += [f"**vLLM**: {rt['vllm']['reason']}.", ""]
    out += ["**tuneforge**", "", "```bash", f"tuneforge generate {name} --prompt \"...\"",
            *([f"tuneforge serve --base {base.name} --adapter {name}={name}"]
              if not manifest.is_full_model else []), "```", "",
            f"tuneforge checks the base model's sha256 (`{base.sha256}`) when it loads the "
            "package and refuses another base model."]
    if rt["llama.cpp"]["loads"]:
        how = rt["llama.cpp"]["how"].replace("RUN", name)
        out += ["", f"**llama.cpp / Ollama**: {how}."]
    return "\n".join(out)


def _terms_section(manifest: PackageManifest, license: str) -> str | None:
    """The base model's licence and terms files carried in the package, named (None when there are none)."""
    base = manifest.base_model or PackageBaseModel()
    if not base.terms:
        return None
    names = ", ".join(f"`{name}`" for name in base.terms)
    return (f"This model is derived from `{base.name}`, whose licence and terms apply to it and to anything derived "
            f"from it: they are included in this package ({names}). Read them before you use, share or serve it; "
            f"the card's `license: {license}` names them.")


def model_card(manifest: PackageManifest | dict[str, Any], license: str, base_model_id: str) -> str:
    """The complete ``README.md`` text for the package described by ``manifest``."""
    manifest = _manifest(manifest)
    meta = front_matter(manifest, license, base_model_id)
    what = ("a full fine-tune (all weights trained; the package is the whole model)" if manifest.is_full_model
            else f"a {manifest.method} adapter (rank {manifest.rank})" if manifest.rank
            else f"a {manifest.method} adapter")
    hyper = manifest.hyperparameters or {}
    sections = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---",
        f"# {manifest.name}",
        f"{what.capitalize()} of `{base_model_id}`, trained with tuneforge ({manifest.task}).",
        "## Intended use\n\n" + (manifest.intended_use or
                                 "The task of the training data below: answer prompts like those in its files, "
                                 "in the chat format it was trained with (that chat template is included). It is "
                                 "not evaluated for other uses."),
        "## Training data\n\n" + _data_section(manifest),
        "## Hyperparameters\n\n" + (_table(("setting", "value"), [(k, f"`{_fmt(v)}`") for k, v in hyper.items()])
                                    if hyper else "Not recorded."),
        "## Metrics\n\n" + _metrics_section(manifest),
        "## Known risks and limitations\n\n" + _risks_section(manifest),
        *([f"## Licence and terms of the base model\n\n{terms}"] if (terms := _terms_section(manifest, license))
          else []),
        "## How to load\n\n" + _load_section(manifest, base_model_id),
        "## Files\n\n" + _table(("file", "sha256"), [(f"`{k}`", f"`{v}`") for k, v in (manifest.files or {}).items()]),
    ]
    return "\n\n".join(sections) + "\n"

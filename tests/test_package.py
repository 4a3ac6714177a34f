"""tuneforge package: peft loads the package unchanged with the run's logits; card, manifest, base-model check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import MODEL, write_jsonl
from tuneforge.export.package import package_run
from tuneforge.fileutil import file_sha256
from tuneforge.runs import BaseModelMismatch, NotARunError, base_model_sha256, verify_base_model

LABELS = ["billing", "shipping", "login"]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    """A real (short) LoRA training run on the tiny model, with a rejected record and an eval/report.json."""
    from tuneforge.config import load_config
    from tuneforge.training.trainer import train

    tmp = tmp_path_factory.mktemp("trained")
    rows = [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
             "completion": LABELS[i % 3]} for i in range(24)]
    data = write_jsonl(tmp / "tickets.jsonl", rows + ["{broken"])
    config = load_config(data={"model": str(tiny_model_dir), "data": {"train": str(data), "val_fraction": 0.25},
                               "output_dir": str(tmp / "run"), "max_steps": 3, "batch_size": 6,
                               "learning_rate": 3e-3, "progress": False,
                               "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    run = train(config).run_dir
    # what `tuneforge eval` (and the quickstart) writes: eval/report.json, scored by the evaluation's own code
    from tuneforge.evaluation import bootstrap, failures

    references, answers = ["billing", "login", "login"], ["billing", "shipping", "billing"]
    rules = failures.FormatRules(labels=LABELS)
    rows = [{"index": i, "prompt": f"Ticket {i}", "reference": r, "answer": a, "stopped": True, "correct": r == a}
            for i, (r, a) in enumerate(zip(references, answers, strict=True))]

    def column(label: list[float], valid: list[float], column_rows: list[dict]) -> dict:
        return {"metrics": {"label": bootstrap.interval(label).to_dict(),
                            "valid_label": bootstrap.interval(valid).to_dict()},
                "failures": failures.analyse(column_rows, rules)}

    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps({"tuneforge_eval": 1, "main_metric": "label", "sets": {
        "test": {"file": str(tmp / "test.jsonl"), "n": 3, "columns": {
            "base": column([0.0, 0.0, 0.0], [0.5, 0.5, 0.5], []),
            "tuned": column([1.0, 0.0, 0.0], [1.0, 1.0, 1.0], rows)}}}}))
    return run, data


@pytest.fixture(scope="module")
def package(trained_run, tmp_path_factory):
    run, _ = trained_run
    out = tmp_path_factory.mktemp("pkg") / "tickets-lora"
    report = package_run(run, out)
    return out, report


def test_package_holds_the_adapter_tokenizer_card_and_manifest(trained_run, package, tiny_model_dir):
    run, data = trained_run
    out, report = package
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "config.yaml", "README.md", "tuneforge.json"):
        assert (out / name).is_file(), name
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert file_sha256(out / name) == file_sha256(run / name), f"{name} must be copied unchanged"
    assert not (out.parent / "tickets-lora.partial").exists()

    manifest = json.loads((out / "tuneforge.json").read_text())
    assert manifest["method"] == "lora" and manifest["rank"] == 4 and manifest["kind"] == "adapter"
    assert manifest["adapter"]["lora_alpha"] == 8
    # the base model is named by the sha256 of its one weight file (a converted GGUF: the GGUF's hash)
    assert manifest["base_model"]["sha256"] == file_sha256(tiny_model_dir / "model.safetensors")
    assert manifest["base_model"]["sha256"] == base_model_sha256(tiny_model_dir) == report.base_model_sha256
    assert manifest["data"][0]["sha256"] == file_sha256(data) and manifest["data"][0]["role"] == "train"
    assert manifest["examples"]["rejected"] == 1 and sum(manifest["rejects_by_check"].values()) == 1
    assert manifest["versions"]["training"]["peft"] and manifest["versions"]["packaging"]["torch"]
    assert manifest["files"]["adapter_model.safetensors"] == file_sha256(out / "adapter_model.safetensors")
    assert manifest["runtimes"]["peft"]["loads"] and manifest["runtimes"]["vllm"]["loads"]
    assert manifest["training"]["steps"] == 3


def test_model_card_front_matter_and_body(package):
    out, _ = package
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model_relation"] == "adapter" and meta["library_name"] == "peft"
    assert meta["datasets"] == ["tickets.jsonl"] and "lora" in meta["tags"] and meta["license"] == "other"
    results = meta["model-index"][0]["results"][0]
    metrics = {m["type"]: m["value"] for m in results["metrics"]}
    assert metrics["label"] == pytest.approx(1 / 3, abs=1e-6) and metrics["valid_label"] == 1.0
    assert results["dataset"]["name"] == "test.jsonl" and results["task"]["name"] == "tuneforge eval (test)"
    for heading in ("## Intended use", "## Training data", "## Hyperparameters", "## Metrics",
                    "## Known risks and limitations", "## How to load"):
        assert heading in card, heading
    assert "wrong_label" in card and "2 of 3" in card       # the failure category of the tuned column's answers
    assert "PeftModel.from_pretrained" in card and "--lora-modules tickets-lora=tickets-lora" in card
    assert file_sha256(out / "adapter_model.safetensors") in card


def test_builtin_base_model_gets_its_hub_id_and_license():
    from tuneforge.export.model_card import front_matter as fm
    from tuneforge.export.package import HUB_IDS, LICENSES

    assert HUB_IDS[MODEL] == "HuggingFaceTB/SmolLM2-135M-Instruct" and LICENSES[MODEL] == "apache-2.0"
    manifest = {"kind": "adapter", "data": [], "library_name": "peft", "method": "lora", "method_variants": [],
                "task": "sft", "runtimes": {"peft": {"loads": True}}, "evaluation": [], "name": "x"}
    meta = fm(manifest, "apache-2.0", HUB_IDS[MODEL])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "model-index" not in meta


def test_peft_loads_the_package_unchanged_with_the_runs_logits(trained_run, package, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.runs import load_run

    run, _ = trained_run
    out, _ = package
    ids = torch.tensor([[1, 504, 3329, 28, 1838, 2]])
    with torch.no_grad():
        expected = load_run(run, device="cpu").model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        got = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
        via_tuneforge = load_run(out, device="cpu").model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(via_tuneforge, expected, rtol=0, atol=1e-6)
    base_only = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=ids).logits
    assert (base_only - expected).abs().max() > 1e-4   # the adapter changes the logits: the check can fail


@pytest.mark.parametrize("case", ["dora", "ia3", "prefix", "adapter"])
def test_each_method_packages_and_the_manifest_says_who_loads_it(case, tmp_path, tiny_model_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from test_merge import make_run
    from tuneforge.runs import load_run

    run = make_run(tmp_path, tiny_model_dir, tokenizer, case)
    out = tmp_path / f"pkg_{case}"
    package_run(run, out)
    manifest = json.loads((out / "tuneforge.json").read_text())
    runtimes = manifest["runtimes"]
    assert runtimes["tuneforge"]["loads"] and not runtimes["vllm"]["loads"]
    expected_reason = {"dora": "DoRA", "ia3": "LoRA adapters only", "prefix": "LoRA adapters only",
                       "adapter": "LoRA adapters only"}[case]
    assert expected_reason in runtimes["vllm"]["reason"]
    assert runtimes["llama.cpp"]["loads"] == (case in ("dora", "ia3"))
    ids = torch.tensor([[1, 504, 3329, 28, 1838]])
    with torch.no_grad():
        expected = load_run(run, device="cpu").model(input_ids=ids).logits
        if case == "adapter":       # ours: peft refuses it, tuneforge loads it
            assert not runtimes["peft"]["loads"] and manifest["library_name"] == "tuneforge"
            got = load_run(out, device="cpu").model(input_ids=ids).logits
        else:
            base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            got = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    meta = front_matter((out / "README.md").read_text())
    assert {"dora": "lora", "ia3": "ia3", "prefix": "prefix", "adapter": "adapter"}[case] in meta["tags"]
    assert ("dora" in meta["tags"]) == (case == "dora")


def test_vllm_rank_above_its_default_needs_max_lora_rank():
    from tuneforge.export.package import runtime_support

    lora = {"peft_type": "LORA", "r": 32, "bias": "none"}
    assert runtime_support("adapter", "lora", lora, True)["vllm"] == {"loads": True, "max_lora_rank": 32}
    assert runtime_support("adapter", "lora", {**lora, "r": 8}, True)["vllm"] == {"loads": True}
    refused = runtime_support("adapter", "lora", {**lora, "modules_to_save": ["lm_head"]}, True)["vllm"]
    assert not refused["loads"] and "modules_to_save" in refused["reason"]


def test_a_full_fine_tune_packages_the_whole_model(tmp_path, tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from tuneforge.config import RunConfig, dump_config
    from tuneforge.methods import apply_method, save_trained

    config = RunConfig.model_validate({"data": {"train": "unused.jsonl"}, "method": "full",
                                       "model": str(tiny_model_dir)})
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), config)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    run = tmp_path / "run_full"
    save_trained(model, run, config)
    tokenizer.save_pretrained(run)
    (run / "config.yaml").write_text(dump_config(config))
    out = tmp_path / "pkg_full"
    package_run(run, out)
    manifest = json.loads((out / "tuneforge.json").read_text())
    assert manifest["kind"] == "full_model" and manifest["library_name"] == "transformers"
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model_relation"] == "finetune" and "**full model**" in card
    assert not (out / "adapter_config.json").exists()
    ids = torch.tensor([[1, 504, 3329]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=ids).logits
        torch.testing.assert_close(got, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    verify_base_model(out, tmp_path)   # a full model needs no base: nothing to refuse


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_another_base_model_is_refused_with_both_hashes(tmp_path, tiny_model_dir, tokenizer):
    from test_merge import make_run
    from tuneforge.models.loading import build_tiny_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    run = make_run(tmp_path, base, tokenizer, "lora")
    out = tmp_path / "pkg"
    package_run(run, out)
    trained_on = base_model_sha256(base)
    verify_base_model(out, base)                       # the right base: accepted
    build_tiny_model(MODEL, seed=1).save_pretrained(base)  # the base folder now holds other weights
    other = base_model_sha256(base)
    assert other != trained_on
    with pytest.raises(BaseModelMismatch) as e:
        verify_base_model(out, base)
    assert trained_on in str(e.value) and other in str(e.value) and "\n" not in str(e.value)

    for argv in (("generate", out, "--prompt", "hi", "--max-new-tokens", "2"),
                 ("merge", out, "--out", tmp_path / "merged")):
        proc = _cli(*argv)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if "bitsandbytes" not in ln]   # its import warning
        assert len(lines) == 1 and trained_on in lines[0] and other in lines[0], proc.stderr
    # packaging the run again notices that the base changed since training (run.json records its hash)
    (run / "run.json").write_text(json.dumps({"base_model": {"weights_sha256": {"model.safetensors": trained_on}}}))
    with pytest.raises(BaseModelMismatch):
        package_run(run, tmp_path / "pkg2")


def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_model_dir, tokenizer):
    from test_merge import make_run

    proc = _cli("package", tmp_path, "--out", tmp_path / "pkg")
    assert proc.returncode == 2 and "is not a tuneforge run (no config.yaml)" in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if "bitsandbytes" not in ln]) == 1
    run = make_run(tmp_path, tiny_model_dir, tokenizer, "lora")
    (run / "adapter_model.safetensors").unlink()
    with pytest.raises(NotARunError, match="has no adapter_model.safetensors"):
        package_run(run, tmp_path / "pkg")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    (tmp_path / "b").mkdir()
    proc = _cli("package", make_run(tmp_path / "b", tiny_model_dir, tokenizer, "lora"), "--out", busy)
    assert proc.returncode == 2 and "not a tuneforge package" in proc.stderr and (busy / "notes.txt").exists()


def test_eval_report_results_go_into_the_card(tmp_path):
    """``tuneforge eval``'s eval/report.json: the tuned column's metrics, the base as baseline, failures, forgetting."""
    from tuneforge.export.model_card import model_card
    from tuneforge.export.package import evaluation_results

    (tmp_path / "eval").mkdir()
    iv = {"value": 0.75, "low": 0.6, "high": 0.9}
    example = {"answer": "login", "reference": "billing"}
    (tmp_path / "eval" / "report.json").write_text(json.dumps({"sets": {"test": {
        "file": "/data/test.jsonl", "n": 40,
        "columns": {"base": {"metrics": {"label": {"value": 0.25, "low": 0.1, "high": 0.4}}},
                    "tuned": {"metrics": {"label": iv, "rouge_l": {"value": float("nan")}},
                              "failures": {"counts": {"wrong_label": 10},
                                           "examples": {"wrong_label": [example]}}}}}},
        "forgetting": {"questions": 100, "data": "cais/mmlu", "base": {"value": 0.31}, "tuned": {"value": 0.29}}}))
    results = evaluation_results(tmp_path)
    assert results[0]["metrics"] == [{"type": "label", "value": 0.75, "low": 0.6, "high": 0.9}]   # NaN dropped
    assert results[0]["baseline"][0]["value"] == 0.25 and results[0]["dataset"] == "test.jsonl"
    assert results[1]["metrics"][0] == {"type": "mmlu_cloze_accuracy", "value": 0.29}
    manifest = {"kind": "adapter", "name": "pkg", "method": "lora", "method_variants": [], "task": "sft",
                "library_name": "peft", "rank": 8, "data": [], "evaluation": results, "files": {},
                "base_model": {"name": "m", "sha256": "abc"},
                "runtimes": {"peft": {"loads": True}, "vllm": {"loads": True}, "llama.cpp": {"loads": False}}}
    card = model_card(manifest, "apache-2.0", "org/base")
    meta = front_matter(card)
    values = [m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]]
    assert values == [0.75, 0.29]
    assert "wrong_label" in card and "0.310 (base) -> 0.290" in card


def test_a_regressed_run_is_not_shipped_unless_asked(tmp_path, tiny_model_dir, tokenizer):
    """A run that ended worse than it started (run.json status: regressed, written with on_divergence: warn) is
    refused by package and both exports in one line naming its problems; --allow-regressed packages it."""
    from test_merge import make_run

    run = make_run(tmp_path, tiny_model_dir, tokenizer, "lora")
    record = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    problem = "the final eval_loss (5.1, step 8) is worse than the model's before training (4.2)"
    (run / "run.json").write_text(json.dumps({**record, "status": "regressed", "problems": [problem]}))
    proc = _cli("package", run, "--out", tmp_path / "pkg")
    assert proc.returncode == 2 and f"ended worse than it started ({problem})" in proc.stderr, proc.stderr
    assert "--allow-regressed" in proc.stderr and not (tmp_path / "pkg").exists()
    for fmt in ("gguf", "gguf-lora"):
        proc = _cli("export", run, "--format", fmt)
        assert proc.returncode == 2 and "ended worse than it started" in proc.stderr, proc.stderr
    assert package_run(run, tmp_path / "pkg", allow_regressed=True).out_dir.is_dir()


def test_the_base_models_terms_travel_into_the_package_and_its_card(tmp_path, tiny_model_dir, tokenizer):
    """A base model folder holding licence/terms files (as the converted gemma3-270m holds GEMMA_TERMS.html and
    NOTICE.md): every package made from it carries them unchanged, lists them in the manifest, names them in the
    card."""
    from test_merge import make_run

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "GEMMA_TERMS.html").write_text("<html>Gemma Terms of Use (test copy)</html>")
    (base / "NOTICE.md").write_text("# NOTICE\nGemma is provided under the Gemma Terms of Use.\n")
    out = tmp_path / "pkg"
    run = make_run(tmp_path, base, tokenizer, "lora")
    report = package_run(run, out, license="gemma")
    for name in ("GEMMA_TERMS.html", "NOTICE.md"):
        assert file_sha256(out / name) == file_sha256(base / name), name
        assert report.files[name] == file_sha256(base / name)
    manifest = json.loads((out / "tuneforge.json").read_text())
    assert manifest["base_model"]["terms"] == ["NOTICE.md", "GEMMA_TERMS.html"]
    card = (out / "README.md").read_text()
    assert front_matter(card)["license"] == "gemma"
    section = card.split("## Licence and terms of the base model", 1)[1].split("##", 1)[0]
    assert "`NOTICE.md`" in section and "`GEMMA_TERMS.html`" in section
    # a merged model carries them too
    from tuneforge.export.merge import merge_run

    merge_run(run, tmp_path / "merged", dtype="fp32")
    for name in ("GEMMA_TERMS.html", "NOTICE.md"):
        assert file_sha256(tmp_path / "merged" / name) == file_sha256(base / name), name
    # a base model without such files: no terms in the manifest, no section in the card
    plain = tmp_path / "plain"
    plain.mkdir()
    package_run(make_run(plain, tiny_model_dir, tokenizer, "lora"), plain / "pkg")
    assert "terms" not in json.loads((plain / "pkg" / "tuneforge.json").read_text())["base_model"]
    assert "Licence and terms" not in (plain / "pkg" / "README.md").read_text()


def test_gemma3_is_a_builtin_with_its_hub_id_and_license():
    from tuneforge.export.package import HUB_IDS, LICENSES
    from tuneforge.models.registry import BUILTIN_MODELS, GEMMA3

    assert GEMMA3 in BUILTIN_MODELS
    assert HUB_IDS[GEMMA3] == "google/gemma-3-270m" and LICENSES[GEMMA3] == "gemma"

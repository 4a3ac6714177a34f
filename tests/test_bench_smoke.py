"""Smoke test of the training-throughput bench: the seeds' recipe and tuneforge on a tiny model (2 steps of
2 examples, max length 64) with a template the tokenizer does not have (the plumbing ``--template`` uses), then
the table and the rendered-token check. No competitor venvs. The recipes' ``main`` run in this process
(the bench runs the same files as child processes) to keep the test fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "throughput"))

from throughput import harness, measure, templates  # noqa: E402

CONVERSATIONS = [[{"role": "user", "content": f"Say the number {i} in words, please."},
                  {"role": "assistant", "content": f"The number is {i}. " * (1 + i % 3)}] for i in range(4)]


def test_seeds_and_tuneforge_rows(tmp_path, tiny_model_dir):
    files = harness.write_data(CONVERSATIONS, tmp_path / "data")
    spec = {"model": str(tiny_model_dir), **files, "max_length": 64, "steps": 2, "batch": 2, "lr": 1e-3,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.05}, "threads": 1, "device": "cpu", "dtype": "fp32",
            "seed": 0, "options": {}, "template": templates.resolve(tiny_model_dir, "base")}
    import seeds_recipe
    import torch
    import tuneforge_recipe

    rows, threads = [], torch.get_num_threads()
    try:
        for name, recipe in (("seeds", seeds_recipe), ("tuneforge", tuneforge_recipe)):
            work = tmp_path / name
            work.mkdir()
            (work / "spec.json").write_text(json.dumps(dict(spec, recipe=name, work_dir=str(work))))
            recipe.main(str(work / "spec.json"), str(work / "result.json"))
            rows.append(measure.summarize(json.loads((work / "result.json").read_text()), peak_gflops=10.0))
    finally:
        torch.set_num_threads(threads)
    seeds, ours = rows
    # the seeds' recipe pads every example to max_length and trains every real token but the first
    assert seeds["examples_per_step"] == 2
    assert all(s["tokens"] < 2 * 64 for s in json.loads((tmp_path / "seeds" / "result.json").read_text())["steps"])
    # tuneforge trains the assistant tokens only, on exactly the real tokens of the same conversations
    assert ours["trained_tok_s"] < ours["real_tok_s"]
    assert ours["real_tokens_per_step"] == seeds["real_tokens_per_step"]
    for row in rows:
        assert row["s_per_step"] > 0 and row["peak_mem_mib"] > 0 and 0 < row["mfu"] and len(row["loss_curve"]) == 2
    # both rendered the conversations with the base template given, not SmolLM2's own: the same tokens as the
    # reference rendering, which differs from the tokenizer's own template's
    reference = templates.reference_rendering(tiny_model_dir, spec["template"]["text"], CONVERSATIONS, 64)
    own = templates.reference_rendering(tiny_model_dir, templates.resolve(tiny_model_dir, None)["text"],
                                        CONVERSATIONS, 64)
    assert reference["tokens"] != own["tokens"]
    for row in rows:
        assert row["rendered"] == {"examples": 4, "tokens": reference["tokens"]}, row["recipe"]
        assert row["template"].startswith("base (")
    assert sum(s["tokens"] for s in json.loads((tmp_path / "seeds" / "result.json").read_text())["steps"]) == \
        reference["tokens"]
    lines = templates.check_lines(rows, reference)
    assert len(lines) == 3 and not any("differs" in x for x in lines)
    assert "differs: +3 tokens" in templates.check_lines([dict(rows[0], rendered={
        "examples": 4, "tokens": reference["tokens"] + 3})], reference)[1]
    table = harness.markdown_table(rows + [{"recipe": "trl", "error": "disabled"}])
    assert "not run: disabled" in table and "| tuneforge |" in table and "| base (" in table
    assert harness.ratios(rows)[0].startswith("tuneforge vs seeds: real tok/s x")


def test_count_batch_neat_packing_mask():
    import torch

    # LLaMA-Factory's 4-D mask for indices [[1, 1, 2, 2, 2, 0]]: 5 real tokens, 2 sequences
    idx = torch.tensor([[1, 1, 2, 2, 2, 0]])
    allowed = (idx[:, None, :, None] == idx[:, None, None, :]) & (idx != 0)[:, None, None, :] & torch.tril(
        torch.ones(6, 6, dtype=torch.bool))
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    labels = torch.tensor([[-100, 5, -100, 7, 8, -100]])
    assert measure.count_batch({"input_ids": torch.zeros(1, 6, dtype=torch.long), "attention_mask": mask,
                                "labels": labels}) == (5, 3, 2)
    # a padding-free row: position restarts count examples
    assert measure.count_batch({"input_ids": torch.zeros(1, 5, dtype=torch.long), "labels": labels[:, :5],
                                "position_ids": torch.tensor([[0, 1, 0, 1, 2]])}) == (5, 3, 2)


def test_template_defaults_and_bad_values(tmp_path, tokenizer, capsys):
    import copy

    import train_throughput

    from tuneforge.errors import ConfigError

    base = copy.deepcopy(tokenizer)
    base.chat_template = None     # a base model's tokenizer
    for model_type in ("gemma3_text", "llama"):
        folder = tmp_path / model_type
        base.save_pretrained(folder)
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    # a Gemma base model defaults to the gemma template (which SmolLM2's vocabulary, used here, cannot hold)
    with pytest.raises(ConfigError, match=r"^--template: gemma writes <start_of_turn>"):
        templates.resolve(tmp_path / "gemma3_text", None)
    with pytest.raises(ConfigError, match=r"^--template: .* has no chat template and no default is known"):
        templates.resolve(tmp_path / "llama", None)
    with pytest.raises(ConfigError, match=r"^--template: auto, but .* has no chat template"):
        templates.resolve(tmp_path / "llama", "auto")
    chosen = templates.resolve(tmp_path / "llama", "base")
    assert (chosen["name"], chosen["source"], chosen["lf_template"]) == ("base", "builtin", None)
    # LLaMA-Factory's gemma3 template needs a multimodal processor: a text-only Gemma 3 gets its gemma template
    assert templates.lf_template_for("gemma", tmp_path / "gemma3_text") == "gemma"
    # the bench stops in one line, exit 2, before it reads any data or loads weights
    assert train_throughput.main(["--model", str(tmp_path / "llama"), "--template", "gema",
                                  "--data", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'gemma'?" in err

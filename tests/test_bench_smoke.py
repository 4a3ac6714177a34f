"""Smoke test of the training-throughput bench: the seeds' recipe and tuneforge on a tiny model (2 steps of
2 examples, max length 64), then the table. No competitor venvs. The recipes' ``main`` run in this process
(the bench runs the same files as child processes) to keep the test fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "throughput"))

from throughput import harness, measure  # noqa: E402

CONVERSATIONS = [[{"role": "user", "content": f"Say the number {i} in words, please."},
                  {"role": "assistant", "content": f"The number is {i}. " * (1 + i % 3)}] for i in range(4)]


def test_seeds_and_tuneforge_rows(tmp_path, tiny_model_dir):
    files = harness.write_data(CONVERSATIONS, tmp_path / "data")
    spec = {"model": str(tiny_model_dir), **files, "max_length": 64, "steps": 2, "batch": 2, "lr": 1e-3,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.05}, "threads": 1, "device": "cpu", "dtype": "fp32",
            "seed": 0, "options": {}}
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
    table = harness.markdown_table(rows + [{"recipe": "trl", "error": "disabled"}])
    assert "not run: disabled" in table and "| tuneforge |" in table
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

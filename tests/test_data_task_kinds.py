"""A record of another kind than the run's task (text in an SFT run, ...) is rejected by training as by `data clean`."""

from __future__ import annotations

import json

from conftest import write_jsonl
from tuneforge.cli import main
from tuneforge.data.curation.clean import clean_files
from tuneforge.data.curation.config import CurationConfig
from tuneforge.data.dataset import TRAINING_CHECKS, load_examples
from tuneforge.data.preference import load_pairs
from tuneforge.data.settings import DataConfig

TOOLS = ["calculator", "search engine", "weather radar", "map", "clock", "dictionary"]


def _chat(n: int) -> list[dict]:
    return [{"instruction": f"Which tool answers question number {i} about {w}?", "output": w}
            for i, w in enumerate(TOOLS * 4)][:n]


def _reasons(rejects) -> dict[int, list[tuple[str, str]]]:
    return {r.line: [tuple(reason) for reason in r.reasons] for r in rejects}


def test_training_rejects_a_text_record_in_an_sft_run_as_data_clean_does(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", _chat(6) + [{"text": "plain text in chat data"}]
                    + [{"chosen": "good", "rejected": "bad", "prompt": "q"}])
    loaded = load_examples(str(f), DataConfig(train=str(f)), "sft")
    assert len(loaded.examples) == 6 and loaded.formats == {"alpaca": 6}
    clean_files(f, tmp_path / "out", CurationConfig(min_examples=0, near_dup=False))
    cleaned = {r["line"]: [(x["check"], x["message"]) for x in r["reasons"]]
               for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())}
    assert _reasons(loaded.rejects) == cleaned
    assert [c for reasons in cleaned.values() for c, _ in reasons] == ["mixed_kinds", "mixed_kinds"]
    assert "mixed_kinds" in TRAINING_CHECKS


def test_pretrain_rejects_chat_records_and_a_declared_format_decides_the_kind(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "raw text one"}, {"text": "raw text two"}] + _chat(1))
    loaded = load_examples(str(f), DataConfig(train=str(f)), "pretrain")
    assert len(loaded.examples) == 2 and [(r.line, r.reasons[0].check) for r in loaded.rejects] == [(3, "mixed_kinds")]
    loaded = load_examples(str(f), DataConfig(train=str(f), format="text"), "sft")   # SFT on text, declared
    assert len(loaded.examples) == 2 and [r.reasons[0].check for r in loaded.rejects] == ["missing_field"]


def test_preference_runs_reject_chat_records_as_mixed_kinds(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}] + _chat(1))
    loaded = load_pairs(str(f), DataConfig(train=str(f)))
    assert len(loaded.examples) == 1 and [(r.line, r.reasons[0].check) for r in loaded.rejects] == [(2, "mixed_kinds")]


def test_train_writes_the_text_record_to_rejects(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    f = write_jsonl(tmp_path / "my.jsonl", _chat(12) + [{"text": "plain text in chat data"}])
    rc = main(["train", "--data", str(f), "--set", f"model={tiny_model_dir}", "--set", "max_steps=1",
               "--set", "progress=false", "--set", "lora.r=2"])
    assert rc == 0, capsys.readouterr().err
    [reject] = [json.loads(x) for x in (tmp_path / "runs" / "my" / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 13 and reject["reasons"][0]["check"] == "mixed_kinds"
    record = json.loads((tmp_path / "runs" / "my" / "run.json").read_text())
    assert record["examples"]["train"] + record["examples"]["validation"] == 12

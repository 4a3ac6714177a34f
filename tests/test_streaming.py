"""data.streaming: the memory-mapped token store and training from it while it is written.

References: the in-memory path's tokenization of the same records (the store must hold exactly those examples),
an uninterrupted streaming run (a resumed one must end bitwise the same), the writer's own commits (a reader must
never see past them)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

import tuneforge.data.streaming as streaming
from conftest import Killed, crash_after_checkpoint, write_jsonl
from tuneforge.config import load_config
from tuneforge.data.dataset import load_examples, prepare_data, tokenize_examples
from tuneforge.data.errors import DataError
from tuneforge.data.rendering import TokenizedExample
from tuneforge.data.settings import DataConfig
from tuneforge.data.token_store import TokenStore, TokenStoreWriter, read_manifest
from tuneforge.errors import ConfigError
from tuneforge.training.trainer import TrainingRecipe, train

ROWS = [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
         "completion": ["billing", "shipping", "login"][i % 3]} for i in range(40)]


def _key(e: TokenizedExample) -> tuple:
    return tuple(e.input_ids), tuple(e.trained)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(streaming, "CHUNK_RECORDS", 7)       # many commits, a last partial one
    return tmp_path / "cache"


def test_store_holds_exactly_the_in_memory_tokenization_and_rejects_bad_lines(tmp_path, tokenizer, cache):
    rows = [*ROWS[:20], "this is not JSON", {"prompt": "no answer", "completion": ""}, *ROWS[20:]]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = DataConfig(train=str(path), val_fraction=0, streaming=True, shuffle_block=8)
    data = prepare_data(cfg, tokenizer, seed=0)
    data.train.wait_for(1 << 62, data.writing)              # the whole file
    reference_cfg = cfg.model_copy(update={"streaming": False})
    rejects: list = []
    reference, _ = tokenize_examples(load_examples(str(path), reference_cfg), tokenizer, reference_cfg, rejects)
    assert data.complete and len(data.train) == len(reference) == 40
    assert [_key(data.train[i]) for i in range(len(data.train))] == [_key(e) for e in reference]
    assert data.train_tokens == sum(len(e) for e in reference)
    assert [(r.line, r.reasons[0].check) for r in data.rejects] == [(21, "not_json"), (22, "empty_answer")]
    assert data.rejects[0].raw == "this is not JSON"
    # every epoch takes each example once; later epochs in another order
    first, second = list(data.epoch_order(0, 0)), list(data.epoch_order(0, 1))
    assert sorted(first) == sorted(second) == list(range(40)) and first != second
    batches = list(data.micro_batches(6, 0, 0))
    assert [len(b.example_ids) for b in batches] == [6] * 6 + [4]
    assert Counter(_key(data.train[i]) for b in batches for i in b.example_ids) == Counter(_key(e) for e in reference)
    assert torch.equal(batches[2].input_ids, next(data.micro_batches(6, 0, 0, start=2)).input_ids)


def test_second_run_opens_the_complete_store_without_tokenizing(tmp_path, tokenizer, cache, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = DataConfig(train=str(path), val_fraction=0.2, val_max_examples=5, streaming=True, shuffle_block=8)
    first = prepare_data(cfg, tokenizer, seed=3)
    first._writer.join()                       # the whole file
    order = list(first.epoch_order(3, 0))
    import tuneforge.data.record_checks as record_checks

    monkeypatch.setattr(record_checks, "tokenize_example", lambda *a, **k: pytest.fail("tokenized again"))
    second = prepare_data(cfg, tokenizer, seed=3)
    assert second._writer is None and second.complete
    assert len(second.validation) == 5 and [_key(e) for e in second.validation] == [_key(e) for e in first.validation]
    assert len(second.train) == 35 and list(second.epoch_order(3, 0)) == order


def test_a_validation_file_is_tokenized_first_and_kept_apart(tmp_path, tokenizer, cache):
    train_file = write_jsonl(tmp_path / "train.jsonl", ROWS[:30])
    validation_file = write_jsonl(tmp_path / "validation.jsonl", ROWS[30:])
    cfg = DataConfig(train=str(train_file), validation=str(validation_file), streaming=True, shuffle_block=8)
    data = prepare_data(cfg, tokenizer, seed=0)
    data.train.wait_for(1 << 62, data.writing)
    memory = prepare_data(cfg.model_copy(update={"streaming": False}), tokenizer, seed=0)
    assert [_key(e) for e in data.validation] == [_key(e) for e in memory.validation] and len(data.validation) == 10
    assert [_key(e) for e in data.train] == [_key(e) for e in memory.train]


def test_reader_sees_only_committed_examples_and_a_killed_writer_is_continued(tmp_path):
    folder = tmp_path / "store"
    writer = TokenStoreWriter(folder)
    examples = [TokenizedExample(list(range(i, i + 3 + i)), [j % 2 == 0 for j in range(3 + i)]) for i in range(6)]
    for e in examples[:2]:
        writer.add("train", e)
    reader = TokenStore(folder)
    assert len(reader) == 0
    writer.commit(records=2, formats={"text": 2}, truncated=0)
    for e in examples[2:4]:
        writer.add("train", e)                 # written to nobody yet: not committed
    writer._files["train"][0].write(b"\x01\x02")   # and bytes a killed writer left past the commit
    writer._files["train"][0].flush()
    reader.refresh()
    assert len(reader) == 2 and [_key(reader[i]) for i in range(2)] == [_key(e) for e in examples[:2]]
    with pytest.raises(IndexError):
        reader[2]
    # the process dies here; a new writer cuts the files to the commit and continues after record 2
    continued = TokenStoreWriter(folder)
    assert continued.manifest["records"] == 2 and continued.count("train") == 2
    for e in examples[2:]:
        continued.add("train", e)
    continued.commit(records=6, formats={"text": 6}, truncated=0, complete=True)
    reader.refresh()
    assert reader.complete and [_key(e) for e in reader] == [_key(e) for e in examples]
    assert read_manifest(folder)["train"]["tokens"] == sum(len(e) for e in examples)


def test_a_stopped_writer_is_continued_to_the_same_store(tmp_path, tokenizer, cache, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = DataConfig(train=str(path), val_fraction=0.5, val_max_examples=3, streaming=True, shuffle_block=8)
    calls = []
    original = streaming.tokenize_record

    def stop_after_25(*args):
        calls.append(1)
        if len(calls) == 25:                   # the training run ends: the writer thread is told to stop
            threading.current_thread().stop.set()
        return original(*args)

    with monkeypatch.context() as m:
        m.setattr(streaming, "tokenize_record", stop_after_25)
        data = prepare_data(cfg, tokenizer, seed=1)
        data._writer.join()
    stopped = read_manifest(data.folder)
    assert not stopped["complete"] and 0 < stopped["records"] < len(ROWS)
    with pytest.raises(DataError, match="stopped before the end"):
        data.train.wait_for(len(ROWS), data.writing)
    again = prepare_data(cfg, tokenizer, seed=1)
    again._writer.join()
    fresh = prepare_data(cfg, tokenizer, seed=1, use_cache=False)
    fresh._writer.join()
    fresh.train.refresh()
    assert again.complete and len(calls) == 25
    assert [_key(e) for e in again.train] == [_key(e) for e in fresh.train]
    assert [_key(e) for e in again.validation] == [_key(e) for e in fresh.validation]


def _settings(tiny_model_dir, data, out):
    return {"model": str(tiny_model_dir), "data": {"train": str(data), "val_fraction": 0.2, "val_max_examples": 3,
                                                     "streaming": True, "shuffle_block": 8},
            "output_dir": str(out), "max_steps": 6, "batch_size": 4, "gradient_accumulation_steps": 2,
            "learning_rate": 3e-3, "eval_every": 3, "save_every": 1, "keep_best": False, "progress": False,
            "seed": 7, "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}



def test_streaming_run_resumes_bitwise_as_the_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", [*ROWS, "{broken"])
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache-a"))
    full = train(load_config(data=_settings(tiny_model_dir, data, tmp_path / "a")))
    assert full.steps == 6
    assert json.loads((tmp_path / "a" / "rejects.jsonl").read_text())["reasons"][0]["check"] == "not_json"
    # another cache: the crashed run tokenizes on its own; it dies after step 3's checkpoint
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache-b"))
    config = load_config(data=_settings(tiny_model_dir, data, tmp_path / "b"))
    crash = crash_after_checkpoint(3)

    original_tokenize, calls = streaming.tokenize_record, []

    def stall_at_33(*args):                    # the writer is still at record 33 when the run dies at step 3
        calls.append(1)
        if len(calls) == 33:
            threading.current_thread().stop.wait()
        return original_tokenize(*args)

    with monkeypatch.context() as m:
        m.setattr(TrainingRecipe, "save_checkpoint", crash)
        m.setattr(streaming, "tokenize_record", stall_at_33)
        m.setattr(streaming, "CHUNK_RECORDS", 4)
        with pytest.raises(Killed):
            train(config)
    stopped = read_manifest(next((tmp_path / "cache-b" / "tokenized").glob("*.store")))
    assert not stopped["complete"] and stopped["records"] == 33       # the resumed run continues the store
    train(config, resume=True)
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("a", "b")]
    assert [r["step"] for r in rows[1]] == list(range(1, 7))
    same = ("loss", "eval_loss", "lr", "tokens", "trained_tokens")
    assert [[r.get(k) for k in same] for r in rows[0]] == [[r.get(k) for k in same] for r in rows[1]]
    wa, wb = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_streaming_needs_max_steps_and_one_source(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    settings = _settings(tiny_model_dir, data, tmp_path / "out")
    del settings["max_steps"]
    with pytest.raises(ConfigError, match="data.streaming needs max_steps"):
        load_config(data=settings)
    settings["max_steps"] = 2
    settings["data"]["train"] = [{"path": str(data)}]
    with pytest.raises(ConfigError, match="data.streaming reads one data.train"):
        load_config(data=settings)


def test_memory_stays_bounded_and_the_first_batch_comes_before_tokenization_ends(tmp_path, tokenizer, monkeypatch):
    """A large-ish file (100k pretraining texts, ~40 MB): the first micro-batch is drawn while the store is still being
    written, and the process grows by far less than the same examples would take in memory as token lists."""
    psutil = pytest.importorskip("psutil")
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    words = "the parcel arrived late and the invoice was charged twice so I asked support to".split()
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(100_000):
            text = " ".join(words[(i + j) % len(words)] for j in range(70)) + f" record {i}"
            f.write(json.dumps({"text": text}) + "\n")
    process = psutil.Process()
    base = process.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cfg = DataConfig(train=str(path), val_max_examples=50, streaming=True)
    start = time.time()
    data = prepare_data(cfg, tokenizer, seed=0, task="pretrain")
    try:
        batches = data.micro_batches(8, 0, 0)
        next(batches)
        first = time.time() - start
        assert not data.complete, "the first batch should come before the whole file is tokenized"
        data.train.wait_for(40_000, data.writing)              # ~3.3M tokens: ~140 MB as Python token lists
        for _ in range(50):
            next(batches)
    finally:
        data.close()
        done.set()
        sampler.join()
    tokens = data.train_tokens
    in_memory = tokens * (8 + 8 + 28)          # a list slot for the id and for the mask, an int object per id
    growth = peak[0] - base
    assert tokens > 3_000_000 and in_memory > 120 * 2**20
    assert growth < 48 * 2**20, (f"RSS grew {growth / 2**20:.0f} MiB while {tokens} tokens were stored "
                                 f"({in_memory / 2**20:.0f} MiB as token lists)")
    assert first < 30

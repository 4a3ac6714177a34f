"""Data sources past one file (:mod:`tuneforge.data.sources`): a folder of shards, a ``save_to_disk`` folder and a
Hub id load to exactly the records and tokens of the same JSONL file; the cache key follows the data; a folder
of mixed formats, a missing split and an offline Hub id are one line (exit 2); rejects name the source and row."""

from __future__ import annotations

import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from tuneforge.data.dataset import load_examples, prepare_data
from tuneforge.data.errors import DataFileError
from tuneforge.data.loaders import data_sha256, iter_records
from tuneforge.data.settings import DataConfig
from tuneforge.data.sources import parse_source

ROWS = [{"prompt": f"Ticket {i}: {['charged twice', 'parcel late', 'cannot sign in'][i % 3]}",
         "completion": ["billing", "shipping", "login"][i % 3]} for i in range(20)]


def _tokens(data):
    return ([(e.input_ids, e.trained) for e in data.train], [(e.input_ids, e.trained) for e in data.validation])


@pytest.fixture()
def reference(tmp_path, tokenizer, monkeypatch):
    """The rows as one JSONL file, prepared (no cache): what every other source must give."""
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "all.jsonl", ROWS)
    return _tokens(prepare_data(DataConfig(train=str(path)), tokenizer, seed=3, use_cache=False))


def _shards_jsonl(folder):
    folder.mkdir()
    write_jsonl(folder / "part-000.jsonl", ROWS[:7])
    with gzip.open(folder / "part-001.jsonl.gz", "wt") as f:          # .jsonl and .jsonl.gz are one format
        f.write("".join(json.dumps(r) + "\n" for r in ROWS[7:15]))
    write_jsonl(folder / "part-002.jsonl", ROWS[15:])
    (folder / "README.md").write_text("not data")
    return str(folder)


def _shards_parquet(folder):
    folder.mkdir()
    for k, (a, b) in enumerate(((0, 9), (9, 20))):     # named so the sort puts 10 before 2: order by name
        pq.write_table(pa.Table.from_pylist(ROWS[a:b]), folder / f"shard-{'a' if k == 0 else 'b'}.parquet")
    return str(folder)


def _saved_dataset(folder):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    return str(folder)


def _saved_dict(folder):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:3]),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(folder))
    return f"{folder}?split=test"


@pytest.mark.parametrize("make", [_shards_jsonl, _shards_parquet, _saved_dataset, _saved_dict])
def test_each_source_kind_loads_the_records_and_tokens_of_the_same_jsonl(make, tmp_path, tokenizer, reference):
    spec = make(tmp_path / "src")
    assert [r.data for r in iter_records(spec)] == ROWS
    got = _tokens(prepare_data(DataConfig(train=spec), tokenizer, seed=3, use_cache=False))
    assert got == reference
    assert len(got[0]) + len(got[1]) == len(ROWS)


def test_a_config_takes_a_saved_split_and_a_mixture_source_its_split_key(tmp_path, tokenizer, monkeypatch):
    from tuneforge.config import load_config

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    saved = tmp_path / "saved"
    _saved_dict(saved)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: smollm2-135m-instruct\ndata:\n  train: saved?split=test\n  validation: saved?split=train\n")
    config = load_config(cfg)
    assert config.data.train == f"{saved}?split=test"
    data = prepare_data(config.data, tokenizer, seed=0)
    assert (len(data.train), len(data.validation)) == (20, 3)
    cfg.write_text("model: smollm2-135m-instruct\ndata:\n  train:\n  - {path: saved, split: test, weight: 1}\n")
    config = load_config(cfg)
    mixed = prepare_data(config.data, tokenizer, seed=0)
    assert mixed.mixture.sources[0].path == f"{saved}?split=test"
    assert len(mixed.train) + len(mixed.validation) == 20


def test_the_cache_key_changes_with_the_data_and_a_second_run_reuses_it(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    saved = _saved_dataset(tmp_path / "saved")
    first = data_sha256(saved)
    assert data_sha256(saved) == first
    datasets.Dataset.from_list(ROWS[:-1]).save_to_disk(str(tmp_path / "saved2"))
    assert data_sha256(str(tmp_path / "saved2")) != first
    # the same folder, another split: another key
    _saved_dict(tmp_path / "dd")
    assert data_sha256(str(tmp_path / "dd")) != data_sha256(f"{tmp_path / 'dd'}?split=test")
    shards = _shards_jsonl(tmp_path / "shards")
    before = data_sha256(shards)
    write_jsonl(tmp_path / "shards" / "part-003.jsonl", ROWS[:1])
    assert data_sha256(shards) != before
    prepare_data(DataConfig(train=saved), tokenizer, seed=0)
    entries = list((tmp_path / "cache" / "tokenized").glob("*.pt"))
    prepare_data(DataConfig(train=saved), tokenizer, seed=0)
    assert list((tmp_path / "cache" / "tokenized").glob("*.pt")) == entries and len(entries) == 1


def test_rejects_name_the_source_and_row(tmp_path):
    rows = [*ROWS[:4], {"prompt": "no answer here", "completion": ""}, *ROWS[4:6]]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "s"))
    saved = str(tmp_path / "s")
    loaded = load_examples(saved, DataConfig(train=saved))
    assert len(loaded.examples) == 6
    [reject] = loaded.rejects
    assert (reject.source, reject.line) == (f"{saved}?split=train", 5)
    assert reject.record == rows[4]


def _cli(capsys, *args):
    from tuneforge.cli import main

    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_a_folder_of_mixed_formats_is_one_line_naming_it_and_the_formats(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", ROWS[:2])
    pq.write_table(pa.Table.from_pylist(ROWS[2:4]), folder / "b.parquet")
    with pytest.raises(DataFileError, match=r"mixed.*1 \.jsonl, 1 \.parquet") as e:
        list(iter_records(folder))
    assert str(folder) in str(e.value)
    rc, err = _cli(capsys, "data", "check", str(folder))
    assert rc == 2
    [line] = err.strip().splitlines()
    assert str(folder) in line and ".parquet" in line and ".jsonl" in line


def test_a_missing_split_names_the_splits_there(tmp_path):
    _saved_dict(tmp_path / "dd")
    with pytest.raises(DataFileError, match=r"no split 'validation' \(it has train, test\)"):
        list(iter_records(f"{tmp_path / 'dd'}?split=validation"))


def test_what_a_path_is():
    assert parse_source("hf://owner/name?split=test&revision=v1").kind == "hub"
    hub = parse_source("HuggingFaceH4/no_robots?split=test")
    assert (hub.kind, hub.location, hub.split, hub.revision) == ("hub", "HuggingFaceH4/no_robots", "test", None)
    assert parse_source("data/train.jsonl").kind == "file"          # a missing file is no Hub id
    with pytest.raises(DataFileError, match="unknown option colour"):
        parse_source("hf://o/n?colour=red")


def test_an_offline_hub_id_not_in_the_cache_is_one_line(tmp_path, monkeypatch, capsys):
    """No network is used: the Hub is switched off, and the cache is an empty folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    with pytest.raises(DataFileError) as e:
        list(iter_records("hf://someone/not-cached?split=train"))
    message = str(e.value)
    assert "\n" not in message and "someone/not-cached" in message and "HF_HUB_OFFLINE" in message
    assert "save_to_disk" in message
    rc, err = _cli(capsys, "data", "check", "someone/not-cached")
    assert rc == 2, err
    [line] = err.strip().splitlines()
    assert "someone/not-cached" in line


def test_curation_reads_a_saved_dataset(tmp_path):
    from tuneforge.data.curation.clean import clean_files

    rows = [*ROWS[:5], ROWS[0]]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "s"))
    report = clean_files(str(tmp_path / "s"), tmp_path / "out")
    same = clean_files(str(write_jsonl(tmp_path / "s.jsonl", rows)), tmp_path / "ref")
    assert (tmp_path / "out" / "clean.jsonl").read_text() == (tmp_path / "ref" / "clean.jsonl").read_text()
    assert report.rejected == same.rejected == 1
    [reject] = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert (reject["source"], reject["line"]) == (f"{tmp_path / 's'}?split=train", 6)


def test_eval_test_sets_and_run_json_take_a_source_as_a_file(tmp_path):
    from tuneforge.config.run import RunConfig
    from tuneforge.evaluation.api import load_test_set
    from tuneforge.runs.versions import data_fingerprints

    saved = _saved_dict(tmp_path / "dd")
    config = RunConfig.model_validate({"model": "smollm2-135m-instruct", "data": {"train": saved}})
    test = load_test_set("test", saved, config, None)
    assert [e.messages[-1]["content"] for e in test.examples] == [r["completion"] for r in ROWS]
    [recorded] = data_fingerprints([saved])
    assert (recorded.path, recorded.sha256) == (saved, data_sha256(saved))


def test_stats_and_split_name_their_outputs_after_the_source(tmp_path, monkeypatch, capsys):
    from tuneforge.data.sources import source_stem

    assert [source_stem(s) for s in ("d/saved?split=test", "hf://o/name", "x/a.jsonl.gz", "d/saved")] == [
        "saved_test", "name", "a", "saved"]
    monkeypatch.chdir(tmp_path)
    _saved_dict(tmp_path / "dd")
    rc, _ = _cli(capsys, "data", "split", "dd?split=test", "--val", "0.25")
    assert rc == 0
    assert len((tmp_path / "dd_test_split" / "val.jsonl").read_text().splitlines()) == 5


def test_a_run_trains_on_a_saved_split_and_records_it_in_run_json(tmp_path, tiny_model_dir, monkeypatch):
    from tuneforge.config import load_config
    from tuneforge.training.trainer import train

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    saved = _saved_dict(tmp_path / "dd")
    settings = {"model": str(tiny_model_dir), "data": {"train": saved, "val_fraction": 0.2},
                "output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 2, "progress": False,
                "keep_best": False, "lora": {"r": 4, "alpha": 8}}
    train(load_config(data=settings))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    [data] = record["data"]
    assert (data["path"], data["sha256"]) == (saved, data_sha256(saved))

"""A truncated or corrupt compressed data file: every readable record is used, the cut is one reject, no traceback."""

from __future__ import annotations

import gzip
import json
import logging
import random
import zlib
from pathlib import Path

import pytest

from tuneforge.cli import main
from tuneforge.data.curation.clean import clean_files
from tuneforge.data.curation.config import CHECKS, CurationConfig
from tuneforge.data.dataset import TRAINING_CHECKS
from tuneforge.data.loaders import iter_records

WORDS = "alpha beta gamma delta river stone cloud paper green swift lamp ocean tiger violet amber".split()
TRUNCATED = "file is truncated / corrupt compressed stream: "


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"instruction": f"{i} " + " ".join(rng.choice(WORDS) for _ in range(8)),
             "output": " ".join(rng.choice(WORDS) for _ in range(12))} for i in range(n)]


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def _truncated_gz(path: Path, payload: bytes, keep: float = 0.6) -> int:
    """Write ``payload`` gzipped and cut to ``keep`` of its size; return how many complete lines are readable
    (decompressed here with zlib, independently of the loaders)."""
    data = gzip.compress(payload)
    cut = data[: int(len(data) * keep)]
    path.write_bytes(cut)
    readable = zlib.decompressobj(31).decompress(cut)
    assert 0 < readable.count(b"\n") < payload.count(b"\n")
    return readable.count(b"\n")


def _messages(r: dict) -> dict:
    return {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n")[:-1]]


def _assert_truncation_reject(reject: dict, source: Path, line: int) -> None:
    assert reject["source"] == str(source) and reject["line"] == line
    [reason] = reject["reasons"]
    assert reason["check"] == "truncated_file" and reason["message"].startswith(TRUNCATED)


def test_data_clean_keeps_the_readable_records_of_a_truncated_jsonl_gz(tmp_path, capsys):
    records = _records(400)
    f = tmp_path / "t.jsonl.gz"
    n = _truncated_gz(f, _jsonl(records))
    out = tmp_path / "out"
    rc = main(["data", "clean", str(f), "--out", str(out), "--no-near-dup", "--min-examples", "0"])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err, err
    assert _lines(out / "clean.jsonl") == [_messages(r) for r in records[:n]]
    [reject] = _lines(out / "rejects.jsonl")
    _assert_truncation_reject(reject, f, n + 1)
    report = json.loads((out / "report.json").read_text())
    assert report["records"] == n + 1 and report["checks"]["truncated_file"]["rejected"] == 1


def test_the_parallel_path_and_a_partial_last_line(tmp_path):
    """Workers read .jsonl lines unparsed: the truncation reject comes through them too, with the cut line's text."""
    records = _records(600, seed=1)
    f = tmp_path / "t.jsonl.gz"
    n = _truncated_gz(f, _jsonl(records), keep=0.5)
    one = clean_files(f, tmp_path / "a", CurationConfig(min_examples=0, near_dup=False), chunk_size=64)
    two = clean_files(f, tmp_path / "b", CurationConfig(min_examples=0, near_dup=False), chunk_size=64, workers=2)
    for name in ("clean.jsonl", "rejects.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert one.clean == two.clean == n and one.rejected == two.rejected == 1
    [reject] = _lines(tmp_path / "a" / "rejects.jsonl")
    _assert_truncation_reject(reject, f, n + 1)
    partial = _jsonl(records).split(b"\n")[n].decode()
    assert reject["raw"] and partial.startswith(reject["raw"])


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_truncated_csv_gz_and_json_gz(tmp_path, kind):
    records = _records(300, seed=2)
    f = tmp_path / f"t.{kind}.gz"
    if kind == "csv":
        payload = ("instruction,output\n" + "".join(f'{r["instruction"]},"{r["output"]}"\n' for r in records)).encode()
        n = _truncated_gz(f, payload) - 1                                 # the header is a line, not a record
        expected_line = n + 2                                             # the cut row's line (header is line 1)
    else:
        payload = ("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n").encode()
        n = _truncated_gz(f, payload) - 1                                 # "[" has a line of its own
        expected_line = n + 1                                             # .json: element index
    got = list(iter_records(f))
    assert [r.data for r in got[:-1]] == records[:n]
    assert got[-1].data is None and got[-1].line == expected_line and got[-1].error.startswith(TRUNCATED)


def test_corrupt_and_not_gzip_files_are_rejects_not_tracebacks(tmp_path, capsys):
    records = _records(2000, seed=3)
    data = bytearray(gzip.compress(_jsonl(records)))
    for k in range(64):                                                   # garble the middle of the stream
        data[len(data) // 2 + k] ^= 0x5A
    corrupt = tmp_path / "c.jsonl.gz"
    corrupt.write_bytes(bytes(data))
    got = list(iter_records(corrupt))                  # deflate decodes garbage for a while before it notices
    assert [r.data for r in got[:500]] == records[:500] and [r.line for r in got] == list(range(1, len(got) + 1))
    assert got[-1].error.startswith(TRUNCATED) and "garbled" in got[-1].error

    fake = tmp_path / "plain.jsonl.gz"                                    # not gzip at all
    fake.write_bytes(_jsonl(records[:3]))
    assert main(["data", "clean", str(fake), "--out", str(tmp_path / "o")]) == 0
    [reject] = _lines(tmp_path / "o" / "rejects.jsonl")
    _assert_truncation_reject(reject, fake, 1)
    assert "Traceback" not in capsys.readouterr().err


def test_the_check_is_known_to_curation_and_training():
    assert CHECKS["truncated_file"].fixed and "truncated_file" in TRAINING_CHECKS


def test_train_data_trains_on_the_readable_records_and_warns(tiny_model_dir, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "t.jsonl.gz"
    n = _truncated_gz(f, _jsonl(_records(60, seed=4)))
    with caplog.at_level(logging.WARNING):
        rc = main(["train", "--data", str(f), "--set", f"model={tiny_model_dir}", "--set", "max_steps=1",
                   "--set", "progress=false", "--set", "lora.r=2", "--set", "output_dir=runs/t"])
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err, err
    record = json.loads((tmp_path / "runs" / "t" / "run.json").read_text())
    assert record["examples"]["train"] + record["examples"]["validation"] == n
    [reject] = _lines(tmp_path / "runs" / "t" / "rejects.jsonl")
    _assert_truncation_reject(reject, f, n + 1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and TRUNCATED in r.getMessage()]
    assert warned and f"{f}:{n + 1}" in warned[0]


def test_a_truncated_json_array_is_a_one_line_error_naming_file_and_position(tmp_path, capsys):
    f = tmp_path / "t.json"
    f.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "outp')
    assert main(["data", "clean", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}:3:") and err.count("\n") == 1 and "element 2" in err
    assert main(["train", "--data", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}:3:") and err.count("\n") == 1 and "Traceback" not in err

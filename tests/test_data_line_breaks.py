"""Line numbers as editors show them: a line ends at \\n (\\r\\n is one break); a lone \\r is part of the line."""

from __future__ import annotations

import gzip
import json

import pytest

from tuneforge.data.curation.clean import clean_files
from tuneforge.data.curation.config import CurationConfig
from tuneforge.data.dataset import load_examples
from tuneforge.data.loaders import iter_records
from tuneforge.data.settings import DataConfig

# line 2 holds a lone \r as JSON whitespace (a valid record); line 4 a lone \r inside a string (not valid JSON)
LINES = [
    b'{"instruction": "first question here", "output": "first answer"}',
    b'{"instruction": "second question here",\r "output": "second answer"}',
    b"not json at all",
    b'{"instruction": "a lone \r inside a string", "output": "x"}',
    b'{"instruction": "windows line ending", "output": "crlf answer"}\r',
    b'{"foo": 1}',
    b'{"instruction": "last question here", "output": "last answer"}',
]
DATA = b"\n".join(LINES) + b"\n"
BAD = {3: "not_json", 4: "not_json", 6: "unknown_format"}


def _editor_line(needle: bytes) -> int:
    """The line an editor shows ``needle`` on, counted here from the bytes (independently of the loaders)."""
    return DATA[: DATA.index(needle)].count(b"\n") + 1


@pytest.fixture(params=["plain", "gz"])
def data_file(request, tmp_path):
    if request.param == "gz":
        path = tmp_path / "d.jsonl.gz"
        path.write_bytes(gzip.compress(DATA))
    else:
        path = tmp_path / "d.jsonl"
        path.write_bytes(DATA)
    return path


def test_records_are_numbered_as_editors_number_lines(data_file):
    assert _editor_line(b"{\"foo\"") == 6 and len(DATA.split(b"\n")) - 1 == len(LINES)
    recs = list(iter_records(data_file))
    assert [r.line for r in recs] == [1, 2, 3, 4, 5, 6, 7]
    assert recs[1].data == {"instruction": "second question here", "output": "second answer"}
    assert recs[4].data["output"] == "crlf answer"


@pytest.mark.parametrize("workers", [1, 2])
def test_clean_rejects_carry_editor_line_numbers(data_file, tmp_path, workers):
    report = clean_files(data_file, tmp_path / "out", CurationConfig(min_examples=0, near_dup=False), workers=workers)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_bytes().split(b"\n")[:-1]]
    assert {r["line"]: r["reasons"][0]["check"] for r in rejects} == BAD
    assert report.records == len(LINES) and report.clean == 4


def test_training_rejects_and_preview_carry_editor_line_numbers(data_file, tokenizer):
    from tuneforge.data.preview import preview

    loaded = load_examples(str(data_file), DataConfig(train=str(data_file)))
    assert {r.line: r.reasons[0].check for r in loaded.rejects} == BAD
    assert [e.meta["where"] for e in loaded.examples] == [f"{data_file}:{n}" for n in (1, 2, 5, 7)]
    text = preview(str(data_file), tokenizer, n=2, color=False)
    assert f"--- {data_file}:2 " in text and f"first rejected: {data_file}:3: not_json" in text


def test_csv_lines_split_at_newline_only(tmp_path):
    f = tmp_path / "t.csv"
    f.write_bytes(b'prompt,completion\r\n"a lone \r in quotes",yes\r\nunquoted \r here,no\nlast,ok\n')
    recs = list(iter_records(f))
    assert [r.line for r in recs] == [2, 3, 4]
    assert recs[0].data == {"prompt": "a lone \r in quotes", "completion": "yes"}
    assert recs[1].data is None and "\\r" in recs[1].error and recs[2].data == {"prompt": "last", "completion": "ok"}


def test_json_error_lines_count_newlines_only(tmp_path):
    from tuneforge.data.loaders import DataFileError

    f = tmp_path / "t.json"
    f.write_bytes(b'[{"text": "a"},\r{"text": "b"},\n{"text": oops}]')
    with pytest.raises(DataFileError, match=r"t\.json:2:"):
        list(iter_records(f))


def test_rejects_jsonl_never_holds_a_lone_carriage_return(tmp_path):
    """A duplicate's record is copied from its source line; a \\r there (JSON whitespace) must not break the line
    for readers that split at \\r."""
    f = tmp_path / "d.jsonl"
    f.write_bytes(LINES[1] + b"\n" + LINES[1].replace(b"\r", b"\r\r") + b"\n")
    clean_files(f, tmp_path / "out", CurationConfig(min_examples=0))
    data = (tmp_path / "out" / "rejects.jsonl").read_bytes()
    assert b"\r" not in data
    [reject] = [json.loads(x) for x in data.splitlines()]
    assert reject["line"] == 2 and reject["reasons"][0]["check"] == "exact_duplicate"
    assert reject["record"] == json.loads(LINES[1])

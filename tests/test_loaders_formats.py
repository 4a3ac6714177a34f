import json

import pytest

from tuneforge.data.dataset import TRAINING_CHECKS, PreparedData, load_examples
from tuneforge.data.formats import RecordError, detect_format, to_example
from tuneforge.data.loaders import DataFileError, iter_records
from tuneforge.data.rejects import write_rejects
from tuneforge.data.settings import DataConfig


def test_detects_each_format():
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"instruction": "i", "input": "", "output": "o"}) == "alpaca"
    assert detect_format({"prompt": "p", "completion": "c"}) == "prompt_completion"
    assert detect_format({"text": "t"}) == "text"
    assert detect_format({"chosen": "a", "rejected": "b"}) == "preference"
    assert detect_format({"foo": 1}) is None


def test_alpaca_with_input_becomes_user_assistant():
    ex = to_example({"instruction": "Translate.", "input": "hola", "output": "hello"}, "alpaca",
                    system_prompt="Be nice.")
    assert ex.messages == [{"role": "system", "content": "Be nice."},
                           {"role": "user", "content": "Translate.\n\nhola"},
                           {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("messages,match", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "must end with an assistant turn"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "messages\\[0\\].role is 'robot'"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "content must be a string"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "assistant turn is empty"),
])
def test_bad_messages_say_what_is_wrong(messages, match):
    with pytest.raises(RecordError, match=match):
        to_example({"messages": messages}, "messages")


def test_jsonl_bad_lines_are_kept_with_line_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n\nnot json\n[1, 2]\n{"text": "b"}\n')
    recs = list(iter_records(f))
    assert [(r.line, r.data is not None) for r in recs] == [(1, True), (3, False), (4, False), (5, True)]
    assert "not JSON" in recs[1].error and recs[1].raw == "not json"
    assert "expected a JSON object" in recs[2].error


def test_json_array_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "p", "completion": "c"}, 5]))
    recs = list(iter_records(tmp_path / "a.json"))
    assert recs[0].data == {"prompt": "p", "completion": "c"} and recs[1].error

    (tmp_path / "t.csv").write_text('category,text\nbilling,"I was charged, twice"\nlogin,cannot sign in\n')
    recs = list(iter_records(tmp_path / "t.csv"))
    assert [(r.line, r.data["category"]) for r in recs] == [(2, "billing"), (3, "login")]

    pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "t.parquet")
    assert [r.data["text"] for r in iter_records(tmp_path / "t.parquet")] == ["x", "y"]


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataFileError, match="unsupported data file type"):
        list(iter_records(tmp_path / "x.txt"))
    with pytest.raises(DataFileError, match="not found"):
        list(iter_records(tmp_path / "missing.jsonl"))


def test_csv_with_column_mapping(tmp_path):
    f = tmp_path / "tickets.csv"
    f.write_text("category,text\nbilling,I was charged twice\nlogin,cannot sign in\n")
    cfg = DataConfig(train=str(f), format="prompt_completion", columns={"prompt": "text", "completion": "category"})
    loaded = load_examples(str(f), cfg)
    assert not loaded.rejects
    assert loaded.examples[0].messages[-1] == {"role": "assistant", "content": "billing"}
    assert loaded.examples[1].meta["where"].endswith("tickets.csv:3")


def test_rejects_name_file_line_and_reason(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"prompt": "p", "completion": "c"}\n{"foo": 1}\n{"messages": [{"role": "user", "content": "q"}]}\n')
    loaded = load_examples(str(f), DataConfig(train=str(f)))
    assert len(loaded.examples) == 1
    assert [(r.line, [reason.check for reason in r.reasons]) for r in loaded.rejects] == [
        (2, ["unknown_format"]), (3, ["turn_order"])]
    assert loaded.rejects[1].reasons[0].message.startswith("messages: ")
    assert loaded.rejects[0].record == {"foo": 1}


def test_training_rejects_have_the_curation_schema(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"prompt": "p", "completion": "c"}\n{"foo": 1}\n{broken\n[1]\n'
                 '{"prompt": "p", "completion": 3}\n{"chosen": "a", "rejected": "b"}\n')
    loaded = load_examples(str(f), DataConfig(train=str(f)))
    write_rejects(loaded.rejects, tmp_path / "rejects.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reasons"][0]["check"]) for r in rows] == [
        (2, "unknown_format"), (3, "not_json"), (4, "not_object"), (5, "wrong_type"), (6, "mixed_kinds")]
    for r in rows:
        assert r["source"] == str(f) and r.keys() == {"source", "line", "reasons", "record" if "record" in r else "raw"}
        assert all(reason.keys() == {"check", "message"} and reason["check"] in TRAINING_CHECKS
                   for reason in r["reasons"])
    assert rows[0]["record"] == {"foo": 1} and rows[1]["raw"] == "{broken"
    # the token cache stores rejects as plain data and gives them back unchanged
    prepared = PreparedData([], [], loaded.rejects, {})
    assert PreparedData.from_payload(prepared.to_payload()).rejects == loaded.rejects


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_json_arrays_stream_across_chunk_edges(tmp_path, chunk):
    import io

    from tuneforge.data.loaders import _iter_json_array

    items = [{"instruction": "a, [b] {c}", "output": "ü 'q' \\ end", "n": 12345.678}, 42, {"text": "x" * 50},
             [1, 2], {"nested": {"k": [1, {"z": None}]}}, 7]
    text = json.dumps(items, indent=1)
    stream = io.StringIO(text)
    first = stream.read(chunk).lstrip()
    recs = list(_iter_json_array(tmp_path / "a.json", stream, first[1:], chunk=chunk))
    assert [r.data if r.data is not None else json.loads(r.raw) for r in recs] == items
    assert [r.line for r in recs] == list(range(1, len(items) + 1))


def test_truncated_json_array_is_a_clear_error(tmp_path):
    (tmp_path / "t.json").write_text('[{"text": "a"}, {"text": "b"')
    with pytest.raises(DataFileError, match="element 2 of the array is not valid JSON"):
        list(iter_records(tmp_path / "t.json"))
    (tmp_path / "u.json").write_text('[{"text": "a"}, ')
    with pytest.raises(DataFileError, match="not closed"):
        list(iter_records(tmp_path / "u.json"))

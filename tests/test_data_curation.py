"""tuneforge data check/clean/stats/split: checks, dedup, leakage, PII, nothing lost."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from tuneforge.data.curation.clean import check_files, clean_files
from tuneforge.data.curation.commands import main as data_main
from tuneforge.data.curation.config import CHECKS, CurationConfig, CurationConfigError, load_curation_config
from tuneforge.data.curation.dedup import DuplicateIndex, MinHasher, lsh_params
from tuneforge.data.curation.quality import find_pii, is_refusal, luhn_valid, mask_pii, repeats_prompt
from tuneforge.data.curation.split import split_file
from tuneforge.data.curation.stats import compute_stats, plot_histogram
from tuneforge.data.curation.validation import check_record
from tuneforge.data.formats import to_example
from tuneforge.data.loaders import RawRecord

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GPTEACHER = SHARED / "gpteacher_roleplay.json"
HH = SHARED / "hh_rlhf_harmless_test.jsonl.gz"
needs_shared = pytest.mark.skipif(not GPTEACHER.exists(), reason="../shared/data not present")

LOREM = ("The quick brown fox jumps over the lazy dog near the river bank while the farmer watches "
         "from the old wooden porch and the sun sets slowly behind the distant green hills.")


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def alpaca(i: int, output: str | None = None) -> dict:
    return {"instruction": f"Question number {i}: describe item {i} in detail.", "input": "",
            "output": output or f"Item {i} is a distinct thing with property {i * 7} and colour code {i * 13}."}


def issues(record: dict, **cfg) -> set[str]:
    return {i.check for i in check_record(RawRecord("f.jsonl", 1, record), CurationConfig(**cfg)).issues}


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- structure

@pytest.mark.parametrize("record,check", [
    ({"messages": "hi"}, "wrong_type"),
    ({"messages": []}, "missing_field"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown_role"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}, "wrong_type"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "assistant", "content": "b"}]}, "turn_order"),
    ({"messages": [{"role": "user", "content": "q"}]}, "turn_order"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}]}, "turn_order"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "turn_order"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty_answer"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a fine answer"}]}, "empty_turn"),
    ({"instruction": "q", "output": ""}, "empty_answer"),
    ({"instruction": "q", "output": 5}, "wrong_type"),
    ({"instruction": "q", "input": ["x"], "output": "ok answer"}, "wrong_type"),
    ({"question": "q", "answer": "a"}, "unknown_format"),
    ({"text": "   "}, "empty_answer"),
    ({"chosen": "same", "rejected": "same"}, "identical_pair"),
    ({"chosen": "x", "rejected": 3}, "wrong_type"),
])
def test_structure_checks_name_the_problem(record, check):
    assert check in issues(record)


def test_parse_errors_are_named():
    assert issues_of_raw("not JSON: Expecting value at column 1") == {"not_json"}
    assert issues_of_raw("invalid UTF-8") == {"invalid_utf8"}
    assert issues_of_raw("expected a JSON object, got list") == {"not_object"}


def issues_of_raw(error: str) -> set[str]:
    return {i.check for i in check_record(RawRecord("f", 1, None, raw="x", error=error), CurationConfig()).issues}


def test_valid_chat_matches_formats_to_example():
    rec = {"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob!"}
    c = check_record(RawRecord("f", 1, rec), CurationConfig())
    assert c.issues == [] and c.clean == {"messages": to_example(rec, "alpaca").messages}


def test_columns_and_declared_format():
    rec = {"q": "What is 2+2?", "a": "Four, because two plus two is four."}
    c = check_record(RawRecord("f", 1, rec), CurationConfig(columns={"prompt": "q", "completion": "a"}))
    assert c.format == "prompt_completion" and c.clean["messages"][1]["content"].startswith("Four")
    c = check_record(RawRecord("f", 1, {"text": "hello"}), CurationConfig(format="alpaca"))
    assert {i.check for i in c.issues} == {"missing_field"}


# ---------------------------------------------------------------- quality and PII

def test_quality_heuristics():
    assert "refusal" in issues({"instruction": "Tell me a joke", "output": "As an AI language model, I cannot joke."})
    assert "placeholder" in issues({"instruction": "Write a bio", "output": "Lorem ipsum dolor sit amet, consectetur."})
    assert "placeholder" in issues({"instruction": "Write a letter", "output": "Dear <insert name>, thanks a lot."})
    assert "repeats_prompt" in issues({"instruction": "Explain how photosynthesis works in plants.",
                                       "output": "Explain how photosynthesis works in plants."})
    assert "control_chars" in issues({"instruction": "q", "output": "bin\x00\x01ary data here"})
    assert "non_text" in issues({"instruction": "q", "output": "0x3f 0x00 1234 5678 !!! ### $$$ %%% 9999 8888 7777"})
    assert "short_answer" in issues({"instruction": "Pick one", "output": "A"})
    assert issues(alpaca(1)) == set()
    assert not repeats_prompt("Is the sky blue? Answer yes or no.", "yes")


def test_pii_detection_and_masking():
    text = "Mail jane.doe@example.com or call +1 415-555-0132; card 4111 1111 1111 1111; not 4111 1111 1111 1112."
    assert find_pii(text) == {"email": 1, "phone": 1, "card": 1}
    masked = mask_pii(text)
    assert "[EMAIL]" in masked and "[PHONE]" in masked and "[CARD]" in masked and "4111 1111 1111 1112" in masked
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert find_pii("In 1999 there were 1234567 people and 42 cats.") == {}


def test_pii_regexes_are_linear_on_huge_fields():
    import time

    t = time.perf_counter()
    find_pii("a" * 2_000_000 + "@" + "b" * 2_000_000)
    find_pii("1" * 1_000_000)
    mask_pii("-1" * 500_000)
    assert time.perf_counter() - t < 5


def test_refusal_is_not_overeager():
    assert not is_refusal("As an engineer, I can model the system with a language of my own.")


# ---------------------------------------------------------------- dedup

def test_lsh_params_put_the_curve_near_threshold():
    bands, rows = lsh_params(0.8, 128)
    assert bands * rows <= 128
    p = lambda j: 1 - (1 - j ** rows) ** bands  # noqa: E731
    assert p(0.9) > 0.99 and p(0.8) > 0.8 and p(0.5) < 0.05


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in rng.integers(0, 10_000, 300)]
    mh = MinHasher(num_perm=256, shingle=1)
    a, b = " ".join(words[:200]), " ".join(words[100:300])
    sa, sb = set(words[:200]), set(words[100:300])
    sig, _ = mh.signatures([a, b])
    assert abs((sig[0] == sig[1]).mean() - len(sa & sb) / len(sa | sb)) < 0.08


def test_duplicate_index_exact_near_and_leak():
    rng = np.random.default_rng(1)
    base = [" ".join(f"w{k}" for k in rng.integers(0, 5000, 40)) for _ in range(50)]
    words = base[3].split()
    near = " ".join(words[:20] + ["changed"] + words[21:])
    idx = DuplicateIndex(threshold=0.7)
    idx.add(base + [base[0], near])
    idx.add_reference([base[10]])
    res = idx.find()
    assert res.duplicates[50].kind == "exact" and res.duplicates[50].of == 0
    assert res.duplicates[51].kind == "near" and res.duplicates[51].of == 3
    assert res.duplicates[10].leak and res.duplicates[10].of == 52
    assert len(res.duplicates) == 3


def test_clean_drops_duplicates_and_leaks(tmp_path):
    rows = [alpaca(i) for i in range(30)]
    rows.append(dict(alpaca(5), output=alpaca(5)["output"].upper() + "  "))   # exact after normalisation
    rows.append({"instruction": "Write a long story.", "output": LOREM * 2})
    rows.append({"instruction": "Write a long story.", "output": (LOREM * 2).replace("farmer", "old farmer")})
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [alpaca(7), {"text": "something else entirely"}])
    report = clean_files(train, tmp_path / "out", CurationConfig(min_examples=0), against=[val])
    rejects = lines(tmp_path / "out" / "rejects.jsonl")
    reasons = {(r["line"], r["reasons"][0]["check"]) for r in rejects}
    assert reasons == {(31, "exact_duplicate"), (33, "near_duplicate"), (8, "leakage")}
    assert report.clean == 30 and report.rejected == 3
    # rejects keep the record verbatim
    assert next(r for r in rejects if r["line"] == 31)["record"] == rows[30]
    assert report.duplicate_clusters


# ---------------------------------------------------------------- pipeline: nothing lost

def test_clean_accounts_for_every_record(tmp_path):
    rows = [alpaca(i) for i in range(20)] + [
        "{not json", "[1, 2]", {"text": "a text record in chat data"}, {"instruction": "q", "output": ""},
        {"foo": 1}, {"messages": [{"role": "user", "content": "hi"}]}, alpaca(3),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = clean_files(path, tmp_path / "out")
    clean, rejects = lines(tmp_path / "out" / "clean.jsonl"), lines(tmp_path / "out" / "rejects.jsonl")
    assert len(clean) == report.clean == 20 and len(rejects) == report.rejected == 7
    assert sorted(r["line"] for r in rejects) == [21, 22, 23, 24, 25, 26, 27]
    assert all(r["reasons"] and r["reasons"][0]["check"] in CHECKS for r in rejects)
    assert {r["reasons"][0]["check"] for r in rejects} == {
        "not_json", "not_object", "mixed_kinds", "empty_answer", "unknown_format", "turn_order", "exact_duplicate"}
    assert all(set(c) == {"messages"} for c in clean)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["clean"] == 20 and saved["checks"]["not_json"]["found"] == 1
    assert any(w["check"] == "few_examples" for w in saved["dataset_warnings"])
    assert not list((tmp_path / "out").glob(".spool*"))


def test_workers_give_the_same_output(tmp_path):
    rows = [alpaca(i) for i in range(300)] + [alpaca(i) for i in range(0, 300, 7)] + ["{bad", {"x": 1}]
    rows.append({"instruction": "Write a long story.", "output": LOREM * 2})
    rows.append({"instruction": "Write a long story.", "output": (LOREM * 2).replace("farmer", "old farmer")})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(path, "a", encoding="utf-8", errors="surrogateescape", newline="") as f:   # lines the two parsers
        f.write('{"instruction": "n", "output": NaN}\n')                                     # (json, orjson) treat
        f.write('{"instruction": "big", "output": "x", "id": 123456789012345678901234567890}\n')   # differently
        f.write('{"instruction": "lone \\ud800 surrogate", "output": "yes it is"}\n')
        f.write('{"instruction": "bytes", "output": "\udcff\udcfe"}\n')
        f.write('{"instruction": "Label?", "output": "  positive  "}\r\n')
    one = clean_files(path, tmp_path / "a", chunk_size=64)
    two = clean_files(path, tmp_path / "b", chunk_size=64, workers=2)
    for name in ("clean.jsonl", "rejects.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert one.rejected_by == two.rejected_by and one.rejected_by["near_duplicate"] == 1
    assert one.rejected_by["invalid_utf8"] == 2 and one.formats == two.formats and one.labels == two.labels
    assert one.records == two.records == len(rows) + 5
    # truncation and PII masking rebuild the record in the parent
    cfg = CurationConfig(max_length=60, too_long="truncate", mask_pii=True)
    rows = [{"instruction": "Story?", "output": LOREM * 3}, {"instruction": "Mail?", "output": "to a@b.example.com"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    clean_files(path, tmp_path / "c", cfg)
    clean_files(path, tmp_path / "d", cfg, workers=2)
    assert (tmp_path / "c" / "clean.jsonl").read_bytes() == (tmp_path / "d" / "clean.jsonl").read_bytes()
    assert "[EMAIL]" in (tmp_path / "d" / "clean.jsonl").read_text()


def test_check_reports_file_line_and_exit_code(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [alpaca(i) for i in range(5)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [alpaca(1), {"instruction": "q", "output": 3}])
    assert data_main(["check", str(good)]) == 0
    assert data_main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2: field 'output' must be a string, got int" in out
    assert data_main(["check", str(good), "--strict"]) == 1            # few_examples warning
    assert data_main(["check", str(good), "--warn", "nope"]) == 2


def test_too_long_drop_truncate_keep(tmp_path):
    rows = [alpaca(1), {"instruction": "Tell a long story.", "output": LOREM * 20},
            {"instruction": LOREM * 20, "output": "Short answer here."}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    r = check_files(path, CurationConfig(max_length=100))
    assert r.checks["too_long"]["found"] == 2 and r.rejected == 2
    r = clean_files(path, tmp_path / "t", CurationConfig(max_length=100, too_long="truncate"))
    assert r.clean == 2 and r.rejected == 1            # the long prompt cannot be truncated without losing the answer
    clean = lines(tmp_path / "t" / "clean.jsonl")
    answer = clean[1]["messages"][1]["content"]
    assert LOREM[:50] in answer and len(answer) < len(LOREM * 20)
    assert "truncating would remove the answer" in lines(tmp_path / "t" / "rejects.jsonl")[0]["reasons"][0]["message"]
    r = check_files(path, CurationConfig(max_length=100, too_long="keep"))
    assert r.rejected == 0 and r.checks["too_long"]["found"] == 2


def test_exact_token_counts_with_tokenizer(tmp_path, tokenizer):
    from tuneforge.data.token_count import TokenizerCounter

    rows = [alpaca(i) for i in range(5)]
    counter = TokenizerCounter(tokenizer)
    n = counter.count([{"messages": to_example(rows[0], "alpaca").messages}])[0]
    rendered = tokenizer.apply_chat_template(to_example(rows[0], "alpaca").messages, tokenize=True)
    rendered = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
    assert n == len(rendered)
    r = check_files(write_jsonl(tmp_path / "d.jsonl", rows), CurationConfig(max_length=n - 1), counter=counter)
    assert r.checks["too_long"]["found"] >= 1


def test_mask_pii_in_clean_output(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl",
                       [{"instruction": "Who to contact?", "output": "Write to bob@corp.example.org."}])
    clean_files(path, tmp_path / "o", CurationConfig(mask_pii=True))
    assert lines(tmp_path / "o" / "clean.jsonl")[0]["messages"][1]["content"] == "Write to [EMAIL]."


def test_preference_and_text_normalisation(tmp_path):
    pref = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "Good answer.", "rejected": "Bad answer."},
                                              {"chosen": "same", "rejected": "same"}])
    clean_files(pref, tmp_path / "p")
    assert lines(tmp_path / "p" / "clean.jsonl") == [
        {"chosen": "Good answer.", "rejected": "Bad answer.", "prompt": "Q?"}]
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "Plain text to learn.", "meta": 1}])
    clean_files(text, tmp_path / "t")
    assert lines(tmp_path / "t" / "clean.jsonl") == [{"text": "Plain text to learn."}]


def test_label_imbalance_and_label_counts(tmp_path):
    rows = [{"instruction": f"Review {i}: great product, works well.", "output": "positive"} for i in range(60)]
    rows += [{"instruction": f"Review {i}: broke after a day.", "output": "negative"} for i in range(3)]
    r = check_files(write_jsonl(tmp_path / "d.jsonl", rows), CurationConfig(min_examples=0, near_dup=False))
    assert r.labels == {"positive": 60, "negative": 3}
    assert [w["check"] for w in r.dataset_warnings] == ["label_imbalance"]


# ---------------------------------------------------------------- config

def test_config_yaml_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("max_length: 512\ntoo_long: truncate\nactions: {refusal: reject}\n")
    c = load_curation_config(y, actions={"pii": "off"})
    assert c.max_length == 512 and c.action("refusal") == "reject" and c.action("pii") == "off"
    assert c.action("too_long") == "reject" and c.action("exact_duplicate") == "reject"
    with pytest.raises(CurationConfigError, match="did you mean 'max_length'"):
        load_curation_config(None, max_lenght=3)
    with pytest.raises(CurationConfigError, match="structural"):
        load_curation_config(None, actions={"not_json": "warn"})


# ---------------------------------------------------------------- stats and split

def test_stats_estimate_and_histogram(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi " * i},
                          {"role": "assistant", "content": "yes"}] * (1 + i % 2)}
            for i in range(1, 41)]
    rows = [r for r in rows]
    s = compute_stats(write_jsonl(tmp_path / "d.jsonl", rows + ["{bad"]), model=None, max_length=20)
    assert s.records == 41 and s.valid == 40 and s.invalid == 1
    assert s.turns == {2: 20, 4: 20}
    assert s.labels is None     # one answer value ("yes") is not a label distribution (it needs two or more)
    two = [{"messages": [{"role": "user", "content": "hi " * i},
                         {"role": "assistant", "content": "yes" if i % 4 else "no"}]} for i in range(1, 41)]
    assert compute_stats(write_jsonl(tmp_path / "two.jsonl", two), model=None).labels == {"yes": 30, "no": 10}
    assert s.percentiles["p50"] <= s.percentiles["p99"] <= s.percentiles["max"]
    assert s.over_max_length == int((s.lengths > 20).sum())
    png = plot_histogram(s, tmp_path / "h.png")
    assert Path(png).stat().st_size > 1000


def test_split_is_reproducible_stratified_and_complete(tmp_path):
    rows = [{"instruction": f"t{i}", "output": "a" if i % 5 else "b"} for i in range(200)] + ["{broken"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    r1 = split_file(path, val=0.1, seed=3, stratify="output", out_dir=tmp_path / "s1")
    r2 = split_file(path, val=0.1, seed=3, stratify="output", out_dir=tmp_path / "s2")
    assert (tmp_path / "s1" / "val.jsonl").read_text() == (tmp_path / "s2" / "val.jsonl").read_text()
    assert r1.n_train + r1.n_val + r1.n_rejected == 201 and r1.n_val == 20
    assert r1.val_labels == {"a": 16, "b": 4}
    train, val = lines(Path(r1.train)), lines(Path(r1.val))
    assert sorted(x["instruction"] for x in train + val) == sorted(f"t{i}" for i in range(200))
    assert r2.n_val == 20


# ---------------------------------------------------------------- real data

@needs_shared
def test_real_data_gpteacher_and_hh(tmp_path):
    r = clean_files(GPTEACHER, tmp_path / "g")
    assert r.records == 3146 and r.clean + r.rejected == 3146 and r.kind == "chat"
    assert r.clean >= 3100
    r = check_files(HH)
    assert r.records == 2312 and r.kind == "preference" and r.checks["pii"]["found"] > 0


@needs_shared
def test_cli_clean_and_split_on_real_data(tmp_path, capsys):
    assert data_main(["clean", str(GPTEACHER), "--out", str(tmp_path / "c"), "--no-near-dup",
                      "--reject", "refusal"]) == 0
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["rejected_by"] == {"refusal": 3} and report["clean"] == 3143
    assert data_main(["split", str(tmp_path / "c" / "clean.jsonl"), "--val", "0.1", "--seed", "0",
                      "--out", str(tmp_path / "s")]) == 0
    assert "train:" in capsys.readouterr().out


def test_gz_input(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(3):
            f.write(json.dumps(alpaca(i)) + "\n")
    assert check_files(path, CurationConfig(min_examples=0)).clean == 3


def test_jsonio_matches_the_standard_library():
    from tuneforge.data import jsonio

    for text in ('{"a": [1, 2.5, null, true], "b": "é ✓"}', '{"n": NaN, "i": -Infinity}',
                 '{"big": 123456789012345678901234567890}', '{"a": 1, "a": 2}', '"\\ud800"'):
        a, b = jsonio.loads(text), json.loads(text)
        assert repr(a) == repr(b)
    for bad in ('{"a": }', '{"a": 1} x', ""):
        with pytest.raises(json.JSONDecodeError) as ours:
            jsonio.loads(bad)
        with pytest.raises(json.JSONDecodeError) as theirs:
            json.loads(bad)
        assert (ours.value.msg, ours.value.colno) == (theirs.value.msg, theirs.value.colno)
    obj = {"messages": [{"role": "user", "content": "é ✓ \n \"q\""}], "n": 2**70}
    assert json.loads(jsonio.dumps(obj)) == obj
    with pytest.raises(UnicodeEncodeError):
        jsonio.dumps({"s": "\ud800"})


def test_auto_workers_only_for_big_inputs(tmp_path, monkeypatch):
    from tuneforge.data.curation import clean

    small = write_jsonl(tmp_path / "s.jsonl", [alpaca(i) for i in range(3)])
    assert clean.resolve_workers("auto", [small]) == 1 and clean.resolve_workers(3, [small]) == 3
    monkeypatch.setattr(clean, "AUTO_WORKERS_MIN_BYTES", 10)
    monkeypatch.setattr(clean.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert clean.resolve_workers("auto", [small]) == 2
    with pytest.raises(SystemExit) as exit_:
        data_main(["check", str(small), "--workers", "0"])
    assert exit_.value.code == 2


# ---------------------------------------------------------------- near duplicates: content, not template; no chains

TOOLS_PREAMBLE = (
    "You are an assistant with access to these tools. calculator: evaluates arithmetic expressions such as "
    "square roots, powers and percentages and returns the numeric result. search: looks up facts about people, "
    "places, history and science in an encyclopedia and returns a short summary. weather: returns the forecast "
    "for a city and a date. Answer with the name of the tool to call and its argument. Question: ")
QUESTIONS = [
    "Find the square root of 256", "Calculate the square of 9", "Provide information about Albert Einstein",
    "Tell me about the history of the Eiffel Tower", "What will the weather be in Paris tomorrow",
    "How much is 15 percent of 80", "Who painted the Mona Lisa", "Is it going to rain in Oslo on Friday",
    "What is 2 to the power of 10", "When was the Great Wall of China built", "Forecast for Tokyo next Monday",
    "Compute 7 times 13", "Explain how photosynthesis works", "Give me the biography of Marie Curie",
    "Will it snow in Denver this weekend", "Divide 144 by 12", "What is the tallest mountain in Africa",
    "Tell me the temperature in Cairo on Sunday", "Find the cube root of 27", "Who discovered penicillin",
    "Describe the causes of the French Revolution", "What is the weather like in Lima today",
    "Calculate 3 percent of 2500", "Where is the Taj Mahal located",
]


def _tool_record(question: str) -> dict:
    tool = "calculator" if any(w in question.lower() for w in ("root", "square", "percent", "power", "times",
                                                                "divide", "compute", "calculate")) else "search"
    return {"instruction": TOOLS_PREAMBLE + question, "output": f'{{"tool": "{tool}"}}'}


def test_a_shared_preamble_does_not_make_distinct_questions_near_duplicates(tmp_path):
    rows = [_tool_record(q) for q in QUESTIONS]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    report = clean_files(path, tmp_path / "out", CurationConfig(min_examples=0))
    assert report.rejected_by.get("near_duplicate", 0) == 0, lines(tmp_path / "out" / "rejects.jsonl")
    # without the template discount the preamble makes these records near duplicates of each other
    before = clean_files(path, tmp_path / "off", CurationConfig(min_examples=0, template_share=0))
    assert before.rejected_by["near_duplicate"] >= 3


def test_the_same_question_behind_the_same_preamble_still_is_a_near_duplicate(tmp_path):
    long_q = ("Please tell me about the history of the Eiffel Tower in Paris, who designed it, who built it, how long "
              "the construction took and why so many people wanted it taken down after the exhibition")
    rows = [_tool_record(q) for q in QUESTIONS] + [_tool_record(long_q), _tool_record("Hi, " + long_q)]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    clean_files(path, tmp_path / "out", CurationConfig(min_examples=0))
    rejects = lines(tmp_path / "out" / "rejects.jsonl")
    assert [(r["line"], r["reasons"][0]["check"]) for r in rejects] == [(len(rows), "near_duplicate")]


def test_near_duplicates_do_not_chain():
    a, b, c = (" ".join(f"w{k}" for k in range(lo, lo + 100)) for lo in (0, 10, 20))
    # word sets: J(A, B) = J(B, C) = 90/110 = 0.82, J(A, C) = 80/120 = 0.67
    sig, _ = MinHasher(num_perm=256, shingle=1).signatures([a, b, c])
    assert (sig[0] == sig[2]).mean() < 0.75 < min((sig[0] == sig[1]).mean(), (sig[1] == sig[2]).mean())
    idx = DuplicateIndex(threshold=0.75, num_perm=256, shingle=1)
    idx.add([a, b, c])
    res = idx.find()
    assert set(res.duplicates) == {1} and res.duplicates[1].of == 0      # B goes for A; C stays
    assert res.clusters == [[0, 1]]


# ---------------------------------------------------------------- short records: word 1- to 3-grams

OPENERS = ["how do i {v} a {a} {n}", "can you help me {v} my {n}", "is it safe to {v} a {n} {p}",
           "what is the best way to {v} {n}s", "why does my {n} keep {g}", "should i {v} my {a} {n} every week"]
SLOTS = {"v": ["clean", "fix", "paint", "sell", "store", "wash", "repair", "move", "rent", "test", "fold", "dry"],
         "a": ["red", "cheap", "wooden", "broken", "heavy", "small", "vintage", "electric", "leather", "rusty"],
         "n": ["bike", "laptop", "sofa", "kettle", "guitar", "window", "printer", "tent", "fridge", "phone", "boat",
               "lamp", "ladder", "drone", "carpet", "piano", "camera", "oven", "scooter", "desk"],
         "p": ["at home", "in winter", "online", "at night", "indoors"],
         "g": ["beeping", "leaking", "overheating", "rattling", "squeaking"]}


def short_questions(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` distinct 5-9-word questions from templates with slots (many one word apart), answer: the template."""
    import random

    rng = random.Random(seed)
    out: dict[str, str] = {}
    while len(out) < n:
        t = rng.randrange(len(OPENERS))
        q = OPENERS[t].format(**{k: rng.choice(v) for k, v in SLOTS.items()})
        out.setdefault(q[0].upper() + q[1:] + "?", f"intent_{t}")
    return list(out.items())


def test_hi_copies_of_short_questions_are_near_duplicates_and_distinct_ones_are_not(tmp_path):
    pairs = short_questions(400)
    copies = list(range(0, 400, 5))                                  # 80 planted "Hi, " copies, after all originals
    rows = [{"instruction": q, "output": a} for q, a in pairs]
    rows += [{"instruction": "Hi, " + pairs[i][0], "output": pairs[i][1]} for i in copies]
    path = write_jsonl(tmp_path / "short.jsonl", rows)
    clean_files(path, tmp_path / "out", CurationConfig(min_examples=0))
    rejects = {r["line"]: r["reasons"][0] for r in lines(tmp_path / "out" / "rejects.jsonl")}
    caught = sum(1 for k, i in enumerate(copies) if rejects.get(401 + k, {}).get("check") == "near_duplicate"
                 and f"short.jsonl:{i + 1} " in rejects[401 + k]["message"])
    flagged = sum(1 for line in rejects if line <= 400)
    assert caught >= 0.9 * len(copies) and flagged <= 4, (caught, flagged)
    assert "word 1- to 3-grams: short text" in next(iter(rejects.values()))["message"]
    # word 3-grams alone (the behaviour before) miss most of them
    before = clean_files(path, tmp_path / "before", CurationConfig(min_examples=0, short_text_words=0))
    assert before.rejected_by.get("near_duplicate", 0) < 0.3 * len(copies)


def _long(rng: np.random.Generator, words: int) -> str:
    return " ".join(f"w{k}" for k in rng.integers(0, 5000, words))


def test_long_records_keep_word_shingles():
    rng = np.random.default_rng(3)
    texts = [_long(rng, 60) for _ in range(40)] + [_long(rng, 300) for _ in range(5)]
    texts += [" ".join(t.split()[:30] + ["changed"] + t.split()[31:]) for t in texts[:10]]
    split = MinHasher(short_words=40).split_signatures(texts)
    sig, bands = MinHasher().signatures(texts)
    assert (split.kind == 0).all() and (split.sig == sig).all() and (split.bands == bands).all()
    found = []
    for short_words in (0, 40):
        idx = DuplicateIndex(threshold=0.7, short_words=short_words)
        idx.add(texts)
        found.append({i: (d.of, d.similarity, d.short) for i, d in idx.find().duplicates.items()})
    assert found[0] == found[1] and len(found[0]) == 10


def test_short_and_long_records_meet_at_the_boundary():
    rng = np.random.default_rng(4)
    base = _long(rng, 39)                        # short: 1- to 3-grams; its copy with two more words has both
    longer = "hi there " + base
    mh = MinHasher(short_words=40)
    assert mh.split_signatures([base, longer]).kind.tolist() == [1, 2]
    idx = DuplicateIndex(short_words=40)
    idx.add([base, longer] + [_long(rng, 39) for _ in range(20)])
    dup = idx.find().duplicates
    assert set(dup) == {1} and dup[1].of == 0 and dup[1].short


# ---------------------------------------------------------------- conflicting labels

def _conflict_rows() -> list[dict]:
    return [
        {"instruction": "What is 2+2?", "output": "Four."},                 # 1  prompt P, answer four
        {"instruction": "what is  2+2", "output": "Five"},                  # 2  P, five: the minority
        {"instruction": "Is the sky green?", "output": "No"},               # 3  prompt Q, no (first of a tie)
        {"instruction": "WHAT IS 2+2?", "output": "four"},                  # 4  P, four again (same answer)
        {"instruction": "Is the sky green?", "output": "Yes"},              # 5  Q, yes: tie, after the first
        {"instruction": "Name a colour.", "output": "Blue is a colour."},   # 6  alone
    ]


def test_conflicting_labels_warn_with_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", _conflict_rows())
    report = check_files(path, CurationConfig(min_examples=0))
    assert report.checks["conflicting_labels"] == {"action": "warn", "found": 2, "rejected": 0}
    examples = {e["where"]: e["message"] for e in report.examples["conflicting_labels"]}
    assert set(examples) == {f"{path}:2", f"{path}:5"}
    assert examples[f"{path}:2"].startswith(f"same prompt as {path}:1,") and "2 give the majority" in \
        examples[f"{path}:2"]
    assert examples[f"{path}:5"].startswith(f"same prompt as {path}:3,") and "tied" in examples[f"{path}:5"]
    assert report.conflicts == [{"answers": [{"records": 2, "at": [f"{path}:1", f"{path}:4"]},
                                             {"records": 1, "at": [f"{path}:2"]}]},
                                {"answers": [{"records": 1, "at": [f"{path}:3"]}, {"records": 1, "at": [f"{path}:5"]}]}]
    assert report.rejected == 0


def test_conflicting_labels_reject_keeps_the_majority(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", _conflict_rows())
    cfg = CurationConfig(min_examples=0, actions={"conflicting_labels": "reject"})
    one = clean_files(path, tmp_path / "a", cfg)
    two = clean_files(path, tmp_path / "b", cfg, workers=2, chunk_size=2)
    rejects = lines(tmp_path / "a" / "rejects.jsonl")
    assert [(r["line"], r["reasons"][0]["check"]) for r in rejects] == [(2, "conflicting_labels"),
                                                                        (5, "conflicting_labels")]
    assert rejects[0]["record"] == _conflict_rows()[1] and f"{path}:1" in rejects[0]["reasons"][0]["message"]
    kept = [c["messages"][1]["content"] for c in lines(tmp_path / "a" / "clean.jsonl")]
    assert kept == ["Four.", "No", "four", "Blue is a colour."]
    assert one.rejected_by == {"conflicting_labels": 2} and one.clean == 4
    for name in ("clean.jsonl", "rejects.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert two.rejected_by == one.rejected_by
    # a duplicate is not a second vote: P's "four" twice as exact duplicates -> one vote, a tie, the first kept
    rows = _conflict_rows()[:2] + [{"instruction": "What is 2+2?", "output": "Four."}]
    r = clean_files(write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "d", cfg)
    assert r.rejected_by == {"exact_duplicate": 1, "conflicting_labels": 1}
    assert data_main(["check", str(path), "--reject", "conflicting_labels", "--min-examples", "0"]) == 1

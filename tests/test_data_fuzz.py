"""Fuzz `tuneforge data clean` with thousands of broken records: no crash, nothing lost, every reject explained.

The expected number of records is counted as the lines are written (one record a line, as editors count lines:
``\\r\\n`` is one break, a lone ``\\r`` part of the line), never by the reader under test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tuneforge.data.curation.clean import clean_files
from tuneforge.data.curation.config import CHECKS, CurationConfig

WORDS = "the a model answer question data train token cat dog river blue fast slow why how".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _valid(rng: random.Random) -> dict:
    kind = rng.randrange(4)
    if kind == 0:
        return {"instruction": _text(rng, 8), "input": rng.choice(["", _text(rng, 4)]), "output": _text(rng, 20)}
    if kind == 1:
        return {"prompt": _text(rng, 8), "completion": _text(rng, 15)}
    if kind == 2:
        turns = [{"role": r, "content": _text(rng, 10)} for r in ["user", "assistant"] * rng.randint(1, 3)]
        return {"messages": ([{"role": "system", "content": "be nice"}] if rng.random() < 0.3 else []) + turns}
    return {"chosen": _text(rng, 12), "rejected": _text(rng, 12)}


def _mutate(rng: random.Random, rec: dict) -> dict:
    rec = json.loads(json.dumps(rec))
    key = rng.choice(list(rec))
    choice = rng.randrange(12)
    if choice == 0:
        rec[key] = rng.choice([None, 3, 2.5, True, [], {}, ["x"], {"a": 1}])
    elif choice == 1:
        del rec[key]
    elif choice == 2:
        rec[key] = "x" * rng.choice([100_000, 1_000_000]) if rng.random() < 0.05 else _text(rng, 3000)
    elif choice == 3:
        rec[key] = "".join(chr(rng.randrange(0, 0x3000)) for _ in range(60))
    elif choice == 4:
        rec[key] = ""
    elif choice == 5 and "messages" in rec:
        rec["messages"].append({"role": rng.choice(["assistant", "user", "tool", None, 7]),
                                "content": rng.choice(["x", "", 1, None])})
    elif choice == 6 and "messages" in rec:
        rec["messages"] = rec["messages"][::-1]
    elif choice == 7:
        rec[key] = "\ud800 lone surrogate" if rng.random() < 0.5 else "call +1 415-555-0132 or a@b.co"
    elif choice == 8:
        rec = {rng.choice(["foo", "Text", "msg"]): rec[key]}
    elif choice == 9:
        rec[key] = "As an AI language model I cannot. TODO lorem ipsum"
    return rec


def _line(rng: random.Random) -> bytes:
    r = rng.random()
    rec = _valid(rng)
    if r < 0.4:
        return json.dumps(rec).encode()
    if r < 0.45:                                                       # a lone \r as JSON whitespace: one record
        return json.dumps(rec).replace(", ", ",\r ").encode()
    if r < 0.8:
        return json.dumps(_mutate(rng, rec), ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    if r < 0.87:
        s = json.dumps(rec).encode()
        return s[: rng.randrange(1, len(s))]                           # truncated line
    if r < 0.93:
        garbage = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b" ")
        return b"#" + garbage                                          # binary garbage (lone \r too), never blank
    return rng.choice([b"[1, 2, 3]", b"null", b'"a string"', b"42", b"{}", b'{"messages": "x"}'])


def test_fuzz_clean_loses_nothing_and_explains_every_reject(tmp_path: Path):
    rng = random.Random(1234)
    files, n_input = [], 0
    for k in range(3):
        path = tmp_path / f"fuzz{k}.jsonl"
        with open(path, "wb") as f:
            for _ in range(1500):
                f.write(_line(rng) + rng.choice([b"\n", b"\r\n"]))   # one line, one record: counted here
                n_input += 1
        files.append(path)
    arr = tmp_path / "fuzz.json"
    arr.write_text(json.dumps([_valid(rng) if rng.random() < 0.6 else rng.choice([1, "s", None, [1]])
                               for _ in range(300)]))
    files.append(arr)
    n_input += 300
    report = clean_files(files, tmp_path / "out", CurationConfig(max_length=512, min_examples=0))
    out = tmp_path / "out"
    clean = (out / "clean.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text(encoding="utf-8").split("\n")[:-1]]

    assert len(clean) + len(rejects) == n_input == report.records
    assert len(clean) == report.clean and len(rejects) == report.rejected
    assert len({(r["source"], r["line"]) for r in rejects}) == len(rejects)
    for r in rejects:
        assert r["reasons"], r
        assert all(reason["check"] in CHECKS and reason["message"] for reason in r["reasons"])
        assert "record" in r or "raw" in r
    kind = report.kind
    for line in clean:
        rec = json.loads(line)
        assert set(rec) == ({"messages"} if kind == "chat" else {"text"} if kind == "text"
                            else set(rec) & {"chosen", "rejected", "prompt"})
    assert report.clean > 500 and report.rejected > 1000
    assert len(report.checks) == len(CHECKS)

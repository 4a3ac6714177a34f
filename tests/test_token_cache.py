"""Tokenized-data cache: same key -> no recompute; any key change -> recompute; atomic, corruption-safe."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.token_cache import cache_path, cached_tokenize, tokenizer_fingerprint
from tuneforge.fileutil import file_sha256


def test_second_call_does_not_compute(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"input_ids": [torch.arange(5), torch.arange(3)], "n": 2}

    key = {"data": ["abc"], "tokenizer": "t1", "render": {"max_length": 128}}
    first = cached_tokenize(key, compute)
    second = cached_tokenize(dict(reversed(list(key.items()))), compute)   # key order does not matter
    assert len(calls) == 1
    assert second["n"] == 2 and torch.equal(second["input_ids"][0], first["input_ids"][0])
    assert cache_path(key).parent == tmp_path / "tokenized" and cache_path(key).suffix == ".pt"
    cached_tokenize({**key, "render": {"max_length": 256}}, compute)
    assert len(calls) == 2
    assert not list((tmp_path / "tokenized").glob("*.tmp"))


def test_corrupt_entry_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    key = {"k": 1}
    cached_tokenize(key, lambda: [1, 2, 3])
    cache_path(key).write_bytes(b"garbage")
    assert cached_tokenize(key, lambda: [4]) == [4]
    assert cached_tokenize(key, lambda: [5]) == [4]


def test_failed_compute_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))

    def boom():
        raise RuntimeError("no")

    try:
        cached_tokenize({"k": 2}, boom)
    except RuntimeError:
        pass
    assert not cache_path({"k": 2}).exists()


def test_fingerprints(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    f.write_text("a\n")
    h1 = file_sha256(f)
    f.write_text("bb\n")          # another size: a new memo key even where mtimes are coarse
    assert file_sha256(f) != h1 and len(h1) == 64
    fp = tokenizer_fingerprint(tokenizer)
    assert fp == tokenizer_fingerprint(tokenizer)
    tokenizer.chat_template = (tokenizer.chat_template or "") + " "
    try:
        assert tokenizer_fingerprint(tokenizer) != fp
    finally:
        tokenizer.chat_template = tokenizer.chat_template[:-1]


def test_file_sha256_reads_a_file_once_per_version(tmp_path, monkeypatch):
    import hashlib

    from tuneforge import fileutil

    f = tmp_path / "d.jsonl"
    f.write_bytes(b"x" * 3_000_000)
    assert file_sha256(f) == hashlib.sha256(b"x" * 3_000_000).hexdigest()   # streamed in 1 MiB blocks
    monkeypatch.setattr(fileutil, "open", lambda *a, **k: pytest.fail("hashed twice"), raising=False)
    assert file_sha256(str(f)) == file_sha256(f)                              # same file: from the memo
    monkeypatch.undo()
    f.write_bytes(b"y")                                                       # changed: hashed again
    assert file_sha256(f) == hashlib.sha256(b"y").hexdigest()


def test_cache_dir(tmp_path, monkeypatch):
    from pathlib import Path

    from tuneforge.fileutil import cache_dir

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.setenv("TUNEFORGE_CACHE", "~/tf-cache")
    assert cache_dir() == Path.home() / "tf-cache"
    monkeypatch.delenv("TUNEFORGE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "tuneforge"

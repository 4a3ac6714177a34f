"""tuneforge: from a file of examples to a fine-tuned, evaluated, packaged and served language model.

The Python API under the ``tuneforge`` CLI::

    import tuneforge
    config = tuneforge.load_config("examples/quickstart.yaml", overrides=["max_steps=3"])
    result = tuneforge.train(config)                      # writes config.output_dir
    print(tuneforge.generate(result.run_dir, "Where is my parcel?"))
    print(tuneforge.run_pipeline("my.yaml").table())      # curate -> ... -> package, skipping what is up to date
"""

from __future__ import annotations

__version__ = "0.1.0"

import logging as _logging

from tuneforge.config import RunConfig, load_config
from tuneforge.errors import ConfigError

# bitsandbytes >= 0.49 on CPUs with AVX512-BF16 tries, at import (peft imports it), to fetch an optional 4-bit
# GEMM kernel from the `kernels` package and warns on every start when it is not installed. tuneforge keeps
# bitsandbytes on its dequantize path on CPU (methods/qlora/model.py: one_cpu_kernel_), so the kernel is never
# used: the warning (the only one that module logs) is noise; other bitsandbytes warnings still show.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)


def train(config: "RunConfig | str | dict", overrides: list[str] | None = None):
    """Train from a :class:`RunConfig`, a YAML path or a dict of settings; return a ``RunResult``."""
    from tuneforge.pipeline import train_and_evaluate

    if isinstance(config, str):
        config = load_config(config, overrides)
    elif isinstance(config, dict):
        config = load_config(None, overrides, data=config)
    return train_and_evaluate(config)


def generate(run_dir: str, prompt: str, **kwargs) -> str:
    """Generate an answer to ``prompt`` with the model of a finished run (adapter applied)."""
    from tuneforge.runs import load_run

    return load_run(run_dir).generate(prompt, **kwargs)


def evaluate(run_dir: str, **kwargs):
    """Evaluate a finished run (base, few-shot, RAG, tuned columns, failures, forgetting); write its report
    to ``run_dir/eval/``. See :func:`tuneforge.evaluation.api.evaluate` for the arguments."""
    from tuneforge.evaluation.api import evaluate as _evaluate

    return _evaluate(run_dir, **kwargs)


def run_pipeline(config: "RunConfig | str", overrides: list[str] | None = None, **kwargs):
    """Run the stages of the config's ``pipeline:`` section (curate -> train -> evaluate -> gates -> package ->
    export -> serve), skipping those whose inputs did not change; return a ``PipelineResult``. See
    :func:`tuneforge.pipeline.run_pipeline` for the arguments (``from_stage``, ``until``, ``force``, ``accept``)."""
    from tuneforge.pipeline import run_pipeline as _run_pipeline

    if isinstance(config, str):
        config = load_config(config, overrides)
    return _run_pipeline(config, **kwargs)


__all__ = ["ConfigError", "RunConfig", "load_config", "train", "generate", "evaluate", "run_pipeline", "__version__"]

"""The pipeline's stages as (inputs, outputs, run) triples over the existing stage APIs; no stage logic here.

Each stage says which inputs it reads (name -> sha256: its config section, the data files' contents, the upstream
stages' outputs), which files it writes, and how to run it: ``curate`` is ``tuneforge data clean``
(:func:`~tuneforge.data.curation.clean.clean_files`), ``train`` is :func:`~tuneforge.training.trainer.train`,
``evaluate`` is :func:`~tuneforge.evaluation.api.evaluate`, ``gates`` is :mod:`tuneforge.pipeline.gates`,
``package`` is :func:`~tuneforge.export.package.package_run`, ``export`` is ``tuneforge export``'s functions and
``serve`` is ``tuneforge serve``'s :class:`~tuneforge.serving.server.Server`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.config import RunConfig
from tuneforge.config.pipeline import PipelineSettings
from tuneforge.pipeline.gates import GateResult, check_gates
from tuneforge.pipeline.hashing import combined, json_sha256, path_sha256
from tuneforge.runs import RunDir
from tuneforge.runs.layout import PIPELINE

CURATED = "curated"
CLEAN = "clean.jsonl"
# keys of the run config that change neither the trained weights nor what is trained on
_NOT_TRAINING = ("pipeline", "eval", "progress", "output_dir")


@dataclass
class Context:
    """What every stage reads: the run config, its ``pipeline:`` settings and the run directory."""

    config: RunConfig
    settings: PipelineSettings
    run: RunDir
    gate_results: list[GateResult] = field(default_factory=list)

    @property
    def curated(self) -> Path:
        return self.run.path / PIPELINE / CURATED

    def curates(self) -> bool:
        return "curate" in self.settings.stages

    def train_config(self) -> RunConfig:
        """The run config training gets: ``data.train`` is the curated file when ``curate`` is a stage."""
        config = self.config.model_copy(deep=True)
        if self.curates():
            config.data.train = str(self.curated / CLEAN)
        return config

    @property
    def package_dir(self) -> Path:
        out = self.settings.package.out
        return Path(out) if out else self.run.path / "package"

    def shipped(self) -> Path:
        """What export and serve read: the package when ``package`` is a stage, else the run."""
        return self.package_dir if "package" in self.settings.stages else self.run.path

    def gguf(self) -> Path:
        ex = self.settings.export
        if ex.out:
            return Path(ex.out)
        name = self.run.path.name
        return self.run.export_dir / (f"{name}-lora.gguf" if ex.format == "gguf-lora" else f"{name}-{ex.quant}.gguf")


def key(ctx: Context, path: str | Path) -> str:
    """A path as recorded: relative to the run directory when inside it (a moved run stays up to date)."""
    p = Path(path)
    try:
        return p.resolve().relative_to(ctx.run.path.resolve()).as_posix()
    except ValueError:
        return str(p)


def where(ctx: Context, recorded: str) -> Path:
    """The path a recorded key names."""
    p = Path(recorded)
    return p if p.is_absolute() else ctx.run.path / p


def _files(ctx: Context, paths: list[Path]) -> dict[str, str]:
    return {key(ctx, p): path_sha256(p) for p in paths}


def outputs_sha256(stage: Stage, ctx: Context) -> dict[str, str]:
    return _files(ctx, stage.outputs(ctx))


# ------------------------------------------------------------------------------------------------ curate


def _train_files(config: RunConfig) -> list[str | Path]:
    return [str(p) for p in config.data.train_paths()] if config.data.sources is None else []


def _against(config: RunConfig) -> list[str | Path]:
    files = [config.data.validation, config.eval.data if config.eval else None]
    return [f for f in files if f and Path(f).is_file()]


def curate_inputs(ctx: Context) -> dict[str, str]:
    c = ctx.config
    return {"pipeline.curate": json_sha256(ctx.settings.curate.model_dump(mode="json")),
            **{f"data.train:{p}": path_sha256(p) for p in _train_files(c)},
            **{f"against:{p}": path_sha256(p) for p in _against(c)}}


def curate_outputs(ctx: Context) -> list[Path]:
    return [ctx.curated / n for n in (CLEAN, "rejects.jsonl", "report.json")]


def curate_run(ctx: Context) -> str:
    from tuneforge.data.curation.clean import clean_files
    from tuneforge.data.curation.config import load_curation_config

    if ctx.config.data.sources is not None:
        raise ValueError("curate cleans data.train files, not a mixture (data.sources): curate each source with "
                         "`tuneforge data clean`, or leave curate out of pipeline.stages")
    settings = load_curation_config(None, **ctx.settings.curate.settings)
    report = clean_files(_train_files(ctx.config), ctx.curated, settings, against=_against(ctx.config))
    if report.clean == 0:
        raise ValueError(f"no record of {report.records} survived curation (see {ctx.curated / 'report.json'})")
    return f"{report.clean} of {report.records} records kept, {report.rejected} rejected"


# ------------------------------------------------------------------------------------------------- train


def train_inputs(ctx: Context) -> dict[str, str]:
    config = ctx.train_config()
    dumped = {k: v for k, v in config.model_dump(mode="json").items() if k not in _NOT_TRAINING}
    if ctx.curates():
        dumped["data"]["train"] = key(ctx, config.data.train)      # type: ignore[arg-type]
    data = [*config.data.train_paths(), config.data.validation, config.data.tools]
    return {"config": json_sha256(dumped), **{f"data:{key(ctx, p)}": path_sha256(p) for p in data if p}}


def train_outputs(ctx: Context) -> list[Path]:
    run = ctx.run
    return [run.record, run.config, *sorted(run.path.glob("*.safetensors"))]


def train_run(ctx: Context) -> str:
    from tuneforge.training.trainer import train

    result = train(ctx.train_config())
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    return f"{result.steps} steps in {result.wall_time_s:.0f} s{loss}"


# ---------------------------------------------------------------------------------------------- evaluate


def _eval_files(config: RunConfig) -> list[str]:
    settings = config.eval
    files = [settings.data if settings and settings.data else config.data.validation]
    if settings:
        files += [*settings.extra.values(), settings.docs]
    return [f for f in files if f]


def evaluate_inputs(ctx: Context) -> dict[str, str]:
    settings = ctx.config.eval.model_dump(mode="json") if ctx.config.eval else {}
    settings.pop("after_training", None)
    return {"train": combined(_files(ctx, train_outputs(ctx))), "eval": json_sha256(settings),
            **{f"data:{p}": path_sha256(p) for p in _eval_files(ctx.config)}}


def evaluate_outputs(ctx: Context) -> list[Path]:
    """report.json and report.md; report.html is rendered from report.json, and the pipeline adds its section to it."""
    return [ctx.run.eval_dir / n for n in ("report.json", "report.md")]


def evaluate_run(ctx: Context) -> str:
    from tuneforge.evaluation.api import evaluate, resolve_settings

    result = evaluate(ctx.run.path, settings=resolve_settings(ctx.config), progress=ctx.config.progress)
    return f"report: {result.out_dir / 'report.html'}"


# ------------------------------------------------------------------------------------------------- gates


def _max_drop(ctx: Context) -> float:
    return ctx.config.eval.forgetting.max_drop if ctx.config.eval else 0.02


def gates_inputs(ctx: Context) -> dict[str, str]:
    run = ctx.run
    return {"gates": json_sha256([ctx.settings.gates.model_dump(mode="json"), _max_drop(ctx)]),
            **_files(ctx, [run.report, run.record, run.metrics])}


def gates_run(ctx: Context) -> str:
    ctx.gate_results = check_gates(ctx.run, ctx.settings.gates, _max_drop(ctx))
    passed = sum(g.passed for g in ctx.gate_results)
    return f"{passed} of {len(ctx.gate_results)} gates passed"


# ----------------------------------------------------------------------------------------------- package


def package_inputs(ctx: Context) -> dict[str, str]:
    return {"pipeline.package": json_sha256(ctx.settings.package.model_dump(mode="json")),
            "train": combined(_files(ctx, train_outputs(ctx))), **_files(ctx, [ctx.run.report])}


def package_outputs(ctx: Context) -> list[Path]:
    return [RunDir(ctx.package_dir).manifest]


def package_run(ctx: Context) -> str:
    from tuneforge.export.package import package_run as package

    p = ctx.settings.package
    report = package(ctx.run.path, ctx.package_dir, license=p.license, intended_use=p.intended_use)
    return f"{report.kind.replace('_', ' ')} package, {len(report.files)} files"


# ------------------------------------------------------------------------------------------------ export


def export_inputs(ctx: Context) -> dict[str, str]:
    source = package_outputs(ctx) if "package" in ctx.settings.stages else train_outputs(ctx)
    return {"pipeline.export": json_sha256(ctx.settings.export.model_dump(mode="json")),
            "source": combined(_files(ctx, source))}


def export_outputs(ctx: Context) -> list[Path]:
    return [ctx.gguf()]


def export_run(ctx: Context) -> str:
    ex, out = ctx.settings.export, ctx.gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    if ex.format == "gguf-lora":
        from tuneforge.export.gguf_lora import export_gguf_lora

        return f"gguf-lora -> {export_gguf_lora(ctx.shipped(), out)}"
    from tuneforge.export.gguf import export_gguf

    export_gguf(ctx.shipped(), out, quant=ex.quant, check=ex.check)
    return f"gguf {ex.quant} -> {out}" + (", round trip checked" if ex.check else "")


# ------------------------------------------------------------------------------------------------- serve


def serve_run(ctx: Context) -> str:
    from tuneforge.serving.commands import base_from_adapters
    from tuneforge.serving.server import ServeConfig, Server

    s = ctx.settings.serve
    adapters = {s.name: str(ctx.shipped())}
    server = Server(ServeConfig.model_validate({"base": base_from_adapters(adapters), "adapters": adapters,
                                                 "host": s.host, "port": s.port}))
    print(f"serving {s.name} on http://{s.host}:{s.port}/v1 (Ctrl-C stops)", flush=True)
    server.run()
    return "stopped"


# ------------------------------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class Stage:
    """A stage: ``inputs(ctx)`` -> {name: sha256}, ``outputs(ctx)`` -> files it writes, ``run(ctx)`` -> one line.
    ``cached``: a rerun may skip it (serve always runs: it is a process, not a file)."""

    name: str
    inputs: Callable[[Context], dict[str, str]]
    outputs: Callable[[Context], list[Path]]
    run: Callable[[Context], str]
    cached: bool = True


def _no_inputs(ctx: Context) -> dict[str, str]:
    return {}


def _no_outputs(ctx: Context) -> list[Path]:
    return []


STAGE_TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("curate", curate_inputs, curate_outputs, curate_run),
    Stage("train", train_inputs, train_outputs, train_run),
    Stage("evaluate", evaluate_inputs, evaluate_outputs, evaluate_run),
    Stage("gates", gates_inputs, _no_outputs, gates_run),
    Stage("package", package_inputs, package_outputs, package_run),
    Stage("export", export_inputs, export_outputs, export_run),
    Stage("serve", _no_inputs, _no_outputs, serve_run, cached=False),
)}

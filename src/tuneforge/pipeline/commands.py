"""``tuneforge pipeline CONFIG``: a thin argparse layer over :func:`tuneforge.pipeline.run_pipeline`.

Exit codes: 0 every selected stage done (or skipped); 1 a gate failed (one line: the gate, its numbers, the
report); 2 a stage failed (one line: the stage and why) or the config cannot be used.
"""

from __future__ import annotations

import argparse
import sys

from tuneforge.config.pipeline import STAGES


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    """The flags ``tuneforge pipeline`` and ``tuneforge quickstart`` share."""
    p.add_argument("--from", dest="from_stage", choices=STAGES, default=None,
                   help="run this stage and every later one even when up to date (the earlier ones do not run)")
    p.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    p.add_argument("--force", action="append", default=[], choices=STAGES, metavar="STAGE",
                   help="run this stage even when its inputs did not change (repeatable)")
    p.add_argument("--accept-gate", action="append", default=[], metavar="NAME",
                   help="let this failed gate through (repeatable); needs --reason, recorded with the gate")
    p.add_argument("--reason", default=None, help="why the accepted gates may fail (recorded in the summary)")


def accepted(args: argparse.Namespace) -> dict[str, str]:
    return {name: args.reason or "" for name in args.accept_gate}


def add_pipeline_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pipeline", help="curate, train, evaluate, check the gates, package, export and serve, as the run config's "
                         "pipeline: section says; a rerun skips what did not change",
        description="Run the stages of the run config's pipeline: section in order (curate -> train -> evaluate -> "
                    "gates -> package -> export -> serve). Each stage records its inputs' and outputs' hashes in "
                    "<output_dir>/pipeline/state.json; a rerun skips the stages whose inputs did not change. Exit 1 "
                    "when a gate fails, 2 when a stage fails.")
    p.add_argument("config", help="run config (YAML) with a pipeline: section (without one: the default stages)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; dotted keys reach nested ones (pipeline.stages=[train,evaluate])")
    add_pipeline_args(p)
    p.set_defaults(func=run_pipeline_command)
    return p


def run_pipeline_command(args: argparse.Namespace) -> int:
    from tuneforge.config import load_config
    from tuneforge.pipeline import GateFailed, StageFailed, run_pipeline

    config = load_config(args.config, args.set)
    try:
        result = run_pipeline(config, from_stage=args.from_stage, until=args.until, force=args.force,
                              accept=accepted(args))
    except GateFailed as e:
        sys.stderr.write(f"tuneforge pipeline: {e}\n")
        return 1
    except StageFailed as e:
        sys.stderr.write(f"tuneforge pipeline: {e}\n")
        return 2
    print(result.table())
    print(f"summary: {result.summary_md}")
    return 0

"""``tuneforge merge RUN --out DIR [--dtype bf16|fp16|fp32]``: a thin CLI over :func:`merge_run`."""

from __future__ import annotations

import argparse
import sys


def add_merge_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``merge`` on an argparse subparsers object; ``args.func(args)`` runs it and returns an exit code."""
    p = subparsers.add_parser("merge", help="fold a LoRA/DoRA/IA3/QLoRA adapter into the base model and check it",
                              description="Merge a run's adapter into its base model, save a plain transformers "
                                          "model folder in --dtype, and check merged vs unmerged logits.")
    p.add_argument("run", metavar="RUN", help="run folder (holds config.yaml and the adapter files)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the merged model to")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="dtype of the saved weights")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="prompt for the merge check (repeatable; default: three built-in prompts)")
    p.set_defaults(func=run_merge_command)
    return p


def run_merge_command(args: argparse.Namespace) -> int:
    """0 on a checked merge; 1 when the check fails; 2 when the run cannot be merged."""
    from tuneforge.export.merge import MergeCheckError, merge_run
    from tuneforge.methods.errors import NotMergeableError

    try:
        report = merge_run(args.run, args.out, dtype=args.dtype, check_prompts=args.prompt)
    except NotMergeableError as e:
        print(f"tuneforge merge: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"tuneforge merge: {e}", file=sys.stderr)
        return 2
    except MergeCheckError as e:
        print(f"tuneforge merge: the merge check FAILED\n{e}", file=sys.stderr)
        return 1
    print(report)
    return 0

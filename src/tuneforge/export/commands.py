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


def add_package_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``package``: ``tuneforge package RUN --out DIR``."""
    p = subparsers.add_parser("package", help="package a run: adapter (peft layout), tokenizer, model card, manifest",
                              description="Write a folder that peft, vLLM and tuneforge load unchanged: the adapter "
                                          "(or full model), the tokenizer and chat template used in training, a "
                                          "model card (README.md) and tuneforge.json (base model sha256, data "
                                          "fingerprints, versions, which runtimes can load it).")
    p.add_argument("run", metavar="RUN", help="run folder written by `tuneforge train`")
    p.add_argument("--out", required=True, metavar="DIR", help="package folder to write")
    p.add_argument("--license", default=None, help="license for the card (default: the base model's, else 'other')")
    p.add_argument("--base-model-id", default=None, metavar="HUB_ID",
                   help="Hub id of the base model for the card (default: known for built-in models)")
    p.add_argument("--intended-use", default=None, metavar="TEXT", help="the card's 'Intended use' paragraph")
    p.add_argument("--allow-regressed", action="store_true",
                   help="package a run that ended worse than it started (run.json status: regressed)")
    p.set_defaults(func=run_package_command)
    return p


def run_package_command(args: argparse.Namespace) -> int:
    """0 when the package is written; 2 when the folder is not a finished run or its base model changed."""
    from tuneforge.export.package import package_run
    from tuneforge.runs import BaseModelMismatch, NotARunError

    try:
        report = package_run(args.run, args.out, license=args.license, base_model_id=args.base_model_id,
                             intended_use=args.intended_use, allow_regressed=args.allow_regressed)
    except (NotARunError, BaseModelMismatch) as e:
        print(f"tuneforge package: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0


def add_export_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export``: ``tuneforge export RUN --format gguf|gguf-lora [--quant f16|q8_0|q4_0] [--out FILE]``."""
    from tuneforge.export.gguf import QUANTS

    p = subparsers.add_parser("export", help="export a run's merged model as a GGUF file (llama.cpp, Ollama)",
                              description="Merge the run's adapter into its base (as `tuneforge merge` does), write "
                                          "it as one GGUF file with the tokenizer and chat template in its metadata, "
                                          "then load it back with transformers and compare logits and greedy tokens "
                                          "with the merged model.")
    p.add_argument("run", metavar="RUN", help="run folder or package")
    p.add_argument("--format", choices=("gguf", "gguf-lora"), default="gguf",
                   help="gguf: the merged model; gguf-lora: the LoRA adapter alone, for llama.cpp's --lora")
    p.add_argument("--quant", choices=QUANTS, default="f16",
                   help="gguf: weight type of the 2-D tensors (norms stay f32); gguf-lora is always f32")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="GGUF file to write (default: RUN/export/<run name>-<quant>.gguf or <run name>-lora.gguf)")
    p.add_argument("--no-check", action="store_true", help="skip loading the file back and comparing")
    p.add_argument("--allow-regressed", action="store_true",
                   help="export a run that ended worse than it started (run.json status: regressed)")
    p.set_defaults(func=run_export_command)
    return p


def run_export_command(args: argparse.Namespace) -> int:
    """0 on a checked export; 1 when the round-trip check fails; 2 when the run cannot be exported."""
    from tuneforge.export.gguf import ExportCheckError, UnsupportedModelError, export_gguf
    from tuneforge.export.gguf_lora import export_gguf_lora
    from tuneforge.methods.errors import NotMergeableError
    from tuneforge.runs import BaseModelMismatch, NotARunError

    try:
        if args.format == "gguf-lora":
            print(f"export gguf-lora -> {export_gguf_lora(args.run, args.out, allow_regressed=args.allow_regressed)}")
            return 0
        report = export_gguf(args.run, args.out, quant=args.quant, check=not args.no_check,
                             allow_regressed=args.allow_regressed)
    except (NotARunError, NotMergeableError, BaseModelMismatch, UnsupportedModelError, FileNotFoundError) as e:
        print(f"tuneforge export: {e}", file=sys.stderr)
        return 2
    except ExportCheckError as e:
        print(f"tuneforge export: the round-trip check FAILED\n{e}", file=sys.stderr)
        return 1
    print(report)
    return 0

"""``tuneforge data check | clean | stats | split``: thin argparse wrappers over the Python API.

``cli.py`` creates the ``tuneforge data`` group and calls :func:`add_curation_commands` with its
sub-parsers. Every handler returns an exit code: 0 ok, 1 the data has problems (``check`` found
records that ``clean`` would reject), 2 the command could not run (bad file, bad setting).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tuneforge.data.curation.config import CHECKS, DATASET_CHECKS, CurationConfigError, load_curation_config
from tuneforge.data.formats import FORMATS
from tuneforge.data.sources import source_stem
from tuneforge.models.registry import DEFAULT_MODEL


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default=None, choices=("auto",) + FORMATS,
                   help="declare the format instead of detecting it")
    p.add_argument("--columns", nargs="*", default=[], metavar="FIELD=COLUMN",
                   help="map canonical fields to your column names, e.g. instruction=question output=answer")
    p.add_argument("--tools", default=None, metavar="JSON",
                   help="a JSON file of tool definitions for every record (as data.tools; a record's own replace it)")


def _add_check_options(p: argparse.ArgumentParser) -> None:
    _add_data_options(p)
    p.add_argument("--config", default=None, metavar="YAML", help="curation settings (keys of CurationConfig)")
    p.add_argument("--model", default=None,
                   help="count tokens exactly with this model's tokenizer (default: estimate from characters)")
    p.add_argument("--max-length", type=int, default=None, help="token limit per record (default 2048)")
    p.add_argument("--no-max-length", action="store_true", help="do not check lengths")
    p.add_argument("--too-long", choices=["drop", "truncate", "keep"], default=None,
                   help="records over --max-length: drop (reject, default), truncate the final answer, keep (warn)")
    p.add_argument("--min-answer-chars", type=int, default=None)
    p.add_argument("--near-dup-threshold", type=float, default=None, help="MinHash Jaccard similarity (default 0.8)")
    p.add_argument("--no-near-dup", action="store_true", help="exact duplicates only (faster)")
    p.add_argument("--against", nargs="+", default=[], metavar="FILE",
                   help="validation/test files: training records duplicating theirs are 'leakage'")
    p.add_argument("--min-examples", type=int, default=None)
    p.add_argument("--workers", type=_workers, default="auto",
                   help="processes that parse, check and hash records (default auto: one per core, at most 8, "
                        "for inputs over 16 MB; 1 otherwise)")
    for action in ("reject", "warn", "off"):
        p.add_argument(f"--{action}", action="append", default=[], metavar="CHECK[,CHECK]",
                       help=f"set these checks to {action} (see --list-checks)")
    p.add_argument("--list-checks", action="store_true", help="list the checks and their default actions, then exit")


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 1 or 'auto', got {value!r}")
    return n


def _columns(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise CurationConfigError(f"--columns takes FIELD=COLUMN pairs, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def config_from_args(args: argparse.Namespace) -> Any:
    """A :class:`CurationConfig` from ``--config`` and the command-line flags (flags win)."""
    actions: dict[str, str] = {}
    for action in ("reject", "warn", "off"):
        for item in getattr(args, action, []) or []:
            for name in filter(None, (s.strip() for s in item.split(","))):
                actions[name] = action
    overrides: dict[str, Any] = {
        "format": args.format, "tools": getattr(args, "tools", None),
        "model": getattr(args, "model", None), "too_long": getattr(args, "too_long", None),
        "max_length": getattr(args, "max_length", None), "min_answer_chars": getattr(args, "min_answer_chars", None),
        "near_dup_threshold": getattr(args, "near_dup_threshold", None),
        "min_examples": getattr(args, "min_examples", None), "actions": actions,
    }
    if args.columns:
        overrides["columns"] = _columns(args.columns)
    if getattr(args, "no_near_dup", False):
        overrides["near_dup"] = False
    if getattr(args, "mask_pii", False):
        overrides["mask_pii"] = True
    config = load_curation_config(getattr(args, "config", None), **overrides)
    if getattr(args, "no_max_length", False):
        config = config.model_copy(update={"max_length": None})
    return config


def _list_checks() -> int:
    for c in CHECKS.values():
        fixed = " (always)" if c.fixed else ""
        print(f"{c.name:<16} {c.group:<11} {c.default + fixed:<15} {c.description}")
    for name, desc in DATASET_CHECKS.items():
        print(f"{name:<16} {'dataset':<11} {'warn':<15} {desc}")
    return 0


def _run(fn, args: argparse.Namespace) -> int:
    from tuneforge.data.loaders import DataFileError

    try:
        return fn(args)
    except (CurationConfigError, DataFileError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _list_or_require_files(args: argparse.Namespace) -> int | None:
    """``--list-checks`` answers at once; otherwise at least one FILE is needed. None: go on."""
    if args.list_checks:
        return _list_checks()
    if not args.files:
        print("error: give at least one FILE", file=sys.stderr)
        return 2
    return None


def cmd_check(args: argparse.Namespace) -> int:
    if (early := _list_or_require_files(args)) is not None:
        return early

    def run(args: argparse.Namespace) -> int:
        from tuneforge.data.curation.clean import check_files, resolve_workers

        report = check_files(args.files, config_from_args(args), against=args.against,
                              workers=resolve_workers(args.workers, args.files + args.against))
        if args.json:
            print(json.dumps(report.to_dict(), indent=2, default=str))
        else:
            print(report.summary(max_examples=args.show))
        failing = not report.ok or (args.strict and (report.dataset_warnings or any(
            c["found"] and c["action"] == "warn" for c in report.checks.values())))
        return 1 if failing else 0
    return _run(run, args)


def cmd_clean(args: argparse.Namespace) -> int:
    if (early := _list_or_require_files(args)) is not None:
        return early

    def run(args: argparse.Namespace) -> int:
        from tuneforge.data.curation.clean import clean_files, resolve_workers

        report = clean_files(args.files, args.out, config_from_args(args), against=args.against,
                              workers=resolve_workers(args.workers, args.files + args.against))
        print(report.summary(max_examples=args.show))
        return 0
    return _run(run, args)


def cmd_stats(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        from tuneforge.data.curation.config import CurationConfig
        from tuneforge.data.curation.stats import compute_stats, plot_histogram

        config = CurationConfig(format=args.format or "auto", columns=_columns(args.columns), tools=args.tools)
        model = None if args.estimate else args.model
        template, kwargs = _template_options(args)
        stats = compute_stats(args.file, model=model, max_length=args.max_length, config=config, template=template,
                              template_kwargs=kwargs)
        out = Path(args.out) if args.out else Path.cwd() / (source_stem(args.file) + "_lengths.png")
        if out.suffix.lower() != ".png":
            out = out / "lengths.png"
        plot_histogram(stats, out)
        print(json.dumps(stats.to_dict(), indent=2, default=str) if args.json else stats.summary())
        return 0
    return _run(run, args)


def _template_options(args: argparse.Namespace) -> tuple[str | None, dict[str, Any] | None]:
    """``--template`` and ``--template-kwargs`` checked as the run config checks ``template:`` and
    ``template_kwargs:`` (ConfigError, one line naming the option)."""
    from tuneforge.data.templates import check_template_kwargs, check_template_value
    from tuneforge.errors import ConfigError

    if args.template is None:
        if args.template_kwargs is not None:
            raise ConfigError("--template-kwargs: give --template too (the template they are passed to)")
        return None, None
    if args.estimate:
        raise ConfigError("--template: counts with a template need the tokenizer; drop --estimate")
    try:
        check_template_value(args.template)
    except ValueError as e:
        raise ConfigError(f"--template: {e}") from None
    kwargs = None
    if args.template_kwargs is not None:
        try:
            kwargs = check_template_kwargs(json.loads(args.template_kwargs), "--template-kwargs")
        except json.JSONDecodeError as e:
            raise ConfigError(f"--template-kwargs: not JSON ({e.msg}); write e.g. '{{\"enable_thinking\": false}}'") \
                from None
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return args.template, kwargs


def cmd_split(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        from tuneforge.data.curation.split import split_file

        r = split_file(args.file, val=args.val, seed=args.seed, stratify=args.stratify, out_dir=args.out)
        print(f"train: {r.train} ({r.n_train} records)\nval:   {r.val} ({r.n_val} records)")
        if r.n_rejected:
            print(f"rejects: {r.rejects} ({r.n_rejected} unparsable records)")
        if r.val_labels:
            counts = ", ".join(f"{k!r} {v}" for k, v in list(r.val_labels.items())[:20])
            print("val by " + args.stratify + ": " + counts)
        return 0
    return _run(run, args)


def add_curation_commands(data_subparsers: Any) -> None:
    """Register ``check``, ``clean``, ``stats`` and ``split`` on the ``tuneforge data`` sub-parsers."""
    c = data_subparsers.add_parser("check", help="validate records; exit 1 if any would be rejected",
                                   description="Validate every record and report problems by check, with file:line.")
    c.add_argument("files", nargs="*", metavar="FILE")
    _add_check_options(c)
    c.add_argument("--show", type=int, default=5, help="example records listed per check")
    c.add_argument("--json", action="store_true", help="print the full report as JSON")
    c.add_argument("--strict", action="store_true", help="also fail on warnings")
    c.set_defaults(func=cmd_check)

    k = data_subparsers.add_parser("clean", help="write clean.jsonl, rejects.jsonl and report.json",
                                   description="Normalise, deduplicate and filter; every record lands in "
                                               "clean.jsonl or rejects.jsonl (with its reasons).")
    k.add_argument("files", nargs="*", metavar="FILE")
    k.add_argument("--out", required=False, default="curated", metavar="DIR", help="output folder (default ./curated)")
    k.add_argument("--mask-pii", action="store_true", help="replace emails/phones/card numbers with [EMAIL]/...")
    _add_check_options(k)
    k.add_argument("--show", type=int, default=3, help="example records listed per check")
    k.set_defaults(func=cmd_clean)

    s = data_subparsers.add_parser("stats",
                                   help="token lengths, turns, answer distribution, truncation at --max-length")
    s.add_argument("file", help="a data file; or a run config (.yaml): each source of its data.train, in examples "
                   "and tokens an epoch (a mixture's shares)")
    _add_data_options(s)
    s.add_argument("--model", default=DEFAULT_MODEL, help="tokenizer for token counts")
    s.add_argument("--estimate", action="store_true", help="estimate tokens from characters (no tokenizer)")
    s.add_argument("--template", default=None, metavar="TEMPLATE",
                   help="count as a run with this template: trains (auto, a built-in such as gemma, or a .jinja file): "
                        "the same tokens, and the share of them trained")
    s.add_argument("--template-kwargs", default=None, metavar="JSON",
                   help="with --template: the run's template_kwargs, e.g. '{\"enable_thinking\": false}'")
    s.add_argument("--max-length", type=int, default=None, help="count records longer than this")
    s.add_argument("--out", default=None,
                   help="histogram PNG path or folder (default: ./<file stem>_lengths.png)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

    p = data_subparsers.add_parser("split", help="split a file into train.jsonl / val.jsonl")
    p.add_argument("file")
    p.add_argument("--val", type=float, default=0.1, help="validation fraction (default 0.1)")
    p.add_argument("--stratify", default=None, metavar="FIELD",
                   help="keep the share of each value of FIELD ('answer' = final assistant answer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="default: ./<file stem>_split")
    p.set_defaults(func=cmd_split)


def main(argv: list[str] | None = None) -> int:
    """``python -m tuneforge.data.curation.commands check ...`` (the same commands without the main CLI)."""
    parser = argparse.ArgumentParser(prog="tuneforge data")
    add_curation_commands(parser.add_subparsers(dest="data_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

"""``tuneforge eval RUN``: the command over :func:`tuneforge.evaluation.api.evaluate`."""

from __future__ import annotations

import argparse
import sys


def _columns(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def cmd_eval(args: argparse.Namespace) -> int:
    from tuneforge.evaluation.api import BAD_INPUT, evaluate
    from tuneforge.evaluation.judge import JudgeError

    extra = dict(item.split("=", 1) for item in args.extra) if args.extra else None
    if args.extra and any("=" not in item for item in args.extra):
        print("error: --extra takes NAME=FILE", file=sys.stderr)
        return 2
    try:
        result = evaluate(args.run, data=args.data, columns=_columns(args.columns) if args.columns else None,
                          docs=args.docs, out=args.out, forgetting=True if args.forgetting else None,
                          forgetting_data=args.forgetting_data, judge=args.judge, progress=not args.no_progress,
                          max_examples=args.max_examples, samples=args.samples, extra=extra,
                          forgetting_full=True if args.forgetting_full else None, json_schema=args.json_schema,
                          regex=args.regex, user_metric=args.user_metric)
    except (*BAD_INPUT, JudgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name in result.report["sets"]:
        print(f"{name} ({result.report['sets'][name]['n']} examples):")
        print(result.table(name))
    if "forgetting" in result.report:
        f = result.report["forgetting"]
        print(f"forgetting (MMLU cloze, {f['questions']} questions): base {100 * f['base']['value']:.1f}%, tuned "
              f"{100 * f['tuned']['value']:.1f}%, drop {100 * f['drop']['value']:.1f} pts: "
              f"{'passed' if f['passed'] else 'FAILED'}")
    print(f"report: {result.out_dir / 'report.html'} (and report.md, report.json)")
    if "forgetting" in result.report and not result.report["forgetting"]["passed"]:
        return 1
    return 0


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate a run: base, few-shot, RAG and tuned side by side, failures, "
                                    "forgetting, one report")
    e.add_argument("run", help="run directory written by `tuneforge train`")
    e.add_argument("--data", help="test file (default: the config's eval.data, else data.validation)")
    e.add_argument("--columns", help="comma-separated: base,fewshot,rag,tuned,tuned+rag (default: eval.columns, "
                                     "else base,tuned)")
    e.add_argument("--docs", help="folder of .md/.txt documents for the rag columns")
    e.add_argument("--extra", action="append", default=[], metavar="NAME=FILE",
                   help="another held-out file, reported apart (repeatable)")
    e.add_argument("--max-examples", type=int, default=None, help="score at most this many test examples per file")
    e.add_argument("--samples", type=int, default=None, help="output variability: samples per prompt (0: off)")
    e.add_argument("--forgetting", action="store_true", help="MMLU cloze and general-text perplexity, base vs tuned")
    e.add_argument("--forgetting-data", help="MMLU folder (the original release's CSVs, holding test/)")
    e.add_argument("--forgetting-full", action="store_true", help="every MMLU question, not 10 a subject")
    e.add_argument("--json-schema", help="JSON Schema file answers must meet (schema-valid rate)")
    e.add_argument("--regex", help="a regular expression answers must match in full (regex rate)")
    e.add_argument("--user-metric", help="module:function(prediction, reference) -> float")
    e.add_argument("--judge", help="OpenAI-compatible endpoint URL for pairwise LLM-as-judge")
    e.add_argument("--out", help="report folder (default: RUN/eval)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)


def cmd_sweep(args: argparse.Namespace) -> int:
    from tuneforge.evaluation.sweep import SweepError, sweep, table

    try:
        folder, points = sweep(args.config, args.grid, out=args.out, overrides=args.set,
                               eval_args=["--columns", args.columns] if args.columns else None)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(points))
    print(f"sweep folder: {folder} (sweep.md, sweep.json, sweep.png, sweep.html)")
    return 0 if all(p.quality is not None for p in points) else 1


def add_sweep_command(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="train and evaluate a grid of settings; table and plot of quality vs cost")
    s.add_argument("config", help="run config (YAML)")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a setting and its values (repeatable: the grid is every combination)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every point")
    s.add_argument("--columns", help="columns each point is evaluated with (default: tuned)")
    s.add_argument("--out", help="sweep folder (default: <output_dir>-sweep); a finished point in it is kept")
    s.set_defaults(func=cmd_sweep)


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """``tuneforge eval`` and ``tuneforge sweep``."""
    add_eval_command(sub)
    add_sweep_command(sub)

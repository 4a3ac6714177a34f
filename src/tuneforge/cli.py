"""The ``tuneforge`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _error(line: str) -> None:
    """One line to stderr in one write: under several processes (accelerate launch) lines never interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def cmd_train(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.pipeline import train_and_evaluate
    from tuneforge.training.trainer import TrainingFailed, TrainingInterrupted

    if args.data:
        if args.config:
            overrides = [f"data.train={args.data}", f"data.validation={args.validation or 'null'}", *args.set]
            config = load_config(args.config, overrides)
        else:
            from tuneforge.own_data import own_data_config

            config = own_data_config(args.data, args.set, validation=args.validation)
    elif args.config:
        validation = [f"data.validation={args.validation}"] if args.validation else []
        config = load_config(args.config, args.set + validation)
    else:
        print("error: give a run config (tuneforge train my.yaml) or your data (tuneforge train --data my.jsonl); "
              "`tuneforge init my.jsonl` writes a config to edit", file=sys.stderr)
        return 2
    try:
        result = train_and_evaluate(config, resume=args.resume)
    except TrainingInterrupted as e:
        _error(f"tuneforge train: {e}")
        return 128 + e.signum
    except TrainingFailed as e:
        _error(f"error: {e}")
        return 1
    print(f"run directory: {result.run_dir}  steps: {result.steps}  final loss: {result.final_loss:.4f}"
          + (f"  best eval loss: {result.best_eval_loss:.4f} (step {result.best_step})" if result.best_step else ""))
    return 0


def cmd_init(args) -> int:
    from tuneforge.own_data import write_init_config

    out, task = write_init_config(args.data, args.out or f"{Path(args.data).stem}.yaml", force=args.force,
                                  method=args.method)
    print(f"wrote {out} (task: {task}, method: {args.method}); read it, then: tuneforge train {out}")
    return 0


def cmd_quickstart(args) -> int:
    from tuneforge.quickstart import printable_config, run_quickstart

    if args.print_config:
        print(printable_config(args.config), end="")
        return 0
    from tuneforge.pipeline import GateFailed, StageFailed
    from tuneforge.pipeline.commands import accepted

    try:
        run_quickstart(args.config, args.set, accept=accepted(args), from_stage=args.from_stage, until=args.until,
                       force=args.force)
    except GateFailed as e:
        _error(f"tuneforge quickstart: {e}")
        return 1
    except StageFailed as e:
        _error(f"tuneforge quickstart: {e}")
        return 2
    return 0


def cmd_generate(args) -> int:
    from tuneforge.runs import load_run

    loaded = load_run(args.run)
    print(loaded.generate(args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature))
    return 0


def cmd_chat(args) -> int:
    from tuneforge.runs import load_run

    loaded = load_run(args.run)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chatting with", args.run, "(empty line or Ctrl-D to quit, /reset to start over)")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        answer = loaded.generate(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        messages.append({"role": "assistant", "content": answer})
        print("model>", answer)
    return 0


def cmd_data_preview(args) -> int:
    from tuneforge.data.preview import preview
    from tuneforge.data.settings import DataConfig
    from tuneforge.data.templates import apply_template, check_template_value
    from tuneforge.errors import ConfigError
    from tuneforge.models.loading import load_tokenizer

    cfg = DataConfig(train=args.file, format=args.format, train_on=args.train_on, system_prompt=args.system,
                     columns=dict(c.split("=", 1) for c in args.columns), tools=args.tools)
    try:
        check_template_value(args.template)
    except ValueError as e:
        raise ConfigError(f"--template: {e}") from None
    tokenizer = load_tokenizer(args.model)
    apply_template(tokenizer, args.template, args.model, needs_chat=args.format != "text")
    color = sys.stdout.isatty() and not args.no_color
    print(preview(args.file, tokenizer, cfg, n=args.n, color=color))
    return 0


def cmd_plan(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.estimate.plan import parse_memory, plan_for_config

    config = load_config(args.config, args.set)
    from tuneforge.estimate.commands import check_price_and_gpu

    check_price_and_gpu(args.price_per_hour, args.mfu, args.gpu)
    if args.accelerate_config:
        from tuneforge.estimate.distributed_plan import plan_distributed, read_accelerate_config

        print(plan_distributed(config, read_accelerate_config(args.accelerate_config)).table())
        return 0
    try:
        budget = parse_memory(args.memory) if args.memory else None
    except ValueError as e:
        print(f"error: --memory: {e}", file=sys.stderr)
        return 2
    from tuneforge.methods import get_method
    from tuneforge.models.dtype import pick_device
    from tuneforge.training.precision import resolve_precision

    # the precision as training resolves it (an impossible combination: one line, exit 2, as `tuneforge train`)
    resolved = resolve_precision(config.precision, config.dtype, pick_device(config.device),
                                 get_method(config.method).is_full_model)
    try:
        plan = plan_for_config(config, budget, precision=(resolved.mode, resolved.reason))
    except ValueError as e:        # a method the estimator does not model
        _error(f"error: {e}")
        return 2
    print(plan.table())
    if plan.chosen:
        from tuneforge.estimate.timing import plan_line

        chosen = plan.chosen
        print(plan_line(config, chosen.method, chosen.gradient_checkpointing, gpu=args.gpu, mfu=args.mfu,
                        price_per_hour=args.price_per_hour, device=chosen.device))
    return 0 if plan.chosen else 1


def cmd_data_stats(args: argparse.Namespace) -> int:
    """``tuneforge data stats``: a data file's statistics; a run config (``.yaml``): what each source of its
    ``data.train`` gives an epoch, in examples and tokens (:mod:`tuneforge.data.mixture_stats`)."""
    from tuneforge.data.curation.commands import cmd_stats

    if not args.file.lower().endswith((".yaml", ".yml")):
        return cmd_stats(args)
    import json

    from tuneforge.config import load_config
    from tuneforge.data import mixture_stats

    stats = mixture_stats.mixture_stats(load_config(args.file))
    print(json.dumps(mixture_stats.to_dict(stats), indent=2) if args.json else mixture_stats.summary(stats))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """``tuneforge ui``: the web studio (:mod:`tuneforge.studio`), needs the ``ui`` extra."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        _error("error: tuneforge ui needs Gradio: pip install 'tuneforge[ui]'")
        return 2
    from tuneforge.studio.app import AUTH_ENV, check_host, launch, parse_auth

    check_host(args.host, parse_auth(args.auth or os.environ.get(AUTH_ENV)))   # refused before anything is printed
    print(f"tuneforge studio on http://{args.host}:{args.port} (runs in {args.runs}); Ctrl-C stops it "
          "(runs it started keep training)")
    launch(args.runs, host=args.host, port=args.port, auth=args.auth, model=args.model)
    return 0


def cmd_data_generate(args: argparse.Namespace) -> int:
    """``tuneforge data generate``: a teacher answers the prompts (:func:`tuneforge.data.teacher.generate_teacher_data`;
    a URL is an OpenAI-compatible endpoint, anything else a run, package or model folder)."""
    from tuneforge.data.teacher import OpenAITeacher, generate_teacher_data
    from tuneforge.errors import ConfigError

    settings = {"temperature": args.temperature, "max_tokens": args.max_tokens, "n": args.n}
    if args.teacher.startswith(("http://", "https://")):
        teacher: Any = OpenAITeacher(args.teacher, model=args.model, api_key_env=args.api_key_env,
                                     timeout_s=args.timeout, **settings)
    else:
        from tuneforge.evaluation.local_teacher import LocalTeacher

        if args.model:
            raise ConfigError("--model names the model of an endpoint (a URL); a local --teacher is the model")
        teacher = LocalTeacher.from_path(args.teacher, batch_size=args.batch_size, seed=args.seed, **settings)
    report = generate_teacher_data(teacher, args.prompts, args.out, failures=args.failures,
                                   concurrency=args.concurrency, retries=args.retries, backoff_s=args.backoff,
                                   fail_fast=args.fail_fast)
    print(f"{report.out}: {report.records} records written for {report.answered} prompts ({report.cached} answered "
          f"before, {report.prompts} in all) in {report.seconds:.1f} s")
    if report.failures:
        print(f"{report.failed} prompts failed (each in {report.failures}); run the same command again to ask for "
              "them again", file=sys.stderr)
        return 1
    return 0


def add_generate_command(dsub: Any) -> None:
    g = dsub.add_parser("generate", help="have a teacher (an OpenAI-compatible endpoint, a run or a model) answer "
                        "prompts, as chat training data; a rerun asks only what is missing")
    g.add_argument("--teacher", required=True, metavar="URL_OR_RUN",
                   help="an OpenAI-compatible base URL (http://host:8000/v1), or a run directory, package, model "
                   "folder or model name")
    g.add_argument("--prompts", required=True, metavar="FILE", help="prompts: records with messages, prompt or "
                   "instruction (any data path: a file, shards, a save_to_disk folder, a Hub id)")
    g.add_argument("--out", required=True, metavar="FILE", help="the output .jsonl (appended to: a rerun resumes)")
    g.add_argument("--failures", default=None, metavar="FILE",
                   help="prompts that failed, one a line (default: OUT's name with .failures.jsonl)")
    g.add_argument("--model", default=None, help="the endpoint's model name (default: its only model)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="the environment variable holding the endpoint's key")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--max-tokens", type=int, default=512, help="tokens an answer may have")
    g.add_argument("--n", type=int, default=1, help="answers a prompt (needs --temperature > 0 for n > 1)")
    g.add_argument("--concurrency", type=int, default=8, help="calls in flight at once (a local teacher: 1)")
    g.add_argument("--retries", type=int, default=4, help="retries of a call that fails transiently")
    g.add_argument("--backoff", type=float, default=1.0, metavar="S",
                   help="seconds before the first retry, doubled each time (at most 30)")
    g.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds a call may take (endpoint)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts a batch (local teacher)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (local teacher)")
    g.add_argument("--fail-fast", action="store_true", help="stop at the first prompt that fails")
    g.set_defaults(func=cmd_data_generate)


def build_parser() -> argparse.ArgumentParser:
    from tuneforge.data.curation.commands import add_curation_commands
    from tuneforge.data.formats import SFT_FORMATS
    from tuneforge.estimate.commands import add_estimate_command
    from tuneforge.evaluation.commands import add_eval_commands
    from tuneforge.export.commands import add_export_command, add_merge_command, add_package_command
    from tuneforge.models.registry import DEFAULT_MODEL
    from tuneforge.pipeline.commands import add_pipeline_args, add_pipeline_command
    from tuneforge.serving.commands import add_serve_command

    p = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune, evaluate, export and serve language models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a YAML run config, or on your data with the defaults")
    t.add_argument("config", nargs="?", help="run config (YAML), e.g. examples/quickstart.yaml")
    t.add_argument("--data", help="your training file: without a config, trains with the defaults `tuneforge init` "
                                  "writes; with one, replaces data.train and its validation file")
    t.add_argument("--validation", help="held-out records of the same task (default with --data: split off it)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; dotted keys reach nested ones (data.train=FILE)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in output_dir from its last checkpoint (same config and data)")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("init", help="write a commented run config for your data file, with the defaults")
    i.add_argument("data", help="your training file (.jsonl, .json, .csv, .parquet)")
    i.add_argument("--out", help="config to write (default: <data file name>.yaml in the current folder)")
    i.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    i.add_argument("--method", default="lora", help="the method the config trains (full, lora, qlora, adapter, "
                   "prefix, prompt, ia3), with its settings sections and its learning rate")
    i.set_defaults(func=cmd_init)

    q = sub.add_parser("quickstart", help="curate, train LoRA on the ticket-routing demo, compare base, few-shot, RAG "
                                          "and tuned, check the gates and package (a pipeline run)")
    q.add_argument("--config", default=None, help="run config (default: the quickstart config shipped with tuneforge)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    q.add_argument("--print-config", action="store_true",
                   help="print the config with absolute data paths and exit (> my.yaml, then tuneforge train my.yaml)")
    add_pipeline_args(q)
    q.set_defaults(func=cmd_quickstart)

    for name, helptext in (("generate", "generate one answer with a trained run"), ("chat", "chat with a trained run")):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("run", help="run directory written by `tuneforge train`")
        if name == "generate":
            g.add_argument("--prompt", required=True)
        g.add_argument("--system", default=None, help="system prompt")
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        g.set_defaults(func=cmd_generate if name == "generate" else cmd_chat)

    d = sub.add_parser("data", help="inspect and curate data files")
    dsub = d.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    pv = dsub.add_parser("preview", help="show rendered examples with the trained tokens marked")
    pv.add_argument("file")
    pv.add_argument("-n", type=int, default=3, help="how many examples")
    pv.add_argument("--model", default=DEFAULT_MODEL)
    pv.add_argument("--template", default="auto", help="the chat template, as template: in a run config: auto, "
                    "chatml, llama3, gemma, mistral, phi3, alpaca, base or a .jinja file")
    pv.add_argument("--format", default="auto", choices=("auto",) + SFT_FORMATS)
    pv.add_argument("--columns", nargs="*", default=[], metavar="FIELD=COLUMN")
    pv.add_argument("--train-on", default="assistant", choices=["assistant", "all"])
    pv.add_argument("--system", default=None, help="system prompt to add")
    pv.add_argument("--tools", default=None, metavar="JSON",
                    help="a JSON file of tool definitions for every record (as data.tools)")
    pv.add_argument("--no-color", action="store_true")
    pv.set_defaults(func=cmd_data_preview)
    add_curation_commands(dsub)
    add_generate_command(dsub)
    dsub.choices["stats"].set_defaults(func=cmd_data_stats)     # a run config: its mixture's sources
    d.set_defaults(func=lambda args: (d.print_help(), 2)[1])

    add_merge_command(sub)
    add_package_command(sub)
    add_export_command(sub)
    add_estimate_command(sub)
    add_eval_commands(sub)
    add_serve_command(sub)
    add_pipeline_command(sub)
    pl = sub.add_parser("plan", help="fit a run config to a memory budget (micro-batch, accumulation, "
                                     "checkpointing, QLoRA) with the estimator")
    pl.add_argument("config", help="run config (YAML)")
    pl.add_argument("--memory", help="budget, e.g. 8GB (default: memory_budget, else the GPU's memory or half the RAM)")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--accelerate-config", metavar="FILE",
                    help="dry run of a multi-device launch with this accelerate config: engine, world size, "
                         "per-device micro-batch, global batch and memory per device (no GPU needed)")
    pl.add_argument("--gpu", default=None, help="the time line: hours on this GPU of the peak table (h100, a100, l4, "
                                                "...; default: this machine's GPU, when in the table)")
    pl.add_argument("--mfu", type=float, default=0.20, help="the time line: share of the GPU's peak (default: "
                                                            "%(default)s, see tuneforge estimate --time)")
    pl.add_argument("--price-per-hour", type=float, default=None, help="the time line: the machine's price an hour")
    pl.set_defaults(func=cmd_plan)

    u = sub.add_parser("ui", help="the web studio: data, training, chat, evaluation and shipping in a browser "
                                  "(needs pip install 'tuneforge[ui]')")
    u.add_argument("--runs", default="runs", help="the folder of run directories the studio shows and trains into")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but this machine needs --auth")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="ask for this login (default: the TUNEFORGE_UI_AUTH environment variable; none: no login)")
    u.add_argument("--model", default=None, help="the default base model of the forms and the chat "
                                                 f"(default: {DEFAULT_MODEL})")
    u.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    from tuneforge.data.dataset import DataError
    from tuneforge.errors import ConfigError
    from tuneforge.models.registry import ModelNotFoundError
    from tuneforge.runs import BaseModelMismatch, NotARunError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, DataError, ModelNotFoundError, BaseModelMismatch, NotARunError) as e:
        if args.verbose:
            traceback.print_exc()
        _error(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

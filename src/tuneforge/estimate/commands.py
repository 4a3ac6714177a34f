"""``tuneforge estimate``: the command over :func:`tuneforge.estimate.estimate_memory`."""

from __future__ import annotations

import argparse
import json

from tuneforge.models.registry import DEFAULT_MODEL


def method_settings_from(pairs: list[str]) -> dict[str, dict]:
    """``["adapter.bottleneck=32", "prefix.num_virtual_tokens=10"]`` -> ``{"adapter": {"bottleneck": 32}, ...}``
    (values read as YAML)."""
    import yaml

    from tuneforge.errors import ConfigError

    out: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot and section and name):
            raise ConfigError(f"--set {pair!r}: write SECTION.KEY=VALUE, e.g. adapter.bottleneck=32")
        out.setdefault(section, {})[name] = yaml.safe_load(value)
    return out


def _check_section(section: str, model, values: dict) -> None:
    """One line naming the ``--set`` key that does not fit the method's section (closest valid key for a typo)."""
    import difflib

    from pydantic import ValidationError

    from tuneforge.errors import ConfigError

    try:
        model.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join([section, *(str(p) for p in first["loc"])])
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(first["loc"][-1]), list(model.model_fields), n=1)
            hint = f" (did you mean '{section}.{close[0]}'?)" if close else ""
            raise ConfigError(f"--set: unknown key '{key}'{hint}") from e
        raise ConfigError(f"--set {key}: {first['msg'].removeprefix('Value error, ')} "
                          f"(got {first.get('input')!r})") from e


def cmd_estimate(args: argparse.Namespace) -> int:
    from tuneforge.errors import ConfigError
    from tuneforge.estimate.memory import estimable_methods, estimate_memory, seeds_table
    from tuneforge.estimate.precision import mode_for
    from tuneforge.estimate.shapes import resolve_shape
    from tuneforge.methods.registry import settings_sections

    if args.time:
        return cmd_estimate_time(args)
    if args.seeds_table:
        print(seeds_table(seq=args.seq, batch=args.batch, lora_r=args.lora_r or 16))
        return 0
    settings = method_settings_from(args.set)
    unknown = sorted(set(settings) - set(settings_sections()))
    if unknown:
        raise ConfigError(f"--set {unknown[0]}.*: no method owns a section {unknown[0]!r}; sections: "
                          f"{', '.join(settings_sections())}")
    for section, values in settings.items():
        _check_section(section, settings_sections()[section], values)
    methods = estimable_methods() if args.method == "all" else [args.method]
    precision = args.precision
    if args.master_weights:
        import sys

        print("warning: --master-weights is deprecated: use --precision bf16-mixed (fp32 master weights and optimizer "
              "states, autocast to bf16)", file=sys.stderr)
        if precision == "auto":
            precision = mode_for(args.dtype or "bf16", None, True, args.device)
    if precision == "auto" and args.dtype is None:
        precision = mode_for(None, None, device=args.device)     # what tuneforge train picks on the device
    try:
        shape = resolve_shape(args.model, trust_remote_code=args.trust_remote_code)
        estimates = [estimate_memory(shape, method, args.seq, args.batch,
                                     gradient_checkpointing=args.gradient_checkpointing, lora_r=args.lora_r,
                                     lora_dropout=args.lora_dropout, attention=args.attention, dtype=args.dtype,
                                     trained_fraction=args.trained_fraction,
                                     precision=precision, optimizer=args.optimizer,
                                     optimizer_impl=args.optimizer_impl, device=args.device, settings=settings)
                     for method in methods]
    except ValueError as e:            # an unknown method, one without memory terms, a setting out of range
        message = str(e).splitlines()[0]
        if message.startswith("dtype ") and " with precision " in message:
            message = "--" + message.replace(" with precision ", " with --precision ", 1).replace("(leave dtype unset)",
                                                                                               "(leave --dtype unset)")
        raise ConfigError(message) from e
    if args.json:
        print(json.dumps([{**{name.replace(" ", "_"): value for name, value in e.rows()}, "peak": e.peak,
                           "peak_phase": e.peak_phase,
                           "precision": e.precision, "dtypes": e.dtypes, "method": e.method, "model": e.model,
                           "seq": e.seq, "batch": e.batch, "trainable_params": e.trainable_params,
                           "total_params": e.total_params}
                          for e in estimates], indent=2))
        return 0
    print("\n\n".join(e.table() for e in estimates))
    return 0


def check_price_and_gpu(price_per_hour: float | None, mfu: float, gpu: str | None) -> None:
    """Refuse a negative price, an MFU outside (0, 1] or a GPU the peak table lacks (naming the closest) in one
    line, before anything loads (``estimate --time``, ``plan``)."""
    from tuneforge.errors import ConfigError
    from tuneforge.estimate.flops import gpu_peak

    if price_per_hour is not None and price_per_hour < 0:
        raise ConfigError(f"--price-per-hour {price_per_hour:g}: give a price of 0 or more (per hour of the machine)")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu:g}: give the share of the peak a run reaches, above 0 and at most 1 (e.g. 0.2)")
    if gpu:
        try:
            gpu_peak(gpu)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _check_time_flags(args: argparse.Namespace) -> None:
    """Refuse bad ``--time`` input in one line (before any tokenizer or model loads)."""
    from tuneforge.errors import ConfigError

    check_price_and_gpu(args.price_per_hour, args.mfu, None if args.peak_tflops is not None else args.gpu)
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ConfigError(f"--peak-tflops {args.peak_tflops:g}: give a positive TFLOP/s")
    if args.measure_steps < 2:
        raise ConfigError(f"--measure-steps {args.measure_steps}: at least 2 (the first step is warm-up, left out)")
    if not args.config:
        raise ConfigError("--time: give --config RUN.yaml (the run whose tokens are counted)")


def cmd_estimate_time(args: argparse.Namespace) -> int:
    """``tuneforge estimate --time --config RUN.yaml``: :func:`tuneforge.estimate.timing.estimate_time`."""
    from tuneforge.config import load_config
    from tuneforge.errors import ConfigError
    from tuneforge.estimate.timing import estimate_time

    _check_time_flags(args)
    config = load_config(args.config, args.override)
    try:
        estimate = estimate_time(config, gpu=args.gpu, mfu=args.mfu, peak_tflops=args.peak_tflops,
                                 price_per_hour=args.price_per_hour, measure_steps=args.measure_steps)
    except (ValueError, RuntimeError) as e:       # data that leaves nothing, a task not counted, a failed measure
        raise ConfigError(str(e).splitlines()[0]) from None
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else estimate.table())
    return 0


def add_estimate_command(subparsers) -> argparse.ArgumentParser:
    """Register ``estimate`` on the top-level ``tuneforge`` subparsers; return its parser."""
    e = subparsers.add_parser("estimate",
                              help="predict peak training memory (weights, gradients, optimizer, activations, logits)",
                              description="Predict the peak memory of one training step, by component, without loading "
                                          "the model. --model takes a model spec (its config.json is read) or a named "
                                          "shape: 7b, 13b, 70b (Llama-2), llama-3.2-1b, llama-3.1-8b, smollm2-135m.")
    e.add_argument("--model", default=DEFAULT_MODEL, help="model spec or named shape (default: %(default)s)")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="read the config of a model that ships its own code (its config class runs)")
    e.add_argument("--method", default="lora",
                   help="a fine-tuning method (full, lora, qlora, adapter, prefix, prompt, ia3, or any registered "
                        "one), or all of them (default: %(default)s)")
    e.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a method setting, as in the run config (e.g. adapter.bottleneck=32; repeatable)")
    e.add_argument("--seq", type=int, default=512, help="tokens per example (default: %(default)s)")
    e.add_argument("--batch", type=int, default=1, help="examples packed into one row per step (default: %(default)s)")
    e.add_argument("--gradient-checkpointing", action="store_true")
    e.add_argument("--lora-r", type=int, default=None, help="lora.r (default: the lora section's, 16)")
    e.add_argument("--lora-dropout", type=float, default=None, help="lora.dropout (default: the lora section's, 0.05)")
    e.add_argument("--attention", default="packed_sdpa", choices=["packed_sdpa", "sdpa"],
                   help="packed rows: per-example attention (tuneforge's default) or the dense block mask")
    e.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed"],
                   help="the run's precision: mode (default: auto, what tuneforge train picks: bf16-mixed on a GPU, "
                        "fp32 on a CPU; with --dtype, by the dtype: fp32, bf16-true, fp16-mixed)")
    e.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="the base weights' storage (dtype:), with --precision auto picks the mode as train does")
    e.add_argument("--trained-fraction", type=float, default=1.0,
                   help="share of tokens with a loss, sizes the logits (default: %(default)s; ~0.3 for chat SFT)")
    e.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="sets the runtime overhead, dropout mask size and optimizer default (default: %(default)s)")
    e.add_argument("--master-weights", action="store_true",
                   help="deprecated: use --precision bf16-mixed (fp32 master weights and optimizer states)")
    e.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit"])
    e.add_argument("--optimizer-impl", default=None, choices=["for-loop", "foreach", "fused"],
                   help="default: torch's default for the device (for-loop on cpu, foreach on cuda)")
    e.add_argument("--seeds-table", action="store_true",
                   help="print the Llama-2 7B/13B/70B x every method table with its assumptions")
    e.add_argument("--json", action="store_true", help="print bytes (with --time: tokens, FLOPs, hours) as JSON")
    t = e.add_argument_group("time and cost (--time)")
    t.add_argument("--time", action="store_true",
                   help="predict the run's hours (and cost) instead of its memory: tokens the config trains x the "
                        "method's FLOPs per token / a throughput measured here (a few steps) or a GPU's (--gpu)")
    t.add_argument("--config", help="with --time: the run config (YAML) whose data and steps are counted")
    t.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="with --time: override a key of --config, as train's --set (repeatable)")
    t.add_argument("--gpu", default=None,
                   help="with --time: a GPU of the peak table (h200, h200-nvl, h100, h100-pcie, h100-nvl, a100, "
                        "l40s, l4, a10) instead of measuring on this machine")
    t.add_argument("--mfu", type=float, default=0.20,
                   help="with --gpu: the share of the peak the run reaches (default: %(default)s, tuneforge's LoRA "
                        "step on an H200, benchmarks/results/gpu_profile_2026-12-04.txt)")
    t.add_argument("--peak-tflops", type=float, default=None,
                   help="with --time: a peak of your own (TFLOP/s), for a GPU not in the table")
    t.add_argument("--price-per-hour", type=float, default=None, help="with --time: the machine's price an hour")
    t.add_argument("--measure-steps", type=int, default=6,
                   help="without --gpu: real steps to time on this machine, the first left out (default: %(default)s)")
    e.set_defaults(func=cmd_estimate)
    return e

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
    e.add_argument("--json", action="store_true", help="print bytes as JSON")
    e.set_defaults(func=cmd_estimate)
    return e

"""``tuneforge serve --base MODEL --adapter NAME=PATH ...`` (or ``--config serve.yaml``): a thin CLI over
:class:`~tuneforge.serving.server.Server`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from tuneforge.data.tool_formats import TOOL_CALL_FORMATS

log = logging.getLogger(__name__)


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on an argparse subparsers object; ``args.func(args)`` runs it and returns an exit code."""
    p = subparsers.add_parser(
        "serve", help="serve a base model and many adapters over an OpenAI-compatible API",
        description="One base model in memory, adapters per request (the `model` field), continuous batching. "
                    "Endpoints: /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics, and the "
                    "admin endpoints /v1/load_lora_adapter and /v1/unload_lora_adapter.")
    p.add_argument("--config", metavar="YAML",
                   help="serve config: the flags' keys (base, adapters: {name: path}, ...)")
    p.add_argument("--base", help="base model: built-in name, folder or .gguf (default: the one the adapters' runs "
                                  "and packages record)")
    p.add_argument("--base-name", help="the base model's id in /v1/models (default: --base)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="an adapter to serve as model NAME: a run folder, a package or a peft adapter (repeatable)")
    p.add_argument("--pin", action="append", default=[], metavar="NAME", help="never evict this adapter (repeatable)")
    p.add_argument("--adapter-root", metavar="DIR", help="the only folder admin endpoints may load adapters from")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accepted user key (repeatable; also $TUNEFORGE_API_KEYS, comma-separated)")
    p.add_argument("--admin-key", metavar="KEY", help="admin key (also $TUNEFORGE_ADMIN_KEY); without one admin "
                                                      "endpoints are off")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--lora-kernel", choices=("peft", "stacked"), default=None,
                   help="LoRA rows of different adapters: two batched matmuls per layer over stacked adapter "
                        "weights (default) or peft's adapter_names")
    p.add_argument("--dtype", default=None, help="auto, bf16, fp16, fp32")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, ...")
    for flag, helptext in (("--max-batch", "rows decoded together (32)"),
                           ("--max-loaded-adapters", "adapters in memory at once, LRU evicted (8)"),
                           ("--max-input-tokens", "prompt token limit (4096)"),
                           ("--max-output-tokens", "max_tokens limit (1024)"),
                           ("--max-body-bytes", "request body limit (1 MiB)"),
                           ("--max-concurrent", "requests in flight; more get 429 (256)")):
        p.add_argument(flag, type=int, default=None, help=helptext)
    p.add_argument("--prefix-cache-mb", type=int, default=None, metavar="MIB",
                   help="memory for cached prompt prefixes (system turn, tools, earlier turns), reused by later "
                        "requests that start the same way (1024); 0 turns prefix caching off")
    p.add_argument("--cascade-decode", choices=("on", "off"), default=None,
                   help="rows sharing a cached prompt prefix decode against one copy of it (off, the default: "
                        "slower on CPU in benchmarks/serve_throughput.py --tools)")
    p.add_argument("--guided-decoding", choices=("on", "off"), default=None,
                   help="honour a request's response_format json_object / json_schema by constraining its tokens "
                        "to the schema (on, the default); off: such requests are answered 400")
    p.add_argument("--tool-call-format", choices=("auto", *TOOL_CALL_FORMATS), default=None,
                   help="the format models write tool calls in, parsed into tool_calls and forced by tool_choice "
                        "(auto, the default: detected from each model's chat template)")
    p.add_argument("--graceful-timeout", type=float, default=None, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight requests may run on before they are cut short with "
                        "finish_reason length (60); /health answers 503 meanwhile, then the server exits 0")
    p.set_defaults(func=run_serve_command)
    return p


def serve_config_from_args(args: argparse.Namespace):
    """The :class:`ServeConfig` the flags (over ``--config``, over the environment) describe."""
    from tuneforge.serving.server import ServeConfig

    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {item!r}: write NAME=PATH, e.g. --adapter tickets=runs/quickstart")
        if name in adapters:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    for key in args.api_key:
        if not key.strip():
            raise ValueError("--api-key: an empty key is not a key (it would count as keys configured while no "
                             "request can match it); give a non-empty key, or leave the flag out")
    if args.admin_key is not None and not args.admin_key.strip():
        raise ValueError("--admin-key: an empty key is not a key; give a non-empty key, or leave the flag out to "
                         "turn the admin endpoints off")
    env_keys = [k.strip() for k in os.environ.get("TUNEFORGE_API_KEYS", "").split(",") if k.strip()]
    overrides = {
        "base": args.base, "base_name": args.base_name, "adapter_root": args.adapter_root,
        "admin_key": args.admin_key or os.environ.get("TUNEFORGE_ADMIN_KEY", "").strip() or None,
        "host": args.host, "port": args.port, "dtype": args.dtype, "device": args.device,
        "max_batch": args.max_batch, "max_loaded_adapters": args.max_loaded_adapters,
        "max_input_tokens": args.max_input_tokens, "max_output_tokens": args.max_output_tokens,
        "max_body_bytes": args.max_body_bytes, "max_concurrent": args.max_concurrent, "lora_kernel": args.lora_kernel,
        "graceful_timeout": args.graceful_timeout, "prefix_cache_mb": args.prefix_cache_mb,
        "guided_decoding": None if args.guided_decoding is None else args.guided_decoding == "on",
        "cascade_decode": None if args.cascade_decode is None else args.cascade_decode == "on",
        "tool_call_format": args.tool_call_format,
    }
    if args.config:
        import yaml

        data = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: a serve config is a mapping of keys (base, adapters, ...)")
        data.update({k: v for k, v in overrides.items() if v is not None})
    else:
        data = {k: v for k, v in overrides.items() if v is not None}
    data["adapters"] = {**(data.get("adapters") or {}), **adapters}
    if not data.get("base"):
        data["base"] = base_from_adapters(data["adapters"])
    data["pinned"] = list(dict.fromkeys([*data.get("pinned", []), *args.pin]))
    data["api_keys"] = list(dict.fromkeys([*data.get("api_keys", []), *args.api_key, *env_keys]))
    return ServeConfig.model_validate(data)


def base_from_adapters(adapters: dict[str, str]) -> str:
    """No ``--base``: the base model the adapters' runs and packages record (all the same one, by sha256 where
    recorded, else by name); one line when none is given, one names none, or they disagree."""
    from tuneforge.runs.base_model import recorded_base_model

    if not adapters:
        raise ValueError("--base is required (or --config with a `base:` key, or --adapter NAME=RUN: a run or "
                         "package names its base model)")
    found = {}
    for name, path in adapters.items():
        recorded = recorded_base_model(path) if Path(path).is_dir() else None
        if recorded is None:
            raise ValueError(f"--base is required: adapter {name} ({path}) records no base model (not a tuneforge "
                             "run or package); pass --base MODEL")
        found[name] = recorded
    if len({b.sha256 or b.spec for b in found.values()}) > 1:
        named = ", ".join(f"{n}: {b.spec}" + (f" (sha256 {b.sha256[:12]})" if b.sha256 else "")
                          for n, b in found.items())
        raise ValueError(f"--base is required: the adapters were trained on different base models ({named}); pass "
                         "--base MODEL and serve the others from another server")
    name, first = next(iter(found.items()))
    log.info("base model %s, as adapter %s records (%s)", first.spec, name, first.source)
    return first.spec


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve_command(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / Ctrl-C, drained (0); 2 with one line for a bad flag, config or adapter folder."""
    from pydantic import ValidationError

    from tuneforge.serving.adapters import AdapterLoadError
    from tuneforge.serving.server import Server

    try:
        config = serve_config_from_args(args)
    except ValidationError as e:
        err = e.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        print(f"tuneforge serve: {'.'.join(str(p) for p in err['loc'])}: {message}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"tuneforge serve: {e}", file=sys.stderr)
        return 2
    if not _is_loopback(config.host) and not config.api_keys:
        print(f"tuneforge serve: listening on {config.host} needs --api-key (or $TUNEFORGE_API_KEYS); without keys "
              "serve on 127.0.0.1 only", file=sys.stderr)
        return 2
    try:
        server = Server(config)
    except (AdapterLoadError, ValueError) as e:
        print(f"tuneforge serve: {e}", file=sys.stderr)
        return 2
    server.run()
    return 0

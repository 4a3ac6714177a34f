"""Serving throughput, side by side on one base model and one set of prompts (loopback only).

Configurations (issue 16):

* (a) ``tuneforge serve`` with 8 LoRA adapters, each request naming one of them (mixed batches);
* (b) the naive multi-adapter server S-LoRA and Punica compare against: one request at a time, the adapter
  switched with peft's ``set_adapter`` before ``generate`` (built here, same HTTP API);
* (c) ``tuneforge serve`` with one adapter, every request naming it;
* (d) ``transformers serve --continuous-batching`` on the base model (transformers' own server); when it cannot
  run here the table says why;
* (e) ``tuneforge serve`` on the base model alone (the row to hold against (d));
* (f) as (a) with ``lora_kernel: stacked`` (two batched matmuls per layer instead of peft's per-adapter loop);
* (g) with ``--guided``: as (e), every request with ``response_format`` ``json_schema`` (:data:`GUIDED_SCHEMA`, a
  ticket triage object): the cost of guided decoding, (g)/(e) in tokens/s (issue 26's target: >= 0.9x).
* (t) with ``--tools``: as (e), every request with ``tools`` (:data:`BENCH_TOOLS`, three functions; ``tool_choice``
  auto): the cost of tools in every request (rendered into the prompt, the answer parsed), (t)/(e) in tokens/s
  (issue 26's target: >= 0.9x). The tools block is the same in every request: the prefix cache holds it (the
  warm-up pass fills it, as a running server's earlier requests would);
* (k) with ``--tools``: as (t) with cascade decode on (rows share one copy of the tools prefix in decode).
* (u) with ``--tools``: as (t) with the prefix cache off (``prefix_cache_mb: 0``): what the cache saves.

Every configuration gets the same ``--requests`` chat requests from ``--concurrency`` clients (the official
``openai`` async client), greedy, ``--max-tokens`` each (``ignore_eos`` where the server takes it; the table
counts the tokens the servers report). Targets with 32 clients: (a) >= 4x (b) in tokens/s, (a) >= 0.8x (c),
(e) >= (d).

    python benchmarks/serve_throughput.py                          # SmolLM2-135M, 8 LoRA r=16 adapters
    python benchmarks/serve_throughput.py --model tiny --requests 16 --concurrency 4 --max-tokens 8   # smoke
    python benchmarks/serve_throughput.py --configs e --guided     # guided decoding against free decoding
    python benchmarks/serve_throughput.py --configs e --tools      # tools in every request against none

Adapters are random LoRA weights (r=16, all linear layers): throughput does not depend on what they learned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from fastapi import Request  # module level: FastAPI resolves the handler's annotation here

PROMPTS = [
    "I was charged twice for my subscription this month.",
    "Where is my parcel? It has been ten days.",
    "The app crashes when I open settings.",
    "Please add a dark mode.",
    "I cannot log in after resetting my password.",
    "I want my money back for the broken blender.",
    "Write a short poem about the sea.",
    "Explain what a KV cache is in one paragraph.",
]


def make_adapters(base: str, out: Path, n: int, rank: int) -> dict[str, str]:
    """``n`` LoRA adapters with random (non-zero) weights on ``base``, saved under ``out``."""
    from peft import LoraConfig, get_peft_model

    from tuneforge.models.loading import load_model

    folders = {}
    for i in range(n):
        model = load_model(base)
        torch.manual_seed(100 + i)
        peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                init_lora_weights=False))
        folder = out / f"adapter-{i}"
        peft.save_pretrained(folder)
        folders[f"adapter-{i}"] = str(folder)
    return folders


def tiny_model(out: Path) -> str:
    from tuneforge.models.loading import build_tiny_model, load_tokenizer

    build_tiny_model().save_pretrained(out)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(out)
    return str(out)


GUIDED_SCHEMA = {"type": "object", "additionalProperties": False,
                 "required": ["category", "urgency", "summary", "steps"],
                 "properties": {"category": {"enum": ["billing", "shipping", "bug", "feature", "account", "other"]},
                                "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
                                "summary": {"type": "string"},
                                "steps": {"type": "array", "items": {"type": "string"}}}}


# ------------------------------------------------------------------------------------------- load generator
async def _drive(url: str, models: list[str], args: argparse.Namespace, extra: dict) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=args.api_key, max_retries=0, timeout=3600)
    jobs = asyncio.Queue()
    for i in range(args.requests):
        jobs.put_nowait(i)
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    failures: list[str] = []

    async def worker() -> None:
        nonlocal tokens
        while True:
            try:
                i = jobs.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            first = None
            try:
                stream = await client.chat.completions.create(
                    model=models[i % len(models)], messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    max_tokens=args.max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
                    extra_body=extra)
                n = 0
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t0
                    if chunk.usage is not None:
                        n = chunk.usage.completion_tokens
                tokens += n
                latencies.append(time.perf_counter() - t0)
                ttfts.append(first if first is not None else latencies[-1])
            except Exception as e:
                failures.append(f"{type(e).__name__}: {str(e)[:200]}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {"requests": len(latencies), "failures": len(failures), "first_failure": failures[0] if failures else None,
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else 0.0,
            "p50_s": statistics.median(latencies) if latencies else None, "p95_s": q[18] if latencies else None,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None}


def drive(url: str, models: list[str], args: argparse.Namespace, extra: dict | None = None) -> dict:
    return asyncio.run(_drive(url, models, args, extra or {}))


# ----------------------------------------------------------------------------------------- configurations

def run_ours(args: argparse.Namespace, adapters: dict[str, str], models: list[str], lora_kernel: str = "peft",
             extra: dict | None = None, prefix_cache_mb: int = 1024, cascade: bool = False) -> dict:
    from tuneforge.serving.server import ServeConfig, Server, ServerThread

    config = ServeConfig(base=args.base, base_name="base", adapters=adapters, max_batch=args.max_batch,
                         max_loaded_adapters=max(1, len(adapters)), max_output_tokens=max(1024, args.max_tokens),
                         api_keys=[args.api_key], device=args.device, lora_kernel=lora_kernel,
                         prefix_cache_mb=prefix_cache_mb, cascade_decode=cascade)
    server = Server(config)
    with ServerThread(server.app) as thread:
        drive(thread.url, models, _warmup(args), extra)
        result = drive(thread.url, models, args, {"ignore_eos": True, **(extra or {})})
    server.shutdown()
    result["largest_batch"] = server.engine.max_rows_seen
    return result


def run_naive(args: argparse.Namespace, adapters: dict[str, str]) -> dict:
    """One request at a time on a peft model holding every adapter, ``set_adapter`` before each ``generate``."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from peft import PeftModel

    from tuneforge.data.rendering import prompt_ids
    from tuneforge.models.dtype import pick_device, pick_dtype
    from tuneforge.models.loading import load_model, load_tokenizer
    from tuneforge.serving.server import ServerThread

    tok = load_tokenizer(args.base)
    names = list(adapters)
    device = pick_device(args.device)
    dtype, _ = pick_dtype("auto", device)            # what `tuneforge serve` picks
    model = PeftModel.from_pretrained(load_model(args.base, dtype=dtype, device=device), adapters[names[0]],
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    lock = threading.Lock()
    app = FastAPI()

    def generate(body: dict) -> int:
        ids = torch.tensor([prompt_ids(tok, body["messages"])], device=model.device)
        with lock, torch.no_grad():
            model.set_adapter(body["model"])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=body["max_tokens"],
                                 min_new_tokens=body["max_tokens"], do_sample=False, pad_token_id=tok.pad_token_id)
        return int(out.shape[1] - ids.shape[1])

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        n = await asyncio.get_running_loop().run_in_executor(None, generate, body)

        async def events():
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "length"}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}}
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    with ServerThread(app) as thread:
        drive(thread.url, names, _warmup(args))
        return drive(thread.url, names, args)


def run_transformers_serve(args: argparse.Namespace) -> dict:
    """``transformers serve --continuous-batching BASE`` in a subprocess; ``{"skipped": why}`` when it cannot run."""
    exe = shutil.which("transformers")
    if exe is None:
        return {"skipped": "the `transformers` CLI is not on PATH"}
    from tuneforge.models.registry import resolve_model

    path = str(resolve_model(args.base))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([exe, "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
                             "--device", args.device if args.device != "auto" else "auto", path],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + args.startup_timeout
        while True:
            if proc.poll() is not None:
                return {"skipped": f"`transformers serve` exited with {proc.returncode}: {_tail(log.name)}"}
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                return {"skipped": f"`transformers serve` did not answer /health in {args.startup_timeout} s: "
                                   f"{_tail(log.name)}"}
            time.sleep(0.5)
        warm = drive(url, [path], _warmup(args))
        if warm["failures"]:
            return {"skipped": f"`transformers serve` failed the warm-up: {warm['first_failure']}"}
        return drive(url, [path], args)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _tail(path: str, n: int = 300) -> str:
    text = Path(path).read_text(errors="replace").strip().replace("\n", " | ")
    return text[-n:] or "(no output)"


def _warmup(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "requests": min(args.concurrency, args.requests), "max_tokens": 2})


# ------------------------------------------------------------------------------------------------- main

BENCH_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "refund_order", "description": "Refund an order",
                                      "parameters": {"type": "object", "properties": {
                                          "order_id": {"type": "string"}, "reason": {"type": "string"}},
                                          "required": ["order_id"]}}},
    {"type": "function", "function": {"name": "search_docs", "description": "Search the help centre",
                                      "parameters": {"type": "object", "properties": {
                                          "query": {"type": "string"}}, "required": ["query"]}}},
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="base model, or `tiny` for a smoke run")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--configs", default="a,b,c,d,e,f", help="which configurations to run (comma-separated)")
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--guided", action="store_true", help="also (g): (e) with response_format json_schema on every "
                                                          "request (guided decoding), and (e) for comparison")
    p.add_argument("--tools", action="store_true", help="also (t): (e) with tools on every request (tool_choice "
                                                         "auto), and (e) for comparison")
    args = p.parse_args(argv)
    args.api_key = "bench"
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    args.base = tiny_model(work / "tiny") if args.model == "tiny" else args.model
    wanted = (set(args.configs.split(",")) | ({"e", "g"} if args.guided else set())
              | ({"e", "t", "k", "u"} if args.tools else set()))
    print(f"base {args.model}, {args.adapters} adapters (LoRA r={args.rank}), {args.requests} requests from "
          f"{args.concurrency} clients, {args.max_tokens} tokens each", flush=True)
    adapters = make_adapters(args.base, work / "adapters", args.adapters, args.rank)
    one = dict(list(adapters.items())[:1])
    runs = {
        "a": (f"(a) tuneforge, {args.adapters} adapters mixed", lambda: run_ours(args, adapters, list(adapters))),
        "b": ("(b) naive: one at a time, set_adapter", lambda: run_naive(args, adapters)),
        "c": ("(c) tuneforge, 1 adapter", lambda: run_ours(args, one, list(one))),
        "d": ("(d) transformers serve (base, CB)", lambda: run_transformers_serve(args)),
        "e": ("(e) tuneforge, base model", lambda: run_ours(args, {}, ["base"])),
        "f": (f"(f) tuneforge, {args.adapters} adapters mixed, stacked LoRA kernel",
              lambda: run_ours(args, adapters, list(adapters), "stacked")),
        "g": ("(g) tuneforge, base model, response_format json_schema (guided)",
              lambda: run_ours(args, {}, ["base"], extra={"response_format": {
                  "type": "json_schema", "json_schema": {"name": "triage", "schema": GUIDED_SCHEMA}}})),
        "t": ("(t) tuneforge, base model, tools on every request (tool_choice auto)",
              lambda: run_ours(args, {}, ["base"], extra={"tools": BENCH_TOOLS})),
        "k": ("(k) as (t), cascade decode on",
              lambda: run_ours(args, {}, ["base"], extra={"tools": BENCH_TOOLS}, cascade=True)),
        "u": ("(u) as (t), prefix cache off",
              lambda: run_ours(args, {}, ["base"], extra={"tools": BENCH_TOOLS}, prefix_cache_mb=0)),
    }
    results = {}
    for key, (label, fn) in runs.items():
        if key in wanted:
            print(f"running {label} ...", flush=True)
            results[key] = {"label": label, **fn()}
    print("\n| configuration | tokens/s | p50 latency s | p95 latency s | TTFT p50 s | requests ok | failed |")
    print("|---|---|---|---|---|---|---|")
    for r in results.values():
        if "skipped" in r:
            print(f"| {r['label']} | not run: {r['skipped']} | | | | | |")
            continue
        if not r["requests"]:
            print(f"| {r['label']} | every request failed: {r['first_failure']} | | | | 0 | {r['failures']} |")
            continue
        print(f"| {r['label']} | {r['tokens_per_s']:.1f} | {r['p50_s']:.3f} | {r['p95_s']:.3f} | "
              f"{r['ttft_p50_s']:.3f} | {r['requests']} | {r['failures']} |")

    def ratio(x: str, y: str) -> str:
        rx, ry = results.get(x), results.get(y)
        if not rx or not ry or "skipped" in rx or "skipped" in ry or not ry["tokens_per_s"]:
            return "n/a"
        return f"{rx['tokens_per_s'] / ry['tokens_per_s']:.2f}x"
    print(f"\n(a)/(b) = {ratio('a', 'b')} (target >= 4x); (a)/(c) = {ratio('a', 'c')} (target >= 0.8x); "
          f"(e)/(d) = {ratio('e', 'd')} (target >= 1x); (f)/(b) = {ratio('f', 'b')}, (f)/(c) = {ratio('f', 'c')}"
          + (f"; guided (g)/(e) = {ratio('g', 'e')} (target >= 0.9x)" if "g" in results else "")
          + (f"; tools (t)/(e) = {ratio('t', 'e')} (target >= 0.9x), cascade decode on (k)/(e) = "
             f"{ratio('k', 'e')}, without the prefix cache (u)/(e) = {ratio('u', 'e')}" if "t" in results else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

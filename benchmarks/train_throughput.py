"""Training throughput of tuneforge against the seeds' recipe, TRL and LLaMA-Factory, on the same machine.

    python benchmarks/train_throughput.py                        # 6 steps of 4 examples, max length 512
    python benchmarks/train_throughput.py --json bench.json      # also write the table as JSON
    python benchmarks/train_throughput.py --recipes seeds tuneforge --steps 4
    python benchmarks/train_throughput.py --sweep                # max length 512 -> 4096, seeds vs tuneforge
    python benchmarks/train_throughput.py --time-to-quality      # quickstart accuracy vs wall time, TRL vs tuneforge
    python benchmarks/train_throughput.py --random-init-shape llama-3.2-1b   # a real shape, random weights (GPU)
    python benchmarks/train_throughput.py --device cuda --peak-tflops 989.5  # MFU against a given peak
    bash benchmarks/gpu_check.sh                                  # the whole GPU check (install, tests, benches)
    python benchmarks/train_throughput.py --model gemma3-270m --recipes trl llamafactory tuneforge   # a base model

Same model (``--model``, default SmolLM2-135M-Instruct), same conversations (``--data``, default GPTeacher
role-play: Alpaca records rendered with the model's chat template), same LoRA (r=16, alpha=32, dropout
0.05, all linear layers), same chat template (``--template``: tuneforge's values; default ``auto``, or ``gemma``
for a Gemma base model such as gemma3-270m; LLaMA-Factory uses its own template of the same turns, see
``benchmarks/throughput/templates.py``; the rendered tokens are checked across recipes), same max length,
same optimizer steps, ``--batch`` examples per step (TRL and LLaMA-Factory's packing fill ``batch`` bins of
``max_length`` tokens instead: see the ex/step column).
Each recipe runs in a fresh process, one after another, with ``--threads`` threads. TRL and
LLaMA-Factory run from their own cached virtual environments (``benchmarks/throughput/venvs.py``).
Definitions of every column are in ``benchmarks/throughput/measure.py``; FLOPs per token, the peak and MFU in
``benchmarks/throughput/flops.py``. On a GPU (``--device cuda``) every recipe loads the weights in bf16 and
trains with bf16 autocast (TRL and LLaMA-Factory: ``bf16=True``), peak memory is the child's
``torch.cuda.max_memory_allocated``, and TRL also runs with Liger (``trl-liger``: ``use_liger_kernel=True``) where
``liger-kernel`` is in its environment.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "throughput"))
sys.path.insert(0, str(Path(__file__).parent))

from throughput import flops, harness, measure, templates, venvs  # noqa: E402

from tuneforge.errors import ConfigError  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpteacher_roleplay.json"
ALL_RECIPES = ("seeds", "trl", "llamafactory", "tuneforge")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or local HF folder")
    p.add_argument("--random-init-shape", help="random weights of a named shape (llama-3.2-1b, 7b, ...)")
    p.add_argument("--template", default=None,
                   help="chat template for every recipe: auto, a tuneforge built-in (gemma, chatml, ...) or a .jinja "
                        "file (default: auto when the tokenizer has one, gemma for a Gemma base model)")
    p.add_argument("--lf-template", default=None,
                   help="LLaMA-Factory's template name (default: gemma3 for --template gemma on Gemma 3, smollm2 for "
                        "SmolLM2 with auto; see benchmarks/throughput/templates.py)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="JSON array / JSONL of Alpaca or messages records")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (the first is reported apart)")
    p.add_argument("--batch", type=int, default=4, help="examples per step")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", nargs="+", choices=ALL_RECIPES, default=list(ALL_RECIPES))
    p.add_argument("--with-llamafactory", action=argparse.BooleanOptionalAction, default=True,
                   help="build LLaMA-Factory's venv and run it (default on; its row says why when it cannot)")
    p.add_argument("--trl-defaults", action="store_true", help="also run TRL with its own defaults (bf16, checkpointing)")
    p.add_argument("--llamafactory-defaults", action="store_true",
                   help="also run LLaMA-Factory with its default gradient checkpointing on (and tuneforge with it)")
    p.add_argument("--trl-mode", choices=["packing", "padding-free", "both"], default="packing",
                   help="TRL with its default BFD packing, padding-free without packing (batch examples per row, "
                        "like tuneforge: the pair for comparing loss curves), or both")
    p.add_argument("--rebuild-venvs", action="store_true")
    p.add_argument("--build-venvs", action=argparse.BooleanOptionalAction, default=True,
                   help="build a competitor's venv when it is not ready (--no-build-venvs: its row says skipped)")
    p.add_argument("--trl-python", help="run TRL with this interpreter (its environment as it is) instead of a venv")
    p.add_argument("--llamafactory-python", help="run LLaMA-Factory with this interpreter instead of a venv")
    p.add_argument("--trl-liger", action=argparse.BooleanOptionalAction, default=None,
                   help="also run TRL with use_liger_kernel=True (default: on with --device cuda)")
    p.add_argument("--tuneforge-set", action="append", default=[], metavar="KEY=VALUE",
                   help="set a key of tuneforge's run config (YAML value; dotted keys nest), e.g. precision=bf16-mixed")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s that MFU divides by (default: the GPU's dense bf16 datasheet rate, see "
                        "benchmarks/throughput/flops.py; on a CPU or an unknown GPU the matmul rate measured here)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the whole suite N times (recipes alternate) and keep each recipe's median run: "
                        "on a shared machine, load then biases no recipe more than another")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per recipe run")
    p.add_argument("--work-dir", help="where runs write (default: a temporary folder)")
    p.add_argument("--json", help="write the table (one object per recipe) to this file")
    p.add_argument("--sweep", action="store_true", help="max length 512 -> 4096 on synthetic long examples")
    p.add_argument("--sweep-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--sweep-steps", type=int, default=3)
    p.add_argument("--sweep-recipes", nargs="+", choices=ALL_RECIPES, default=["seeds", "tuneforge"])
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="skip sweep points tuneforge's estimator puts above this (default: 85%% of RAM on CPU)")
    p.add_argument("--time-to-quality", action="store_true", help="quickstart accuracy vs wall time, tuneforge vs TRL")
    p.add_argument("--ttq-steps", type=int, nargs="+", default=[10, 30, 90],
                   help="tuneforge training lengths (optimizer steps) whose wall time and accuracy are measured")
    p.add_argument("--ttq-trl-steps", type=int, nargs="+", default=[3, 8, 24],
                   help="TRL training lengths (its steps hold ~4x the tickets: 4 bins of 256 tokens)")
    p.add_argument("--ttq-lf-steps", type=int, nargs="+", default=[10, 30, 90],
                   help="LLaMA-Factory training lengths (4 tickets a step, like tuneforge)")
    p.add_argument("--ttq-test-examples", type=int, default=None, help="score only the first N test tickets")
    p.add_argument("--ttq-budgets", type=float, nargs="+", default=[60, 120, 300, 600, 1200],
                   help="training-time budgets (s) of the accuracy-at-budget table")
    return p.parse_args(argv)


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def base_spec(args, model: Path, device: str) -> dict:
    return {"model": str(model), "max_length": args.max_length, "steps": args.steps, "batch": args.batch,
            "lr": args.lr, "lora": {"r": 16, "alpha": 32, "dropout": 0.05}, "threads": args.threads,
            "device": device, "dtype": "bf16" if device.startswith("cuda") else "fp32", "seed": args.seed,
            "options": {}}


def tuneforge_overrides(pairs: list[str]) -> dict:
    """``--tuneforge-set KEY=VALUE`` pairs as ``{key: YAML-parsed value}``; a pair without ``=``: exit 2."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--tuneforge-set: {pair!r} is not KEY=VALUE (e.g. precision=bf16-mixed)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def liger_wanted(args, device: str) -> bool:
    return device.startswith("cuda") if args.trl_liger is None else args.trl_liger


def _external_python(python: str, module: str) -> tuple[str | None, str]:
    """An interpreter given on the command line, if it can import ``module`` (else None and why)."""
    import shutil
    import subprocess

    path = shutil.which(python) or python
    code = ("import importlib.metadata as m, json\nout = {}\nfor d in ('torch', %r, 'transformers', 'peft', "
            "'liger-kernel'):\n    try: out[d] = m.version(d)\n    except m.PackageNotFoundError: pass\n"
            "import %s\nprint(json.dumps(out))") % (module, module)
    proc = subprocess.run([path, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, (f"skipped: {module} cannot be imported by {python} (offline: carry its wheels, "
                      f"benchmarks/gpu_wheels.sh)")
    return path, ", ".join(f"{k} {v}" for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items())


def interpreters(recipes, args, log=print) -> dict[str, tuple[str | None, str]]:
    """``recipe -> (python, versions or reason)``; competitors get their own venvs (built once)."""
    out: dict[str, tuple[str | None, str]] = {}
    for recipe in recipes:
        if recipe in ("seeds", "tuneforge"):
            out[recipe] = (sys.executable, ", ".join(f"{k} {v}" for k, v in measure.versions_of(
                "torch", "transformers", "peft").items()))
        elif recipe == "llamafactory" and not args.with_llamafactory:
            out[recipe] = (None, "disabled by --no-with-llamafactory")
        elif (recipe == "trl" and args.trl_python) or (recipe == "llamafactory" and args.llamafactory_python):
            given = args.trl_python if recipe == "trl" else args.llamafactory_python
            out[recipe] = _external_python(given, "trl" if recipe == "trl" else "llamafactory")
        else:
            spec = venvs.TRL if recipe == "trl" else venvs.LLAMAFACTORY
            if recipe == "trl" and getattr(args, "device_resolved", "cpu").startswith("cuda"):
                spec = venvs.TRL_GPU     # with liger-kernel
            if not args.build_venvs and not venvs.ready(spec):
                out[recipe] = (None, f"skipped: no ready {spec.name} venv in {venvs.venv_root()} and "
                                     "--no-build-venvs")
                continue
            python, info = venvs.ensure_venv(spec, force=args.rebuild_venvs, log=log)
            out[recipe] = (str(python) if python else None, info)
    return out


def run_suite(args, specs: list[tuple[str, dict]], work: Path, pythons: dict, peak_gflops: float,
              fpt: dict | None = None) -> list[dict]:
    """Run ``(recipe, spec)`` pairs one after another; return summarised rows (or error rows). ``fpt``: FLOPs
    per real token by convention (``lora``, ``6n``; ``flops.py``), the same for every recipe."""
    rows = []
    fpt = fpt or {}
    for i, (label, spec) in enumerate(specs):
        recipe = spec["recipe"]
        python, info = pythons[recipe]
        if python is None:
            rows.append({"recipe": label, "error": info})
            continue
        if spec.get("options", {}).get("liger"):
            reason = liger_unavailable(spec["device"], info)
            if reason:
                rows.append({"recipe": label, "error": reason})
                continue
        print(f"[{time.strftime('%H:%M:%S')}] {label}: running (load average {harness.load_average()})", flush=True)
        result = harness.run_recipe(recipe, python, spec, work / f"{i:02d}-{label}", args.timeout)
        if "error" in result:
            print(f"  {label}: {result['error']}", flush=True)
            rows.append({"recipe": label, "error": result["error"]})
            continue
        row = measure.summarize(result, peak_gflops, fpt.get("lora"), fpt.get("6n"))
        row.update(recipe=label, versions_text=info, load_average_after=harness.load_average(),
                   child_wall_s=result["child_wall_s"], max_length=spec["max_length"], batch=spec["batch"])
        print(f"  {label}: {row['real_tok_s']:.0f} real tok/s, {row['s_per_step']:.2f} s/step, "
              f"peak {row['peak_mem_mib']:.0f} MiB, MFU {row['mfu']:.2%}, loss {row['loss_last']}", flush=True)
        rows.append(row)
    return rows


def liger_unavailable(device: str, info: str) -> str | None:
    """Why TRL + Liger cannot run (None: it can): Liger's kernels are Triton, CUDA only."""
    if not device.startswith("cuda"):
        return "skipped: Liger's kernels run on CUDA only"
    if "liger-kernel" not in info:
        return "skipped: liger-kernel is not installed in TRL's environment"
    return None


def throughput_specs(args, base: dict) -> list[tuple[str, dict]]:
    specs = []
    for recipe in args.recipes:
        if recipe != "trl" or args.trl_mode != "padding-free":
            specs.append((recipe, dict(base, recipe=recipe)))
        if recipe == "trl" and liger_wanted(args, base["device"]):
            specs.append(("trl-liger", dict(base, recipe="trl", options={"liger": True})))
        if recipe == "trl" and args.trl_mode != "packing":
            specs.append(("trl-padding-free", dict(base, recipe="trl", options={"packing": "padding_free"})))
        if recipe == "llamafactory":
            specs.append(("llamafactory-neat", dict(base, recipe="llamafactory", options={"neat_packing": True})))
            if args.llamafactory_defaults:
                specs.append(("llamafactory-defaults", dict(base, recipe="llamafactory", options={"lf_defaults": True})))
        if recipe == "tuneforge" and args.llamafactory_defaults:    # the same memory saving, for a fair pair
            specs.append(("tuneforge-ckpt", dict(base, recipe="tuneforge", options={"gradient_checkpointing": True})))
        if recipe == "trl" and args.trl_defaults:
            specs.append(("trl-defaults", dict(base, recipe="trl", options={"trl_defaults": True})))
    return specs


def sweep(args, base: dict, conversations, work: Path, pythons, peak_gflops) -> list[dict]:
    """Seeds vs tuneforge (by default) at growing max lengths, every example exactly ``max_length`` tokens."""
    from transformers import AutoTokenizer

    from tuneforge.estimate import estimate_memory, resolve_shape

    tokenizer = AutoTokenizer.from_pretrained(base["model"])
    shape = resolve_shape(base["model"])
    limit = args.memory_limit_gib or 0.85 * _ram_gib()
    rows = []
    for length in args.sweep_lengths:
        long = harness.synthetic_long(conversations, tokenizer, length, args.sweep_steps * args.batch, args.seed)
        files = harness.write_data(long, work / f"sweep-{length}" / "data")
        spec = dict(base, **files, max_length=length, steps=args.sweep_steps)
        device = "cuda" if spec["device"].startswith("cuda") else "cpu"
        run, predicted = [], {}
        for recipe in args.sweep_recipes:
            # upper bounds: every token trained, LM head on all of them. tuneforge packs the examples into
            # one row; the others run one row per example with peft's dropout (and TRL/LLaMA-Factory may
            # pack, which only adds the mask: not modelled, so their bound is looser)
            packed = recipe == "tuneforge"
            est = estimate_memory(shape, "lora", length if packed else length * args.batch, args.batch if packed else 1,
                                  dtype=spec["dtype"], trained_fraction=1.0, fused_forward=packed, device=device)
            predicted[recipe] = est.peak / 2 ** 30
            label = f"{recipe}@{length}"
            if predicted[recipe] <= limit:
                run.append((label, dict(spec, recipe=recipe)))
                continue
            rows.append({"recipe": label, "max_length": length, "error":
                         f"skipped: estimator predicts {predicted[recipe]:.1f} GiB > limit {limit:.1f} GiB"})
            if packed:   # what tuneforge does about it: gradient checkpointing
                ckpt = estimate_memory(shape, "lora", length, args.batch, dtype=spec["dtype"], trained_fraction=1.0,
                                       gradient_checkpointing=True, device=device).peak / 2 ** 30
                if ckpt <= limit:
                    predicted["tuneforge-ckpt"] = ckpt
                    run.append((f"tuneforge-ckpt@{length}",
                                dict(spec, recipe=recipe, options={"gradient_checkpointing": True})))
        fpt = {c: flops.flops_per_token(shape, length, c) for c in flops.FORMULAS}   # every example `length` long
        for row in run_suite(args, run, work / f"sweep-{length}", pythons, peak_gflops, fpt):
            row["max_length"] = length
            row["predicted_peak_gib"] = round(predicted[row["recipe"].split("@")[0]], 2)
            rows.append(row)
    return rows


def median_row(runs: list[dict]) -> dict:
    """The run with the median real tokens/s of one recipe's repeats (all throughputs kept in ``repeats``)."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["real_tok_s"])
    if not ok:
        return runs[0]
    row = dict(ok[(len(ok) - 1) // 2])
    row["repeats_real_tok_s"] = [r["real_tok_s"] for r in ok]
    return row


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2 ** 20
    return 16.0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="tuneforge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    args.device_resolved = device
    overrides = tuneforge_overrides(args.tuneforge_set)   # a bad pair: exit 2 before any weights
    model = harness.model_folder(args.model, args.random_init_shape, device)
    template = templates.resolve(model, args.template, args.lf_template)   # bad --template: exit 2 here
    conversations = harness.load_conversations(args.data)
    base = dict(base_spec(args, model, device), template=template)
    if overrides:
        base["tuneforge_config"] = overrides
    print(f"template {base['template']['name']} ({base['template']['source']}, sha256 "
          f"{str(base['template']['sha256'])[:12]}); LLaMA-Factory: {base['template']['lf_template']}")
    if args.time_to_quality:
        from throughput import time_to_quality

        return time_to_quality.main(args, base, work)

    import torch

    recipes = args.sweep_recipes if args.sweep else args.recipes
    pythons = interpreters(recipes, args)
    measure.set_threads(args.threads)
    measured = measure.matmul_peak_gflops(device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else None
    peak, peak_source = flops.choose_peak(device, gpu, args.peak_tflops, measured)
    from tuneforge.estimate.shapes import resolve_shape

    shape = resolve_shape(str(model))
    header = {"device": device, "threads": args.threads, "model": str(model), "matmul_peak_gflops": round(measured, 1),
              "gpu": gpu, "peak_gflops": round(peak, 1), "peak_source": peak_source,
              "mfu_formulas": dict(flops.FORMULAS), "matmul_params": flops.matmul_params(shape),
              "layers": shape.num_layers, "attn_width": shape.q_width,
              "random_init_shape": args.random_init_shape, "tuneforge_config": overrides,
              "load_average_before": harness.load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "max_length": args.max_length, "steps": args.steps, "batch": args.batch,
              "versions": {r: info for r, (_, info) in pythons.items()},
              "template": {k: v for k, v in base["template"].items() if k != "text"}}
    print(f"device {device}{f' ({gpu})' if gpu else ''}, {args.threads} threads, matmul measured {measured:.1f} "
          f"GFLOP/s ({'bf16' if device.startswith('cuda') else 'fp32'}), MFU peak {peak:.1f} GFLOP/s: {peak_source}; "
          f"load average {header['load_average_before']}")
    if args.sweep:
        rows = sweep(args, base, conversations, work, pythons, peak)
    else:
        subset = harness.bench_subset(conversations, args.steps * args.batch, args.seed)
        files = harness.write_data(subset, work / "data")
        header["rendered_reference"] = templates.reference_rendering(model, base["template"]["text"], subset,
                                                                     args.max_length)
        span = header["rendered_reference"]["attention_span"]
        fpt = {c: flops.flops_per_token(shape, span, c) for c in flops.FORMULAS}
        header.update(attention_span=span, flops_per_token=fpt)
        specs = throughput_specs(args, dict(base, **files))
        rounds = [run_suite(args, specs, work / f"round-{r}", pythons, peak, fpt) for r in range(args.repeat)]
        rows = [median_row([rnd[i] for rnd in rounds]) for i in range(len(specs))]
    header["load_average_after"] = harness.load_average()
    print()
    print(f"model {model.name}, max length {args.max_length if not args.sweep else 'sweep'}, "
          f"{args.steps if not args.sweep else args.sweep_steps} steps x {args.batch} examples, {device}, "
          f"{args.threads} threads, load average {header['load_average_before']} -> {header['load_average_after']}")
    print(f"MFU: real tok/s x FLOPs per token / {peak / 1e3:.1f} TFLOP/s ({peak_source}); FLOPs per token: "
          f"{flops.FORMULAS['lora']}; MFU 6N: {flops.FORMULAS['6n']}"
          + (f"; S = {header['attention_span']:.0f}" if not args.sweep else "; S = max length"))
    print(harness.markdown_table(rows))
    for line in harness.ratios(rows) if not args.sweep else []:
        print(line)
    for line in templates.check_lines(rows, header["rendered_reference"]) if not args.sweep else []:
        print(line)
    for recipe, (_, info) in pythons.items():
        print(f"  {recipe}: {info}")
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": header, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
        if not args.sweep:
            plot = Path(args.json).with_suffix(".loss.png")
            harness.plot_loss_curves(rows, plot, f"{model.name}, {args.batch} examples/step, max length {args.max_length}")
            print(f"wrote {plot}")
    return 0 if all("error" not in r or r["error"].startswith(("skipped", "disabled")) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput of tuneforge against the seeds' recipe, TRL and LLaMA-Factory, on the same machine.

    python benchmarks/train_throughput.py                        # 6 steps of 4 examples, max length 512
    python benchmarks/train_throughput.py --json bench.json      # also write the table as JSON
    python benchmarks/train_throughput.py --recipes seeds tuneforge --steps 4
    python benchmarks/train_throughput.py --sweep                # max length 512 -> 4096, seeds vs tuneforge
    python benchmarks/train_throughput.py --time-to-quality      # quickstart accuracy vs wall time, TRL vs tuneforge
    python benchmarks/train_throughput.py --random-init-shape llama-3.2-1b   # a real shape, random weights (GPU)
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
Definitions of every column (and the MFU convention) are in ``benchmarks/throughput/measure.py``.
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

from throughput import harness, measure, templates, venvs  # noqa: E402

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


def interpreters(recipes, args, log=print) -> dict[str, tuple[str | None, str]]:
    """``recipe -> (python, versions or reason)``; competitors get their own venvs (built once)."""
    out: dict[str, tuple[str | None, str]] = {}
    for recipe in recipes:
        if recipe in ("seeds", "tuneforge"):
            out[recipe] = (sys.executable, ", ".join(f"{k} {v}" for k, v in measure.versions_of(
                "torch", "transformers", "peft").items()))
        elif recipe == "llamafactory" and not args.with_llamafactory:
            out[recipe] = (None, "disabled by --no-with-llamafactory")
        else:
            spec = venvs.TRL if recipe == "trl" else venvs.LLAMAFACTORY
            python, info = venvs.ensure_venv(spec, force=args.rebuild_venvs, log=log)
            out[recipe] = (str(python) if python else None, info)
    return out


def run_suite(args, specs: list[tuple[str, dict]], work: Path, pythons: dict, peak_gflops: float) -> list[dict]:
    """Run ``(recipe, spec)`` pairs one after another; return summarised rows (or error rows)."""
    rows = []
    for i, (label, spec) in enumerate(specs):
        recipe = spec["recipe"]
        python, info = pythons[recipe]
        if python is None:
            rows.append({"recipe": label, "error": info})
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {label}: running (load average {harness.load_average()})", flush=True)
        result = harness.run_recipe(recipe, python, spec, work / f"{i:02d}-{label}", args.timeout)
        if "error" in result:
            print(f"  {label}: {result['error']}", flush=True)
            rows.append({"recipe": label, "error": result["error"]})
            continue
        row = measure.summarize(result, peak_gflops)
        row.update(recipe=label, versions_text=info, load_average_after=harness.load_average(),
                   child_wall_s=result["child_wall_s"], max_length=spec["max_length"], batch=spec["batch"])
        print(f"  {label}: {row['real_tok_s']:.0f} real tok/s, {row['s_per_step']:.2f} s/step, "
              f"peak {row['peak_mem_mib']:.0f} MiB, loss {row['loss_last']}", flush=True)
        rows.append(row)
    return rows


def throughput_specs(args, base: dict) -> list[tuple[str, dict]]:
    specs = []
    for recipe in args.recipes:
        if recipe != "trl" or args.trl_mode != "padding-free":
            specs.append((recipe, dict(base, recipe=recipe)))
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
        for row in run_suite(args, run, work / f"sweep-{length}", pythons, peak_gflops):
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
    model = harness.model_folder(args.model, args.random_init_shape)
    template = templates.resolve(model, args.template, args.lf_template)   # bad --template: exit 2 here
    conversations = harness.load_conversations(args.data)
    base = dict(base_spec(args, model, device), template=template)
    print(f"template {base['template']['name']} ({base['template']['source']}, sha256 "
          f"{str(base['template']['sha256'])[:12]}); LLaMA-Factory: {base['template']['lf_template']}")
    if args.time_to_quality:
        from throughput import time_to_quality

        return time_to_quality.main(args, base, work)

    import torch

    recipes = args.sweep_recipes if args.sweep else args.recipes
    pythons = interpreters(recipes, args)
    measure.set_threads(args.threads)
    peak = measure.matmul_peak_gflops(device, torch.bfloat16 if device.startswith("cuda") else torch.float32)
    header = {"device": device, "threads": args.threads, "model": str(model), "matmul_peak_gflops": round(peak, 1),
              "load_average_before": harness.load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "max_length": args.max_length, "steps": args.steps, "batch": args.batch,
              "versions": {r: info for r, (_, info) in pythons.items()},
              "template": {k: v for k, v in base["template"].items() if k != "text"}}
    print(f"device {device}, {args.threads} threads, matmul peak {peak:.1f} GFLOP/s "
          f"({'bf16' if device.startswith('cuda') else 'fp32'}), load average {header['load_average_before']}")
    if args.sweep:
        rows = sweep(args, base, conversations, work, pythons, peak)
    else:
        subset = harness.bench_subset(conversations, args.steps * args.batch, args.seed)
        files = harness.write_data(subset, work / "data")
        header["rendered_reference"] = templates.reference_rendering(model, base["template"]["text"], subset,
                                                                     args.max_length)
        specs = throughput_specs(args, dict(base, **files))
        rounds = [run_suite(args, specs, work / f"round-{r}", pythons, peak) for r in range(args.repeat)]
        rows = [median_row([rnd[i] for rnd in rounds]) for i in range(len(specs))]
    header["load_average_after"] = harness.load_average()
    print()
    print(f"model {model.name}, max length {args.max_length if not args.sweep else 'sweep'}, "
          f"{args.steps if not args.sweep else args.sweep_steps} steps x {args.batch} examples, {device}, "
          f"{args.threads} threads, load average {header['load_average_before']} -> {header['load_average_after']}")
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

"""The GPU check's results table (``benchmarks/gpu_check.sh``, stage 4): one row per model and recipe.

    python benchmarks/throughput/gpu_report.py --bench smollm2-135m=a.json --bench llama-3.2-1b-shape=b.json \\
        --stages stages.tsv --env env.json --out benchmarks/results/gpu_check_2026-12-04

Reads the ``--json`` files of ``train_throughput.py`` (one per model), the script's stage timings (TSV: stage,
seconds, status, note) and the environment it printed (torch, CUDA, GPU), and writes ``OUT.txt`` (the table and
the summary) and ``OUT.json`` (everything, rows included), and a copy of both into ``--copy-to`` (``$OUT`` on the
lent machine). Columns: :data:`COLUMNS`; MFU as ``flops.py`` defines it (the header names the formula and the
peak).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import flops  # noqa: E402

# (key, header, format): the table's columns, in order
COLUMNS = [("model", "model", "{}"), ("recipe", "recipe", "{}"), ("real_tok_s", "real tok/s", "{:.0f}"),
           ("peak_mem_mib", "peak MiB", "{:.0f}"), ("peak_reserved_mib", "reserved MiB", "{:.0f}"),
           ("mfu", "MFU (LoRA 4N)", "{:.1%}"), ("mfu_6n", "MFU (6N)", "{:.1%}"), ("s_per_step", "s/step", "{:.3f}"),
           ("examples_per_step", "ex/step", "{:.1f}"), ("real_tokens_per_step", "tok/step", "{:.0f}"),
           ("loss_last", "loss (last 3)", "{:.3f}")]
# issue #25's target on the 1B shape: tuneforge at >= 1.3x TRL + Liger's real tokens/s, at <= 0.7x its peak memory
TARGET_SPEED, TARGET_MEMORY = 1.3, 0.7


def rows_of(label: str, bench: dict) -> list[dict]:
    return [dict(row, model=label) for row in bench["rows"]]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['recipe']} | not run: {row['error']} |" + " |" * (len(COLUMNS) - 3))
            continue
        lines.append("| " + " | ".join(fmt.format(row[k]) if row.get(k) is not None else "-"
                                       for k, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def comparisons(rows: list[dict]) -> list[str]:
    """tuneforge against each reference of the same model; the issue #25 target against TRL + Liger."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = {r["recipe"]: r for r in rows if r["model"] == model and "error" not in r}
        ours = ok.get("tuneforge")
        if ours is None:
            out.append(f"{model}: no tuneforge row, no comparison")
            continue
        for name, ref in ok.items():
            if name == "tuneforge":
                continue
            speed = ours["real_tok_s"] / ref["real_tok_s"]
            memory = ours["peak_mem_mib"] / ref["peak_mem_mib"]
            line = f"{model}: tuneforge vs {name}: real tok/s x{speed:.2f}, peak memory x{memory:.2f}"
            if name == "trl-liger":
                met = speed >= TARGET_SPEED and memory <= TARGET_MEMORY
                line += (f" (issue #25 target >= x{TARGET_SPEED} at <= x{TARGET_MEMORY}: "
                         f"{'met' if met else 'not met'})")
            out.append(line)
    return out


def read_stages(path: Path | None) -> list[dict]:
    if not path or not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            stage, seconds, status, *note = line.split("\t")
            out.append({"stage": stage, "seconds": float(seconds), "status": status, "note": "\t".join(note)})
    return out


def header_lines(env: dict, benches: dict[str, dict], stages: list[dict], dry_run: bool) -> list[str]:
    first = next(iter(benches.values()), {}).get("setup", {})
    lines = [f"GPU check{' (CPU dry run: tiny settings, not a measurement)' if dry_run else ''}, "
             f"{env.get('date', '?')}",
             f"device: {env.get('device', first.get('device', '?'))}, GPU {env.get('gpu') or 'none'}, torch "
             f"{env.get('torch', '?')}, CUDA {env.get('cuda') or 'none'}, install: {env.get('install', '?')}"]
    if first:
        lines.append(f"MFU = real tok/s x FLOPs per token / peak {first.get('peak_gflops', 0) / 1e3:.1f} TFLOP/s "
                     f"({first.get('peak_source', '?')})")
        lines.append(f"  MFU (LoRA 4N): {flops.FORMULAS['lora']}")
        lines.append(f"  MFU (6N): {flops.FORMULAS['6n']}")
        lines.append("  N_mm = decoder linears + LM head, L = layers, d_attn = query width, S = sum(n^2)/sum(n) over "
                     "the examples (benchmarks/throughput/flops.py)")
    for label, bench in benches.items():
        s = bench["setup"]
        shape = f" (random weights of shape {s['random_init_shape']})" if s.get("random_init_shape") else ""
        n_mm = s.get("matmul_params", 0) / 1e6
        lines.append(f"{label}: {Path(s['model']).name}{shape}, N_mm {n_mm:.1f}M, "
                     f"S {s.get('attention_span', 0):.0f}, {s['steps']} steps x {s['batch']} examples, "
                     f"max length {s['max_length']}")
        for recipe, info in s.get("versions", {}).items():
            lines.append(f"  {recipe}: {info}")
    if stages:
        lines.append("stages: " + ", ".join(f"{s['stage']} {s['seconds']:.0f} s {s['status']}"
                                            + (f" ({s['note']})" if s["note"] else "") for s in stages))
        lines.append(f"total {sum(s['seconds'] for s in stages):.0f} s")
    return lines


def write_report(benches: dict[str, dict], stages: list[dict], env: dict, out: Path, dry_run: bool = False,
                 copy_to: Path | None = None) -> dict:
    """Write ``out.txt`` and ``out.json``; return the JSON object."""
    rows = [row for label, bench in benches.items() for row in rows_of(label, bench)]
    text = "\n".join([*header_lines(env, benches, stages, dry_run), "", table(rows), "", *comparisons(rows)]) + "\n"
    data = {"env": env, "dry_run": dry_run, "stages": stages, "columns": [k for k, _, _ in COLUMNS],
            "mfu_formulas": dict(flops.FORMULAS), "rows": rows,
            "setups": {label: bench["setup"] for label, bench in benches.items()}, "comparisons": comparisons(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    txt, js = out.with_name(out.name + ".txt"), out.with_name(out.name + ".json")
    txt.write_text(text)
    js.write_text(json.dumps(data, indent=1))
    if copy_to:
        copy_to.mkdir(parents=True, exist_ok=True)
        for f in (txt, js):
            shutil.copy(f, copy_to / f.name)
    print(text)
    print(f"wrote {txt} and {js}" + (f" (copies in {copy_to})" if copy_to else ""))
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", action="append", default=[], metavar="LABEL=FILE",
                   help="a train_throughput.py --json file and the model label of its rows (a missing file: the "
                        "stage did not finish; its rows say so)")
    p.add_argument("--stages", type=Path)
    p.add_argument("--env", type=Path)
    p.add_argument("--out", type=Path, required=True, help="path prefix: writes OUT.txt and OUT.json")
    p.add_argument("--copy-to", type=Path)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    benches: dict[str, dict] = {}
    for pair in args.bench:
        label, sep, path = pair.partition("=")
        if not sep:
            print(f"error: --bench: {pair!r} is not LABEL=FILE", file=sys.stderr)
            return 2
        if Path(path).is_file():
            benches[label] = json.loads(Path(path).read_text())
        else:
            benches[label] = {"setup": {"model": label, "steps": 0, "batch": 0, "max_length": 0},
                              "rows": [{"recipe": "all", "error": f"the bench wrote no results ({path})"}]}
    env = json.loads(args.env.read_text()) if args.env and args.env.is_file() else {}
    write_report(benches, read_stages(args.stages), env, args.out, args.dry_run, args.copy_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())

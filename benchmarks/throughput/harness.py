"""The parent side of the bench: data files, the model folder, running each recipe in its own process, the table.

Runs in tuneforge's environment. Every recipe gets the same conversations (written once as JSONL) and the
same model folder, and runs in a fresh child process, one after another, so no recipe inherits another's
memory, threads or caches.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RECIPES = {name: HERE / f"{name}_recipe.py" for name in ("seeds", "trl", "llamafactory", "tuneforge")}


# ------------------------------------------------------------------------------------------------ data


def load_conversations(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSON array or JSONL of Alpaca records (``instruction``/``input``/``output``) or
    ``messages`` records, normalised by tuneforge's own format code (Alpaca -> user / assistant)."""
    from tuneforge.data.formats import to_example

    text = Path(path).read_text()
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    out = []
    for record in records:
        fmt = "messages" if "messages" in record else "alpaca"
        out.append(to_example(record, fmt).messages)
    return out


def write_data(conversations: list[list[dict]], folder: Path) -> dict[str, str]:
    """``messages.jsonl`` and the same conversations as conversational prompt-completion (for TRL)."""
    folder.mkdir(parents=True, exist_ok=True)
    messages, pc = folder / "messages.jsonl", folder / "prompt_completion.jsonl"
    messages.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    pc.write_text("".join(json.dumps({"prompt": c[:-1], "completion": c[-1:]}) + "\n" for c in conversations))
    return {"messages_file": str(messages), "prompt_completion_file": str(pc)}


def bench_subset(conversations: list[list[dict]], n: int, seed: int) -> list[list[dict]]:
    """``n`` conversations drawn with ``seed``: every recipe trains on exactly these (one epoch of them for
    the recipes that take ``batch`` examples per step)."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    return [conversations[i] for i in order[:n]]


def synthetic_long(conversations: list[list[dict]], tokenizer, length: int, n: int, seed: int) -> list[list[dict]]:
    """``n`` conversations of at least ``length`` tokens: a prompt of about ``length/8`` tokens (plus the template) and an answer
    long enough that truncation at ``length`` cuts the answer (so each example is exactly ``length`` tokens
    and still has trained tokens). Texts are real (concatenated answers of ``conversations``)."""
    rng = random.Random(seed)
    answers = [c[-1]["content"] for c in conversations]

    def text_of(tokens: int) -> str:
        parts, count = [], 0
        while count < tokens:
            t = rng.choice(answers)
            parts.append(t)
            count += len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 2
        return "\n\n".join(parts)

    return [[{"role": "user", "content": "Summarise and continue:\n\n" + text_of(length // 8)},
             {"role": "assistant", "content": text_of(length)}] for _ in range(n)]


# ------------------------------------------------------------------------------------------------ model


def bench_shapes() -> dict:
    """Shapes only the bench knows: ``tiny`` (2 layers of width 64), what the GPU check's CPU dry run trains in
    place of the 1B shape (``benchmarks/gpu_check.sh --dry-run``)."""
    from tuneforge.estimate.shapes import ModelShape

    return {"tiny": ModelShape("tiny", 64, 128, 2, 4, 2, 0, head_dim=16, tie_word_embeddings=True)}


def model_folder(model: str, random_init_shape: str | None, device: str = "cpu") -> Path:
    """A local HF folder: ``model`` resolved by tuneforge, or a randomly initialised model of a named shape
    (e.g. ``llama-3.2-1b``, from :data:`tuneforge.estimate.shapes.NAMED_SHAPES`, or :func:`bench_shapes`) with
    ``model``'s tokenizer (``model`` may be a folder holding only a config and a tokenizer), saved once under
    ``~/.cache/tuneforge/bench-models`` (bf16 safetensors). The weights are drawn on ``device`` (a 1B shape
    takes a minute on a CPU, a second on a GPU)."""
    from tuneforge.fileutil import cache_dir
    from tuneforge.models.registry import resolve_model

    source = Path(resolve_model(model))
    if not random_init_shape:
        return source
    target = cache_dir() / "bench-models" / f"{random_init_shape}-{source.name}-random"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuneforge.estimate.shapes import resolve_shape

    s = bench_shapes().get(random_init_shape) or resolve_shape(random_init_shape)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                         num_key_value_heads=s.num_kv_heads, head_dim=s.hd,
                         vocab_size=max(s.vocab_size, len(tokenizer)), tie_word_embeddings=s.tie_word_embeddings,
                         max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model_ = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model_.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    del model_
    if device.startswith("cuda"):
        torch.cuda.empty_cache()     # the recipes' processes get the whole card
    return target


# ------------------------------------------------------------------------------------------------ runs


def run_recipe(recipe: str, python: str | Path, spec: dict, work: Path, timeout_s: float) -> dict:
    """Run one recipe in a fresh process; return its result dict, or ``{"error": reason}``."""
    work.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, work_dir=str(work))
    spec_path, out_path = work / "spec.json", work / "result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONWARNINGS="ignore", TUNEFORGE_BENCH="1")
    if Path(python).resolve() != Path(sys.executable).resolve():
        env.pop("PYTHONPATH", None)  # a competitor's venv must not see our packages
    started = time.time()
    with open(work / "child.log", "w") as logf:
        try:
            proc = subprocess.run([str(python), str(RECIPES[recipe]), str(spec_path), str(out_path)], cwd=work,
                                  env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"recipe": recipe, "error": f"timed out after {timeout_s:.0f}s (log: {work / 'child.log'})"}
    if proc.returncode != 0 or not out_path.is_file():
        tail = [x for x in (work / "child.log").read_text().splitlines() if x.strip()][-1:] or ["(no output)"]
        return {"recipe": recipe, "error": f"exit {proc.returncode}: {tail[0][-200:]} (log: {work / 'child.log'})"}
    result = json.loads(out_path.read_text())
    result["child_wall_s"] = round(time.time() - started, 1)
    return result


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ------------------------------------------------------------------------------------------------ table

COLUMNS = [("recipe", "recipe", "{}"), ("examples_per_step", "ex/step", "{:.1f}"),
           ("real_tokens_per_step", "tok/step", "{:.0f}"), ("real_tok_s", "real tok/s", "{:.0f}"),
           ("trained_tok_s", "trained tok/s", "{:.0f}"), ("s_per_step", "s/step", "{:.2f}"),
           ("first_step_s", "step 1 s", "{:.2f}"), ("peak_mem_mib", "peak MiB", "{:.0f}"),
           ("mfu", "MFU", "{:.1%}"), ("mfu_6n", "MFU 6N", "{:.1%}"), ("loss_last", "loss (last 3)", "{:.3f}"),
           ("template", "template", "{}")]


def markdown_table(rows: list[dict]) -> str:
    """One line per recipe; a row with ``error`` says ``not run: <reason>``."""
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['recipe']} | not run: {row['error']} |" + " |" * (len(COLUMNS) - 2))
            continue
        cells = [fmt.format(row[k]) if row.get(k) is not None else "-" for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict], ours: str = "tuneforge") -> list[str]:
    """tuneforge against each competitor: throughput (real and trained tokens/s) and peak memory ratios."""
    base = next((r for r in rows if r["recipe"] == ours and "error" not in r), None)
    if base is None:
        return [f"no {ours} row: no ratios"]
    out = []
    for row in rows:
        if row is base or "error" in row:
            continue
        out.append(f"{ours} vs {row['recipe']}: real tok/s x{base['real_tok_s'] / row['real_tok_s']:.2f}, "
                   f"trained tok/s x{base['trained_tok_s'] / max(row['trained_tok_s'], 1e-9):.2f}, "
                   f"peak memory x{base['peak_mem_mib'] / row['peak_mem_mib']:.2f}, "
                   f"s/step x{base['s_per_step'] / row['s_per_step']:.2f}")
    return out


def plot_loss_curves(rows: list[dict], path: Path, title: str) -> None:
    """Training loss per step of every recipe (raw, and a 5-step moving average), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in rows:
        curve = row.get("loss_curve") or []
        if not curve:
            continue
        steps = list(range(1, len(curve) + 1))
        line, = ax.plot(steps, curve, alpha=0.3, linewidth=1)
        window = min(5, len(curve))
        smooth = [sum(curve[max(0, i - window + 1):i + 1]) / len(curve[max(0, i - window + 1):i + 1])
                  for i in range(len(curve))]
        ax.plot(steps, smooth, color=line.get_color(), linewidth=2, label=row["recipe"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (thin: per step, thick: 5-step mean)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

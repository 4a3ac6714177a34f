"""TRL: ``SFTTrainer`` with ``packing=True`` (best-fit-decreasing bins of ``max_length``, padding-free).

The data is conversational prompt-completion (``prompt``: the turns before the answer, ``completion``: the
assistant answer), so TRL's completion-only loss trains the answer tokens only. By default fp32 on a CPU (bf16
weights and ``bf16=True`` autocast on a GPU) and no gradient checkpointing, like the other recipes;
``options.trl_defaults`` keeps TRL's own defaults (bf16 and gradient checkpointing); ``options.liger`` adds
``use_liger_kernel=True`` (Liger's fused RMSNorm, RoPE, SwiGLU and linear cross-entropy: ``liger-kernel`` in TRL's
environment and a CUDA device). The chat template is the parent's (``spec["template"]``), given as a user gives TRL
one: ``SFTConfig(chat_template_path=...)`` on a ``.jinja`` file holding the text.
``per_device_train_batch_size = batch`` packed bins per step, so a step holds up to ``batch * max_length``
tokens: usually more examples than the other recipes' ``batch``. Runs inside TRL's own virtual environment:
``python trl_recipe.py SPEC.json OUT.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import measure  # noqa: E402


def main(spec_path: str, out_path: str) -> None:
    spec = common.load_spec(spec_path)
    measure.set_threads(spec["threads"])
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    options = spec.get("options", {})
    kwargs = common.training_args_kwargs(spec)
    if options.get("trl_defaults"):
        kwargs.pop("bf16")
    else:
        kwargs.update(gradient_checkpointing=False)
    packing = options.get("packing", "bfd")  # "bfd" (packing=True) or "padding_free" (no packing)
    # TRL refuses max_length with padding_free and no packing (it would not truncate): the GPTeacher bench
    # examples are shorter than max_length anyway; tuneforge truncates the rare longer one
    template_path = common.template_file(spec)
    if options.get("liger"):
        kwargs.update(use_liger_kernel=True)
    args = SFTConfig(**kwargs, max_length=spec["max_length"] if packing == "bfd" else None, packing=packing == "bfd",
                     padding_free=True, completion_only_loss=True, chat_template_path=template_path)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dtype = common.torch_dtype(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa")
    n_params = measure.count_params(model)
    lora = spec["lora"]
    data = Dataset.from_list(common.read_jsonl(spec["prompt_completion_file"]))
    log = measure.StepLog()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                target_modules="all-linear", task_type="CAUSAL_LM"),
                         callbacks=[measure.trainer_probe(log)])
    data = trainer.train_dataset   # tokenized (and packed) by TRL: what it renders, before training
    if "seq_lengths" in data.column_names:   # packed: truncated at max_length per sequence
        lengths = [n for row in data["seq_lengths"] for n in row]
    else:
        lengths = [len(ids) for ids in data["input_ids"]]
    trainer.train()
    if options.get("save_adapter"):
        trainer.model.save_pretrained(options["save_adapter"])
    label = "trl-defaults" if options.get("trl_defaults") else "trl-liger" if options.get("liger") else "trl"
    measure.write_result(out_path, label, log, spec["device"],
                         n_params, measure.versions_of("trl", "torch", "transformers", "peft", "liger-kernel"),
                         notes=f"packing={packing}, completion-only loss, gradient_checkpointing="
                               f"{trainer.args.gradient_checkpointing}, bf16={trainer.args.bf16}, "
                               f"use_liger_kernel={trainer.args.use_liger_kernel}",
                         template=f"{(spec.get('template') or {}).get('name', 'auto')} "
                                  f"({'chat_template_path' if template_path else 'tokenizer'})",
                         rendered=common.rendered(lengths, spec["max_length"]))


if __name__ == "__main__":
    main(*sys.argv[1:3])

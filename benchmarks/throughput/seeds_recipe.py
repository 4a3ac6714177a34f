"""The seeds' recipe: transformers ``Trainer`` + peft LoRA, every example padded to ``max_length``.

Each conversation is rendered with the model's chat template (the parent's ``spec["template"]`` text when
set), tokenized, truncated and padded to ``max_length`` (right padding); ``labels = input_ids`` with padding
set to -100 through the attention mask (never through the pad id: SmolLM2's pad token is its end-of-turn
token). The loss is on every real token, prompt included. Run as ``python seeds_recipe.py SPEC.json OUT.json``
(see ``common.py``).
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
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, default_data_collator

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if common.template_text(spec) is not None:
        tokenizer.chat_template = common.template_text(spec)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    n = spec["max_length"]

    def encode(record):
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        enc = tokenizer(text, truncation=True, max_length=n, padding="max_length", add_special_tokens=False)
        enc["labels"] = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"])]
        return enc

    rows = common.read_jsonl(spec["messages_file"])
    data = Dataset.from_list(rows).map(encode, remove_columns=["messages"])
    dtype = common.torch_dtype(spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa")
    n_params = measure.count_params(model)
    lora = spec["lora"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    log = measure.StepLog()
    trainer = Trainer(model=model, args=common.training_args(spec), train_dataset=data,
                      data_collator=default_data_collator, callbacks=[measure.trainer_probe(log)])
    trainer.train()
    measure.write_result(out_path, "seeds", log, spec["device"], n_params,
                         measure.versions_of("torch", "transformers", "peft"),
                         notes=f"padded to {n}, loss on all real tokens",
                         template=f"{(spec.get('template') or {}).get('name', 'auto')} (tokenizer.chat_template)",
                         rendered=common.rendered([sum(m) for m in data["attention_mask"]], n))


if __name__ == "__main__":
    main(*sys.argv[1:3])

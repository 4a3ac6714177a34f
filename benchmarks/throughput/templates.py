"""The chat template every recipe renders the bench conversations with, chosen once in the parent.

``--template`` takes tuneforge's ``template:`` values (``auto``, a built-in such as ``gemma``, or a ``.jinja``
file). Default: ``auto`` for a model whose tokenizer has a chat template, ``gemma`` for a Gemma base model
(Gemma 3 270M has none). The chosen text travels in the spec (``spec["template"]``) and each recipe uses it as
its users would:

* tuneforge: the ``template:`` key with the same value;
* TRL: ``SFTConfig(chat_template_path=<the text written to a .jinja file>)``;
* the seeds' recipe: ``tokenizer.chat_template = <the text>``;
* LLaMA-Factory: its own registered template of the same turns, rendered by its own code (``smollm2`` for
  SmolLM2; ``gemma`` for Gemma; ``--lf-template`` for any other model). For Gemma 3 it is ``gemma``, not
  ``gemma3``: LLaMA-Factory 0.9.5's ``gemma3`` is the same text plus its image plugin, which stops a text-only
  Gemma 3 (270M ships no processor) with "Processor was not found, please check and update your model file."
  (``--lf-template gemma3`` shows it); ``gemma`` is what its user then sets.

:func:`reference_rendering` renders the conversations once with the chosen text, so the parent can check that
every recipe tokenized the same conversations into the same number of tokens.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import ConfigError

# model_type of a base model without a chat template -> tuneforge built-in that renders its turns
BASE_MODEL_TEMPLATES = {"gemma3_text": "gemma", "gemma3": "gemma", "gemma2": "gemma", "gemma": "gemma"}
# tuneforge template -> LLaMA-Factory's template of the same turns (by model_type where it depends on it)
LF_TEMPLATES = {"gemma": {"gemma3": "gemma3", None: "gemma"},    # gemma3_text (no processor): gemma
                "chatml": {None: "chatml"}, "llama3": {None: "llama3"}, "mistral": {None: "mistral"},
                "phi3": {None: "phi"}, "alpaca": {None: "alpaca"}}


def _model_type(model: Path) -> str | None:
    import json

    config = Path(model) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def lf_template_for(name: str, model: Path) -> str | None:
    """LLaMA-Factory's template for the tuneforge template ``name`` on ``model``, or None when none is known."""
    if name == "auto":   # the model's own template: LLaMA-Factory names it after the model
        return "smollm2" if "smollm2" in Path(model).name.lower() else None
    table = LF_TEMPLATES.get(name, {})
    return table.get(_model_type(model), table.get(None))


def resolve(model: Path, value: str | None, lf_value: str | None = None) -> dict:
    """``{"name", "source", "text", "sha256", "lf_template"}`` of the bench's template; :class:`ConfigError` in
    one line for an unknown name, a file that does not parse, or a base model with ``auto``."""
    from transformers import AutoTokenizer

    from tuneforge.data.templates import apply_template, check_template_value

    tokenizer = AutoTokenizer.from_pretrained(model)
    if value is None:
        value = "auto" if getattr(tokenizer, "chat_template", None) else BASE_MODEL_TEMPLATES.get(_model_type(model))
        if value is None:
            raise ConfigError(f"--template: {Path(model).name}'s tokenizer has no chat template and no default is "
                              "known for its model_type; pass --template gemma, chatml, llama3, mistral, phi3, "
                              "alpaca, base or a .jinja file")
    try:
        check_template_value(value)
    except ValueError as e:
        raise ConfigError(f"--template: {e}") from None
    try:
        chosen = apply_template(tokenizer, value, model=Path(model).name)
    except ConfigError as e:   # tuneforge's message names its config key "template:"; here it is the option
        raise ConfigError(f"--{e}" if str(e).startswith("template:") else str(e)) from None
    return {"name": value, "source": chosen.source, "text": tokenizer.chat_template, "sha256": chosen.sha256,
            "lf_template": lf_value or lf_template_for(value, model)}


def reference_rendering(model: Path, text: str, conversations: list[list[dict]], max_length: int) -> dict:
    """Examples and tokens of ``conversations`` rendered with ``text`` (no special tokens added: the template
    writes BOS where the model wants it), each capped at ``max_length`` as every recipe truncates."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = text
    lengths = [len(tokenizer(tokenizer.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"])
               for c in conversations]
    capped = [min(n, max_length) for n in lengths]
    return {"examples": len(lengths), "tokens": sum(capped),
            "untruncated_tokens": sum(lengths), "truncated_examples": sum(n > max_length for n in lengths),
            # the span a token attends over, sum(n^2) / sum(n) (the attention term of flops.py)
            "attention_span": round(sum(n * n for n in capped) / max(sum(capped), 1), 2)}


def check_lines(rows: list[dict], reference: dict) -> list[str]:
    """One line per recipe: its rendered examples / tokens of the bench data against the reference."""
    out = [f"rendered bench data (each conversation capped at max length): reference {reference['examples']} examples, "
           f"{reference['tokens']} tokens ({reference['untruncated_tokens']} untruncated, "
           f"{reference['truncated_examples']} truncated)"]
    for row in rows:
        got = row.get("rendered")
        if "error" in row or not got:
            continue
        same = got["examples"] == reference["examples"] and got["tokens"] == reference["tokens"]
        diff = "" if same else (f"  <- differs: {got['tokens'] - reference['tokens']:+d} tokens, "
                                f"{got['examples'] - reference['examples']:+d} examples")
        if diff and reference["truncated_examples"]:
            diff += (" (conversations longer than max length: each recipe truncates or drops them its own way; "
                     "compare the rendering at a max length none exceeds)")
        out.append(f"  {row['recipe']}: {got['examples']} examples, {got['tokens']} tokens "
                   f"(template {row.get('template', '?')}){diff}")
    return out

"""Show exactly what the model learns: rendered examples with the trained tokens marked."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from tuneforge.config import DataConfig
from tuneforge.data.dataset import load_examples
from tuneforge.data.rendering import TokenizedExample, tokenize_example

START, END = "\x1b[1;32m", "\x1b[0m"  # bold green on a terminal


def mark_trained(tok: TokenizedExample, tokenizer: PreTrainedTokenizerBase, color: bool = True) -> str:
    """Decode ``tok``, wrapping each run of trained tokens in ``[[...]]`` (and green when ``color``)."""
    out, run = [], []
    open_, close = (START + "[[", "]]" + END) if color else ("[[", "]]")

    def flush():
        if run:
            out.append(open_ + tokenizer.decode(run) + close)
            run.clear()

    for token_id, trained in zip(tok.input_ids, tok.trained, strict=True):
        if trained:
            run.append(token_id)
        else:
            flush()
            out.append(tokenizer.decode([token_id]))
    flush()
    return "".join(out)


def preview(file: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig | None = None, n: int = 3,
            color: bool = True, task: str = "sft") -> str:
    cfg = cfg or DataConfig(train=file)
    from tuneforge.data.preference import is_preference_file, preview_pairs

    if task == "preference" or (task == "sft" and is_preference_file(file, cfg.columns)):
        return preview_pairs(file, tokenizer, cfg, n, color)    # prompt, then chosen and rejected, answers marked
    loaded = load_examples(file, cfg, task)
    blocks = []
    for example in loaded.examples[:n]:
        tok = tokenize_example(example, tokenizer, cfg.train_on)
        blocks.append(f"--- {example.meta['where']}  ({len(tok)} tokens, {tok.num_trained} trained)\n"
                      + mark_trained(tok, tokenizer, color))
    summary = (f"{len(loaded.examples)} usable records ({', '.join(f'{k}: {v}' for k, v in loaded.formats.items())}), "
               f"{len(loaded.rejects)} rejected; trained tokens shown as [[...]]")
    if loaded.rejects:
        r = loaded.rejects[0]
        summary += f"\nfirst rejected: {r.source}:{r.line}: {r.reason}"
    return "\n\n".join(blocks + [summary])

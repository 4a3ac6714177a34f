"""Show exactly what the model learns: rendered examples with the trained tokens marked.

A record with tools says so above its rendering (its tools, its calls per tool, its tool results); the rendering
shows the tool list, the calls (trained, marked) and the results (never trained) as the template writes them."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from tuneforge.data.dataset import load_examples
from tuneforge.data.formats import Example, RecordError
from tuneforge.data.preference import is_preference_file, load_pairs, tokenize_pair
from tuneforge.data.rejects import Reason, Reject
from tuneforge.data.rendering import TokenizedExample, tokenize_example
from tuneforge.data.settings import DataConfig

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
    if task == "preference" or (task == "sft" and is_preference_file(file, cfg.columns)):
        return preview_pairs(file, tokenizer, cfg, n, color)    # prompt, then chosen and rejected, answers marked
    loaded = load_examples(file, cfg, task)
    blocks = []
    for example in loaded.examples[:n]:
        tok = tokenize_example(example, tokenizer, cfg.train_on, cfg.train_reasoning)
        blocks.append(f"--- {example.meta['where']}  ({len(tok)} tokens, {tok.num_trained} trained)\n"
                      + tool_summary(example) + mark_trained(tok, tokenizer, color))
    summary = (f"{len(loaded.examples)} usable records ({', '.join(f'{k}: {v}' for k, v in loaded.formats.items())}), "
               f"{len(loaded.rejects)} rejected; trained tokens shown as [[...]]")
    if loaded.rejects:
        r = loaded.rejects[0]
        summary += f"\nfirst rejected: {r.source}:{r.line}: {r.reason}"
    return "\n\n".join(blocks + [summary])


def tool_summary(example: Example) -> str:
    """One line on the tools of ``example`` (empty when it has none)."""
    calls: dict[str, int] = {}
    for m in example.messages or []:
        for call in m.get("tool_calls") or []:
            calls[call["function"]["name"]] = calls.get(call["function"]["name"], 0) + 1
    results = sum(m["role"] == "tool" for m in example.messages or [])
    if not example.tools and not calls:
        return ""
    names = ", ".join(t["function"]["name"] for t in example.tools or []) or "none"
    made = ", ".join(f"{k} x{v}" for k, v in calls.items()) or "none"
    return f"[tools: {names}; calls: {made}; tool results: {results} (never trained)]\n"


def preview_pairs(file: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig | None = None, n: int = 3,
                  color: bool = True) -> str:
    """The first ``n`` pairs as the model sees them: the prompt, then each side with its trained tokens marked."""
    cfg = cfg or DataConfig(train=file)
    loaded = load_pairs(file, cfg)
    blocks = []
    for example, raw in loaded.examples[:n]:
        try:
            pair, _ = tokenize_pair(example, tokenizer, cfg)
        except RecordError as e:
            loaded.rejects.append(Reject(raw.source, raw.line, [Reason(e.check, str(e))], raw.data))
            continue
        chosen, rejected = pair.chosen, pair.rejected
        first = chosen.trained.index(True)
        blocks.append(f"--- {example.meta['where']}  ({example.format}; prompt {first} tokens, chosen "
                      f"{chosen.num_trained} trained, rejected {rejected.num_trained} trained)\n"
                      f"[prompt]\n{tokenizer.decode(chosen.input_ids[:first])}\n"
                      f"[chosen]\n{mark_trained(_answer_part(chosen), tokenizer, color)}\n"
                      f"[rejected]\n{mark_trained(_answer_part(rejected), tokenizer, color)}")
    summary = (f"{len(loaded.examples)} usable pairs ({', '.join(f'{k}: {v}' for k, v in loaded.formats.items())}), "
               f"{len(loaded.rejects)} rejected; trained tokens shown as [[...]]")
    if loaded.rejects:
        r = loaded.rejects[0]
        summary += f"\nfirst rejected: {r.source}:{r.line}: {r.reason}"
    return "\n\n".join(blocks + [summary])


def _answer_part(tok: TokenizedExample) -> TokenizedExample:
    first = tok.trained.index(True)
    return TokenizedExample(tok.input_ids[first:], tok.trained[first:])

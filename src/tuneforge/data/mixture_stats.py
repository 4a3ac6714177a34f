"""``tuneforge data stats RUN_CONFIG.yaml`` (the CLI loads the config): what each source of a mixture gives
training, in examples and tokens.

The run config's data is prepared as training prepares it (:func:`tuneforge.data.dataset.prepare_data`: the
model's tokenizer, the run's ``template:``, each source's validation split; the token cache is filled for the
run), and the first epoch's draw (:meth:`tuneforge.data.mixture.Mixture.epoch_indices`) is counted: each source's
examples and tokens in it, and their shares. A one-file ``data.train`` is a mixture of one source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class SourceStats:
    name: str
    path: str
    train_examples: int
    validation_examples: int
    train_tokens: int           # tokens of the source's training examples, each once
    epoch_examples: int         # examples it gives an epoch
    epoch_tokens: int           # their tokens
    example_share: float        # of the epoch's examples
    token_share: float          # of the epoch's tokens


def mixture_stats(config: Any) -> list[SourceStats]:
    """Each source's contribution to an epoch of the run ``config`` (a loaded run config) configures (module
    docstring)."""
    from tuneforge.data.dataset import prepare_data
    from tuneforge.data.mixture import Mixture, MixtureSource
    from tuneforge.data.rendering import set_template_kwargs
    from tuneforge.data.templates import apply_template
    from tuneforge.models.loading import load_tokenizer

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    apply_template(tokenizer, config.template, config.model,
                   needs_chat=config.task != "pretrain" and config.data.format != "text")
    set_template_kwargs(tokenizer, config.template_kwargs)
    data = prepare_data(config.data, tokenizer, config.seed, config.task)
    mixture = data.mixture or Mixture([MixtureSource(Path(config.data.train_file()).name.split(".")[0],
                                                     config.data.train_file(), None, 1.0, 0, len(data.train), 0,
                                                     len(data.validation), len(data.train), data.train_tokens)])
    examples = [0] * len(mixture.sources)
    tokens = [0] * len(mixture.sources)
    for i in mixture.epoch_indices(config.seed, 0):
        k = mixture.source_of(i)
        examples[k] += 1
        tokens[k] += len(data.train[i])
    all_examples, all_tokens = max(1, sum(examples)), max(1, sum(tokens))
    return [SourceStats(s.name, s.path, s.size, s.val_size, s.train_tokens, examples[k], tokens[k],
                        examples[k] / all_examples, tokens[k] / all_tokens) for k, s in enumerate(mixture.sources)]


def summary(stats: list[SourceStats]) -> str:
    """A table: one line a source, then the epoch's totals."""
    head = ("source", "train", "val", "tokens", "epoch examples", "share", "epoch tokens", "share")
    rows = [(s.name, f"{s.train_examples:,}", f"{s.validation_examples:,}", f"{s.train_tokens:,}",
             f"{s.epoch_examples:,}", f"{s.example_share:.1%}", f"{s.epoch_tokens:,}", f"{s.token_share:.1%}")
            for s in stats]
    rows.append(("epoch", "", "", "", f"{sum(s.epoch_examples for s in stats):,}", "",
                 f"{sum(s.epoch_tokens for s in stats):,}", ""))
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    lines = ["  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths, strict=True)))
             .rstrip() for r in [head, *rows]]
    return "\n".join(lines)


def to_dict(stats: list[SourceStats]) -> dict[str, Any]:
    return {"sources": [asdict(s) for s in stats], "epoch_examples": sum(s.epoch_examples for s in stats),
            "epoch_tokens": sum(s.epoch_tokens for s in stats)}

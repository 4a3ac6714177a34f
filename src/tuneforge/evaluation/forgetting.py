"""Forgetting: MMLU as a cloze task, and perplexity on general text, before and after tuning.

**MMLU cloze.** Each question is scored the way lm-evaluation-harness's ``mmlu_continuation`` task scores
it: context ``"The following are questions (with answers) about {subject}.\\n\\nQuestion: {q}\\nAnswer:"``,
continuation ``" " + choice``; the prediction is the choice with the highest summed log-likelihood
(``acc``), or per byte of the choice (``acc_norm``). A 135M model is at chance on the letter format, not
on this one. The context's tokens are computed once per question, and many questions share one forward:
a row holds several questions, each as its context followed by its four continuations, with an attention
mask shaped like a tree (a continuation sees its question's context and its own earlier tokens, nothing
else; positions restart per question and continue from the context into each continuation). A question
then costs its context plus four short continuations, not four full sequences, in forwards large enough
to keep the CPU's matrix units busy (:func:`score_mmlu`; one question: :func:`choice_logliks`). Methods
whose forward adds virtual tokens (prefix, prompt tuning) are scored on packed rows of the four full
sequences instead (same numbers, tested).

The data is the original release's CSVs (question, four choices, answer letter) in ``<folder>/test/``
(or ``val``/``dev``), never copied into tuneforge: point ``--forgetting-data`` at a copy. By default a
fixed stratified subset (``per_subject`` questions of each subject, chosen with seed 0) is scored.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from tuneforge.data.packing import pack
from tuneforge.data.rendering import TokenizedExample
from tuneforge.methods.loss import packed_example_loss_sums

LETTERS = "ABCD"


class ForgettingDataError(ValueError):
    """The MMLU folder is missing or unreadable; the message names it."""


@dataclass
class Question:
    subject: str
    question: str
    choices: list[str]
    answer: int

    @property
    def context(self) -> str:
        subject = self.subject.replace("_", " ")
        return (f"The following are questions (with answers) about {subject}.\n\n"
                f"Question: {self.question.strip()}\nAnswer:")


def load_mmlu(folder: str | Path, split: str = "test", per_subject: int | None = 10, seed: int = 0
              ) -> list[Question]:
    """Questions of every subject in ``folder/<split>/*_<split>.csv``; ``per_subject=None``: all of them."""
    root = Path(folder)
    files_dir = root / split if (root / split).is_dir() else root
    files = sorted(files_dir.glob(f"*_{split}.csv"))
    if not files:
        raise ForgettingDataError(f"--forgetting-data {root}: no MMLU files (*_{split}.csv) in {files_dir}; point it "
                                  "at a folder holding the original release's test/ CSVs")
    out: list[Question] = []
    for path in files:
        subject = path.name[: -len(f"_{split}.csv")]
        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5].strip() not in LETTERS:
                    raise ForgettingDataError(f"{path}:{line}: expected question, 4 choices and an answer letter")
                rows.append(Question(subject, row[0], row[1:5], LETTERS.index(row[5].strip())))
        if per_subject is not None and len(rows) > per_subject:
            keep = sorted(random.Random(f"{seed}:{subject}").sample(range(len(rows)), per_subject))
            rows = [rows[i] for i in keep]
        out.extend(rows)
    return out


def split_tokens(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: encode context + continuation whole, the context's tokens are its prefix."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[:len(ctx)], whole[len(ctx):]


@torch.no_grad()
def _logliks_packed(model: torch.nn.Module, ctx: list[int], conts: list[list[int]], method: str,
                    device: torch.device) -> list[float]:
    examples = [TokenizedExample(ctx + c, [False] * len(ctx) + [True] * len(c)) for c in conts]
    return [-x for x in packed_example_loss_sums(model, pack(examples).to(device), method).tolist()]


def choice_logliks(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, question: Question,
                   method: str = "base", share_prefix: bool = True) -> list[float]:
    """Summed log-likelihood of each choice's text after the question's context."""
    device = next(model.parameters()).device
    ctx, conts = _pieces(tokenizer, question)
    if share_prefix:
        return _logliks_tree(model, [(ctx, conts)], device)[0]
    return _logliks_packed(model, ctx, conts, method, device)


def _pieces(tokenizer: PreTrainedTokenizerBase, question: Question) -> tuple[list[int], list[list[int]]]:
    # the choice as the dataset has it (the harness keeps surrounding spaces: 766 of MMLU's 14,079 test questions)
    pieces = [split_tokens(tokenizer, question.context, " " + c) for c in question.choices]
    ctx = pieces[0][0]
    return ctx, [p[1] if p[0] == ctx else (p[0] + p[1])[len(ctx):] for p in pieces]


@torch.no_grad()
def _logliks_tree(model: torch.nn.Module, items: list[tuple[list[int], list[list[int]]]], device: torch.device
                  ) -> list[list[float]]:
    """Each item's continuation log-likelihoods from one forward over a row holding every item's context
    once and its continuations after it, under a tree-shaped attention mask."""
    ids: list[int] = []
    pos: list[int] = []
    owner: list[int] = []           # item of each token
    branch: list[int] = []          # -1 for context tokens, else the continuation's index
    wanted: list[tuple[int, int, int, int]] = []   # (item, continuation, logit row, target token)
    for n, (ctx, conts) in enumerate(items):
        last_ctx = len(ids) + len(ctx) - 1
        ids += ctx
        pos += range(len(ctx))
        owner += [n] * len(ctx)
        branch += [-1] * len(ctx)
        for j, cont in enumerate(conts):
            start = len(ids)
            ids += cont
            pos += range(len(ctx), len(ctx) + len(cont))
            owner += [n] * len(cont)
            branch += [j] * len(cont)
            wanted += [(n, j, last_ctx if t == 0 else start + t - 1, tok) for t, tok in enumerate(cont)]
    p = torch.tensor(pos, device=device)
    o = torch.tensor(owner, device=device)
    b = torch.tensor(branch, device=device)
    allowed = ((o[:, None] == o[None, :]) & (p[None, :] <= p[:, None])
               & ((b[None, :] == -1) | (b[None, :] == b[:, None])))
    out = model(input_ids=torch.tensor([ids], device=device), position_ids=p[None],
                attention_mask=allowed[None, None], use_cache=False)
    rows = torch.tensor([w[2] for w in wanted], device=device)
    targets = torch.tensor([w[3] for w in wanted], device=device)
    logp = torch.log_softmax(out.logits[0, rows].float(), dim=-1).gather(1, targets[:, None])[:, 0].tolist()
    scores = [[0.0] * len(conts) for _, conts in items]
    for (n, j, _, _), value in zip(wanted, logp, strict=True):
        scores[n][j] += value
    return scores


def _rows(items: list[tuple[list[int], list[list[int]]]], row_tokens: int
          ) -> Iterator[list[tuple[list[int], list[list[int]]]]]:
    """Consecutive items, greedily, at most ``row_tokens`` tokens a row (an item longer than that alone)."""
    row: list[tuple[list[int], list[list[int]]]] = []
    size = 0
    for ctx, conts in items:
        need = len(ctx) + sum(len(c) for c in conts)
        if row and size + need > row_tokens:
            yield row
            row, size = [], 0
        row.append((ctx, conts))
        size += need
    if row:
        yield row


def score_mmlu(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, questions: list[Question],
               method: str = "base", share_prefix: bool = True, progress: Callable[[int], None] | None = None,
               row_tokens: int = 1024) -> dict[str, list]:
    """Per question: ``correct`` (acc), ``correct_norm`` (acc_norm, per byte) and ``subject``.

    ``share_prefix``: questions are scored ``row_tokens`` at a time in tree-masked rows (see the module's
    docstring); ``False`` (methods with virtual tokens): four full sequences per question, packed."""
    model.eval()
    device = next(model.parameters()).device
    logliks: list[list[float]] = []
    if share_prefix:
        for group in _rows([_pieces(tokenizer, q) for q in questions], row_tokens):
            logliks += _logliks_tree(model, group, device)
            if progress:
                progress(len(group))
    correct, correct_norm = [], []
    for n, q in enumerate(questions):
        if share_prefix:
            ll = logliks[n]
        else:
            ll = choice_logliks(model, tokenizer, q, method, share_prefix=False)
            if progress:
                progress(1)
        # acc_norm as lm-evaluation-harness computes it: per character of the choice (without the delimiter)
        norm = [x / max(len(c), 1) for x, c in zip(ll, q.choices, strict=True)]
        correct.append(float(max(range(4), key=lambda i: ll[i]) == q.answer))
        correct_norm.append(float(max(range(4), key=lambda i: norm[i]) == q.answer))
    return {"correct": correct, "correct_norm": correct_norm, "subject": [q.subject for q in questions]}


def general_text_path() -> Path:
    """The general text shipped with tuneforge for the perplexity check: 16 short encyclopedic paragraphs
    written for the project (``recipes/data/general_text.jsonl``, text records), so it ships with no licence
    question."""
    return Path(__file__).parent.parent / "recipes" / "data" / "general_text.jsonl"

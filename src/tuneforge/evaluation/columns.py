"""The prompts of each evaluation column, built from the same test conversations.

* ``base`` / ``tuned``: the conversation as it is (system prompt and user turn, the model's chat template).
* ``fewshot``: ``k`` training examples (chosen with ``random.Random(seed)``, the same for every prompt)
  inserted as earlier user/assistant turns after the system prompt: what prompting alone achieves.
* ``rag`` / ``tuned+rag``: the top-k BM25 passages of the docs folder for the last user turn, prepended
  to that turn as ``Context:`` lines.

Tool records (:mod:`.tool_eval`) keep their tools in every column (the generator renders them); few-shot examples
keep their own calls and tool results, rendered in the same format.
"""

from __future__ import annotations

import random

from tuneforge.evaluation.retrieval import Retriever


def fewshot_examples(train: list[list[dict]], k: int, seed: int) -> list[list[dict]]:
    """``k`` conversations of ``train`` chosen reproducibly (without replacement)."""
    return random.Random(seed).sample(train, min(k, len(train)))


def with_fewshot(conversation: list[dict], shots: list[list[dict]]) -> list[dict]:
    system = [m for m in conversation[:1] if m["role"] == "system"]
    turns = []
    for shot in shots:
        turns += [m for m in shot if m["role"] in ("user", "assistant", "tool")]   # calls and results kept
    return system + turns + conversation[len(system):]


def last_user(conversation: list[dict]) -> int:
    """The index of the last user turn (a tool record's prompt may end with tool results after it)."""
    return max((i for i, m in enumerate(conversation) if m["role"] == "user"), default=len(conversation) - 1)


def with_context(conversation: list[dict], passages: list[str]) -> list[dict]:
    i = last_user(conversation)
    turn = conversation[i]
    context = "\n".join(f"- {p}" for p in passages)
    return [*conversation[:i], {**turn, "content": f"Context:\n{context}\n\n{turn['content']}"}, *conversation[i + 1:]]


def build_prompts(column: str, prompts: list[list[dict]], shots: list[list[dict]] | None = None,
                  retriever: Retriever | None = None, rag_k: int = 2) -> list[list[dict]]:
    """The prompts of ``column`` for ``prompts`` (conversations ending with a user turn)."""
    if column in ("base", "tuned"):
        return prompts
    if column == "fewshot":
        return [with_fewshot(p, shots or []) for p in prompts]
    if retriever is None:
        raise ValueError(f"column {column!r} needs a docs folder (--docs DIR or eval.docs)")
    return [with_context(p, [x.text for x in retriever.top(p[last_user(p)]["content"], rag_k)]) for p in prompts]

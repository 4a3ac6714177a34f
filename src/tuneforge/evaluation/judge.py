"""LLM-as-judge, pairwise (the MT-Bench design): is answer A or B better, or a tie?

Each prompt is judged twice through any OpenAI-compatible endpoint (the official ``openai`` client), once
with the tuned answer as A and once as B. A verdict that follows the answer across the swap counts; a
verdict that follows the position (A both times, B both times) is a flip and counts as a tie; a reply
without ``[[A]]``, ``[[B]]`` or ``[[C]]`` is unparseable (and a tie). Reported: win / tie / loss rates of
the tuned answer (with bootstrap intervals), position consistency (share of prompts whose two parseable
verdicts agree) and the unparseable rate. Small local judges are a ranking signal, not a score.
"""

from __future__ import annotations

import re
from typing import Any

from tuneforge.evaluation.bootstrap import interval

SYSTEM = ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
          "to the user question displayed below. Choose the assistant that follows the user's instructions and "
          "answers the question better. Avoid any position bias: the order in which the responses are presented "
          "must not influence your decision, nor their length. Be as objective as possible. After a short "
          "explanation, output your final verdict by strictly following this format: \"[[A]]\" if assistant A is "
          "better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.")
TEMPLATE = ("[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's "
            "Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
NOTE = ("Small local judges are a ranking signal, not a score: compare runs with the same judge, and read the "
        "examples before trusting the numbers.")


class JudgeError(ValueError):
    """The judge endpoint cannot be reached or used; the message names it."""


def connect(settings: Any) -> Any:
    """An ``openai.OpenAI`` client for ``settings.url``, checked by listing the endpoint's models."""
    import openai

    client = openai.OpenAI(base_url=settings.url, api_key=settings.api_key, timeout=settings.timeout_s,
                           max_retries=0)
    try:
        client.models.list()
    except openai.APIError as e:
        raise JudgeError(f"--judge {settings.url}: the endpoint does not answer ({type(e).__name__}: {e}); start it, "
                         "or drop --judge") from None
    return client


def parse_verdict(text: str) -> str | None:
    found = _VERDICT.findall(text or "")
    return found[-1] if found else None


def _ask(client: Any, model: str, question: str, a: str, b: str) -> str | None:
    reply = client.chat.completions.create(
        model=model, temperature=0.0, max_tokens=512,
        messages=[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": TEMPLATE.format(question=question, a=a, b=b)}])
    return parse_verdict(reply.choices[0].message.content or "")


def combine(first: str | None, second: str | None) -> tuple[str, bool]:
    """Outcome for the tuned answer from (verdict with tuned as A, verdict with tuned as B), and whether
    the two parseable verdicts agree. A position flip is a tie."""
    tuned_first = {"A": "win", "B": "loss", "C": "tie"}.get(first or "")
    tuned_second = {"B": "win", "A": "loss", "C": "tie"}.get(second or "")
    if tuned_first is None or tuned_second is None:
        return (tuned_first or tuned_second or "tie"), False
    if tuned_first == tuned_second:
        return tuned_first, True
    return "tie", False


def judge_pairwise(client: Any, settings: Any, prompts: list[str], tuned: list[str], other: list[str],
                   against: str = "base") -> dict:
    outcomes, consistent, parseable, unparseable, rows = [], 0, 0, 0, []
    for q, t, o in zip(prompts, tuned, other, strict=True):
        first = _ask(client, settings.model, q, t, o)
        second = _ask(client, settings.model, q, o, t)
        unparseable += (first is None) + (second is None)
        outcome, agree = combine(first, second)
        if first is not None and second is not None:
            parseable += 1
            consistent += agree
        outcomes.append(outcome)
        rows.append({"prompt": q, "tuned": t, "other": o, "verdicts": [first, second], "outcome": outcome})
    n = len(outcomes)
    return {"n": n, "model": settings.model, "url": settings.url, "against": against,
            **{k: interval([float(o == k) for o in outcomes]).to_dict() for k in ("win", "tie", "loss")},
            "consistency": consistent / parseable if parseable else 0.0,
            "unparseable": unparseable / (2 * n) if n else 0.0, "note": NOTE, "rows": rows}

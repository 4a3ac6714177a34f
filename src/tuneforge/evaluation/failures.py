"""Sorting wrong answers into failure categories by rules, first rule that fires wins.

| category | rule |
|---|---|
| ``empty`` | nothing but whitespace was generated |
| ``repetition_loop`` | an n-gram of 1-8 words repeats back to back (4+ times for one word, 3+ for longer) |
| ``refusal`` | an apology / refusal phrase ("I'm sorry", "I cannot", "as an AI") |
| ``echoed_prompt`` | 8+ consecutive words of the prompt (more than half of a short one) copied, or 70% of |
| | the answer's words (4 or more) in runs shared with the prompt |
| ``never_stopped`` | generation hit ``max_new_tokens`` without the end-of-turn token (truncated) |
| ``format_broken`` | outside the label set, not JSON when JSON is expected, failing the schema or regex |
| ``wrong_label`` | a valid label, but not the reference's |
| ``wrong_answer`` | anything else that is not correct |
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass

CATEGORIES = ("empty", "repetition_loop", "refusal", "echoed_prompt", "never_stopped", "format_broken",
              "wrong_label", "wrong_answer")
_REFUSAL = re.compile(r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can(?:no|')t|i cannot|i'?m unable|"
                      r"i am unable|as an ai|i'?m not able|i do not have access|i don'?t have access)\b", re.I)
_WORDS = re.compile(r"\w+")


def repetition_loop(text: str, max_n: int = 8) -> bool:
    words = text.casefold().split()
    for n in range(1, max_n + 1):
        need = 4 if n == 1 else 3
        for start in range(0, len(words) - n * need + 1):
            gram = words[start:start + n]
            if all(words[start + k * n:start + (k + 1) * n] == gram for k in range(1, need)):
                return True
    return False


def echoed_prompt(answer: str, prompt: str) -> bool:
    a, p = _WORDS.findall(answer.casefold()), _WORDS.findall(prompt.casefold())
    if not a or not p:
        return False
    matcher = difflib.SequenceMatcher(None, a, p, autojunk=False)
    if matcher.find_longest_match(0, len(a), 0, len(p)).size >= min(8, max(3, len(p) // 2 + 1)):
        return True
    shared = sum(block.size for block in matcher.get_matching_blocks())
    return len(a) >= 4 and shared >= 0.7 * len(a)


@dataclass
class FormatRules:
    """What a well-formed answer looks like (each check optional)."""
    labels: list[str] | None = None
    json_expected: bool = False
    schema_ok: object = None       # callable(answer) -> bool
    regex_ok: object = None        # callable(answer) -> bool

    def broken(self, answer: str) -> bool:
        from tuneforge.evaluation.metrics import json_valid, normalise_label

        if self.labels is not None and normalise_label(answer) not in {normalise_label(x) for x in self.labels}:
            return True
        if self.json_expected and not json_valid(answer):
            return True
        if callable(self.schema_ok) and not self.schema_ok(answer):
            return True
        return callable(self.regex_ok) and not self.regex_ok(answer)


def categorise(answer: str, prompt: str, stopped: bool, rules: FormatRules) -> str:
    """The failure category of a wrong ``answer`` (see the module's table)."""
    if not answer.strip():
        return "empty"
    if repetition_loop(answer):
        return "repetition_loop"
    if _REFUSAL.search(answer):
        return "refusal"
    if echoed_prompt(answer, prompt):
        return "echoed_prompt"
    if not stopped:
        return "never_stopped"
    if rules.broken(answer):
        return "format_broken"
    if rules.labels is not None:
        return "wrong_label"
    return "wrong_answer"


def analyse(rows: list[dict], rules: FormatRules, examples_per_category: int = 3) -> dict:
    """Counts and examples of the failure categories of ``rows``.

    ``rows``: dicts with ``prompt`` (the last user turn), ``reference``, ``answer``, ``stopped`` and
    ``correct``; each wrong row gets its ``category`` set in place.
    """
    counts: Counter[str] = Counter()
    examples: dict[str, list[dict]] = {}
    for row in rows:
        if row["correct"]:
            continue
        row["category"] = categorise(row["answer"], row["prompt"], row["stopped"], rules)
        counts[row["category"]] += 1
        bucket = examples.setdefault(row["category"], [])
        if len(bucket) < examples_per_category:
            bucket.append({k: row[k] for k in ("index", "prompt", "reference", "answer") if k in row})
    wrong = sum(counts.values())
    return {"wrong": wrong, "n": len(rows),
            "counts": {c: counts[c] for c in CATEGORIES if counts[c]},
            "examples": {c: examples[c] for c in CATEGORIES if c in examples}}

"""Conflicting labels: records with the same prompt and different final answers (``conflicting_labels``).

Chat records only (preference pairs share prompts by design). The prompt is every turn before the final
assistant turn, the answer is that final turn; both are compared normalised: case and whitespace as for
exact duplicates (:func:`tuneforge.data.curation.quality.normalise_text`), and the sentence punctuation
``.?!`` at the end of each turn ignored ("Positive." and "positive" are one answer). Only 64-bit hashes of
the two are kept, 16 bytes a record, never the texts.

Among the records of one prompt that are still kept after duplicate removal (a copied record is not a
second vote), the *majority answer* is the one most of them give; on a tie, the one that comes first in
file order (the rule duplicates follow: the first is kept). Each record with another answer is reported
with the line of the first record of the majority answer; when the check rejects, those records go to
``rejects.jsonl`` and the majority answer's records stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneforge.data.curation.dedup import exact_hash
from tuneforge.data.curation.quality import normalise_text


def _key_text(text: str) -> str:
    return normalise_text(text).rstrip(" .?!")


def conflict_keys(turns: list[dict[str, Any]], answer: str) -> tuple[int, int]:
    """(prompt hash, answer hash) of a chat record: ``turns`` before the final answer, the ``answer`` text."""
    prompt = "\n".join(f"{t['role']}: {_key_text(t['content'] or '')}" for t in turns)
    return exact_hash(prompt) or 1, exact_hash(_key_text(answer))     # prompt hash 0 means "no prompt"


@dataclass
class Conflict:
    """One prompt with more than one answer: entry indices (file order) per answer, the kept answer first."""
    answers: list[list[int]]

    @property
    def kept(self) -> list[int]:
        return self.answers[0]

    @property
    def others(self) -> list[int]:
        return sorted(i for group in self.answers[1:] for i in group)


def find_conflicts(prompts: np.ndarray, answers: np.ndarray, alive: np.ndarray) -> list[Conflict]:
    """Prompts with more than one answer among ``alive`` entries, in order of their first entry.

    ``prompts``, ``answers``: (n,) uint64 hashes (prompt 0: the entry has no prompt, e.g. a text record);
    ``alive``: (n,) bool. Answers of a conflict are ordered by count (descending), then first entry.
    """
    idx = np.flatnonzero(alive & (prompts != 0))
    if len(idx) < 2:
        return []
    order = idx[np.lexsort((idx, answers[idx], prompts[idx]))]
    p, a = prompts[order], answers[order]
    new_prompt = np.r_[True, p[1:] != p[:-1]]
    new_answer = new_prompt | np.r_[True, a[1:] != a[:-1]]
    group = np.cumsum(new_prompt) - 1
    distinct = np.bincount(group, weights=new_answer)
    bounds = np.flatnonzero(np.r_[new_prompt, True])
    conflicts = []
    for g in np.flatnonzero(distinct > 1).tolist():
        lo, hi = bounds[g], bounds[g + 1]
        cuts = np.flatnonzero(new_answer[lo:hi]).tolist() + [hi - lo]
        groups = [order[lo + s:lo + e].tolist() for s, e in zip(cuts[:-1], cuts[1:], strict=True)]
        groups.sort(key=lambda members: (-len(members), members[0]))
        conflicts.append(Conflict(groups))
    conflicts.sort(key=lambda c: min(c.kept[0], c.others[0]))
    return conflicts

"""``rejects.jsonl``: one line per record that was not used, the same schema for training and curation.

Training writes it to the run directory, ``tuneforge data clean`` and ``data split`` to their output
folder. Each line is one JSON object::

    {"source": "data/train.jsonl", "line": 12,
     "reasons": [{"check": "too_long", "message": "1532 tokens > max_length 1024"}],
     "record": {"instruction": "...", "output": "..."}}

* ``source``: the data file as given;
* ``line``: 1-based line (``.jsonl``, ``.csv``) or element index (``.json`` arrays, ``.parquet`` rows);
  null where there is none;
* ``reasons``: every problem that rejected the record; ``check`` names it (curation: a key of
  :data:`tuneforge.data.curation.config.CHECKS`; training: of :data:`tuneforge.data.dataset.TRAINING_CHECKS`,
  the same name where the problem is the same), ``message`` says what is wrong in words;
* ``record``: the record as read, verbatim. A record that could not be parsed has ``"raw"`` (its text,
  or null) instead of ``record``.

:func:`reject_line` turns a :class:`Reject` into one such line; :func:`write_rejects` writes a list;
:func:`log_rejects` is what training logs about them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from tuneforge.data.jsonio import dumps_record
from tuneforge.data.loaders import TRUNCATED_FILE, RawRecord, error_check

log = logging.getLogger(__name__)


class Reason(NamedTuple):
    check: str       # the name of the check that fired, e.g. "too_long"
    message: str     # what is wrong, in words


@dataclass
class Reject:
    """A record that was not used, where it came from and why."""
    source: str
    line: int | None
    reasons: list[Reason] = field(default_factory=list)
    record: Any = None           # the record as read; None when it could not be parsed
    raw: str | None = None       # the text of a record that could not be parsed

    @classmethod
    def of(cls, raw: RawRecord, reasons: Iterable[tuple[str, str]]) -> Reject:
        """The reject of a record the loader read (parsed or not)."""
        return cls(raw.source, raw.line, [Reason(*r) for r in reasons], raw.data, raw.raw)

    @classmethod
    def unreadable(cls, raw: RawRecord) -> Reject:
        """The reject of a record the loader could not parse (``raw.data`` is None), with the check its error names."""
        error = raw.error or "unreadable"
        return cls.of(raw, [(error_check(error), error)])

    @property
    def reason(self) -> str:
        """The reasons on one line, ``check: message; ...`` (for log lines and error messages)."""
        return "; ".join(f"{r.check}: {r.message}" for r in self.reasons)


def reject_line(reject: Reject, record_json: str | None = None) -> str:
    """``reject`` as one line of ``rejects.jsonl``, newline included.

    ``record_json``: the record already serialised (e.g. its line read back from the source file),
    written as it is instead of ``reject.record``.
    """
    head = json.dumps({"source": reject.source, "line": reject.line,
                       "reasons": [{"check": c, "message": m} for c, m in reject.reasons]}, ensure_ascii=True)
    if record_json is None and reject.record is not None:
        record_json = dumps_record(reject.record)
    body = f'"record": {record_json}' if record_json is not None else f'"raw": {dumps_record(reject.raw)}'
    return head[:-1] + ", " + body + "}\n"


def write_rejects(rejects: Iterable[Reject], path: str | Path) -> None:
    """Write ``rejects`` to ``path`` (``rejects.jsonl``), one :func:`reject_line` each."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(reject_line(r))


def log_rejects(rejects: list[Reject], what: str = "records") -> None:
    """Warn that ``rejects`` were not used (all listed in ``rejects.jsonl``), and name each file whose compressed
    stream broke off: the run trains on the records before that point only."""
    for r in rejects:
        if any(reason.check == TRUNCATED_FILE for reason in r.reasons):
            log.warning("%s:%s: %s", r.source, r.line, r.reason.removeprefix(f"{TRUNCATED_FILE}: "))
    if rejects:
        log.warning("%d %s rejected (first: %s:%s: %s); all are listed in rejects.jsonl",
                    len(rejects), what, rejects[0].source, rejects[0].line, rejects[0].reason)

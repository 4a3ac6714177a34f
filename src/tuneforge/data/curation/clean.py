"""Check and clean data files in one streaming pass: every record ends up kept or rejected, with reasons.

:func:`curate` is the engine behind ``tuneforge data check`` (``out_dir=None``: nothing written) and
``tuneforge data clean`` (writes ``clean.jsonl``, ``rejects.jsonl`` and ``report.json`` to ``out_dir``).

The stages (methods of :class:`_Curation`, in the order :func:`curate` calls them):

1. ``read``: stream records in chunks (:func:`tuneforge.data.loaders.iter_records`); per record run the
   structural and quality checks (:func:`tuneforge.data.curation.validation.check_record`), then per
   chunk ``check_kinds`` (all records of one kind: chat, text or preference), ``check_lengths`` (token
   counts, batched) and ``route``: rejected records go to ``rejects.jsonl`` at once; kept ones go to a
   spool file in ``out_dir`` and their hashes/MinHash signatures to a
   :class:`tuneforge.data.curation.dedup.DuplicateIndex`.
2. ``add_references``: records of ``against`` files (validation/test) join the index as references.
3. ``find_duplicates``: exact and near duplicates and leaks in one pass over the index.
4. ``write_clean``: the spool is streamed into ``clean.jsonl`` or, for duplicates, ``rejects.jsonl``.
5. ``finish``: totals, per-check counts and the dataset-level warnings (:func:`_dataset_level`) make
   ``report.json``.

``rejects.jsonl`` has the schema of :mod:`tuneforge.data.rejects` (the same as training's).

Memory is the index (~300 B a record) plus one chunk; texts are never held. ``clean + rejected ==
records`` always holds (``CurationReport.records``), and the report says which check removed what.
"""

from __future__ import annotations

import json
import math
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from tuneforge.data import jsonio
from tuneforge.data.curation.config import CHECKS, DATASET_CHECKS, CurationConfig
from tuneforge.data.curation.conflicts import find_conflicts
from tuneforge.data.curation.dedup import Duplicate, DuplicateIndex, template_shingles
from tuneforge.data.curation.validation import Checked, Issue, check_record, mask_record
from tuneforge.data.formats import KINDS, kind_mismatch
from tuneforge.data.loaders import (
    RawRecord,
    data_suffix,
    iter_records,
    jsonl_lines,
    parse_jsonl_line,
    truncation_record,
)
from tuneforge.data.rejects import Reason, Reject, reject_line
from tuneforge.data.textfile import TextFile
from tuneforge.data.token_count import CharEstimate, LengthCounter, make_counter

CLEAN_FILE, REJECTS_FILE, REPORT_FILE = "clean.jsonl", "rejects.jsonl", "report.json"
T = TypeVar("T")
_LABEL_MAX_CHARS = 64


@dataclass
class CurationReport:
    """What :func:`curate` found. ``checks[name]``: action and how many records the check fired on."""
    files: list[str]
    records: int = 0
    clean: int = 0
    rejected: int = 0
    kind: str | None = None
    formats: dict[str, int] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    rejected_by: dict[str, int] = field(default_factory=dict)
    duplicate_clusters: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)   # prompts with several answers, kept first
    lengths: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, int] | None = None
    dataset_warnings: list[dict[str, str]] = field(default_factory=list)
    against: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no record would be rejected."""
        return self.rejected == 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def summary(self, max_examples: int = 5) -> str:
        """A human-readable report: totals, formats, checks that fired, first examples, warnings."""
        lines = [f"{self.records} records in {len(self.files)} file(s): {self.clean} clean, {self.rejected} rejected"
                 + (f" (kind: {self.kind})" if self.kind else "")]
        if self.formats:
            by_count = sorted(self.formats.items(), key=lambda kv: -kv[1])
            lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in by_count))
        fired = [(n, c) for n, c in self.checks.items() if c["found"]]
        if fired:
            lines.append("checks:")
            for name, c in fired:
                lines.append(f"  {name:<16} {c['found']:>8}  {c['action']:<6}  {CHECKS[name].description}")
                for ex in self.examples.get(name, [])[:max_examples]:
                    lines.append(f"      {ex['where']}: {ex['message']}")
        else:
            lines.append("checks: nothing found")
        if self.lengths:
            ln = self.lengths
            lines.append(f"lengths ({ln['unit']}): p50 {ln['p50']}, p90 {ln['p90']}, p99 {ln['p99']}, max {ln['max']}")
        if self.duplicate_clusters:
            lines.append(f"duplicate clusters: {len(self.duplicate_clusters)} listed in the report")
        if self.conflicts:
            lines.append(f"prompts with conflicting answers: {len(self.conflicts)} listed in the report")
        for w in self.dataset_warnings:
            lines.append(f"warning [{w['check']}]: {w['message']}")
        for name, path in self.outputs.items():
            lines.append(f"{name}: {path}")
        return "\n".join(lines)


def chunked(it: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` consecutive items of ``it`` (the last one shorter)."""
    chunk: list[T] = []
    for r in it:
        chunk.append(r)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Tally:
    """Per-check counts and the first examples."""

    def __init__(self, config: CurationConfig):
        self.config = config
        self.found: Counter = Counter()
        self.rejected_by: Counter = Counter()
        self.examples: dict[str, list[dict[str, str]]] = {}

    def add(self, check: str, where: str, message: str, rejected: bool) -> None:
        self.found[check] += 1
        if rejected:
            self.rejected_by[check] += 1
        ex = self.examples.setdefault(check, [])
        if len(ex) < self.config.max_examples:
            ex.append({"where": where, "message": message[:300]})


class AnswerLabels:
    """Distinct short final answers, while the data looks like classification (few distinct answers)."""

    def __init__(self, max_values: int):
        self.max_values, self.active = max_values, True
        self.ids: dict[str, int] = {}

    def id(self, label: str | None) -> int:
        if not self.active or label is None:
            return -1
        key = label.strip()
        if len(key) > _LABEL_MAX_CHARS:
            self.active = False
            return -1
        i = self.ids.get(key)
        if i is None:
            if len(self.ids) >= self.max_values:
                self.active = False
                return -1
            i = self.ids[key] = len(self.ids)
        return i


class _SourceLines:
    """Raw lines of a ``.jsonl`` file by line number (increasing), numbered as the loader numbers them."""

    def __init__(self, path: str):
        self.f = TextFile(path)
        self.lines = self.f.lines()

    def get(self, number: int) -> str:
        """Line ``number`` of a record that parsed, so any ``\\r`` in it is whitespace between JSON tokens: written
        as a space, so that the line copied into ``rejects.jsonl`` holds no line break for any reader."""
        for n, line in self.lines:
            if n == number:
                return line.replace("\r", " ")
        raise LookupError(f"line {number} not found")

    def close(self) -> None:
        self.f.close()


_WORKER_INDEX: dict[tuple, DuplicateIndex] = {}
_REMOTE: dict[str, Any] = {"remote": True}   # stands for a clean record that stayed in the worker


_LONG_LABEL = "x" * (_LABEL_MAX_CHARS + 1)   # what a worker sends for a label too long to count
_UNPARSED: dict[str, Any] = {"unparsed": True}  # stands for a .jsonl record that only a worker parsed


@dataclass
class _Lines:
    """A chunk of raw ``.jsonl`` lines: sent to a worker as text, parsed there, not here."""
    source: str
    lines: list[tuple[int, str]]

    def records(self) -> list[RawRecord]:
        return [parse_jsonl_line(self.source, n, text) for n, text in self.lines]


def _check_chunk(chunk: list[RawRecord] | _Lines, config: CurationConfig, index_params: tuple | None,
                 counter: LengthCounter | None) -> tuple[list[tuple], tuple | None]:
    """Worker side of ``workers > 1``: parse, check, count and hash a chunk; send back small tuples, no texts."""
    records = chunk.records() if isinstance(chunk, _Lines) else chunk
    checked = [check_record(r, config) for r in records]
    rows = [i for i, c in enumerate(checked) if c.clean is not None]
    hashes = None
    if index_params is not None:
        index = _WORKER_INDEX.get(index_params)
        if index is None:
            index = _WORKER_INDEX[index_params] = DuplicateIndex(*index_params)
        hashes = (rows, index.hashes([checked[i].dedup_text for i in rows]))
    if counter is not None and rows:
        for i, n in zip(rows, counter.count([checked[i].clean for i in rows]), strict=False):
            checked[i].tokens = n
    slim = []
    for c in checked:
        line = None
        if c.clean is not None:
            try:
                line = jsonio.dumps(c.clean)
            except UnicodeEncodeError:
                line = None
        label = c.label if c.label is None or len(c.label.strip()) <= _LABEL_MAX_CHARS else _LONG_LABEL
        slim.append((c.format, c.kind, [(i.check, i.message) for i in c.issues], line, label, c.pii,
                     c.tokens, c.conflict, c.clean is not None, c.raw.data is not None))
    return slim, hashes


def _checked_chunks(file: str, config: CurationConfig, chunk_size: int, pool: Any,
                    workers: int, index_params: tuple | None, counter: LengthCounter | None
                    ) -> Iterator[tuple[list[Checked], tuple | None]]:
    """Chunks of checked records of ``file`` in file order, checked here or by ``pool`` (2 chunks a worker in flight).

    With a pool, ``.jsonl`` lines go to the workers unparsed (parsing is a third of the work per record).
    ``counter``: a picklable counter the workers use (then ``Checked.tokens`` is set and ``clean`` is
    :data:`_REMOTE` until :func:`_local_clean` rebuilds it).
    """
    if pool is None:
        for chunk in chunked(iter_records(file), chunk_size):
            yield [check_record(r, config) for r in chunk], None
        return
    from collections import deque

    if _is_jsonl(file):
        chunks: Iterable = _jsonl_chunks(file, chunk_size)
    else:
        chunks = chunked(iter_records(file), chunk_size)
    pending: deque = deque()
    for chunk in chunks:
        pending.append((chunk, pool.apply_async(_check_chunk, (chunk, config, index_params, counter))))
        if len(pending) >= 2 * workers:
            yield _rejoin(*pending.popleft())
    while pending:
        yield _rejoin(*pending.popleft())


def _jsonl_chunks(file: str, chunk_size: int) -> Iterator[_Lines | list[RawRecord]]:
    """The lines of a ``.jsonl`` file in chunks, unparsed; where a compressed stream broke off, one more chunk: its
    :func:`~tuneforge.data.loaders.truncation_record`."""
    with TextFile(file) as f:
        for lines in chunked(jsonl_lines(f), chunk_size):
            yield _Lines(file, lines)
        if f.error is not None:
            yield [truncation_record(file, f.error, f.error_line, f.partial)]


def _rejoin(chunk: list[RawRecord] | _Lines, future: Any) -> tuple[list[Checked], tuple | None]:
    slim, hashes = future.get()
    if isinstance(chunk, _Lines):           # parse here only what could not be parsed (for its rejects line)
        parsed = [s[-1] for s in slim]                      # the worker could parse it: a JSON object
        raws = [RawRecord(chunk.source, n, _UNPARSED, raw=text) if ok else parse_jsonl_line(chunk.source, n, text)
                for (n, text), ok in zip(chunk.lines, parsed, strict=False)]
    else:
        raws = chunk
    checked = []
    for raw, (fmt, kind, issues, line, label, pii, tokens, conflict, has_clean, _) in zip(raws, slim, strict=False):
        checked.append(Checked(raw, fmt, kind, _REMOTE if has_clean else None, [Issue(*i) for i in issues],
                               label=label, pii=pii, tokens=tokens, line=line, conflict=conflict))
    return checked, hashes


def _parsed(c: Checked) -> RawRecord:
    """``c.raw``, parsed here if only a worker parsed it."""
    if c.raw.data is _UNPARSED:
        c.raw = parse_jsonl_line(c.raw.source, c.raw.line, c.raw.raw)
    return c.raw


def _local_clean(c: Checked, config: CurationConfig) -> dict[str, Any]:
    """The clean record of ``c``, rebuilt here when a worker checked it (rare: truncation, PII masking)."""
    if c.clean is _REMOTE:
        c.clean = check_record(_parsed(c), config).clean
    return c.clean


def _truncate(clean: dict[str, Any], tokens: int, counter: LengthCounter, config: CurationConfig
              ) -> tuple[dict[str, Any] | None, str]:
    """Shorten the final answer (or text) to fit ``max_length``; None when nothing of the answer would be left."""
    if "messages" in clean:
        key = "messages"
        answer = clean["messages"][-1]["content"]
    elif "text" in clean:
        key, answer = "text", clean["text"]
    else:
        return None, "preference pairs are not truncated"
    keep_min = max(1, config.min_answer_chars)
    total_chars = sum(len(m["content"]) for m in clean["messages"]) if key == "messages" else len(answer)
    for _ in range(4):
        excess = tokens - config.max_length
        if excess <= 0:
            return clean, f"truncated to {tokens} tokens"
        cut = math.ceil(excess * max(1.0, total_chars / max(tokens, 1)) * 1.05) + 1
        if len(answer) - cut < keep_min or not answer[: len(answer) - cut].strip():
            return None, "the prompt alone nearly fills max_length: truncating would remove the answer"
        answer = answer[: len(answer) - cut]
        total_chars -= cut
        if key == "messages":
            clean = {**clean, "messages": clean["messages"][:-1] + [{**clean["messages"][-1], "content": answer}]}
        else:
            clean = {"text": answer}
        tokens = counter.count([clean])[0]
    return (clean, f"truncated to {tokens} tokens") if tokens <= config.max_length else (None, "could not truncate")


AUTO_WORKERS_MIN_BYTES = 16 * 2**20


def resolve_workers(workers: int | str, files: list[str | Path]) -> int:
    """``workers``, or for ``"auto"``: one process per core (at most 8) when the inputs total over 16 MB, else 1.

    Starting the pool costs ~0.1 s and shipping records to the workers ~30% more CPU a record, so small
    inputs (16 MB is ~20k Alpaca-size records, ~1.5 s in one process) stay in one process.
    """
    if workers != "auto":
        return int(workers)
    size = sum(Path(f).stat().st_size for f in files if Path(f).is_file())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, 8) if size > AUTO_WORKERS_MIN_BYTES else 1


def curate(files: str | Path | list[str | Path], config: CurationConfig | None = None,
           out_dir: str | Path | None = None, against: list[str | Path] | None = None,
           counter: LengthCounter | None = None, chunk_size: int = 256,
           progress: Callable[[int], None] | None = None, workers: int = 1) -> CurationReport:
    """Check (``out_dir=None``) or clean (write to ``out_dir``) ``files``; see the module docstring.

    ``against``: validation/test files; training records that duplicate one of their records are
    reported as ``leakage``. ``counter``: token counter (default: ``config.model``'s tokenizer or the
    character estimate). ``progress`` is called with the number of records read so far.
    ``workers > 1`` checks and hashes chunks in that many processes (reading, lengths, dedup and
    writing stay in this one); the output is the same as with one.
    """
    config = config or CurationConfig()
    files = _expand_sources([files] if isinstance(files, (str, Path)) else files)
    against = _expand_sources(against or [])
    counter = counter or make_counter(config.model, config.chars_per_token)
    run = _Curation(files, config, counter, bool(against), out_dir, chunk_size, progress)
    try:
        run.start(workers)
        for file in files:
            run.read(file)
        run.add_references(against)
        run.find_duplicates()
        run.write_clean()
    finally:
        run.close()
    return run.finish()


def _expand_sources(paths: list[str | Path]) -> list[str]:
    """Fail before any work, not after the first file: every path exists and has a supported suffix. A folder of
    shards is its files (read as files are); a ``save_to_disk`` folder or a Hub id is its name with its split
    (what its records' ``source`` is, :mod:`tuneforge.data.sources`)."""
    from tuneforge.data.sources import check_source, parse_source, shard_files

    out: list[str] = []
    for f in paths:
        check_source(f)
        source = parse_source(f)
        if source.kind == "shards":
            out += [str(p) for p in shard_files(source.location)]
        else:
            out.append(source.name if source.kind in ("saved", "hub") else str(f))
    return out


def _is_jsonl(file: str) -> bool:
    """A ``.jsonl`` file (its lines can be re-read by number); not a ``datasets`` source."""
    return Path(file).is_file() and data_suffix(file) == ".jsonl"


def _index_params(config: CurationConfig, has_against: bool) -> tuple | None:
    """Arguments of the :class:`DuplicateIndex` (MinHash only when near duplicates or leaks are looked for),
    or None when every duplicate check is off."""
    act = config.action
    if all(act(c) == "off" for c in ("exact_duplicate", "near_duplicate", "leakage")):
        return None
    near = act("near_duplicate") != "off" or (has_against and act("leakage") != "off")
    return near, config.near_dup_threshold, config.num_perm, config.shingle_words


def _template_stop(files: list[str], config: CurationConfig) -> bytes:
    """The template shingles (see :func:`tuneforge.data.curation.dedup.template_shingles`) of the first
    ``config.template_sample`` usable records of ``files``, as bytes (part of the index parameters)."""
    if not config.template_share:
        return b""
    texts: list[str] = []
    for file in files:
        for raw in iter_records(file):
            c = check_record(raw, config)
            if c.clean is not None and c.dedup_text:
                texts.append(c.dedup_text)
            if len(texts) >= config.template_sample:
                break
        if len(texts) >= config.template_sample:
            break
    return template_shingles(texts, config.template_share, config.shingle_words).tobytes()


def _start_pool(workers: int) -> Any:
    """A pool of ``workers`` processes (fork where there is one: fast start, no re-import of ``__main__``);
    None for one worker."""
    if workers <= 1:
        return None
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(workers)


def _clean_line(c: Checked, config: CurationConfig) -> str | None:
    """The clean record of ``c`` as a JSON line, PII masked when asked; None (and an ``invalid_utf8``
    issue) when a text holds a lone surrogate."""
    masked = config.mask_pii and c.pii
    if c.line is not None and not masked:
        return c.line
    try:
        clean = _local_clean(c, config)
        return jsonio.dumps(mask_record(clean) if masked else clean)
    except UnicodeEncodeError:
        c.add("invalid_utf8", "a text contains a lone surrogate (invalid UTF-8)")
        return None


def _index_kept(index: DuplicateIndex, texts: list[str], rows: list[int], hashes: tuple | None) -> None:
    """Add the kept records of a chunk to ``index``: their texts, or the hashes a worker computed for the
    chunk's structurally valid records (``hashes[0]``: their rows), picked at the kept ``rows``."""
    if hashes is None:
        index.add(texts)
        return
    hashed_rows, computed = hashes
    at = {r: k for k, r in enumerate(hashed_rows)}
    index.add_hashes(computed.take(np.array([at[p] for p in rows], dtype=np.int64)))


class _OriginalLines:
    """Raw lines of the ``.jsonl`` inputs by (file, line number), each file read forward once, on demand."""

    def __init__(self, sources: list[str]):
        self.sources = sources
        self.readers: dict[int, _SourceLines] = {}

    def get(self, file_id: int, number: int) -> str:
        if file_id not in self.readers:
            self.readers[file_id] = _SourceLines(self.sources[file_id])
        return self.readers[file_id].get(number)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


_SPOOL_CLEAN, _SPOOL_ORIG = ".spool.clean.jsonl", ".spool.orig.jsonl"


class _Curation:
    """The state of one :func:`curate` call; its stages are the methods below, in the order they run.

    Per kept training record it holds only its file, line, length and label id (~22 bytes) and its
    hashes in the duplicate index. With an output folder the kept records wait in two spools until
    duplicates are known: ``.spool.clean.jsonl`` (the clean lines) and ``.spool.orig.jsonl`` (the
    originals of records of non-``.jsonl`` files; ``.jsonl`` originals are re-read from the file).
    """

    def __init__(self, files: list[str], config: CurationConfig, counter: LengthCounter, has_against: bool,
                 out_dir: str | Path | None, chunk_size: int, progress: Callable[[int], None] | None):
        self.config, self.act, self.counter = config, config.action, counter
        self.chunk_size, self.progress = chunk_size, progress
        self.report = CurationReport(files=files, config=config.model_dump())
        self.tally = _Tally(config)
        self.formats: Counter = Counter()
        self.kind = None if config.format == "auto" else KINDS[config.format]
        self.index_params = _index_params(config, has_against)
        if self.index_params is not None and self.index_params[0]:
            self.index_params += (_template_stop(files, config), config.short_text_words, config.short_text_ngrams)
        self.index = DuplicateIndex(*self.index_params) if self.index_params is not None else None
        self.n_read = 0
        self.sources: list[str] = []
        self.where_file, self.where_line = array("H"), array("q")    # of each kept record
        self.lengths, self.label_ids = array("I"), array("i")
        self.prompt_keys, self.answer_keys = array("Q"), array("Q")   # conflicting_labels (0: no prompt)
        self.labels = AnswerLabels(config.max_label_values)
        self.ref_where: list[str] = []                               # of each --against record in the index
        self.dropped = np.zeros(0, dtype=bool)                       # kept records found to be duplicates
        self.drop_reason: dict[int, tuple[str, str]] = {}
        self.out = Path(out_dir) if out_dir is not None else None
        self.rejects = self.spool_clean = self.spool_orig = None
        self.pool, self.workers = None, 1
        self.remote_counter = counter if isinstance(counter, CharEstimate) else None   # tokenizers count here

    # ---------------------------------------------------------------- stage 0: outputs and workers

    def start(self, workers: int) -> None:
        """Create the output folder, ``rejects.jsonl`` and the spools; start the worker processes."""
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.rejects = open(self.out / REJECTS_FILE, "w", encoding="utf-8")
            self.spool_clean = open(self.out / _SPOOL_CLEAN, "w", encoding="utf-8")
            self.spool_orig = open(self.out / _SPOOL_ORIG, "w", encoding="utf-8")
        self.pool, self.workers = _start_pool(workers), workers

    # ---------------------------------------------------------------- stage 1: read and check each record

    def read(self, file: str) -> None:
        """Check every record of ``file`` chunk by chunk: record checks (here or in the pool), kinds,
        lengths, then each record to ``rejects.jsonl`` or kept (spooled and hashed)."""
        self.sources.append(file)
        file_id = len(self.sources) - 1
        spool_original = not _is_jsonl(file)
        for checked, hashes in _checked_chunks(file, self.config, self.chunk_size, self.pool, self.workers,
                                               self.index_params, self.remote_counter):
            self.n_read += len(checked)
            self.check_lengths(self.check_kinds(checked))
            self.route(checked, hashes, file_id, spool_original)
            if self.progress:
                self.progress(self.n_read)

    def _rejected(self, c: Checked) -> bool:
        return any(self.act(i.check) == "reject" for i in c.issues)

    def check_kinds(self, checked: list[Checked]) -> list[Checked]:
        """Count formats; flag ``mixed_kinds`` on records of another kind (chat/text/preference) than the
        first. Returns the structurally valid records nothing rejects so far (for the length check)."""
        valid: list[Checked] = []
        for c in checked:
            self.formats["unparsable" if c.raw.data is None else (c.format or "unknown")] += 1
            if c.clean is None:
                continue
            if self.kind is None:
                self.kind = c.kind
            elif (mismatch := kind_mismatch(c.format, self.kind)) is not None:
                c.add("mixed_kinds", mismatch)
                continue
            if not self._rejected(c):
                valid.append(c)
        return valid

    def check_lengths(self, valid: list[Checked]) -> None:
        """Set the token count of ``valid`` records (counted here, or already by a worker); handle those
        over ``max_length`` (see :meth:`_too_long`)."""
        if not valid:
            return
        config = self.config
        precounted = self.pool is not None and self.remote_counter is not None
        counts = ([c.tokens for c in valid] if precounted
                  else self.counter.count([_local_clean(c, config) for c in valid]))
        for c, n in zip(valid, counts, strict=False):
            c.tokens = n
            if config.max_length is not None and n > config.max_length and self.act("too_long") != "off":
                self._too_long(c)

    def _too_long(self, c: Checked) -> None:
        """Flag ``too_long``, or with ``too_long: truncate`` (and no explicit action) shorten the final answer
        to fit, counted as a warning; a record whose answer would not survive is flagged."""
        config, n = self.config, c.tokens
        message = f"{n} tokens > max_length {config.max_length}"
        if config.too_long != "truncate" or "too_long" in config.actions:
            c.add("too_long", message)
            return
        new, why = _truncate(_local_clean(c, config), n, self.counter, config)
        if new is None:
            c.add("too_long", f"{message}; {why}")
        else:
            c.clean, c.tokens, c.line = new, self.counter.count([new])[0], None
            self.tally.add("too_long", c.where, f"{message}; {why}", False)

    def route(self, checked: list[Checked], hashes: tuple | None, file_id: int, spool_original: bool) -> None:
        """Tally every issue; a record with a rejecting issue (or no usable clean line) goes to
        ``rejects.jsonl``, any other is kept: remembered, spooled and added to the duplicate index."""
        spool_batch: list[str] = []             # one write a chunk: a write per line costs ~4 us
        texts: list[str] = []
        rows: list[int] = []
        for pos, c in enumerate(checked):
            line = _clean_line(c, self.config) if c.clean is not None and not self._rejected(c) else None
            reasons = self._reasons(c)
            if reasons or line is None:
                self._reject(c, reasons)
                continue
            self._keep(c, file_id)
            texts.append(c.dedup_text)
            rows.append(pos)
            if self.spool_clean is not None:
                spool_batch.append(line)
                if spool_original:             # .jsonl originals are re-read verbatim from the file if needed
                    self.spool_orig.write(jsonio.dumps_record(c.raw.data) + "\n")
        if spool_batch:
            self.spool_clean.write("\n".join(spool_batch) + "\n")
        if self.index is not None and rows:
            _index_kept(self.index, texts, rows, hashes)

    def _reasons(self, c: Checked) -> list[tuple[str, str]]:
        """Tally each issue of ``c`` whose check is not off; return ``(check, message)`` of those that reject."""
        reasons = []
        for issue in c.issues:
            action = self.act(issue.check)
            if action == "off":
                continue
            self.tally.add(issue.check, c.where, issue.message, action == "reject")
            if action == "reject":
                reasons.append((issue.check, issue.message))
        return reasons

    def _reject(self, c: Checked, reasons: list[tuple[str, str]]) -> None:
        """Count ``c`` as rejected and write its ``rejects.jsonl`` line (record verbatim)."""
        self.report.rejected += 1
        if self.rejects is not None:
            reasons = reasons or [("invalid", "record could not be used")]
            self.rejects.write(reject_line(Reject.of(_parsed(c), reasons)))

    def _keep(self, c: Checked, file_id: int) -> None:
        """Remember a kept record: where it came from, its length and its label id."""
        self.where_file.append(file_id)
        self.where_line.append(c.raw.line)
        self.lengths.append(min(c.tokens, 2**32 - 1))
        self.label_ids.append(self.labels.id(c.label) if c.kind == "chat" else -1)
        prompt, answer = c.conflict or (0, 0)
        self.prompt_keys.append(prompt)
        self.answer_keys.append(answer)
        if self.kind != "chat":
            self.labels.active = False

    # ---------------------------------------------------------------- stage 2: references, duplicates

    def add_references(self, against: list[str]) -> None:
        """Add the usable records of the ``against`` files (validation/test) to the index as references."""
        if self.index is None or not against or self.act("leakage") == "off":
            return
        total = 0
        for file in against:
            for chunk in chunked(iter_records(file), self.chunk_size):
                total += len(chunk)
                checked = (check_record(r, self.config) for r in chunk)
                usable = [c for c in checked if c.clean is not None and c.dedup_text]
                self.ref_where.extend(c.where for c in usable)
                if usable:
                    self.index.add_reference([c.dedup_text for c in usable])
        self.report.against = {"files": against, "records": total, "compared": len(self.ref_where)}

    def where(self, i: int) -> str:
        """``file:line`` of record ``i`` of the index (kept training records first, then references)."""
        n_train = len(self.where_file)
        if i >= n_train:
            return self.ref_where[i - n_train]
        return f"{self.sources[self.where_file[i]]}:{self.where_line[i]}"

    def find_duplicates(self) -> None:
        """Exact and near duplicates and leaks in one pass over the index: tally them, mark the rejected
        ones in ``dropped``, list the first 200 clusters; then conflicting labels among the records left
        (:meth:`find_conflicts`); settle the clean and rejected counts."""
        n_train = len(self.where_file)
        self.dropped = np.zeros(n_train, dtype=bool)
        if self.index is not None:
            result = self.index.find()
            for i, d in sorted(result.duplicates.items()):
                self._duplicate(i, d)
            for members, kind in list(zip(result.clusters, result.cluster_kinds, strict=False))[:200]:
                self.report.duplicate_clusters.append({
                    "kind": kind, "size": len(members), "first": self.where(members[0]),
                    "first_is_reference": members[0] >= n_train,
                    "members": [self.where(m) for m in members[1:21]]})
        self.find_conflicts()
        n_dropped = int(self.dropped.sum())
        self.report.rejected += n_dropped
        self.report.clean = n_train - n_dropped

    def _duplicate(self, i: int, d: Duplicate) -> None:
        """Tally that kept record ``i`` duplicates ``d.of`` (``exact_duplicate``, ``near_duplicate`` or
        ``leakage``); mark it dropped when that check rejects."""
        check = "leakage" if d.leak else ("exact_duplicate" if d.kind == "exact" else "near_duplicate")
        action = self.act(check)
        if action == "off":
            return
        message = (f"{d.kind} duplicate of {self.where(d.of)}"
                   + ("" if d.kind == "exact" else f" (similarity {d.similarity:.2f}"
                      + (f" of word 1- to {self.config.short_text_ngrams}-grams: short text)" if d.short else ")"))
                   + (" in the --against data" if d.leak else ""))
        self.tally.add(check, self.where(i), message, action == "reject")
        if action == "reject":
            self.dropped[i] = True
            self.drop_reason[i] = (check, message)

    def find_conflicts(self) -> None:
        """``conflicting_labels`` (:mod:`tuneforge.data.curation.conflicts`): each kept record whose prompt has a
        majority answer other than its own is tallied with the line of that answer's first record, and
        dropped when the check rejects; the first 200 prompts are listed in ``report.conflicts``."""
        action = self.act("conflicting_labels")
        if action == "off" or not len(self.where_file):
            return
        prompts = np.frombuffer(self.prompt_keys, dtype=np.uint64)
        answers = np.frombuffer(self.answer_keys, dtype=np.uint64)
        for conflict in find_conflicts(prompts, answers, ~self.dropped):
            kept = conflict.kept
            rule = "the majority answer" if len(kept) > len(conflict.answers[1]) else "tied: the first answer"
            for i in conflict.others:
                mine = next(len(a) for a in conflict.answers if i in a)
                message = (f"same prompt as {self.where(kept[0])}, another answer ({mine} of "
                           f"{sum(map(len, conflict.answers))} records give this one; {len(kept)} give "
                           f"{rule}, kept)")
                self.tally.add("conflicting_labels", self.where(i), message, action == "reject")
                if action == "reject":
                    self.dropped[i] = True
                    self.drop_reason[i] = ("conflicting_labels", message)
            if len(self.report.conflicts) < 200:
                self.report.conflicts.append({"answers": [{"records": len(a), "at": [self.where(i) for i in a[:20]]}
                                                          for a in conflict.answers]})

    # ---------------------------------------------------------------- stage 3: outputs

    def write_clean(self) -> None:
        """Stream the clean spool into ``clean.jsonl``; a dropped duplicate goes to ``rejects.jsonl`` with
        its original record (from the originals spool, or its line re-read from the ``.jsonl`` file)."""
        if self.out is None:
            return
        self.spool_clean.close()
        self.spool_orig.close()
        spooled = [not _is_jsonl(source) for source in self.sources]
        originals = _OriginalLines(self.sources)
        try:
            with open(self.out / _SPOOL_CLEAN, encoding="utf-8") as spool, \
                 open(self.out / _SPOOL_ORIG, encoding="utf-8") as spool_orig, \
                 open(self.out / CLEAN_FILE, "w", encoding="utf-8") as clean_out:
                kept: list[str] = []
                for i, line in enumerate(spool):
                    fid = self.where_file[i]
                    orig = spool_orig.readline() if spooled[fid] else None   # read every one: the spools stay in step
                    if self.dropped[i]:
                        orig = orig if orig is not None else originals.get(fid, self.where_line[i])
                        reject = Reject(self.sources[fid], self.where_line[i], [Reason(*self.drop_reason[i])])
                        self.rejects.write(reject_line(reject, orig.rstrip("\n")))
                        continue
                    kept.append(line)
                    if len(kept) >= 1024:
                        clean_out.write("".join(kept))
                        kept.clear()
                clean_out.write("".join(kept))
        finally:
            originals.close()
        self.report.outputs = {"clean": str(self.out / CLEAN_FILE), "rejects": str(self.out / REJECTS_FILE),
                               "report": str(self.out / REPORT_FILE)}

    def close(self) -> None:
        """Stop the workers, close the files and remove the spools (after an error too)."""
        if self.pool is not None:
            self.pool.terminate()
        for f in (self.rejects, self.spool_clean, self.spool_orig):
            if f is not None:
                f.close()
        if self.out is not None:
            for name in (_SPOOL_CLEAN, _SPOOL_ORIG):
                (self.out / name).unlink(missing_ok=True)

    # ---------------------------------------------------------------- stage 4: the report

    def finish(self) -> CurationReport:
        """Complete the report (totals, per-check counts, dataset-level warnings) and write ``report.json``."""
        report, config, act = self.report, self.config, self.act
        report.records = self.n_read
        report.kind = self.kind
        report.formats = dict(self.formats)
        report.checks = {name: {"action": act(name), "found": self.tally.found.get(name, 0),
                                "rejected": self.tally.rejected_by.get(name, 0)} for name in CHECKS}
        if config.too_long == "truncate" and "too_long" not in config.actions and config.max_length is not None:
            report.checks["too_long"]["action"] = "truncate"
        report.examples = self.tally.examples
        report.rejected_by = dict(self.tally.rejected_by)
        keep = ~self.dropped
        n_train = len(self.where_file)
        lengths = np.frombuffer(self.lengths, dtype=np.uint32)[keep] if n_train else np.zeros(0)
        label_ids = np.frombuffer(self.label_ids, dtype=np.int32)[keep] if n_train else np.zeros(0, np.int32)
        _dataset_level(report, config, self.counter, lengths, label_ids, self.labels)
        if self.out is not None:
            (self.out / REPORT_FILE).write_text(
                json.dumps(report.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
        assert report.clean + report.rejected == report.records, "curation lost records"
        return report


def _dataset_level(report: CurationReport, config: CurationConfig, counter: LengthCounter,
                   lengths: np.ndarray, label_ids: np.ndarray, labels: AnswerLabels) -> None:
    """Length percentiles, label distribution and the dataset-level warnings."""
    n = report.clean
    warn = report.dataset_warnings
    if n < config.min_examples:
        warn.append({"check": "few_examples", "message": f"{n} clean examples (< {config.min_examples}): expect "
                     "overfitting; consider more data, fewer epochs or a smaller learning rate"})
    if len(lengths):
        p50, p90, p99 = (int(x) for x in np.percentile(lengths, [50, 90, 99]))
        report.lengths = {"unit": counter.unit, "p50": p50, "p90": p90, "p99": p99, "max": int(lengths.max()),
                          "over_max_length": int((lengths > config.max_length).sum()) if config.max_length else 0}
        if p50 > 0 and p99 > config.long_tail_ratio * p50:
            warn.append({"check": "long_tail", "message": f"p99 length {p99} is {p99 / p50:.1f}x the median {p50}: "
                         "a few long records dominate memory; consider max_length or packing"})
    if labels.active and labels.ids and n >= 2 * len(labels.ids) and len(labels.ids) >= 2:
        names = {i: k for k, i in labels.ids.items()}
        counts = np.bincount(label_ids[label_ids >= 0], minlength=len(names))
        report.labels = {names[i]: int(c) for i, c in sorted(enumerate(counts), key=lambda ic: -ic[1]) if c}
        present = counts[counts > 0]
        if len(present) >= 2 and present.max() >= config.imbalance_ratio * present.min():
            top = max(report.labels, key=report.labels.get)
            warn.append({"check": "label_imbalance",
                         "message": f"answer {top!r} is {present.max() / present.min():.0f}x as common as the rarest "
                                    "answer; consider resampling or --stratify when splitting"})
    for w in warn:
        w.setdefault("description", DATASET_CHECKS[w["check"]])


def check_files(files: str | Path | list[str | Path], config: CurationConfig | None = None,
                against: list[str | Path] | None = None, **kwargs: Any) -> CurationReport:
    """Validate ``files`` without writing anything (``tuneforge data check``)."""
    return curate(files, config, out_dir=None, against=against, **kwargs)


def clean_files(files: str | Path | list[str | Path], out_dir: str | Path, config: CurationConfig | None = None,
                against: list[str | Path] | None = None, **kwargs: Any) -> CurationReport:
    """Write ``clean.jsonl``, ``rejects.jsonl`` and ``report.json`` to ``out_dir`` (``tuneforge data clean``)."""
    return curate(files, config, out_dir=out_dir, against=against, **kwargs)

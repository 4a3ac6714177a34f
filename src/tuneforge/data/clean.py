"""Check and clean data files in one streaming pass: every record ends up kept or rejected, with reasons.

:func:`curate` is the engine behind ``tuneforge data check`` (``out_dir=None``: nothing written) and
``tuneforge data clean`` (writes ``clean.jsonl``, ``rejects.jsonl`` and ``report.json`` to ``out_dir``).

1. Stream records in chunks (:func:`tuneforge.data.loaders.iter_records`); per record run the
   structural and quality checks (:func:`tuneforge.data.validation.check_record`), the kind check (all
   records of one kind: chat, text or preference) and the token-length check (batched per chunk).
   Rejected records go to ``rejects.jsonl`` at once; kept ones go to a spool file in ``out_dir`` and
   their hashes/MinHash signatures to a :class:`tuneforge.data.dedup.DuplicateIndex`.
2. Records of ``against`` files (validation/test) are added to the index as references.
3. Duplicates and leaks are found in one pass over the index; the spool is streamed into
   ``clean.jsonl`` or, for duplicates, ``rejects.jsonl``.

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
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from tuneforge.data import jsonio
from tuneforge.data.curation_config import CHECKS, DATASET_CHECKS, CurationConfig
from tuneforge.data.dedup import DuplicateIndex
from tuneforge.data.loaders import (DataFileError, RawRecord, _open_text, data_suffix, iter_jsonl_lines, iter_records,
                                    parse_jsonl_line)
from tuneforge.data.token_count import CharEstimate, LengthCounter, make_counter
from tuneforge.data.validation import Checked, Issue, check_record, mask_record

CLEAN_FILE, REJECTS_FILE, REPORT_FILE = "clean.jsonl", "rejects.jsonl", "report.json"
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
            lines.append("formats: " + ", ".join(f"{k} {v}" for k, v in sorted(self.formats.items(), key=lambda kv: -kv[1])))
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
        for w in self.dataset_warnings:
            lines.append(f"warning [{w['check']}]: {w['message']}")
        for name, path in self.outputs.items():
            lines.append(f"{name}: {path}")
        return "\n".join(lines)


def _chunks(it: Iterable[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    chunk: list[RawRecord] = []
    for r in it:
        chunk.append(r)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _dump(obj: Any) -> str:
    try:
        text = json.dumps(obj, ensure_ascii=False, default=str)
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:        # lone surrogates: keep them, escaped, so the line is still valid JSON
        return json.dumps(obj, ensure_ascii=True, default=str)


def _reject_line(raw: RawRecord, reasons: list[tuple[str, str]], record_json: str | None = None) -> str:
    head = json.dumps({"source": raw.source, "line": raw.line,
                       "reasons": [{"check": c, "message": m} for c, m in reasons]}, ensure_ascii=True)
    if record_json is None:
        record_json = _dump(raw.data) if raw.data is not None else None
    body = f'"record": {record_json}' if record_json is not None else f'"raw": {_dump(raw.raw)}'
    return head[:-1] + ", " + body + "}\n"


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


class _Labels:
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
        self.f = _open_text(Path(path))
        self.lines = enumerate(self.f, start=1)

    def get(self, number: int) -> str:
        for n, line in self.lines:
            if n == number:
                return line.rstrip("\r\n")
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
        hashes = (rows, *index.hashes([checked[i].dedup_text for i in rows]))
    if counter is not None and rows:
        for i, n in zip(rows, counter.count([checked[i].clean for i in rows])):
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
                     c.tokens, c.clean is not None, c.raw.data is not None))
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
        for chunk in _chunks(iter_records(file), chunk_size):
            yield [check_record(r, config) for r in chunk], None
        return
    from collections import deque

    if data_suffix(file) == ".jsonl":
        chunks: Iterable = (_Lines(file, lines) for lines in _chunks(iter_jsonl_lines(file), chunk_size))
    else:
        chunks = _chunks(iter_records(file), chunk_size)
    pending: deque = deque()
    for chunk in chunks:
        pending.append((chunk, pool.apply_async(_check_chunk, (chunk, config, index_params, counter))))
        if len(pending) >= 2 * workers:
            yield _rejoin(*pending.popleft())
    while pending:
        yield _rejoin(*pending.popleft())


def _rejoin(chunk: list[RawRecord] | _Lines, future: Any) -> tuple[list[Checked], tuple | None]:
    slim, hashes = future.get()
    if isinstance(chunk, _Lines):           # parse here only what could not be parsed (for its rejects line)
        parsed = [s[-1] for s in slim]                      # the worker could parse it: a JSON object
        raws = [RawRecord(chunk.source, n, _UNPARSED, raw=text) if ok else parse_jsonl_line(chunk.source, n, text)
                for (n, text), ok in zip(chunk.lines, parsed)]
    else:
        raws = chunk
    checked = []
    for raw, (fmt, kind, issues, line, label, pii, tokens, has_clean, _) in zip(raws, slim):
        checked.append(Checked(raw, fmt, kind, _REMOTE if has_clean else None, [Issue(*i) for i in issues],
                               label=label, pii=pii, tokens=tokens, line=line))
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
            clean = {"messages": clean["messages"][:-1] + [{"role": "assistant", "content": answer}]}
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
    files = [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    against = [str(f) for f in (against or [])]
    for f in files + against:                # fail before any work, not after the first file
        if not Path(f).is_file():
            raise DataFileError(f"{f}: data file not found")
        data_suffix(f)
    counter = counter or make_counter(config.model, config.chars_per_token)
    act = config.action
    report = CurationReport(files=files, config=config.model_dump())
    tally = _Tally(config)
    formats: Counter = Counter()
    kind = {"auto": None, "text": "text", "preference": "preference"}.get(config.format, "chat")

    dup_checks = ("exact_duplicate", "near_duplicate", "leakage")
    use_index = any(act(c) != "off" for c in dup_checks)
    near = act("near_duplicate") != "off" or (bool(against) and act("leakage") != "off")
    index_params = (near, config.near_dup_threshold, config.num_perm, config.shingle_words) if use_index else None
    index = DuplicateIndex(*index_params) if use_index else None
    pool = None
    where_file, where_line = array("H"), array("q")
    sources: list[str] = []
    lengths, label_ids = array("I"), array("i")
    labels = _Labels(config.max_label_values)

    out = Path(out_dir) if out_dir is not None else None
    rejects = spool_clean = spool_orig = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        rejects = open(out / REJECTS_FILE, "w", encoding="utf-8")
        spool_clean = open(out / ".spool.clean.jsonl", "w", encoding="utf-8")
        spool_orig = open(out / ".spool.orig.jsonl", "w", encoding="utf-8")
    n_read = 0
    remote_counter = counter if isinstance(counter, CharEstimate) else None   # tokenizers count here
    try:
        if workers > 1:
            import multiprocessing

            methods = multiprocessing.get_all_start_methods()    # fork: fast start, no re-import of __main__
            pool = multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(workers)
        for file in files:
            sources.append(file)
            file_id = len(sources) - 1
            is_jsonl = data_suffix(file) == ".jsonl"
            for checked, hashes in _checked_chunks(file, config, chunk_size, pool, workers, index_params,
                                                   remote_counter):
                n_read += len(checked)
                # kind, then token length of the structurally valid
                valid: list[Checked] = []
                for c in checked:
                    formats["unparsable" if c.raw.data is None else (c.format or "unknown")] += 1
                    if c.clean is None:
                        continue
                    if kind is None:
                        kind = c.kind
                    elif c.kind != kind:
                        c.add("mixed_kinds", f"a {c.kind} record ({c.format}) in {kind} data; clean them separately")
                        continue
                    if not any(act(i.check) == "reject" for i in c.issues):
                        valid.append(c)
                precounted = pool is not None and remote_counter is not None
                if valid and config.max_length is not None:
                    counts = ([c.tokens for c in valid] if precounted
                              else counter.count([_local_clean(c, config) for c in valid]))
                    for c, n in zip(valid, counts):
                        c.tokens = n
                        if n > config.max_length and act("too_long") != "off":
                            if config.too_long == "truncate" and "too_long" not in config.actions:
                                new, why = _truncate(_local_clean(c, config), n, counter, config)
                                if new is None:
                                    c.add("too_long", f"{n} tokens > max_length {config.max_length}; {why}")
                                else:
                                    c.clean, c.tokens, c.line = new, counter.count([new])[0], None
                                    tally.add("too_long", c.where, f"{n} tokens > max_length {config.max_length}; {why}", False)
                            else:
                                c.add("too_long", f"{n} tokens > max_length {config.max_length}")
                elif valid and not precounted:
                    for c, n in zip(valid, counter.count([_local_clean(c, config) for c in valid])):
                        c.tokens = n
                # route each record
                spool_batch: list[str] = []             # one write a chunk: a write per line costs ~4 us
                new_texts: list[str] = []
                kept_rows: list[int] = []
                for pos, c in enumerate(checked):
                    line = None
                    if c.clean is not None and not any(act(i.check) == "reject" for i in c.issues):
                        masked = config.mask_pii and c.pii
                        line = c.line if not masked else None
                        if line is None:
                            try:
                                clean = _local_clean(c, config)
                                line = jsonio.dumps(mask_record(clean) if masked else clean)
                            except UnicodeEncodeError:
                                c.add("invalid_utf8", "a text contains a lone surrogate (invalid UTF-8)")
                                line = None
                    reasons = []
                    for issue in c.issues:
                        a = act(issue.check)
                        if a == "off":
                            continue
                        tally.add(issue.check, c.where, issue.message, a == "reject")
                        if a == "reject":
                            reasons.append((issue.check, issue.message))
                    if reasons or line is None:
                        report.rejected += 1
                        if rejects is not None:
                            rejects.write(_reject_line(_parsed(c), reasons or [("invalid", "record could not be used")]))
                        continue
                    where_file.append(file_id)
                    where_line.append(c.raw.line)
                    lengths.append(min(c.tokens, 2**32 - 1))
                    label_ids.append(labels.id(c.label) if c.kind == "chat" else -1)
                    if kind != "chat":
                        labels.active = False
                    new_texts.append(c.dedup_text)
                    kept_rows.append(pos)
                    if spool_clean is not None:
                        spool_batch.append(line)
                        if not is_jsonl:       # .jsonl originals are re-read verbatim from the file if needed
                            spool_orig.write(_dump(c.raw.data) + "\n")
                if spool_batch:
                    spool_clean.write("\n".join(spool_batch) + "\n")
                if index is not None and kept_rows:
                    if hashes is None:
                        index.add(new_texts)
                    else:                                   # hashed by the worker: pick the kept rows
                        rows, exact, sig, bands = hashes
                        at = {r: k for k, r in enumerate(rows)}
                        sel = np.array([at[p] for p in kept_rows], dtype=np.int64)
                        index.add_hashes(exact[sel], None if sig is None else sig[sel],
                                         None if bands is None else bands[sel])
                if progress:
                    progress(n_read)

        n_train = len(where_file)
        ref_where: list[str] = []
        if index is not None and against and act("leakage") != "off":
            usable = total = 0
            for file in against:
                for chunk in _chunks(iter_records(file), chunk_size):
                    texts = []
                    for r in chunk:
                        total += 1
                        c = check_record(r, config)
                        if c.clean is not None and c.dedup_text:
                            texts.append(c.dedup_text)
                            ref_where.append(r.where)
                    usable += len(texts)
                    if texts:
                        index.add_reference(texts)
            report.against = {"files": against, "records": total, "compared": usable}

        def loc(i: int) -> str:
            return f"{sources[where_file[i]]}:{where_line[i]}" if i < n_train else ref_where[i - n_train]

        dropped = np.zeros(n_train, dtype=bool)
        drop_reason: dict[int, tuple[str, str]] = {}
        if index is not None:
            result = index.find()
            for i, d in sorted(result.duplicates.items()):
                check = "leakage" if d.leak else ("exact_duplicate" if d.kind == "exact" else "near_duplicate")
                a = act(check)
                if a == "off":
                    continue
                message = (f"{d.kind} duplicate of {loc(d.of)}" + ("" if d.kind == "exact" else f" (similarity {d.similarity:.2f})")
                           + (" in the --against data" if d.leak else ""))
                tally.add(check, loc(i), message, a == "reject")
                if a == "reject":
                    dropped[i] = True
                    drop_reason[i] = (check, message)
            for members, ckind in list(zip(result.clusters, result.cluster_kinds))[:200]:
                report.duplicate_clusters.append({
                    "kind": ckind, "size": len(members), "first": loc(members[0]),
                    "first_is_reference": members[0] >= n_train,
                    "members": [loc(m) for m in members[1:21]]})
        report.rejected += int(dropped.sum())
        report.clean = n_train - int(dropped.sum())

        if out is not None:
            spool_clean.close()
            spool_orig.close()
            readers: dict[int, _SourceLines] = {}
            try:
                with open(out / ".spool.clean.jsonl", encoding="utf-8") as sc, \
                     open(out / ".spool.orig.jsonl", encoding="utf-8") as so, \
                     open(out / CLEAN_FILE, "w", encoding="utf-8") as clean_out:
                    spooled = [data_suffix(source) != ".jsonl" for source in sources]
                    kept: list[str] = []
                    for i, line in enumerate(sc):
                        fid = where_file[i]
                        from_spool = spooled[fid]
                        orig = so.readline() if from_spool else None
                        if not dropped[i]:
                            kept.append(line)
                            if len(kept) >= 1024:
                                clean_out.write("".join(kept))
                                kept.clear()
                            continue
                        if orig is None:
                            if fid not in readers:
                                readers[fid] = _SourceLines(sources[fid])
                            orig = readers[fid].get(where_line[i])
                        check, message = drop_reason[i]
                        rejects.write(_reject_line(RawRecord(sources[fid], where_line[i], None), [(check, message)],
                                                   orig.rstrip("\n")))
                    clean_out.write("".join(kept))
            finally:
                for r in readers.values():
                    r.close()
            report.outputs = {"clean": str(out / CLEAN_FILE), "rejects": str(out / REJECTS_FILE),
                              "report": str(out / REPORT_FILE)}
    finally:
        if pool is not None:
            pool.terminate()
        for f in (rejects, spool_clean, spool_orig):
            if f is not None:
                f.close()
        if out is not None:
            for name in (".spool.clean.jsonl", ".spool.orig.jsonl"):
                try:
                    os.remove(out / name)
                except FileNotFoundError:
                    pass

    report.records = n_read
    report.kind = kind
    report.formats = dict(formats)
    report.checks = {name: {"action": act(name), "found": tally.found.get(name, 0),
                            "rejected": tally.rejected_by.get(name, 0)} for name in CHECKS}
    if config.too_long == "truncate" and "too_long" not in config.actions and config.max_length is not None:
        report.checks["too_long"]["action"] = "truncate"
    report.examples = tally.examples
    report.rejected_by = dict(tally.rejected_by)
    keep = ~dropped
    _dataset_level(report, config, counter, np.frombuffer(lengths, dtype=np.uint32)[keep] if n_train else np.zeros(0),
                   np.frombuffer(label_ids, dtype=np.int32)[keep] if n_train else np.zeros(0, np.int32), labels)
    if out is not None:
        (out / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n",
                                       encoding="utf-8")
    assert report.clean + report.rejected == report.records, "curation lost records"
    return report


def _dataset_level(report: CurationReport, config: CurationConfig, counter: LengthCounter,
                   lengths: np.ndarray, label_ids: np.ndarray, labels: _Labels) -> None:
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
            warn.append({"check": "label_imbalance", "message": f"answer {top!r} is {present.max() / present.min():.0f}x "
                         f"as common as the rarest answer; consider resampling or --stratify when splitting"})
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

"""``data.streaming: true``: train while a background thread tokenizes, from a memory-mapped token store.

:func:`prepare_streaming` opens the run's :mod:`~tuneforge.data.token_store` under the content-hash cache (the
same key as the in-memory cache, :func:`tuneforge.data.dataset.prepare_data`). A complete store is used at once,
with no tokenization. Otherwise a thread reads ``data.train`` record by record (:func:`~tuneforge.data.loaders.
iter_records` streams), applies each record's checks (:func:`~tuneforge.data.record_checks.normalise_record`,
:func:`~tuneforge.data.record_checks.tokenize_record`: every check of
:data:`~tuneforge.data.record_checks.TRAINING_CHECKS`,
rejects to the store's ``rejects.jsonl``) and appends the examples in chunks of :data:`CHUNK_RECORDS` records; a
store a killed run left incomplete is continued where its last chunk ended. Training starts once the validation
examples and the first training examples are committed; memory holds one chunk and the examples of a step, never
the data set.

What differs from the in-memory path:

* **Validation split.** Without ``data.validation``, a record is held out when a hash of ``(seed, its number in the
  file)`` falls under ``data.val_fraction``, until ``data.val_max_examples`` are held out (the in-memory path
  shuffles the whole file, which needs all of it): other records than a non-streaming run holds out. With
  ``val_max_examples: null`` training waits for the whole file. ``data.validation`` is tokenized first.
* **Order.** An epoch takes the store in blocks of ``data.shuffle_block`` examples in file order (epoch 0; later
  epochs in a seeded order of blocks), each block shuffled by ``(seed, epoch, block)``: :meth:`StreamingData.
  epoch_order`. A block is used only once it is whole (or the file has ended), so the order depends on the data and
  the seed only, never on how fast the thread tokenizes: a second run on the complete store, and a resumed run,
  train in the same order as the first. It is not the in-memory path's order (that shuffles the whole epoch).
* **Length.** The number of examples is known only at the end, so ``max_steps`` sets the run's length (a config
  without it is refused, :class:`~tuneforge.config.RunConfig`); counts logged at the start are those committed.
* **Corpus-wide checks.** Training applies none in either path (near duplicates and the like are
  ``tuneforge data clean``'s); the only whole-file step, the shuffled split, is replaced as above.

Several processes (DDP): the main one writes; the others read the store as it grows (a store whose writer has gone
before completing it is an error in them: run again).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import random
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneforge.data.errors import DataError
from tuneforge.data.formats import task_kind
from tuneforge.data.loaders import iter_records
from tuneforge.data.packing import PackedBatch, pack
from tuneforge.data.record_checks import data_tools, normalise_record, tokenize_record
from tuneforge.data.rejects import Reason, Reject, reject_line
from tuneforge.data.rendering import TokenizedExample
from tuneforge.data.settings import DataConfig
from tuneforge.data.token_store import REJECTS, StoreLock, TokenStore, TokenStoreWriter, read_manifest

log = logging.getLogger(__name__)

CHUNK_RECORDS = 256          # source records consumed between two commits of the store


def held_out(seed: int, number: int, fraction: float) -> bool:
    """Whether record ``number`` (1-based, in the training file) is a validation candidate: a hash of ``(seed,
    number)`` as a uniform number in [0, 1) below ``fraction``."""
    digest = hashlib.blake2b(f"{seed}:{number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


class _Writer(threading.Thread):
    """The thread that fills the store (see the module docstring); ``error`` holds what stopped it."""

    def __init__(self, writer: TokenStoreWriter, lock: StoreLock, cfg: DataConfig, tokenizer: Any, seed: int,
                 task: str) -> None:
        super().__init__(name="tuneforge-tokenize", daemon=True)
        self.writer, self.lock, self.cfg, self.tokenizer, self.seed, self.task = (writer, lock, cfg, tokenizer, seed,
                                                                                  task)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fill()
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self.error = e
        finally:
            self.writer.close()
            self.lock.release()

    def _fill(self) -> None:
        cfg, writer = self.cfg, self.writer
        manifest = writer.manifest
        done, formats, truncated = manifest["records"], dict(manifest["formats"]), manifest["truncated"]
        validation_done = manifest["validation"]["complete"] or (not cfg.validation and cfg.val_fraction == 0)
        cap = cfg.val_max_examples
        kind, tools = task_kind(self.task, cfg.format), data_tools(cfg)
        sources = ([(cfg.validation, "validation")] if cfg.validation else []) + [(cfg.train_file(), "train")]
        number = since_commit = 0             # records consumed in all (validation file first), since the last commit
        for path, role in sources:
            for line, rec in enumerate(iter_records(path), 1):
                number += 1
                if number <= done:
                    continue
                if self.stop.is_set():
                    writer.commit(number - 1, formats, truncated, validation_done)
                    return
                split = role
                if role == "train" and not validation_done and held_out(self.seed, line, cfg.val_fraction):
                    split = "validation"
                got = normalise_record(rec, cfg, kind, tools)
                if not isinstance(got, Reject):
                    example, fmt = got
                    formats[fmt] = formats.get(fmt, 0) + 1
                    got = tokenize_record(example, self.tokenizer, cfg)
                if isinstance(got, Reject):
                    writer.add_reject(reject_line(got))
                else:
                    writer.add(split, got[0])
                    truncated += got[1]
                    if split == "validation" and not cfg.validation and cap is not None and \
                            writer.count("validation") >= cap:
                        validation_done = True
                        since_commit = CHUNK_RECORDS          # commit now: training may be waiting for it
                since_commit += 1
                if since_commit >= CHUNK_RECORDS:
                    writer.commit(number, formats, truncated, validation_done)
                    since_commit = 0
            if role == "validation":
                validation_done = True
                writer.commit(number, formats, truncated, validation_done)
                since_commit = 0
        writer.commit(number, formats, truncated, True, complete=True)


class StreamingData:
    """What :func:`prepare_streaming` returns: the in-memory :class:`~tuneforge.data.dataset.PreparedData`'s fields
    the trainer reads (``train`` is a :class:`TokenStore`, growing while the thread writes; ``validation`` a list),
    and :meth:`micro_batches`, which the trainer draws an epoch from."""

    mixture = None

    def __init__(self, folder: Path, writer: _Writer | None, block: int, is_writer: bool,
                 temporary: tempfile.TemporaryDirectory | None = None) -> None:
        self.folder, self._writer, self.block, self._is_writer = folder, writer, block, is_writer
        self._temporary = temporary           # TUNEFORGE_NO_CACHE: the store lives as long as this object
        self.train = TokenStore(folder, "train")
        self.validation: list[TokenizedExample] = []

    # -- state
    def writing(self) -> bool:
        """Whether examples may still be added to the store: its writer (this process's thread, or another process)
        is at work. Raises what stopped this process's writer thread (a DataError, a broken file)."""
        if self._writer is not None:
            error = self._writer.error
            if error is not None:
                raise error if isinstance(error, DataError) else DataError(
                    f"{self.folder}: tokenizing stopped: {type(error).__name__}: {error}")
            return self._writer.is_alive()
        if self._is_writer:
            return False                         # the store was complete when it was opened
        try:
            lock = StoreLock(self.folder, wait=False)
        except BlockingIOError:
            return True                          # the other process's writer is at work
        lock.release()
        return False

    def wait_ready(self) -> None:
        """Block until the validation examples and the first training examples are committed; raises DataError
        when the file holds no usable training record."""
        validation = TokenStore(self.folder, "validation")
        validation.wait_for(1 << 62, self.writing)                # i.e. until its split is complete
        self.validation = list(validation)
        self.train.wait_for(1, self.writing)
        if not len(self.train):
            manifest = self.train.refresh()
            first = next(iter(self.rejects), None)
            hint = f"; first problem: {first.source}:{first.line}: {first.reason}" if first else ""
            raise DataError(f"{self.folder}: no usable training records ({manifest['rejects']} rejected){hint}")

    @property
    def complete(self) -> bool:
        return bool(self.train.refresh()["complete"])

    @property
    def formats(self) -> dict[str, int]:
        return dict(read_manifest(self.folder)["formats"])

    @property
    def truncated(self) -> int:
        return int(read_manifest(self.folder)["truncated"])

    @property
    def rejects(self) -> list[Reject]:
        """The rejects committed so far (read from the store's ``rejects.jsonl``)."""
        size = read_manifest(self.folder)["rejects_bytes"]
        out: list[Reject] = []
        if not size:
            return out
        with open(self.folder / REJECTS, "rb") as f:
            for line in f.read(size).splitlines():
                r = json.loads(line)
                out.append(Reject(r["source"], r["line"], [Reason(x["check"], x["message"]) for x in r["reasons"]],
                                  r.get("record"), r.get("raw")))
        return out

    @property
    def epoch_length(self) -> int:
        """Training examples committed so far (all of them once the store is complete)."""
        self.train.refresh()
        return len(self.train)

    @property
    def train_tokens(self) -> int:
        self.train.refresh()
        return self.train.num_tokens

    def close(self) -> None:
        """Stop the writer thread at its next record (what it tokenized is committed; the next run continues)."""
        if self._writer is not None:
            self._writer.stop.set()
            self._writer.join()
        self.train.refresh()

    # -- order
    def epoch_order(self, seed: int, epoch: int) -> Iterator[int]:
        """The indices of epoch ``epoch``'s training examples, in order (see the module docstring). Blocks until
        the examples it yields are committed."""
        store, size = self.train, self.block
        blocks: Iterator[int]
        if epoch == 0:
            blocks = itertools.count()
        else:
            store.wait_for(1 << 62, self.writing)
            order = list(range(-(-len(store) // size)))
            random.Random(f"blocks:{seed}:{epoch}").shuffle(order)
            blocks = iter(order)
        for k in blocks:
            whole = store.wait_for((k + 1) * size, self.writing)
            if not whole and k * size >= len(store):
                return
            indices = list(range(k * size, min((k + 1) * size, len(store))))
            random.Random(f"block:{seed}:{epoch}:{k}").shuffle(indices)
            yield from indices

    def micro_batches(self, batch_size: int, seed: int, epoch: int, start: int = 0) -> Iterator[PackedBatch]:
        """Epoch ``epoch`` in packed micro-batches of ``batch_size`` examples (the last may be short), from
        micro-batch ``start`` on (the earlier ones are skipped without being read); ``example_ids`` are indices
        into :attr:`train`."""
        order = self.epoch_order(seed, epoch)
        number = 0
        while True:
            ids = list(itertools.islice(order, batch_size))
            if not ids:
                return
            if number >= start:
                batch = pack([self.train[i] for i in ids])
                batch.example_ids = ids
                yield batch
            number += 1


def prepare_streaming(cfg: DataConfig, tokenizer: Any, seed: int, task: str, key: dict[str, Any],
                      use_cache: bool = True) -> StreamingData:
    """Open (or start filling) the token store of ``key`` and return once training can start (see the module
    docstring). ``use_cache`` false: a store in a temporary folder, removed with the returned object."""
    import os

    from tuneforge.data.token_cache import cache_key
    from tuneforge.fileutil import cache_dir

    temporary = None
    if use_cache and not os.environ.get("TUNEFORGE_NO_CACHE"):
        folder = cache_dir() / "tokenized" / f"{cache_key(key)}.store"
    else:
        temporary = tempfile.TemporaryDirectory(prefix="tuneforge-stream-")
        folder = Path(temporary.name)
    log.info("data.streaming: each record is checked and tokenized as it is read, in the background; the validation "
             "split holds records out by a seeded hash (not the in-memory split), the order shuffles blocks of %d "
             "examples, and the counts below are those tokenized so far", cfg.shuffle_block)
    writer = None
    try:
        lock = StoreLock(folder, wait=False)
    except BlockingIOError:
        log.info("another process is tokenizing into %s: reading the store as it grows", folder)
        data = StreamingData(folder, None, cfg.shuffle_block, is_writer=False)
    else:
        manifest = read_manifest(folder)
        if manifest["complete"]:
            lock.release()
            log.info("tokenized data from cache %s (%d examples)", folder, manifest["train"]["examples"])
        else:
            if manifest["records"]:
                log.info("continuing the token store %s after %d records", folder, manifest["records"])
            (folder / "key.json").write_text(json.dumps(key, sort_keys=True, indent=1, default=str) + "\n",
                                             encoding="utf-8")
            # a copy: the training thread may use its tokenizer (decode, generate) while this one encodes
            writer = _Writer(TokenStoreWriter(folder), lock, cfg, copy.deepcopy(tokenizer), seed, task)
            writer.start()
        data = StreamingData(folder, writer, cfg.shuffle_block, is_writer=True, temporary=temporary)
    try:
        data.wait_ready()
    except BaseException:
        data.close()
        raise
    return data

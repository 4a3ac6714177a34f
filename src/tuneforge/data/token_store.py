"""An append-only on-disk store of tokenized examples, read through numpy memory maps while it is written.

A store is one folder (under the content-hash cache: ``<cache_dir()>/tokenized/<key>.store/``) holding, for each
split (``train``, ``validation``):

* ``<split>.tokens.bin``  (N_tokens,) int32: every example's token ids, end to end;
* ``<split>.trained.bin`` (N_tokens,) uint8: 1 where the token is a target (:attr:`TokenizedExample.trained`);
* ``<split>.offsets.bin`` (N_examples,) int64: the end offset of each example in the two arrays above
  (example ``i`` is ``[offsets[i-1], offsets[i])``, with ``offsets[-1] = 0``);

and ``rejects.jsonl`` (the :mod:`tuneforge.data.rejects` schema) and ``manifest.json``. The writer appends a chunk
of examples to the files, flushes them, then replaces ``manifest.json`` (write to a temporary file, rename): the
manifest's counts are the *committed* data, and a reader never looks past them. A run killed mid-chunk leaves bytes
past the committed sizes; the next writer cuts them off and continues from the manifest's ``records`` (raw records
consumed) rather than starting over. ``complete: true`` marks a store whose source was read to the end.

One writer at a time: it holds an exclusive ``flock`` on ``.lock`` while it writes; a second run on the same key
waits for it and then finds the store complete (or continues it).

**Why numpy memmaps and not Arrow (``datasets``).** The store must grow while training reads it, and a reader must
see a consistent prefix without copying. Raw binary files that only grow, with the committed length in a manifest,
give exactly that: a reader maps ``[0, committed)`` and slices an example in O(1) with no parsing. An Arrow file (and
``datasets``' cache, which ``Dataset.map`` writes whole before anything can read it) is written as record batches
with a footer at the end; reading one while it grows needs the IPC stream format and re-reading batches, and gives
nothing here that two flat arrays and an offset table do not. It also keeps ``datasets`` out of the training path.
Token ids are int32 (every vocabulary is < 2**31); the mask is one byte a token (a quarter of the ids' bytes).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, overload

import numpy as np

from tuneforge.data.errors import DataError
from tuneforge.data.rendering import TokenizedExample

SPLITS = ("train", "validation")
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
STORE_VERSION = 1


def empty_manifest() -> dict[str, Any]:
    """The manifest of a store nothing was committed to."""
    return {"version": STORE_VERSION, "complete": False, "records": 0, "rejects": 0, "rejects_bytes": 0,
            "formats": {}, "truncated": 0,
            **{split: {"examples": 0, "tokens": 0, "complete": False} for split in SPLITS}}


def read_manifest(folder: Path) -> dict[str, Any]:
    """The store's committed state; an empty manifest where none (or an unreadable one, or another version) is."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return empty_manifest()
    return manifest if isinstance(manifest, dict) and manifest.get("version") == STORE_VERSION else empty_manifest()


def _files(folder: Path, split: str) -> tuple[Path, Path, Path]:
    return folder / f"{split}.tokens.bin", folder / f"{split}.trained.bin", folder / f"{split}.offsets.bin"


class StoreLock:
    """The writer's exclusive ``flock`` on ``<folder>/.lock`` (released by :meth:`release` or at process exit)."""

    def __init__(self, folder: Path, wait: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class TokenStoreWriter:
    """Appends examples and rejects to a store and commits them in chunks (see the module docstring).

    Opening continues what the manifest committed: the files are cut to the committed sizes, ``manifest["records"]``
    says how many source records were consumed. The caller holds the :class:`StoreLock`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.manifest = read_manifest(folder)
        self._files: dict[str, tuple[Any, Any, Any]] = {}
        self._pending: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[int]]] = {
            s: ([], [], []) for s in SPLITS}
        for split in SPLITS:
            state = self.manifest[split]
            sizes = (state["tokens"] * 4, state["tokens"], state["examples"] * 8)
            handles = []
            for path, size in zip(_files(folder, split), sizes, strict=True):
                f = open(path, "ab")          # noqa: SIM115 - kept open while writing, closed by close()
                f.truncate(size)              # bytes past the last commit (a run killed mid-chunk) are dropped
                handles.append(f)
            self._files[split] = (handles[0], handles[1], handles[2])
        self._rejects = open(folder / REJECTS, "ab")   # noqa: SIM115
        self._rejects.truncate(self.manifest["rejects_bytes"])
        self._tokens = {s: self.manifest[s]["tokens"] for s in SPLITS}
        self._pending_rejects: list[bytes] = []

    def count(self, split: str) -> int:
        """Examples of ``split`` added so far (committed or not)."""
        return self.manifest[split]["examples"] + len(self._pending[split][2])

    def add(self, split: str, example: TokenizedExample) -> None:
        ids, mask, ends = self._pending[split]
        ids.append(np.asarray(example.input_ids, dtype=np.int32))
        mask.append(np.asarray(example.trained, dtype=np.uint8))
        self._tokens[split] += len(example.input_ids)
        ends.append(self._tokens[split])

    def add_reject(self, line: str) -> None:
        """One line of ``rejects.jsonl`` (:func:`tuneforge.data.rejects.reject_line`)."""
        self._pending_rejects.append(line.encode("utf-8"))

    def commit(self, records: int, formats: dict[str, int], truncated: int, validation_complete: bool = False,
               complete: bool = False) -> None:
        """Write what was added since the last commit, then the manifest that makes it visible. ``records``: source
        records consumed in all; ``validation_complete``: no validation example will be added any more."""
        for split in SPLITS:
            ids, mask, ends = self._pending[split]
            f_ids, f_mask, f_ends = self._files[split]
            if ends:
                f_ids.write(np.concatenate(ids).tobytes())
                f_mask.write(np.concatenate(mask).tobytes())
                f_ends.write(np.asarray(ends, dtype=np.int64).tobytes())
            for f in (f_ids, f_mask, f_ends):
                f.flush()
            self.manifest[split]["examples"] += len(ends)
            self.manifest[split]["tokens"] = self._tokens[split]
            ids.clear(), mask.clear(), ends.clear()
        if self._pending_rejects:
            self._rejects.write(b"".join(self._pending_rejects))
            self.manifest["rejects"] += len(self._pending_rejects)
            self._pending_rejects.clear()
        self._rejects.flush()
        self.manifest["rejects_bytes"] = self._rejects.tell()
        self.manifest.update(records=records, formats=dict(formats), truncated=truncated)
        self.manifest["validation"]["complete"] = validation_complete or complete
        self.manifest["train"]["complete"] = complete
        self.manifest["complete"] = complete
        tmp = self.folder / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(self.manifest, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.folder / MANIFEST)

    def close(self) -> None:
        for handles in self._files.values():
            for f in handles:
                f.close()
        self._rejects.close()


class TokenStore(Sequence[TokenizedExample]):
    """One split of a store, read through memory maps: ``store[i]`` is example ``i`` as a :class:`TokenizedExample`.

    ``len(store)`` is the committed count at the last :meth:`refresh` (which :meth:`wait_for` calls while it waits);
    indices past it raise IndexError. Nothing is read into memory but the examples asked for."""

    def __init__(self, folder: Path, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        self.folder, self.split = folder, split
        self._examples = self._tokens = 0
        self._complete = False
        self._ids: np.ndarray = np.zeros(0, dtype=np.int32)
        self._mask: np.ndarray = np.zeros(0, dtype=np.uint8)
        self._ends: np.ndarray = np.zeros(0, dtype=np.int64)
        self.refresh()

    def refresh(self) -> dict[str, Any]:
        """Map what the manifest now says is committed; returns the manifest."""
        manifest = read_manifest(self.folder)
        state = manifest[self.split]
        if state["examples"] != self._examples:
            ids_path, mask_path, ends_path = _files(self.folder, self.split)
            n, t = state["examples"], state["tokens"]
            self._ids = np.memmap(ids_path, dtype=np.int32, mode="r", shape=(t,)) if t else np.zeros(0, np.int32)
            self._mask = np.memmap(mask_path, dtype=np.uint8, mode="r", shape=(t,)) if t else np.zeros(0, np.uint8)
            self._ends = np.memmap(ends_path, dtype=np.int64, mode="r", shape=(n,)) if n else np.zeros(0, np.int64)
            self._examples, self._tokens = n, t
        self._complete = bool(state["complete"])
        return manifest

    @property
    def complete(self) -> bool:
        """No example will be added to this split any more (as of the last :meth:`refresh`)."""
        return self._complete

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def wait_for(self, n: int, writing: Callable[[], bool] | None = None, poll: float = 0.02) -> bool:
        """Block until ``n`` examples are committed or the split is complete; True when ``n`` are there.

        ``writing()`` says whether a writer is still at work (and may raise its error); once it says no and the split
        is still short and incomplete, :class:`DataError` (the store was left incomplete: the next run continues it).
        """
        while True:
            alive = writing() if writing is not None else True      # before the refresh: its last commit is seen
            self.refresh()
            if self._examples >= n or self._complete:
                return self._examples >= n
            if not alive:
                raise DataError(f"{self.folder}: tokenizing stopped before the end of the file ({self._examples} "
                                f"{self.split} examples committed); train again: the store is continued")
            time.sleep(poll)

    def __len__(self) -> int:
        return self._examples

    @overload
    def __getitem__(self, i: int) -> TokenizedExample: ...

    @overload
    def __getitem__(self, i: slice) -> list[TokenizedExample]: ...

    def __getitem__(self, i: int | slice) -> TokenizedExample | list[TokenizedExample]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += self._examples
        if not 0 <= i < self._examples:
            raise IndexError(f"example {i} of {self._examples} committed")
        start = int(self._ends[i - 1]) if i else 0
        end = int(self._ends[i])
        return TokenizedExample(self._ids[start:end].tolist(), self._mask[start:end].astype(bool).tolist())

    def length(self, i: int) -> int:
        """Tokens of example ``i`` (without reading them)."""
        return int(self._ends[i]) - (int(self._ends[i - 1]) if i else 0)

    def __iter__(self) -> Iterator[TokenizedExample]:
        for i in range(len(self)):
            yield self[i]

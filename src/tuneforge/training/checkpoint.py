"""Checkpoints that always exist: versioned folders and an atomically replaced pointer.

A checkpoint kind (``last``, ``best``) lives in ``root/`` as::

    root/last-000020/         a complete checkpoint (weights, tokenizer, trainer_state.pt)
    root/last-000010/         the one before it (``keep``: how many complete folders of a kind stay)
    root/last.json            {"folder": "last-000020", "step": 20,
                               "previous": [{"folder": "last-000010", "step": 10}]}

Saving step ``s`` of kind ``k`` (keeping ``keep`` folders):

1. write everything into a fresh hidden folder ``root/.tmp-k-s-XXXX`` (files fsynced);
2. rename it to ``root/k-s`` (one atomic ``rename``);
3. write ``root/.k.json.tmp``, fsync, and ``os.replace`` it onto ``root/k.json`` (atomic): the new folder
   is current, the newest ``keep - 1`` of the ones before it are ``previous``;
4. delete the folders of kind ``k`` that fell out of the pointer.

A crash between any two of these file operations leaves ``k.json`` naming complete folders: the old
ones until step 3 has happened, the new ones after. What a crash can leave behind (a hidden temporary
folder, a renamed folder no pointer names yet, an old folder not yet deleted) is removed by
:meth:`CheckpointDir.clean_stale`, which the trainer calls at start; readers only ever follow pointers.

A checkpoint can still be damaged after it was written (a disk that filled or failed, a copy cut short, a
hand edit): :meth:`CheckpointDir.candidates` lists a kind's folders newest first (from the pointer, or, when
the pointer itself is unreadable, from the folder names), and :meth:`CheckpointDir.set_aside` moves a damaged
one out of the pointer to ``root/damaged-k-s`` (kept for inspection, never loaded), so that ``--resume`` falls
back to the one before it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_FOLDER = re.compile(r"^(?P<kind>[a-z]+)-(?P<step>\d{6,})(?:\.(?P<n>\d+))?$")


class PointerUnreadable(Exception):
    """``root/k.json`` exists but is not a pointer this module wrote (truncated, edited, not JSON)."""


@dataclass(frozen=True)
class Candidate:
    """One checkpoint folder of a kind, as :meth:`CheckpointDir.candidates` lists them (newest first)."""

    folder: Path
    step: int


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointDir:
    """The checkpoints of one run under ``root`` (``run_dir/checkpoints``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _pointer(self, kind: str) -> Path:
        return self.root / f"{kind}.json"

    def _read(self, kind: str) -> dict[str, Any] | None:
        """The ``kind`` pointer's content (None: no pointer); :class:`PointerUnreadable` when it is damaged."""
        pointer = self._pointer(kind)
        if not pointer.is_file():
            return None
        try:
            content = json.loads(pointer.read_text())
            entries = [content] + list(content.get("previous", []))
            if not all(isinstance(e["folder"], str) and isinstance(e["step"], int) for e in entries):
                raise TypeError("folder must be a string and step an integer")
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as e:
            raise PointerUnreadable(f"{pointer} is unreadable ({type(e).__name__}: {e})") from None
        return content

    def current(self, kind: str) -> Path | None:
        """The folder the ``kind`` pointer names, or None when there is no checkpoint of that kind."""
        content = self._read(kind)
        if content is None:
            return None
        folder = self.root / content["folder"]
        return folder if folder.is_dir() else None

    def current_step(self, kind: str) -> int | None:
        content = self._read(kind)
        return None if content is None else int(content["step"])

    def candidates(self, kind: str) -> tuple[list[Candidate], str | None]:
        """The ``kind`` folders to load, newest first: the current one, then the ``previous`` ones the pointer
        keeps. When the pointer is unreadable, every ``kind-NNNNNN`` folder by step, newest first, and the reason
        (None when the pointer was read)."""
        try:
            content = self._read(kind)
        except PointerUnreadable as e:
            found = []
            for path in self.root.iterdir():
                match = _FOLDER.match(path.name)
                if match and match["kind"] == kind and path.is_dir():
                    found.append((int(match["step"]), int(match["n"] or 0), path))
            return [Candidate(path, step) for step, _, path in sorted(found, reverse=True)], str(e)
        if content is None:
            return [], None
        entries = [content] + list(content.get("previous", []))
        return [Candidate(self.root / e["folder"], int(e["step"])) for e in entries
                if (self.root / e["folder"]).is_dir()], None

    def set_aside(self, kind: str, damaged: Path, keep: list[Candidate]) -> Path:
        """Move the damaged folder ``damaged`` to ``root/damaged-<name>`` (kept for inspection, never loaded) and
        point ``kind`` at ``keep`` (newest first) instead."""
        aside = self.root / f"damaged-{damaged.name}"
        n = 0
        while aside.exists():
            n += 1
            aside = self.root / f"damaged-{damaged.name}.{n}"
        os.rename(damaged, aside)
        self.point(kind, keep)
        return aside

    def point(self, kind: str, keep: list[Candidate]) -> None:
        """Make ``keep[0]`` the current ``kind`` checkpoint and the rest its ``previous`` ones (none: no pointer)."""
        if keep:
            self._write_pointer(kind, keep[0].folder.name, keep[0].step,
                                [{"folder": c.folder.name, "step": c.step} for c in keep[1:]])
        else:
            self._pointer(kind).unlink(missing_ok=True)
            _fsync_dir(self.root)

    def _write_pointer(self, kind: str, folder: str, step: int, previous: list[dict[str, Any]]) -> None:
        pointer_tmp = self.root / f".{kind}.json.tmp"
        with open(pointer_tmp, "w") as f:
            json.dump({"folder": folder, "step": step, **({"previous": previous} if previous else {})}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, self._pointer(kind))
        _fsync_dir(self.root)

    def save(self, kind: str, step: int, write: Callable[[Path], None], keep: int = 1) -> Path:
        """Call ``write(folder)`` into a new folder, then make it the current ``kind`` checkpoint (``keep``: how many
        complete folders of the kind stay, the new one included)."""
        return self.commit(kind, step, self.begin(kind, step), write, keep=keep)

    def begin(self, kind: str, step: int) -> Path:
        """Step 1's fresh hidden folder, for :meth:`commit` (others, e.g. DeepSpeed's processes, may write
        into it first)."""
        if not re.fullmatch(r"[a-z]+", kind):
            raise ValueError(f"checkpoint kind must be lowercase letters (got {kind!r})")
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{kind}-{step:06d}-", dir=self.root))

    def commit(self, kind: str, step: int, tmp: Path, write: Callable[[Path], None], keep: int = 1) -> Path:
        """``write(tmp)``, then steps 2-4: ``tmp`` (from :meth:`begin`) becomes the current ``kind`` checkpoint, the
        newest ``keep - 1`` before it stay as ``previous``; on an error it is removed and the previous checkpoints
        stay current."""
        try:
            write(tmp)
            _fsync_tree(tmp)
            final = self.root / f"{kind}-{step:06d}"
            n = 0
            while final.exists():                    # the same step saved again: never overwrite a folder
                n += 1
                final = self.root / f"{kind}-{step:06d}.{n}"
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(self.root)
        try:
            before = self.candidates(kind)[0]
        except OSError:
            before = []
        kept = [c for c in before if c.folder != final][:max(0, keep - 1)]
        self._write_pointer(kind, final.name, step, [{"folder": c.folder.name, "step": c.step} for c in kept])
        for old in before:
            if old.folder != final and old not in kept:
                shutil.rmtree(old.folder, ignore_errors=True)
        return final

    def clean_stale(self) -> list[Path]:
        """Remove what an interrupted save left: temporary folders and files, and folders no pointer names."""
        if not self.root.is_dir():
            return []
        named: set[str] = set()
        unreadable: set[str] = set()          # kinds whose pointer is damaged: their folders are all kept
        for kind in self._kinds():
            candidates, problem = self.candidates(kind)
            if problem is not None:
                unreadable.add(kind)
            named |= {c.folder.name for c in candidates}
        removed = []
        for path in self.root.iterdir():
            match = _FOLDER.match(path.name)
            stale = path.name.startswith(".tmp-") or (path.name.startswith(".") and path.name.endswith(".json.tmp"))
            stale = stale or (path.is_dir() and match is not None and path.name not in named
                              and match["kind"] not in unreadable)
            if stale:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def _kinds(self) -> list[str]:
        return [p.stem for p in self.root.glob("*.json") if not p.name.startswith(".")]


def copy_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the files of checkpoint ``src`` into the run directory ``dst`` (no sub-folders, none named in ``skip``)."""
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy2(f, dst / f.name)

"""Checkpoints that always exist: versioned folders and an atomically replaced pointer.

A checkpoint kind (``last``, ``best``) lives in ``root/`` as::

    root/last-000020/         a complete checkpoint (weights, tokenizer, trainer_state.pt)
    root/last.json            {"folder": "last-000020", "step": 20}: which folder is current

Saving step ``s`` of kind ``k``:

1. write everything into a fresh hidden folder ``root/.tmp-k-s-XXXX`` (files fsynced);
2. rename it to ``root/k-s`` (one atomic ``rename``);
3. write ``root/.k.json.tmp``, fsync, and ``os.replace`` it onto ``root/k.json`` (atomic);
4. delete the previous folder of kind ``k``.

A crash between any two of these file operations leaves ``k.json`` naming a complete folder: the old
one until step 3 has happened, the new one after. What a crash can leave behind (a hidden temporary
folder, a renamed folder no pointer names yet, an old folder not yet deleted) is removed by
:meth:`CheckpointDir.clean_stale`, which the trainer calls at start; readers only ever follow pointers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

_FOLDER = re.compile(r"^(?P<kind>[a-z]+)-(?P<step>\d{6,})(?:\.(?P<n>\d+))?$")


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

    def current(self, kind: str) -> Path | None:
        """The folder the ``kind`` pointer names, or None when there is no checkpoint of that kind."""
        pointer = self._pointer(kind)
        if not pointer.is_file():
            return None
        folder = self.root / json.loads(pointer.read_text())["folder"]
        return folder if folder.is_dir() else None

    def current_step(self, kind: str) -> int | None:
        pointer = self._pointer(kind)
        return json.loads(pointer.read_text())["step"] if pointer.is_file() else None

    def save(self, kind: str, step: int, write: Callable[[Path], None]) -> Path:
        """Call ``write(folder)`` into a new folder, then make it the current ``kind`` checkpoint."""
        return self.commit(kind, step, self.begin(kind, step), write)

    def begin(self, kind: str, step: int) -> Path:
        """Step 1's fresh hidden folder, for :meth:`commit` (others, e.g. DeepSpeed's processes, may write
        into it first)."""
        if not re.fullmatch(r"[a-z]+", kind):
            raise ValueError(f"checkpoint kind must be lowercase letters (got {kind!r})")
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{kind}-{step:06d}-", dir=self.root))

    def commit(self, kind: str, step: int, tmp: Path, write: Callable[[Path], None]) -> Path:
        """``write(tmp)``, then steps 2-4: ``tmp`` (from :meth:`begin`) becomes the current ``kind`` checkpoint;
        on an error it is removed and the previous checkpoint stays current."""
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
        previous = self.current(kind)
        pointer_tmp = self.root / f".{kind}.json.tmp"
        with open(pointer_tmp, "w") as f:
            json.dump({"folder": final.name, "step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, self._pointer(kind))
        _fsync_dir(self.root)
        if previous is not None and previous != final:
            shutil.rmtree(previous, ignore_errors=True)
        return final

    def clean_stale(self) -> list[Path]:
        """Remove what an interrupted save left: temporary folders and files, and folders no pointer names."""
        if not self.root.is_dir():
            return []
        current = {p.name for p in (self.current(k) for k in self._kinds()) if p is not None}
        removed = []
        for path in self.root.iterdir():
            stale = path.name.startswith(".tmp-") or (path.name.startswith(".") and path.name.endswith(".json.tmp"))
            stale = stale or (path.is_dir() and _FOLDER.match(path.name) is not None and path.name not in current)
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

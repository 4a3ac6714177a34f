"""Atomic checkpoints: written to a temporary folder, then renamed into place.

A crash while saving leaves the previous checkpoint intact; a reader never sees a half-written folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_save_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then atomically replace ``target`` by ``tmp_dir``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def copy_files(src: Path, dst: Path) -> None:
    """Copy the files of checkpoint ``src`` into the run directory ``dst`` (no sub-folders)."""
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)

"""The processes the studio starts (``tuneforge train``, ``eval``, ``serve``): started detached, found again by the
pid file they leave in their folder, stopped with SIGTERM.

A training run's folder holds ``studio.pid`` (the pid of ``tuneforge train``) and ``studio.log`` (its output)
beside what the trainer writes, so a studio closed and opened again finds a run still training. SIGTERM makes
the trainer finish its step and write the ``last`` checkpoint (``tuneforge train --resume`` continues it).

A child trains as the same command typed in a shell would: its output goes straight into the log file (the studio
never reads a pipe from it, so no progress bar's redraws pass through the studio's process), and it gets the
environment the studio was started with (:func:`child_env`: not the torch variables that libraries imported by the
studio set in its own process).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PID_FILE = "studio.pid"
LOG_FILE = "studio.log"


class AlreadyRunning(RuntimeError):
    """A second start of a process whose folder already has one running."""


def tuneforge_command(*args: str) -> list[str]:
    """``tuneforge ARGS`` as this interpreter runs it (the studio's own installation, whatever PATH holds)."""
    return [sys.executable, "-m", "tuneforge.cli", *args]


def read_pid(folder: str | os.PathLike, name: str = PID_FILE) -> int | None:
    """The pid recorded in ``folder`` when that process is still alive (a stale file is removed); else None."""
    path = Path(folder) / name
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if _alive(pid):
        return pid
    path.unlink(missing_ok=True)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:        # a zombie (exited, not yet reaped by its parent) is not running
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    if state == "Z":
        with contextlib.suppress(ChildProcessError):        # our own child: reap it; another's: its parent will
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


LIBRARY_SET_ENV = ("TORCHINDUCTOR_CACHE_DIR",)     # set in the studio's process when Gradio's imports load torch


def _launch_env() -> dict[str, str] | None:
    """The environment this process was started with (``/proc/self/environ``; None where there is none)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in pairs}


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``tuneforge`` child: this process's (a thread count set on purpose, such as
    ``OMP_NUM_THREADS``, is passed on), less the variables of :data:`LIBRARY_SET_ENV` that were not there when it
    started (set by a library imported here: a CLI run would not have them), plus ``extra``."""
    launched = _launch_env()
    env = {k: v for k, v in os.environ.items()
           if launched is None or k in launched or k not in LIBRARY_SET_ENV}
    return {**env, **(extra or {})}


def start(folder: str | os.PathLike, args: list[str], name: str = PID_FILE, log_name: str = LOG_FILE,
          env: dict[str, str] | None = None) -> int:
    """Start ``tuneforge ARGS`` in its own session with its output in ``folder/log_name``; record its pid.

    Refused (:class:`AlreadyRunning`) while the process recorded in ``folder`` still runs.
    """
    folder = Path(folder)
    running = read_pid(folder, name)
    if running is not None:
        raise AlreadyRunning(f"{folder}: already running (pid {running}); stop it first")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / log_name, "ab") as log:
        proc = subprocess.Popen(tuneforge_command(*args), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=child_env(env))
    (folder / name).write_text(str(proc.pid))
    return proc.pid


def stop(folder: str | os.PathLike, name: str = PID_FILE, wait_s: float = 0.0) -> bool:
    """SIGTERM the process recorded in ``folder``; wait up to ``wait_s`` seconds for it to end. False: none ran."""
    pid = read_pid(folder, name)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and read_pid(folder, name) is not None:
        time.sleep(0.2)
    return True


def log_tail(folder: str | os.PathLike, lines: int = 30, log_name: str = LOG_FILE) -> str:
    """The last ``lines`` lines of the process's output (progress bars' carriage returns cut to their last state)."""
    path = Path(folder) / log_name
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 64_000))
        text = f.read().decode("utf-8", "replace")
    return tail_lines(text, lines)


def tail_lines(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text``, each progress bar's carriage-return redraws cut to their last state."""
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(shown[-lines:])

"""``tuneforge serve`` as a process: flags, one-line errors (exit 2), and SIGTERM finishing in-flight requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from _serve_helpers import save_adapter
from tuneforge.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv,message", [
    (["serve"], "--base is required"),
    (["serve", "--base", "x", "--adapter", "nameonly"], "write NAME=PATH"),
    (["serve", "--base", "x", "--adapter", "a=1", "--adapter", "a=2"], "given twice"),
    (["serve", "--base", "x", "--host", "0.0.0.0"], "needs --api-key"),
    (["serve", "--base", "x", "--max-batch", "0"], "max_batch"),
])
def test_bad_flags_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_adapter_folder_that_is_not_an_adapter(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["serve", "--base", str(tiny_model_dir), "--adapter", f"x={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not an adapter" in err and len(err.splitlines()) == 1


def test_package_for_another_base_is_refused_before_loading(tiny_model_dir, tmp_path, capsys):
    save_adapter(tmp_path / "pkg", "lora", {"lora": {"r": 2, "dropout": 0.0}}, seed=3)
    (tmp_path / "pkg" / "tuneforge.json").write_text(json.dumps({"base_model": {"sha256": "cd" * 32}}))
    capsys.readouterr()
    assert main(["serve", "--base", str(tiny_model_dir), "--adapter", f"pkg={tmp_path / 'pkg'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cd" * 32 in err and len(err.splitlines()) == 1, err


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(tiny_model_dir, tmp_path):
    save_adapter(tmp_path / "lora", "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=5)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "serve", "--base", str(tiny_model_dir),
                             "--adapter", f"lora={tmp_path / 'lora'}", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        body = {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        chunks, refused = [], None
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                chunks.append(line[6:])
                if len(chunks) == 3:
                    proc.send_signal(signal.SIGTERM)
                    time.sleep(0.3)
                    try:
                        refused = httpx.get(url + "/health", timeout=2).status_code
                    except httpx.TransportError as e:
                        refused = type(e).__name__
        assert chunks[-1] == "[DONE]"
        usage = json.loads(chunks[-2])["usage"]
        assert usage["completion_tokens"] == 200, usage              # the in-flight request ran to its end
        assert refused in ("ConnectError", 503), refused              # while a new one was refused
        # uvicorn re-raises the signal once shut down, so the exit status says SIGTERM, as for any server
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()

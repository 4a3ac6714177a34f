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
    (["serve", "--base", "x", "--api-key", ""], "--api-key: an empty key is not a key"),
    (["serve", "--base", "x", "--host", "0.0.0.0", "--api-key", ""], "--api-key: an empty key is not a key"),
    (["serve", "--base", "x", "--api-key", "ok", "--api-key", "  "], "--api-key: an empty key is not a key"),
    (["serve", "--base", "x", "--admin-key", ""], "--admin-key: an empty key is not a key"),
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


def test_empty_key_in_a_config_file_is_refused(tmp_path, capsys):
    (tmp_path / "serve.yaml").write_text("base: x\napi_keys: ['']\n")
    assert main(["serve", "--config", str(tmp_path / "serve.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneforge serve: api_keys: an API key must be non-empty") and len(err.splitlines()) == 1


def test_serve_without_base_refuses_adapters_trained_on_different_bases(tmp_path, capsys):
    for name, model in (("a", "smollm2-135m-instruct"), ("b", "gemma3-270m")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(f"model: {model}\n")
    assert main(["serve", "--adapter", f"a={tmp_path / 'a'}", "--adapter", f"b={tmp_path / 'b'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on different base models (a: smollm2-135m-instruct, b: gemma3-270m)" in err, err
    assert "--base MODEL" in err and len(err.splitlines()) == 1


def test_serve_without_base_needs_adapters_that_record_one(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    assert main(["serve", "--adapter", f"p={tmp_path / 'plain'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "adapter p" in err and "records no base model" in err and len(err.splitlines()) == 1


def test_serve_without_base_serves_the_base_the_run_records(tiny_model_dir, tmp_path):
    """`tuneforge serve --adapter NAME=RUN` alone: the run's config names its base, which the server loads and
    lists; the adapter answers."""
    from conftest import write_jsonl
    from tuneforge.config import load_config
    from tuneforge.training.trainer import train

    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"Ticket {i}", "completion": "billing"} for i in range(8)])
    run = tmp_path / "run"
    train(load_config(data={"model": str(tiny_model_dir), "data": {"train": str(data)}, "output_dir": str(run),
                            "max_steps": 1, "batch_size": 4, "progress": False, "eval_base": False,
                            "lora": {"r": 2}}))
    served = Served("--adapter", f"tickets={run}")
    try:
        models = httpx.get(served.url + "/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == [str(tiny_model_dir), "tickets"]
        r = httpx.post(served.url + "/v1/chat/completions", timeout=60, json={
            "model": "tickets", "messages": [{"role": "user", "content": "Ticket 3"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
    finally:
        served.kill()


class Served:
    """``tuneforge serve`` on a free port, as a subprocess (``python -m tuneforge.cli serve ...``)."""

    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "serve", *args, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise AssertionError(self.proc.stdout.read() if self.proc.stdout else "")
            time.sleep(0.2)

    def health(self) -> int | str:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code
        except httpx.TransportError as e:
            return type(e).__name__

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.proc.stdout.read() if self.proc.stdout and self.proc.poll() is not None else ""


def _stream(served: Served, body: dict, on_chunk) -> list[str]:
    chunks = []
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
                on_chunk(len(chunks))
    return chunks


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(tiny_model_dir, tmp_path):
    """Within the drain time an in-flight stream runs to its end; meanwhile /health answers 503 and new requests
    503; then the process exits 0 (not 143)."""
    save_adapter(tmp_path / "lora", "lora", {"lora": {"r": 4, "dropout": 0.0}}, seed=5)
    served = Served("--base", str(tiny_model_dir), "--adapter", f"lora={tmp_path / 'lora'}")
    body = {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    during: dict = {}

    def on_chunk(n: int) -> None:
        if n == 3:
            served.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            during["health"] = served.health()
            during["new"] = httpx.post(served.url + "/v1/chat/completions", json={**body, "stream": False},
                                       timeout=10).status_code
    try:
        chunks = _stream(served, body, on_chunk)
        assert chunks[-1] == "[DONE]"
        usage = json.loads(chunks[-2])["usage"]
        assert usage["completion_tokens"] == 200, usage              # the in-flight request ran to its end
        assert json.loads(chunks[-3])["choices"][0]["finish_reason"] == "length"
        assert during == {"health": 503, "new": 503}, during          # while draining: 503, not a closed socket
        assert served.wait(30) == 0, served.log()
    finally:
        served.kill()


def test_sigterm_cuts_long_streams_at_the_drain_deadline(tiny_model_dir, tmp_path):
    """A stream longer than the drain time ends at the deadline with a final chunk (finish_reason "length"), its
    usage and [DONE]; the process exits 0 soon after."""
    (tmp_path / "serve.yaml").write_text(f"base: {tiny_model_dir}\ngraceful_timeout: 1.5\nmax_output_tokens: 8000\n")
    served = Served("--config", str(tmp_path / "serve.yaml"))
    body = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8000,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent: dict = {}

    def on_chunk(n: int) -> None:
        if n == 3:
            served.proc.send_signal(signal.SIGTERM)
            sent["at"] = time.time()
    try:
        chunks = _stream(served, body, on_chunk)
        ended = time.time() - sent["at"]
        assert chunks[-1] == "[DONE]", chunks[-3:]
        usage = json.loads(chunks[-2])["usage"]
        assert 0 < usage["completion_tokens"] < 8000, usage
        assert json.loads(chunks[-3])["choices"][0]["finish_reason"] == "length"
        assert 1.0 < ended < 10, ended
        assert served.wait(20) == 0, served.log()
        assert time.time() - sent["at"] < 15
    finally:
        served.kill()


def test_sigterm_when_idle_exits_0_at_once(tiny_model_dir):
    served = Served("--base", str(tiny_model_dir))
    t0 = time.time()
    served.proc.send_signal(signal.SIGTERM)
    assert served.wait(20) == 0, served.log()
    assert time.time() - t0 < 5

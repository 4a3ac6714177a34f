"""Teacher data (``tuneforge data generate``, :mod:`tuneforge.data.teacher`): against a fake OpenAI-compatible
server (a real HTTP server on localhost, called through the official ``openai`` client), transient failures are
retried with exponential backoff, a permanent one is recorded and the run goes on, a rerun asks only what is
missing, ``--fail-fast`` stops; a local tiny model answers as our batched generation does; the output is chat
training data that curation and training take."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import write_jsonl
from tuneforge.data.teacher import OpenAITeacher, Progress, TeacherError, generate_teacher_data


class FakeServer:
    """``/v1/chat/completions`` answering ``answer k to: PROMPT``; a prompt in ``flaky`` fails with 503 its first
    ``flaky[prompt]`` calls, one in ``broken`` always fails with 400 (permanent), one in ``down`` always with 500."""

    def __init__(self):
        self.calls: list[str] = []
        self.flaky: dict[str, int] = {}
        self.broken: set[str] = set()
        self.down: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake-teacher", "object": "model", "created": 0,
                                                              "owned_by": "tests"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with server.lock:
                    server.calls.append(prompt)
                    left = server.flaky.get(prompt, 0)
                    if left:
                        server.flaky[prompt] = left - 1
                if left:
                    return self._send(503, {"error": {"message": "overloaded, try again"}})
                if prompt in server.broken:
                    return self._send(400, {"error": {"message": "this prompt is refused"}})
                if prompt in server.down:
                    return self._send(500, {"error": {"message": "internal error"}})
                choices = [{"index": k, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": f"answer {k} to: {prompt}"}}
                           for k in range(body.get("n", 1))]
                self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": choices})

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/v1"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture()
def server():
    s = FakeServer()
    yield s
    s.close()


PROMPTS = [{"prompt": "What is 2 + 2?"},
           {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "flaky one"},
                         {"role": "assistant", "content": "an old answer, dropped"}]},
           {"instruction": "Translate", "input": "hola"},
           {"prompt": "broken"},
           {"question": "flaky two"},
           {"title": "no prompt field"},
           {"prompt": "What is 2 + 2?"}]          # the same prompt again: asked once


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_transient_failures_are_retried_with_backoff_and_a_permanent_one_is_recorded(server, tmp_path):
    server.flaky = {"flaky one": 2, "flaky two": 1}
    server.broken = {"broken"}
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    sleeps = Sleeps()
    teacher = OpenAITeacher(server.url, temperature=0.5, max_tokens=32, n=2)
    report = generate_teacher_data(teacher, prompts, tmp_path / "out.jsonl", concurrency=3, retries=3,
                                   backoff_s=0.01, sleep=sleeps, progress=False)
    assert teacher.model == "fake-teacher"                       # the endpoint's only model
    assert sorted(sleeps) == [0.01, 0.01, 0.02]                  # flaky one: 0.01 then 0.02; flaky two: 0.01
    assert server.calls.count("flaky one") == 3 and server.calls.count("flaky two") == 2
    assert server.calls.count("broken") == 1                     # a 400 is not asked again
    assert server.calls.count("What is 2 + 2?") == 1
    assert (report.prompts, report.answered, report.records, report.failed) == (5, 4, 8, 2)
    records = _lines(tmp_path / "out.jsonl")
    by_prompt = {(r["messages"][-2]["content"], r["metadata"]["choice"]): r for r in records}
    flaky = by_prompt[("flaky one", 1)]
    assert flaky["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "flaky one"},
                                 {"role": "assistant", "content": "answer 1 to: flaky one"}]
    assert by_prompt[("Translate\n\nhola", 0)]["messages"][-1]["content"] == "answer 0 to: Translate\n\nhola"
    meta = flaky["metadata"]
    assert meta["teacher"] == {"name": "fake-teacher", "kind": "openai", "base_url": server.url,
                               "model": "fake-teacher", "temperature": 0.5, "max_tokens": 32, "n": 2}
    assert meta["source"] == f"{prompts}:2"
    failures = {f["source"]: f for f in _lines(tmp_path / "out.failures.jsonl")}
    assert set(failures) == {f"{prompts}:4", f"{prompts}:6"}
    assert "400" in failures[f"{prompts}:4"]["error"] and failures[f"{prompts}:4"]["attempts"] == 1
    assert failures[f"{prompts}:6"]["error"].startswith("bad_prompt")


def test_a_transient_error_that_does_not_pass_is_recorded_after_the_retries(server, tmp_path):
    server.down = {"down"}
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "down"}, {"prompt": "fine"}])
    sleeps = Sleeps()
    report = generate_teacher_data(OpenAITeacher(server.url, model="fake-teacher"), prompts, tmp_path / "o.jsonl",
                                   retries=3, backoff_s=1.0, max_backoff_s=3.0, sleep=sleeps, progress=False)
    assert sleeps == [1.0, 2.0, 3.0]                          # doubled, capped at max_backoff_s
    assert server.calls.count("down") == 4
    assert (report.answered, report.failed) == (1, 1)
    [failure] = _lines(tmp_path / "o.failures.jsonl")
    assert failure["attempts"] == 4 and "InternalServerError" in failure["error"]


def test_a_rerun_asks_only_the_prompts_not_yet_answered(server, tmp_path):
    server.broken = {"broken"}
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:5])
    out = tmp_path / "out.jsonl"
    teacher = OpenAITeacher(server.url)
    generate_teacher_data(teacher, prompts, out, progress=False)
    first = out.read_text()
    server.calls.clear()
    server.broken = set()
    report = generate_teacher_data(teacher, prompts, out, progress=False)
    assert server.calls == ["broken"]
    assert (report.cached, report.asked, report.answered, report.failed) == (4, 1, 1, 0)
    assert out.read_text().startswith(first) and len(_lines(out)) == 5
    assert not (tmp_path / "out.failures.jsonl").exists()        # nothing failed this time
    server.calls.clear()
    assert generate_teacher_data(teacher, prompts, out, progress=False).asked == 0 and server.calls == []
    # a run killed mid-write leaves an incomplete last line: cut off, and its prompt asked again
    text = out.read_text()
    out.write_text(text[:-20])
    server.calls.clear()
    generate_teacher_data(teacher, prompts, out, progress=False)
    assert len(server.calls) == 1 and len(_lines(out)) == 5
    # another setting is another teacher: every prompt is asked again, and appended
    server.calls.clear()
    generate_teacher_data(OpenAITeacher(server.url, max_tokens=7), prompts, out, progress=False)
    assert len(server.calls) == 5 and len(_lines(out)) == 10


def test_fail_fast_stops_at_the_first_failure(server, tmp_path):
    server.broken = {"broken"}
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "broken"}] + [{"prompt": f"q{i}"} for i in range(20)])
    with pytest.raises(TeacherError, match=r"p\.jsonl:1: the teacher failed after 1 attempt.*400.*--fail-fast"):
        generate_teacher_data(OpenAITeacher(server.url), prompts, tmp_path / "o.jsonl", concurrency=1,
                              fail_fast=True, progress=False)
    assert len(server.calls) < 21
    [failure] = _lines(tmp_path / "o.failures.jsonl")
    assert failure["source"].endswith("p.jsonl:1")


def test_progress_says_prompts_per_second_and_eta():
    import io

    stream = io.StringIO()
    bar = Progress(10, every=0.0, stream=stream)
    bar.update(4)
    assert stream.getvalue().startswith("teacher: 4/10 prompts, ") and "prompts/s, ETA " in stream.getvalue()


def test_the_cli_writes_chat_data_that_curation_and_training_take(server, tmp_path, capsys, tokenizer, monkeypatch):
    from tuneforge.cli import main
    from tuneforge.data.dataset import prepare_data
    from tuneforge.data.settings import DataConfig

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    server.broken = {"broken"}
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:5])
    out = tmp_path / "answers.jsonl"
    args = ["data", "generate", "--teacher", server.url, "--prompts", str(prompts), "--out", str(out),
            "--backoff", "0.001"]
    assert main(args) == 1                                        # a prompt failed: said, and the rest written
    err = capsys.readouterr().err
    assert "prompts/s, ETA" in err and "1 prompts failed" in err
    assert main(["data", "check", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "clean", str(out), "--out", str(tmp_path / "clean")]) == 0
    cleaned = _lines(tmp_path / "clean" / "clean.jsonl")
    assert len(cleaned) == 4 and all(set(r) == {"messages", "metadata"} for r in cleaned)  # provenance kept
    written = {json.dumps(r["messages"]): r["metadata"] for r in _lines(out)}
    assert all(written[json.dumps(r["messages"])] == r["metadata"] for r in cleaned)
    assert prepare_data(DataConfig(train=str(tmp_path / "clean" / "clean.jsonl"), val_fraction=0), tokenizer,
                        seed=0, use_cache=False).rejects == []
    data = prepare_data(DataConfig(train=str(out), val_fraction=0), tokenizer, seed=0, use_cache=False)
    assert len(data.train) == 4 and not data.rejects
    server.broken = set()
    assert main(args) == 0
    assert len(_lines(out)) == 5
    assert main(["data", "generate", "--teacher", server.url, "--prompts", str(prompts), "--out", str(out),
                 "--n", "2"]) == 2                                # n > 1 needs sampling: one line, exit 2
    assert "--temperature > 0" in capsys.readouterr().err


def test_a_local_model_teacher_answers_as_our_batched_generation(tmp_path, tiny_model, tokenizer, tiny_model_dir,
                                                                  capsys):
    from tuneforge.cli import main
    from tuneforge.evaluation import generation
    from tuneforge.evaluation.local_teacher import LocalTeacher
    from tuneforge.runs.loading import LoadedModel

    rows = [{"prompt": f"Say a word about {w}."} for w in ("cats", "tea", "rain", "maps", "snow")]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    teacher = LocalTeacher(LoadedModel(tiny_model, tokenizer), "tiny", temperature=1.0, max_tokens=4, n=2,
                           batch_size=5, seed=7)
    report = generate_teacher_data(teacher, prompts, tmp_path / "o.jsonl", progress=False)
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    expected = {(c[0]["content"], k): t for k in range(2) for c, t in zip(conversations, generation.generate(
        tiny_model, tokenizer, conversations, max_new_tokens=4, batch_size=5, temperature=1.0, seed=7 + k).texts,
        strict=True)}
    records = _lines(tmp_path / "o.jsonl")
    got = {(r["messages"][0]["content"], r["metadata"]["choice"]): r["messages"][-1]["content"] for r in records}
    assert (report.answered, report.records, report.failed) == (5, 10, 0)
    assert got == expected and len(set(got.values())) > 5          # sampled: the two passes differ
    meta = records[0]["metadata"]["teacher"]
    assert (meta["kind"], meta["name"], meta["max_tokens"], meta["n"]) == ("local", "tiny", 4, 2)
    # the CLI loads a model folder as the teacher
    assert main(["data", "generate", "--teacher", str(tiny_model_dir), "--prompts", str(prompts), "--out",
                 str(tmp_path / "cli.jsonl"), "--max-tokens", "3", "--batch-size", "5", "--temperature", "1"]) == 0
    assert len(_lines(tmp_path / "cli.jsonl")) == 5

"""Teacher data: a teacher model answers your prompts, and each answer becomes a chat training record.

:func:`generate_teacher_data` is the engine behind ``tuneforge data generate``. A teacher is anything with the
small :class:`Teacher` interface: :class:`OpenAITeacher` (any OpenAI-compatible endpoint through the official
``openai`` client) here, or :class:`tuneforge.evaluation.local_teacher.LocalTeacher` (a run or model folder
through our batched generation).

* **Prompts**: any data path :func:`tuneforge.data.loaders.iter_records` reads (a file, shards, a
  ``save_to_disk`` folder, a Hub id). A record gives its prompt as ``messages`` (trailing assistant turns are
  dropped: the prompt ends with a user turn), ``prompt`` or ``instruction`` (+ ``input``), with an optional
  ``system``. A record with none of them is a failure (``bad_prompt``), never asked.
* **Output**: one JSON line per answer, ``{"messages": [...prompt, {"role": "assistant", "content": answer}],
  "metadata": {"teacher": {name and settings}, "teacher_sha256", "prompt_sha256", "choice", "source"}}``:
  chat training data (``metadata`` is a field no format reads: training and curation ignore it, and ``data
  clean`` writes the records without it). ``n`` answers a prompt are ``n`` records, ``choice`` 0..n-1.
* **Resumable**: the output is append-only, a prompt's records written together and flushed. A rerun reads it
  and asks only for the prompts with no record of the same teacher settings (``(prompt_sha256,
  teacher_sha256)``): an interrupted run loses at most the answers in flight; an incomplete last line (a kill
  mid-write) is cut off. Another teacher or setting asks again and appends, each record naming its teacher.
  Records are in the order answers arrive (with concurrency, not the prompts' order).
* **Failures**: a call that fails with a transient error (connection, timeout, 408/409/429, 5xx) is retried
  ``retries`` times after ``backoff_s * 2**attempt`` seconds (at most ``max_backoff_s``); a permanent error (another
  4xx, an empty answer, the wrong number of answers) is not. A prompt that still fails is one line of the
  failures file (``{"source", "prompt_sha256", "messages", "error", "attempts"}``, rewritten each run, removed
  when none fails) and the run goes on; with ``fail_fast`` the first failure stops it (:class:`TeacherError`).
* **Concurrency**: at most ``concurrency`` calls in flight (threads; a teacher may allow fewer:
  ``max_concurrency``), each of ``teacher.batch_size`` prompts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from tuneforge.data.errors import DataError, RecordError
from tuneforge.endpoints import is_transient

log = logging.getLogger(__name__)


class TeacherError(DataError):
    """A teacher that cannot be used, or (``fail_fast``) a prompt it failed: one line naming it."""


class Teacher(Protocol):
    """What :func:`generate_teacher_data` asks of a teacher."""

    name: str               # recorded in every record (a model name, a run folder)
    batch_size: int         # prompts per :meth:`answer` call
    max_concurrency: int    # calls it allows in flight at once

    def settings(self) -> dict[str, Any]:
        """The name and every setting that decides the answers (recorded; a change asks again)."""
        ...

    def answer(self, prompts: list[list[dict]]) -> list[list[str]]:
        """``n`` answers for each prompt (messages ending with a user turn); raises on failure."""
        ...

    def is_transient(self, error: BaseException) -> bool:
        """Whether a call that raised ``error`` may succeed if asked again."""
        ...


@dataclass
class Prompt:
    messages: list[dict]
    source: str                 # file:line (or source?split=...:row)
    sha256: str                 # of the messages as canonical JSON


@dataclass
class TeacherReport:
    prompts: int = 0            # usable prompts in the prompts file (identical ones once)
    cached: int = 0             # answered by an earlier run (not asked)
    asked: int = 0              # asked in this run
    answered: int = 0           # asked and answered in this run
    failed: int = 0             # failures written (bad prompts too)
    records: int = 0            # records written in this run
    seconds: float = 0.0
    out: str = ""
    failures: str | None = None     # the failures file, when one was written
    failure_lines: list[dict] = field(default_factory=list)


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
                          ).hexdigest()


def prompt_messages(record: dict[str, Any]) -> list[dict]:
    """The prompt of a record as messages ending with a user turn (module docstring); RecordError otherwise."""
    from tuneforge.data.formats import normalise_messages

    system = record.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    if "messages" in record:
        messages = normalise_messages(record["messages"])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or messages[-1]["role"] != "user":
            raise RecordError("the messages do not end with a user turn (after dropping assistant turns)",
                              "turn_order")
        return ([] if messages[0]["role"] == "system" else head) + messages
    for key in ("prompt", "instruction", "question"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            extra = record.get("input") if key == "instruction" else None
            text = f"{value}\n\n{extra}" if isinstance(extra, str) and extra.strip() else value
            return head + [{"role": "user", "content": text}]
    raise RecordError(f"no prompt: fields {sorted(record)[:8]} hold no messages, prompt, instruction or question",
                      "missing_field")


def read_prompts(path: str | Path) -> tuple[list[Prompt], list[dict]]:
    """The usable prompts of ``path`` (identical ones once) and a failure line for each record that is not one."""
    from tuneforge.data.loaders import iter_records

    prompts: list[Prompt] = []
    failures: list[dict] = []
    seen: set[str] = set()
    for raw in iter_records(path):
        if raw.data is None:
            failures.append({"source": raw.where, "error": f"bad_prompt: {raw.error}", "attempts": 0})
            continue
        try:
            messages = prompt_messages(raw.data)
        except RecordError as e:
            failures.append({"source": raw.where, "error": f"bad_prompt: {e}", "attempts": 0})
            continue
        key = _sha256(messages)
        if key not in seen:
            seen.add(key)
            prompts.append(Prompt(messages, raw.where, key))
    return prompts, failures


def answered_keys(out: Path, teacher_sha256: str) -> set[str]:
    """The ``prompt_sha256`` of every record of ``out`` by the teacher ``teacher_sha256``; an incomplete last line
    (a run killed mid-write) is cut off the file."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: cutting off an incomplete last line (%d bytes: the run before was stopped mid-write)", out,
                    len(data) - keep)
        with open(out, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    keys = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            meta = json.loads(line).get("metadata") or {}
        except (json.JSONDecodeError, AttributeError):
            raise TeacherError(f"{out}:{number}: not a record this command wrote (not a JSON object); give another "
                               "--out, or remove the line") from None
        if meta.get("teacher_sha256") == teacher_sha256 and meta.get("prompt_sha256"):
            keys.add(meta["prompt_sha256"])
    return keys


class Progress:
    """A line on stderr at most every ``every`` seconds: prompts done of all, prompts/s, ETA."""

    def __init__(self, total: int, every: float = 2.0, stream: Any = None):
        self.total, self.every, self.done = total, every, 0
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.last = time.perf_counter()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = f"{eta:.0f} s" if eta == eta else "?"
        return f"teacher: {self.done}/{self.total} prompts, {rate:.2f} prompts/s, ETA {eta_text}"

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            print(self.line(), file=self.stream, flush=True)


def _ask(teacher: Teacher, batch: list[Prompt], retries: int, backoff_s: float, max_backoff_s: float,
         sleep: Callable[[float], None]) -> tuple[list[list[str]] | None, str | None, int]:
    """``(answers, None, attempts)``, or ``(None, error, attempts)`` once retries are spent or the error is
    permanent."""
    attempt = 0
    while True:
        attempt += 1
        try:
            answers = teacher.answer([p.messages for p in batch])
            if len(answers) != len(batch):
                return None, f"the teacher gave {len(answers)} answer lists for {len(batch)} prompts", attempt
            empty = next((i for i, a in enumerate(answers) if not a or any(not (t or "").strip() for t in a)), None)
            if empty is not None:
                return None, "empty answer from the teacher", attempt
            return answers, None, attempt
        except Exception as e:  # noqa: BLE001 - every failure is recorded per prompt, never raised
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
            if attempt > retries or not teacher.is_transient(e):
                return None, error, attempt
            delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1))
            log.info("teacher call failed (%s); retry %d/%d in %.2f s", error, attempt, retries, delay)
            sleep(delay)


def generate_teacher_data(teacher: Teacher, prompts: str | Path, out: str | Path, failures: str | Path | None = None,
                          concurrency: int = 4, retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                          fail_fast: bool = False, progress: bool | Progress = True,
                          sleep: Callable[[float], None] = time.sleep) -> TeacherReport:
    """Have ``teacher`` answer every prompt of ``prompts`` not yet answered in ``out`` (module docstring).

    ``failures``: the failures file (default: ``out`` with ``.failures.jsonl`` for its suffix). ``progress``: a
    line on stderr (prompts/s, ETA) every 2 s, or a :class:`Progress` of your own. Returns the counts; raises
    :class:`TeacherError` on the first failure with ``fail_fast``.
    """
    out = Path(out)
    failures_path = Path(failures) if failures is not None else out.with_name(
        out.name.split(".")[0] + ".failures.jsonl")
    if failures_path.resolve() == out.resolve():
        raise TeacherError(f"{out}: the failures file cannot be the output file; give another --failures")
    settings = teacher.settings()
    teacher_sha256 = _sha256(settings)
    items, failure_lines = read_prompts(prompts)
    report = TeacherReport(prompts=len(items), out=str(out))
    if fail_fast and failure_lines:
        raise TeacherError(f"{failure_lines[0]['source']}: {failure_lines[0]['error']} (--fail-fast)")
    done = answered_keys(out, teacher_sha256)
    pending = [p for p in items if p.sha256 not in done]
    report.cached, report.asked = len(items) - len(pending), len(pending)
    bar = progress if isinstance(progress, Progress) else Progress(len(pending), stream=None if progress else
                                                                   io.StringIO())
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    batches = [pending[i:i + teacher.batch_size] for i in range(0, len(pending), teacher.batch_size)]
    workers = max(1, min(concurrency, teacher.max_concurrency))
    stop: str | None = None
    with open(out, "a", encoding="utf-8") as f, ThreadPoolExecutor(max_workers=workers) as pool:
        queue = iter(batches)
        running: dict[Future, list[Prompt]] = {}

        def submit() -> None:
            for batch in queue:
                running[pool.submit(_ask, teacher, batch, retries, backoff_s, max_backoff_s, sleep)] = batch
                if len(running) >= workers:
                    return

        submit()
        while running:
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                batch = running.pop(future)
                answers, error, attempts = future.result()
                if answers is None:
                    for p in batch:
                        failure_lines.append({"source": p.source, "prompt_sha256": p.sha256, "messages": p.messages,
                                              "error": error, "attempts": attempts})
                    stop = stop or (f"{batch[0].source}: the teacher failed after {attempts} attempt(s): {error} "
                                    "(--fail-fast)" if fail_fast else None)
                else:
                    lines = []
                    for p, texts in zip(batch, answers, strict=True):
                        for choice, text in enumerate(texts):
                            meta = {"teacher": settings, "teacher_sha256": teacher_sha256,
                                    "prompt_sha256": p.sha256, "choice": choice, "source": p.source}
                            lines.append(json.dumps({"messages": [*p.messages, {"role": "assistant",
                                                                                 "content": text}],
                                                     "metadata": meta}, ensure_ascii=False) + "\n")
                    f.write("".join(lines))
                    f.flush()
                    report.answered += len(batch)
                    report.records += len(lines)
                bar.update(len(batch))
            if stop is None:
                submit()
            else:
                for future in running:
                    future.cancel()
                break
    report.seconds = time.perf_counter() - start
    report.failed = len(failure_lines)
    report.failure_lines = failure_lines
    if failure_lines:
        with open(failures_path, "w", encoding="utf-8") as ff:
            ff.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in failure_lines)
        report.failures = str(failures_path)
    elif failures_path.is_file():
        failures_path.unlink()      # a failures file of an earlier run: every prompt is answered now
    if stop is not None:
        raise TeacherError(stop)
    return report


class OpenAITeacher:
    """A teacher behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM, our ``tuneforge
    serve``, ...), one prompt a call, through the official ``openai`` client (its own retries off: ours count).

    ``model``: the model name the endpoint serves; None asks the endpoint's ``/models`` and takes its only one.
    ``api_key_env``: the environment variable holding the key (unset: no key, as local servers want).
    ``http_client``: an ``httpx.Client`` for the ``openai`` client (tests, proxies).
    """

    batch_size = 1

    def __init__(self, base_url: str, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 0.0, max_tokens: int = 512, n: int = 1, timeout_s: float = 120.0,
                 max_concurrency: int = 64, http_client: Any = None):
        import openai

        if n < 1 or max_tokens < 1:
            raise TeacherError(f"--n and --max-tokens must be >= 1 (got n {n}, max_tokens {max_tokens})")
        if n > 1 and temperature <= 0:
            raise TeacherError(f"--n {n} answers a prompt need --temperature > 0 (at 0 they would be the same)")
        key = os.environ.get(api_key_env)
        if key is None and api_key_env != "OPENAI_API_KEY":
            raise TeacherError(f"--api-key-env {api_key_env}: the environment variable is not set; export it with "
                               "the endpoint's key")
        self.base_url = base_url.rstrip("/")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key or "EMPTY", max_retries=0, timeout=timeout_s,
                                    http_client=http_client)
        self.temperature, self.max_tokens, self.n = temperature, max_tokens, n
        self.max_concurrency = max_concurrency
        self.model = model or self._only_model()
        self.name = self.model

    def _only_model(self) -> str:
        try:
            names = [m.id for m in self.client.models.list()]
        except Exception as e:  # noqa: BLE001 - one line naming the endpoint
            raise TeacherError(f"{self.base_url}: cannot list the endpoint's models ({type(e).__name__}: {e}); give "
                               "--model NAME") from None
        if len(names) != 1:
            raise TeacherError(f"{self.base_url}: serves {len(names)} models ({', '.join(names[:8])}): give --model "
                               "NAME")
        return names[0]

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "openai", "base_url": self.base_url, "model": self.model,
                "temperature": self.temperature, "max_tokens": self.max_tokens, "n": self.n}

    def answer(self, prompts: list[list[dict]]) -> list[list[str]]:
        out = []
        for messages in prompts:
            response = self.client.chat.completions.create(model=self.model, messages=messages,  # type: ignore[arg-type]
                                                           temperature=self.temperature, max_tokens=self.max_tokens,
                                                           n=self.n)
            texts = [c.message.content or "" for c in sorted(response.choices, key=lambda c: c.index)]
            if len(texts) != self.n:
                raise ValueError(f"asked for n={self.n} answers, the endpoint gave {len(texts)}")
            out.append(texts)
        return out

    def is_transient(self, error: BaseException) -> bool:
        return is_transient(error)

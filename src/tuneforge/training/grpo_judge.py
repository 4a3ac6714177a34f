"""GRPO's ``judge`` reward: an LLM scores each completion through any OpenAI-compatible endpoint.

Each completion is one chat request (the official ``openai`` client, ``temperature`` 0): the ``template``
filled with ``{prompt}`` (the prompt's text: the user turn, or ``role: content`` lines for a longer
conversation), ``{completion}`` and ``{reference}`` (the record's ``reference_field``, read only when the
template names it, and then checked on every record before the first step), after an optional ``system``
message. The reply's score is read by ``parse``:

* ``number`` (default): the last number in the reply (``[[7]]``, ``Score: 7/10`` and ``7`` all read 7), mapped
  from ``scale`` (default ``[0, 10]``) onto [0, 1] and clipped there;
* ``yes_no``: the last ``[[YES]]`` / ``[[NO]]`` (any case) gives 1 / 0.

Requests run ``concurrency`` at a time, each with ``timeout_s``. A connection error, timeout, 408, 409, 429 or 5xx
is retried ``retries`` times after ``backoff_s x 2^attempt`` seconds; other errors are not. A call that still
fails, or a reply with no score in it, gets ``default_score`` and is counted (``rewards/<name>/failed`` and
``rewards/<name>/unparseable`` in ``metrics.jsonl``, summed over the step's completions) and logged; the run goes on
unless ``fail_on_error: true``, which raises on the first such call. The endpoint is asked for its models when the
run starts (``check: false`` skips it), so an endpoint that is not there fails in one line before a model loads.

The API key is read from the environment variable named by ``api_key_env`` (default ``OPENAI_API_KEY``; when
that default is unset, ``"EMPTY"``, which local servers accept). A small local judge is a noisy reward: read
``samples.jsonl`` before trusting its curve.
"""

from __future__ import annotations

import logging
import math
import os
import re
import string
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tuneforge.endpoints import is_transient
from tuneforge.errors import RewardError

logger = logging.getLogger(__name__)

TEMPLATE = ("Rate how well the response answers the user's request, from 0 (useless or wrong) to 10 (perfect).\n\n"
            "[Request]\n{prompt}\n\n[Response]\n{completion}\n\n"
            "Reply with a short reason, then the rating as [[N]].")
PLACEHOLDERS = {"prompt", "completion", "reference"}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_YES_NO = re.compile(r"\[\[\s*(YES|NO)\s*\]\]", re.IGNORECASE)


def placeholders(template: str) -> set[str]:
    """The ``{names}`` a template fills; :class:`RewardError` for a malformed one."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise RewardError(f"grpo.rewards: judge options.template is malformed ({e}); write {{prompt}}, "
                          "{completion}, {reference}, and {{ }} for literal braces") from None


def parse_score(reply: str, parse: str = "number", scale: tuple[float, float] = (0.0, 10.0)) -> float | None:
    """The score in [0, 1] of a judge's ``reply``, or None when it holds none (module docstring)."""
    if parse == "yes_no":
        found = _YES_NO.findall(reply or "")
        return None if not found else float(found[-1].upper() == "YES")
    numbers = _NUMBER.findall(reply or "")
    if not numbers:
        return None
    low, high = scale
    return min(1.0, max(0.0, (float(numbers[-1]) - low) / (high - low)))


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """The prompt as the judge reads it: the single user turn's text, or ``role: content`` lines."""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return str(turns[0]["content"])
    return "\n".join(f"{m['role']}: {m['content']}" for m in turns)


class JudgeReward:
    """The ``judge`` reward function (module docstring); ``counts()`` hands over and resets the failed and
    unparseable calls counted since the last call."""

    def __init__(self, options: dict[str, Any], name: str = "judge", client: Any = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.name = name
        self.where = where = f"grpo.rewards: {name}"
        known = {"base_url", "model", "api_key_env", "template", "system", "parse", "scale", "reference_field",
                 "concurrency", "timeout_s", "retries", "backoff_s", "default_score", "fail_on_error", "max_tokens",
                 "check"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise RewardError(f"{where}: unknown option {unknown[0]!r}; the options are {', '.join(sorted(known))}")
        for required in ("base_url", "model"):
            if not options.get(required):
                raise RewardError(f"{where} needs options.{required} (the OpenAI-compatible endpoint, e.g. "
                                  "http://localhost:8000/v1, and the judge model's name there)")
        self.base_url, self.model = str(options["base_url"]), str(options["model"])
        self.template = str(options.get("template", TEMPLATE))
        used = placeholders(self.template)
        if used - PLACEHOLDERS:
            extra = sorted(used - PLACEHOLDERS)[0]
            raise RewardError(f"{where} options.template names {{{extra}}}; it may use "
                              "{prompt}, {completion} and {reference}")
        if "completion" not in used:
            raise RewardError(f"{where} options.template has no {{completion}}: the judge would not see what it "
                              "scores")
        self.system = options.get("system")
        self.parse = options.get("parse", "number")
        if self.parse not in ("number", "yes_no"):
            raise RewardError(f"{where} options.parse is {self.parse!r}; write number (a score on options.scale) "
                              "or yes_no ([[YES]] / [[NO]])")
        scale = options.get("scale", [0, 10])
        if not (isinstance(scale, (list, tuple)) and len(scale) == 2 and float(scale[0]) < float(scale[1])):
            raise RewardError(f"{where} options.scale is {scale!r}; write [low, high] with low < high, e.g. [0, 10]")
        self.scale = (float(scale[0]), float(scale[1]))
        self.reference_field = str(options.get("reference_field", "answer"))
        self.needs = (self.reference_field,) if "reference" in used else ()
        self.concurrency = int(options.get("concurrency", 8))
        self.timeout_s = float(options.get("timeout_s", 60.0))
        self.retries = int(options.get("retries", 3))
        self.backoff_s = float(options.get("backoff_s", 1.0))
        self.default_score = float(options.get("default_score", 0.0))
        self.fail_on_error = bool(options.get("fail_on_error", False))
        self.max_tokens = int(options.get("max_tokens", 256))
        if self.concurrency < 1 or self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or \
                not math.isfinite(self.default_score):
            raise RewardError(f"{where}: options.concurrency >= 1, timeout_s > 0, retries >= 0, backoff_s >= 0 "
                              "and a finite default_score, please")
        key_env: str | None = options.get("api_key_env")
        key = os.environ.get(key_env or "OPENAI_API_KEY")
        if key_env and key is None:
            raise RewardError(f"{where} options.api_key_env names {key_env}, which is not set in the environment")
        self.sleep = sleep
        self.failed = self.unparseable = 0
        if client is None:
            import openai

            client = openai.OpenAI(base_url=self.base_url, api_key=key or "EMPTY", timeout=self.timeout_s,
                                   max_retries=0)
        self.client = client
        if options.get("check", True):
            self._check()

    def _check(self) -> None:
        import openai

        try:
            self.client.models.list()
        except openai.APIError as e:
            raise RewardError(f"{self.where}: the endpoint {self.base_url} does not answer ({type(e).__name__}: "
                              f"{e}); start it, or set options.check: false") from None

    def counts(self) -> dict[str, int]:
        out = {"failed": self.failed, "unparseable": self.unparseable}
        self.failed = self.unparseable = 0
        return out

    def _ask(self, text: str) -> str:
        """The judge's reply to ``text``, retried (module docstring); raises the last error."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": text}]
        for attempt in range(self.retries + 1):
            try:
                reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0.0,
                                                            max_tokens=self.max_tokens)
                return reply.choices[0].message.content or ""
            except Exception as e:
                if attempt == self.retries or not is_transient(e):
                    raise
                self.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def _one(self, text: str) -> tuple[float | None, str]:
        try:
            reply = self._ask(text)
        except Exception as e:
            return None, f"failed: {type(e).__name__}: {str(e)[:200]}"
        value = parse_score(reply, self.parse, self.scale)
        return value, "" if value is not None else f"unparseable reply {reply[:200]!r}"

    def __call__(self, prompts: list[list[dict[str, Any]]], completions: list[str], **fields: Any) -> list[float]:
        references = fields.get(self.reference_field, [""] * len(completions)) if self.needs else \
            [""] * len(completions)
        texts = [self.template.format(prompt=prompt_text(p), completion=c, reference="" if r is None else r)
                 for p, c, r in zip(prompts, completions, references, strict=True)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, max(1, len(texts)))) as pool:
            results = list(pool.map(self._one, texts))
        problems = [(i, why) for i, (value, why) in enumerate(results) if value is None]
        if problems:
            failed = sum(why.startswith("failed") for _, why in problems)
            self.failed += failed
            self.unparseable += len(problems) - failed
            first, why = problems[0]
            message = (f"{self.where}: {len(problems)} of {len(texts)} judge calls gave no score ({failed} failed, "
                       f"{len(problems) - failed} unparseable); first, completion {first}: {why}")
            if self.fail_on_error:
                raise RewardError(message + " (options.fail_on_error is true)")
            logger.warning("%s; scored %g (options.default_score)", message, self.default_score)
        return [self.default_score if value is None else value for value, _ in results]

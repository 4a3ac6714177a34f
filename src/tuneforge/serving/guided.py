"""Guided decoding: a request's ``response_format`` compiled to a grammar that masks its row's logits.

The grammar engine is `llguidance <https://github.com/guidance-ai/llguidance>`_ (MIT; a Rust Earley parser with
lazily computed token masks, one dependency-free wheel; a backend of vLLM, SGLang and llama.cpp). Why it and
not xgrammar or outlines-core: see docs/guides/serving.md ("Structured output").

Three pieces:

* :class:`Grammars` compiles a grammar once, at validation time (before the request joins a batch), keeps the
  compiled matcher in an LRU cache keyed by the grammar's SHA-256, and hands every request a :class:`Guide`: a
  copy of that matcher in its start state. Bad grammars raise :class:`GrammarError` naming the field.
* :class:`Guide` is what the engine sees (``Request.guide``): :meth:`Guide.fill` writes the allowed-token bitmask
  of the next step, :meth:`Guide.consume` advances it by the emitted token, :attr:`Guide.complete` says that the
  grammar admits nothing more (the row then finishes with ``"stop"``).
* :func:`apply_masks` masks rows of a logits batch in place (``-inf`` where the row's grammar forbids a token);
  rows without a guide are untouched, so constrained and free rows share one decode step.

Grammar sources are llguidance's own format, so any constraint it can express composes: a JSON Schema
(:func:`json_schema_grammar`), any JSON object (:data:`JSON_OBJECT_SCHEMA`), or a Lark grammar
(:func:`lark_grammar`). A forced tool call is one Lark grammar in the model's tool call format
(:func:`tuneforge.serving.tool_calls.tool_call_grammar`; for Hermes, literal ``<tool_call>`` and ``</tool_call>``
around ``%json{...}`` of ``{"name": {"const": tool}, "arguments": <its parameters schema>}``, ``anyOf`` the tools);
it goes through :meth:`Grammars.guide` like a response format.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

MAX_SCHEMA_BYTES = 64 * 1024           # a JSON Schema (as compact JSON) longer than this is refused
CACHE_SIZE = 128                       # compiled grammars kept (LRU)
# JSON as a compact single line: no free whitespace, so a model cannot pad its answer with endless blanks
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
JSON_OBJECT_SCHEMA: dict = {"type": "object"}

SCHEMA_PARAM = "response_format.json_schema.schema"


class GrammarError(ValueError):
    """A grammar that cannot be compiled; ``param`` names the request field it came from."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(f"{param}: {detail}")
        self.param = param
        self.detail = detail


def json_schema_grammar(schema: dict, param: str = SCHEMA_PARAM) -> str:
    """llguidance's grammar of JSON matching ``schema``; :class:`GrammarError` for a schema that is too large or
    not a JSON Schema (checked against its meta-schema)."""
    import jsonschema
    from llguidance import LLMatcher

    if not isinstance(schema, dict):
        raise GrammarError(param, "must be a JSON Schema object")
    text = json.dumps(schema, separators=(",", ":"))     # key order kept: properties are generated in it
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise GrammarError(param, f"{len(text.encode())} bytes, over the limit of {MAX_SCHEMA_BYTES}: simplify the "
                                  "schema (or split the request)")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise GrammarError(param, f"not a valid JSON Schema ({e.message[:200]}{f' at {where}' if where else ''})"
                           ) from None
    except Exception as e:                  # a $schema naming an unknown draft, unhashable oddities, ...
        raise GrammarError(param, f"not a valid JSON Schema ({str(e).splitlines()[0][:200]})") from None
    try:
        return LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)    # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise GrammarError(param, f"not a valid JSON Schema ({str(e).splitlines()[0][:200]})") from None


def lark_grammar(text: str) -> str:
    """llguidance's grammar of a Lark grammar (``%json{...}`` embeds a JSON Schema): for tool calls."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark(text)


class Guide:
    """One request's position in its grammar (a matcher of its own)."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def fill(self, bitmask_row: torch.Tensor) -> None:
        """Write the next step's allowed tokens into ``bitmask_row`` (int32 ``[ceil(V / 32)]``, contiguous, CPU)."""
        self.matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token} ({self.matcher.get_error()[:200]})")

    @property
    def complete(self) -> bool:
        """The grammar admits no further token (only the end of the answer)."""
        return bool(self.matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        return bool(self.matcher.is_accepting())


_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_masks(logits: torch.Tensor, guides: Iterable[tuple[int, Guide]]) -> None:
    """For each ``(i, guide)``, set ``logits[i]`` to ``-inf`` wherever ``guide`` forbids the token (in place)."""
    pairs = list(guides)
    if not pairs:
        return
    vocab = logits.shape[-1]
    bitmask = torch.empty((len(pairs), (vocab + 31) // 32), dtype=torch.int32)
    for k, (_, guide) in enumerate(pairs):
        guide.fill(bitmask[k])
    allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).bool().reshape(len(pairs), -1)[:, :vocab]
    index = torch.tensor([i for i, _ in pairs], device=logits.device)
    rows = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
    logits[index] = rows


class Grammars:
    """Compiled grammars for one tokenizer: :meth:`guide` gives a request its :class:`Guide`.

    Args:
        tokenizer: the base model's (fast) Hugging Face tokenizer.
        vocab_size: the model's vocabulary (logits width; may exceed the tokenizer's).
        eos_ids: tokens that end an answer; the grammar allows them only where it accepts.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int], cache_size: int = CACHE_SIZE) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.cache_size = cache_size
        self._tokenizer: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0                     # grammars compiled (cache misses): tests and metrics

    def _lltokenizer(self) -> Any:
        if self._tokenizer is None:           # ~0.3 s for a 49k vocabulary: on the first guided request
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=sorted(self.eos_ids))
        return self._tokenizer

    def guide(self, grammar: str, param: str) -> Guide:
        """A fresh :class:`Guide` of ``grammar`` (compiled once, then cached); :class:`GrammarError` naming
        ``param`` when llguidance refuses it (an unsupported keyword, a grammar over its size limits, ...)."""
        from llguidance import LLMatcher

        key = hashlib.sha256(grammar.encode()).hexdigest()
        with self._lock:
            matcher = self._cache.get(key)
            if matcher is not None:
                self._cache.move_to_end(key)
            else:
                matcher = LLMatcher(self._lltokenizer(), grammar, log_level=0)
                if matcher.is_error():
                    raise GrammarError(param, f"cannot be used to guide decoding ({_one_line(matcher.get_error())})")
                self.compiled += 1
                self._cache[key] = matcher
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return Guide(matcher.deep_copy())


def _one_line(message: str) -> str:
    lines = [x.strip() for x in message.strip().splitlines() if x.strip() and set(x.strip()) != {"^"}]
    return (" ".join(lines) or "refused by the grammar engine")[:300]

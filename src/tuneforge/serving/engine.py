"""Continuous batching: one base model, many adapters, requests joining the running batch between decode steps.

One thread owns the model. Each iteration of its loop:

1. runs the queued admin commands (load / unload an adapter): between decode steps, never inside one;
2. admits waiting requests while the batch has room and their adapter can be loaded (LRU, pinning:
   :class:`~tuneforge.serving.adapters.AdapterRegistry`), and prefills them: plain rows together, left-padded,
   rows with virtual tokens (prefix / prompt tuning) one by one; each yields its first token;
3. merges the new rows' KV caches into the running batch's (left-padding the shorter ones; an attention mask
   ``[B, L]`` marks real entries, each row keeps its own next position id);
4. runs one decode step for every running row (one token each, the rows' adapters mixed in one forward:
   :meth:`~tuneforge.serving.adapters.AdapterSet.forward`), samples, streams the text, and drops finished rows
   from the batch and the cache.

Rows whose prompt starts with a long cached prefix (:attr:`Engine.cascade_min_tokens`, from the prefix cache) leave
it out of their own cache: rows with the same prefix and adapter load share one copy
(:class:`~tuneforge.kernels.cascade_attention.SharedPrefix`, ``_Row.shared``), and decode steps with such rows run
cascade attention (:mod:`tuneforge.kernels.cascade_attention`: the group's queries against the one prefix, each row
against its own entries, merged by log-sum-exp). Prefill is unchanged; models with a sliding window or soft-capped
scores keep every row's whole cache (:attr:`Engine.cascade_off` says why).

A row may carry a grammar (``Request.guide``, :mod:`tuneforge.serving.guided`: a ``response_format``): before
sampling, its logits are masked to the tokens the grammar allows (the other rows' logits untouched), the guide
advances with each emitted token, and the row finishes with ``"stop"`` once the grammar is complete or at an EOS
token (offered only where the grammar accepts).

Rows compute what they would alone: padding is masked out and positions are per row (tested: a request's
tokens in a busy batch equal its tokens alone). Text goes back through ``Request.sink`` callbacks, called on
the engine thread: ``("token", text, n_tokens)``, then ``("done", finish_reason, usage)`` or
``("error", message, status)``.

One bad row fails alone:

* **before admission**, :meth:`Engine.validate` (called by :meth:`Engine.submit`) refuses what the batch could
  not compute: an empty prompt, token ids outside the vocabulary, a prompt that fills the context, a seed
  ``torch.Generator.manual_seed`` does not take (outside ``[-2**63, 2**64 - 1]``), ``max_tokens < 1``,
  temperature / top_p that are not finite or out of range, empty stop strings. :class:`InvalidRequest` names
  the field (the server answers 400 with it);
* **while computing**, the seam is :meth:`Engine._isolated`: a batched forward (a prefill chunk, a decode step)
  that raises is run again one row at a time (the decode step's KV cache first cut back to its length before
  the step), so the row that raises fails alone and the others go on with the state they would have had;
  per-row work (sampling, detokenization, stop strings, the sink) runs under one ``try`` per row in
  :meth:`Engine._emit`. A failed request gets ``("error", message, 500)`` (a fault of the server, not of its
  input), its row, KV cache rows and adapter reference are freed, and the batch goes on. A fault outside any
  row (merging caches) fails the running batch, as a last resort, and the engine keeps serving;
* **cancelled** requests (``Request.cancelled``, set by the server when the client goes away, streaming or
  not) leave the batch before the next decode step: a flag read per row per step;
* **draining** (:meth:`Engine.drain`, on SIGTERM): admitted requests run on until the deadline; rows still
  running then end with finish reason ``"length"`` (truncated, as by ``max_tokens``; ``shutdown`` in the
  metrics), and requests not started yet get ``("error", ..., 503)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from tuneforge.kernels.cascade_attention import Plan, SharedPrefix, cascade_step, model_configs, unsupported
from tuneforge.models.transformers_compat import cache_argument
from tuneforge.serving.adapters import AdapterLoadError, AdapterRegistry, AdapterSet, NoAdapterSlot
from tuneforge.serving.prefix_cache import PrefixCache
from tuneforge.serving.protocol import SEED_MAX, SEED_MIN

log = logging.getLogger(__name__)

Sink = Callable[[tuple], None]


@dataclass
class Request:
    """One generation: prompt token ids, the adapter (None: base model), sampling and stopping."""

    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False                 # vLLM's extension: always generate max_tokens (benchmarks)
    sink: Sink = lambda event: None
    guide: Any = None                        # a grammar the answer must match (serving.guided.Guide), or None
    keep_tokens: frozenset[int] = frozenset()   # special tokens decoded as text (a tool call format's markers)
    keep_logits: bool = False                # record each step's logits in ``logits`` (tests)
    logits: list[torch.Tensor] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


@dataclass
class _Row:
    req: Request
    pos: int                                 # position id of the next token fed
    virtual: int = 0                         # prefix / soft-prompt length in this row's cache
    cached: int = 0                          # prompt tokens served from the prefix cache (usage: cached_tokens)
    shared: SharedPrefix | None = None       # the group prefix this row's cache leaves out (cascade decode)
    tokens: list[int] = field(default_factory=list)
    text: str = ""                           # decoded so far (whole characters)
    sent: int = 0                            # characters of ``text`` already streamed
    prefix_offset: int = 0                   # incremental detokenization window (see Engine._detokenize)
    read_offset: int = 0
    stopped_by_string: bool = False
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    done: bool = False


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class InvalidRequest(ValueError):
    """A request the engine refuses before admission; ``param`` names the field (``prompt`` for the prompt ids)."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(f"{param}: {detail}")
        self.param = param
        self.detail = detail


def _brief(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


MIN_TEMPERATURE = 1e-6
_CLIENT_REASON = {"cancelled": "stop", "shutdown": "length"}     # internal finish reason -> the one answered


class Engine:
    """The scheduler thread around an :class:`AdapterSet`.

    Args:
        registry: the adapters (and through it the base model).
        tokenizer: the base model's tokenizer (decoding; adapters share its vocabulary).
        max_batch: most rows decoded together.
        max_prefill_tokens: most prompt tokens admitted (and prefilled) between two decode steps, and most
            tokens (rows x padded length) in one prefill forward; a longer prompt is admitted alone.
        eos_ids: token ids that end an answer (default: the tokenizer's and the generation config's EOS).
        max_context: most positions a row may reach (default: the model's ``max_position_embeddings``).
        on_finish: called with ``(request, usage, ttft, latency, finish_reason)`` for metrics.
        prefix_cache_bytes: memory for the KV entries of prompts' leading blocks, reused by later prompts that
            start the same way (:mod:`tuneforge.serving.prefix_cache`); 0 turns prefix caching off.
        cascade: rows whose prompt starts with at least :attr:`cascade_min_tokens` cached tokens keep that prefix
            once per group (:class:`~tuneforge.kernels.cascade_attention.SharedPrefix`, shared by the rows with
            the same prefix and adapter load) and decode with cascade attention over it
            (:mod:`tuneforge.kernels.cascade_attention`); off, or where the model cannot use it (a sliding
            window, soft-capping: :attr:`cascade_off`), every row holds its whole prompt.
    """

    cascade_min_tokens = 64       # a shorter cached prefix stays in the row (a group costs a few ops per layer)

    def __init__(self, registry: AdapterRegistry, tokenizer: PreTrainedTokenizerBase, max_batch: int = 32,
                 max_prefill_tokens: int = 8192, eos_ids: set[int] | None = None, max_context: int | None = None,
                 on_finish: Callable[..., None] | None = None, prefix_cache_bytes: int = 1 << 30,
                 cascade: bool = False) -> None:
        self.registry = registry
        self.set: AdapterSet = registry.set
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = eos_ids if eos_ids is not None else _eos_ids(self.set.base, tokenizer)
        self.max_context = max_context or int(getattr(self.set.base.config, "max_position_embeddings", 2048))
        self.on_finish = on_finish
        self.cache_kw = cache_argument(self.set.base)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.cascade_off: str | None = "turned off" if not cascade else unsupported(self.set.base)
        if cascade and self.cascade_off:
            log.info("cascade decode off for this model (%s): every row keeps its whole prompt", self.cascade_off)
        self._attn_configs = model_configs(self.set.base)
        self._special_ids: set[int] | None = None       # the tokenizer's special tokens (see _text)
        self._waiting: deque[Request] = deque()
        self._commands: queue.Queue = queue.Queue()
        self._rows: list[_Row] = []
        self._prefilling: list[Request] = []     # admitted, not yet in the batch (failed on a batch-wide fault)
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None         # [B, L] 1 where the cache holds a real entry
        self._wake = threading.Condition()
        self._accepting = True
        self._stop = False
        self._deadline: float | None = None            # drain: rows still running then are cut short
        self.vocab_size = int(self.set.base.get_input_embeddings().num_embeddings)
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_rows_seen = 0

    # ----------------------------------------------------------------------------------- public API

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="tuneforge-engine", daemon=True)
        self._thread.start()
        return self

    def validate(self, req: Request) -> None:
        """Raise :class:`InvalidRequest` (naming the field) for a request the batch could not compute."""
        ids = req.prompt_ids
        if not ids:
            raise InvalidRequest("prompt", "empty: it has no tokens; send at least one character of text")
        if not all(type(t) is int for t in ids):
            raise InvalidRequest("prompt", "token ids must be integers")
        low, high = min(ids), max(ids)
        if low < 0 or high >= self.vocab_size:
            raise InvalidRequest("prompt", f"token id {low if low < 0 else high} is outside the model's vocabulary "
                                 f"(0 to {self.vocab_size - 1}): tokenize with the base model's tokenizer")
        if len(ids) >= self.max_context:
            raise InvalidRequest("prompt", f"{len(ids)} tokens leave no room for an answer in the model's context of "
                                 f"{self.max_context}: shorten the prompt")
        if type(req.max_tokens) is not int or req.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"{req.max_tokens!r}: must be an integer of at least 1")
        if not isinstance(req.temperature, int | float) or not math.isfinite(req.temperature) or req.temperature < 0:
            raise InvalidRequest("temperature", f"{req.temperature!r}: must be a finite number of at least 0")
        if not isinstance(req.top_p, int | float) or not math.isfinite(req.top_p) or not 0 < req.top_p <= 1:
            raise InvalidRequest("top_p", f"{req.top_p!r}: must be a number above 0 and at most 1")
        if req.seed is not None and (type(req.seed) is not int or not SEED_MIN <= req.seed <= SEED_MAX):
            raise InvalidRequest("seed", f"{req.seed!r} is out of range: use an integer from -2**63 to 2**64 - 1")
        if any(not isinstance(x, str) or not x for x in req.stop):
            raise InvalidRequest("stop", "stop strings must be non-empty strings")

    def submit(self, req: Request) -> None:
        """Validate ``req`` (:class:`InvalidRequest`) and queue it; it joins the running batch at the next step."""
        self.validate(req)
        with self._wake:
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            self._waiting.append(req)
            self._wake.notify()

    def call(self, fn: Callable[[], Any], timeout: float | None = 600) -> Any:
        """Run ``fn()`` on the engine thread between two decode steps; return its result (or raise its error)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        done: queue.Queue = queue.Queue(maxsize=1)
        with self._wake:
            self._commands.put((fn, done))
            self._wake.notify()
        ok, value = done.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def adapters_in_use(self) -> set[str]:
        return {r.req.adapter for r in self._rows if r.req.adapter} | {r.adapter for r in self._waiting if r.adapter}

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def drain(self, timeout: float) -> None:
        """Finish the admitted requests within ``timeout`` seconds; rows still running then end with finish
        reason ``"length"``, requests not started yet get a 503 error. New requests are still taken (the server
        refuses them before they get here) until :meth:`stop`."""
        with self._wake:
            self._deadline = time.monotonic() + timeout
            self._wake.notify()

    def stop(self, drain: bool = True, timeout: float = 600) -> None:
        """Refuse new requests; with ``drain``, finish the admitted ones first; then end the thread."""
        with self._wake:
            self._accepting = False
            if not drain:
                for req in self._waiting:
                    req.sink(("error", "the server is shutting down", 503))
                self._waiting.clear()
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def generate(self, req: Request, timeout: float = 600) -> tuple[str, str, dict]:
        """Blocking helper: ``(text, finish_reason, usage)`` of ``req`` (for scripts and tests)."""
        events: queue.Queue = queue.Queue()
        req.sink = events.put
        self.submit(req)
        text = []
        while True:
            ev = events.get(timeout=timeout)
            if ev[0] == "token":
                text.append(ev[1])
            elif ev[0] == "done":
                return "".join(text), ev[1], ev[2]
            else:
                raise RuntimeError(ev[1])

    # ------------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        while True:
            with self._wake:
                while (not self._stop and not self._rows and not self._waiting and self._commands.empty()):
                    self._wake.wait()
                if self._stop and not self._rows and not self._waiting and self._commands.empty():
                    return
            try:
                self._run_commands()
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._cut_short()
                self._admit()
                if self._rows:
                    self._decode()
            except Exception as e:   # a fault outside any one row (merging caches, ...): fail the batch, go on
                log.exception("engine step failed")
                message = f"internal error in the running batch ({_brief(e)}); retry the request"
                for req in [r.req for r in self._rows] + self._prefilling:
                    self._fail(req, message, 500)
                    self._release(req)
                self._rows, self._cache, self._mask, self._prefilling = [], None, None, []

    def _cut_short(self) -> None:
        """The drain deadline passed: end every running row now (``"length"``), fail the requests not started."""
        with self._wake:
            waiting = list(self._waiting)
            self._waiting.clear()
        for req in waiting:
            self._fail(req, "the server shut down before this request started; retry it", 503)
        rows = list(self._rows)
        for row in rows:
            self._safely(row.req, self._finish, row, "shutdown")
        self._drop_rows(rows)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn()
            except Exception as e:
                done.put((False, e))
                continue
            finally:                        # an adapter unloaded: its cached prefixes go (its key never returns)
                self.prefix_cache.drop_owners({"base"} | {a.key for a in self.set.adapters.values()})
            done.put((True, result))

    def _admit(self) -> None:
        new: list[Request] = []
        with self._wake:
            pending = list(self._waiting)
            self._waiting.clear()
        keep: list[Request] = []
        budget = self.max_prefill_tokens       # prompt tokens prefilled per step: running streams keep flowing
        for req in pending:
            if req.cancelled:                  # gone before it started: answered, never prefilled
                self._safely(req, self._finish, _Row(req, pos=0), "cancelled")
                continue
            if len(self._rows) + len(new) >= self.max_batch or (new and len(req.prompt_ids) > budget):
                keep.append(req)
                continue
            if req.adapter is not None:
                try:
                    ok = self.registry.acquire(req.adapter)
                except NoAdapterSlot as e:
                    self._fail(req, str(e), 503)
                    continue
                except AdapterLoadError as e:
                    self._fail(req, str(e), 400)
                    continue
                except Exception as e:       # a fault loading the adapter: this request alone
                    log.exception("loading adapter %s failed", req.adapter)
                    self._fail(req, f"internal error loading adapter {req.adapter!r} ({_brief(e)})", 500)
                    continue
                if not ok:
                    keep.append(req)
                    continue
            new.append(req)
            budget -= len(req.prompt_ids)
        with self._wake:
            self._waiting.extendleft(reversed(keep))
        if new:
            self._prefilling = new
            self._prefill(new)
            self._prefilling = []

    # ---------------------------------------------------------------------------------- isolation

    def _isolated(self, items: list, compute: Callable[[list], Any], fail: Callable[[Any, Exception], None],
                  ) -> list:
        """``[compute(items)]``; if that raises, ``compute([item])`` for each item, and ``fail(item, error)`` for
        each one that raises alone: the parts that computed (one, or one per surviving item)."""
        try:
            return [compute(items)]
        except Exception as e:
            if len(items) == 1:
                fail(items[0], e)
                return []
            log.warning("a batched forward of %d rows failed (%s): running them one by one", len(items), _brief(e))
        parts = []
        for item in items:
            try:
                parts.append(compute([item]))
            except Exception as e:
                fail(item, e)
        return parts

    def _fail_request(self, req: Request, e: Exception) -> None:
        """``req`` raised while computed alone: answer it 500 and give back its adapter."""
        log.error("request failed alone (%s)", _brief(e), exc_info=e)
        self._fail(req, f"internal error while generating this request ({_brief(e)}); the other requests were "
                        "not affected: retry it, and report the error if it persists", 500)
        self._release(req)
        self._prefilling = [r for r in self._prefilling if r is not req]

    def _release(self, req: Request) -> None:
        if req.adapter is not None:
            self.registry.release(req.adapter)

    def _forward(self, adapters: list[str | None], **kwargs: Any) -> Any:
        return self.set.forward(adapters, use_cache=True, logits_to_keep=1, **kwargs)

    # ------------------------------------------------------------------------------------- prefill

    def _prefill(self, reqs: list[Request]) -> None:
        plain = [r for r in reqs if not self._virtual_tokens(r)]
        virtual = [r for r in reqs if self._virtual_tokens(r)]
        if self.prefix_cache.enabled and len(plain) > 1:
            self._warm_shared(plain)
        # rows that start from cached blocks prefill apart from rows that do not: a chunk pads to its longest rest
        rest = {id(r): len(r.prompt_ids) - self.prefix_cache.match(self._owner(r), r.prompt_ids) for r in plain}
        cached = [r for r in plain if rest[id(r)] < len(r.prompt_ids)]
        chunks: list[list[Request]] = []
        for part in (cached, [r for r in plain if rest[id(r)] == len(r.prompt_ids)]):
            chunks.append([])
            for req in part:
                chunk = chunks[-1]
                width = max([rest[id(r)] for r in chunk] + [rest[id(req)]])
                if chunk and width * (len(chunk) + 1) > self.max_prefill_tokens:
                    chunks.append([])
                chunks[-1].append(req)
        groups = [(c, self._prefill_plain) for c in chunks if c] + [([r], self._prefill_virtual) for r in virtual]
        for group, compute in groups:
            for part in self._isolated(group, compute, self._fail_request):
                self._join(*part)

    def _owner(self, req: Request) -> str:
        """Whose KV a request's prompt makes: the base model's, or its adapter's (this load of it)."""
        return "base" if req.adapter is None else self.set.adapters[req.adapter].key

    def _warm_shared(self, reqs: list[Request]) -> None:
        """Requests admitted together that share leading blocks not cached yet (the same system turn and tools):
        compute the shared part once, so that each of them prefills only the rest."""
        by_owner: dict[tuple[str, str | None], list[list[int]]] = {}
        for req in reqs:
            by_owner.setdefault((self._owner(req), req.adapter), []).append(req.prompt_ids)
        block = self.prefix_cache.block
        wanted: dict[tuple, tuple[str | None, list[int]]] = {}
        for (owner, adapter), prompts in by_owner.items():
            prompts.sort()
            for a, b in zip(prompts, prompts[1:], strict=False):
                limit = min(len(a), len(b)) - 1
                same = 0
                while same < limit and a[same] == b[same]:
                    same += 1
                same -= same % block
                if same > max(self.prefix_cache.match(owner, a), self.prefix_cache.match(owner, b)):
                    wanted[(owner, tuple(a[:same]))] = (adapter, a[:same])
        for adapter, ids in sorted(wanted.values(), key=lambda item: len(item[1])):
            try:
                self._compute([(adapter, ids)], count=False)
            except Exception as e:            # the requests prefill in full instead (and fail alone if they must)
                log.warning("computing a shared prompt prefix failed (%s)", _brief(e))

    def _virtual_tokens(self, req: Request) -> int:
        adapter = self.set.adapters.get(req.adapter) if req.adapter else None
        return adapter.num_virtual_tokens if adapter is not None else 0

    def _prefill_plain(self, reqs: list[Request]) -> tuple:
        cache, mask, logits, hits = self._compute([(r.adapter, r.prompt_ids) for r in reqs])
        rows = [_Row(r, pos=len(r.prompt_ids), cached=n) for r, n in zip(reqs, hits, strict=True)]
        if self.cascade_off is None and max(hits) >= self.cascade_min_tokens:
            cache, mask = self._share_prefixes(rows, cache, mask, hits)
        return rows, cache, mask, logits

    def _share_prefixes(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, hits: list[int],
                        ) -> tuple[DynamicCache, torch.Tensor]:
        """Take the cached prefixes of just-prefilled ``rows`` out of their cache (columns ``[0, P)``, ``P`` the
        longest hit: :meth:`_compute`'s layout) into one :class:`SharedPrefix` per (owner, prefix tokens), joining
        a running row's group where one exists; a hit shorter than :attr:`cascade_min_tokens` stays in its row.
        The rows' cache is copied without the columns no row needs any more: ``(cache, mask)``."""
        P = max(hits)
        groups = {r.shared.key: r.shared for r in self._rows if r.shared is not None}
        layers = _kv_layers(cache)
        share = [i for i, n in enumerate(hits) if n >= self.cascade_min_tokens]
        for i in share:
            n, req = hits[i], rows[i].req
            key = (self._owner(req), tuple(req.prompt_ids[:n]))
            if key not in groups:            # one copy of the prefix (every layer), not a view of the batch's
                groups[key] = SharedPrefix(key, torch.stack([torch.stack([la.keys[i, :, P - n:P],
                                                                          la.values[i, :, P - n:P]])
                                                             for la in layers]))
            rows[i].shared = groups[key]
        mask = mask.clone()
        mask[share, :P] = 0
        first = int(mask.any(0).nonzero()[0].item())      # leading columns that are padding in every row now
        if first == 0:
            return cache, mask
        trimmed = DynamicCache()
        trimmed.layers = [_RoomyLayer.copy_of(la.keys[:, :, first:], la.values[:, :, first:]) for la in layers]
        return trimmed, mask[:, first:]

    def _compute(self, prompts: list[tuple[str | None, list[int]]], count: bool = True,
                 ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, list[int]]:
        """Prefill ``prompts`` (adapter, token ids) in one forward: each row's cached leading blocks go into the KV
        cache as they are, the rest is computed (left-padded), and its new full blocks are cached.

        Row ``i``'s columns: ``[padding][its n_i cached entries][padding][its computed tokens]``; the attention mask
        marks the real ones and position ids continue from ``n_i``. ``(cache, mask [R, L], last logits [R, V],
        [n_i])``."""
        dev = self.set.device
        owners = ["base" if a is None else self.set.adapters[a].key for a, _ in prompts]
        found = [self.prefix_cache.blocks(o, ids, count=count) for o, (_, ids) in zip(owners, prompts, strict=True)]
        hits = [n for n, _ in found]
        rests = [ids[n:] for n, (_, ids) in zip(hits, prompts, strict=True)]
        P, S = max(hits), max(len(r) for r in rests)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (S - len(r)) + r for r in rests], device=dev)
        rest_mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rests], device=dev)
        positions = (rest_mask.cumsum(-1) - 1).clamp(min=0) + torch.tensor(hits, device=dev)[:, None]
        if P:
            # one buffer for every layer's keys and values, room for the rest and the first decode steps after the
            # cached columns: the blocks are copied once, and the forward appends in place (no concatenation)
            kv = next(blocks[0] for _, blocks in found if blocks)
            block = self.prefix_cache.block
            past = kv.new_empty((kv.shape[0], 2, len(prompts), kv.shape[2], P + S + _RoomyLayer.room, kv.shape[4]))
            for i, (n, blocks) in enumerate(found):
                past[:, :, i, :, :P - n] = 0                     # padding: masked, but never garbage (0 * NaN)
                for j, b in enumerate(blocks):
                    past[:, :, i, :, P - n + j * block:P - n + (j + 1) * block] = b
            cache = DynamicCache()
            cache.layers = [_RoomyLayer.over(layer[0], layer[1], P) for layer in past]
            cached_mask = torch.tensor([[0] * (P - n) + [1] * n for n in hits], device=dev)
            mask = torch.cat([cached_mask, rest_mask], 1)
        else:
            cache, mask = DynamicCache(), rest_mask
            cache.layer_class_to_replicate = _RoomyLayer
        out = self._forward([a for a, _ in prompts], input_ids=ids, attention_mask=mask, position_ids=positions,
                            **{self.cache_kw: cache})
        if self.prefix_cache.enabled:
            layers = _kv_layers(cache)
            for i, (owner, (_, prompt), n, rest) in enumerate(zip(owners, prompts, hits, rests, strict=True)):
                if len(prompt) // self.prefix_cache.block > n // self.prefix_cache.block:
                    lo = P + S - len(rest)
                    new = torch.stack([torch.stack([layer.keys[i, :, lo:], layer.values[i, :, lo:]])
                                       for layer in layers])
                    self.prefix_cache.insert(owner, prompt, new, start=n)
        return cache, mask, out.logits[:, -1], hits

    def _prefill_virtual(self, reqs: list[Request]) -> tuple:
        (req,) = reqs
        adapter = self.set.adapters[req.adapter]            # type: ignore[index]
        dev = self.set.device
        P, T = adapter.num_virtual_tokens, len(req.prompt_ids)
        ids = torch.tensor([req.prompt_ids], device=dev)
        mask = torch.ones((1, P + T), dtype=torch.long, device=dev)
        # the method's serving hook: the prefix KV entries (prefix tuning) or [S; E(x)] (prompt tuning), positions
        past, inputs = self.set.prefill_inputs(req.adapter, ids)        # type: ignore[arg-type]
        cache = DynamicCache(ddp_cache_data=past) if past is not None else DynamicCache()
        out = self._forward([req.adapter], attention_mask=mask, **inputs, **{self.cache_kw: cache})
        return [_Row(req, pos=P + T, virtual=P)], cache, mask, out.logits[:, -1]

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Add prefilled ``rows`` (their ``cache``, ``mask [n, L]`` and last logits ``[n, V]``) to the batch."""
        if self._cache is None or not self._rows:
            self._cache, self._mask = cache, mask
            self._rows = []
        else:
            self._cache, self._mask = _merge_caches(self._cache, self._mask, cache, mask)  # type: ignore[arg-type]
        self._rows.extend(rows)
        joined = {id(r.req) for r in rows}
        self._prefilling = [r for r in self._prefilling if id(r) not in joined]
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        self._emit(rows, logits)

    # -------------------------------------------------------------------------------------- decode

    def _decode(self) -> None:
        gone = [r for r in self._rows if r.req.cancelled]          # clients that went away: drop them first
        if gone:
            for row in gone:
                self._safely(row.req, self._finish, row, "cancelled")
            self._drop_rows(gone)
            if not self._rows:
                return
        rows = list(self._rows)
        parts = self._isolated(rows, self._decode_rows, self._fail_decoded)
        if len(parts) == 1 and parts[0][0] is rows:               # the whole batch in one forward (the rule)
            self._mask = parts[0][2]
        else:                                                     # some rows ran alone: rebuild the batch
            self._rows, self._cache, self._mask = [], None, None
            for part_rows, cache, mask, _ in parts:
                if self._cache is None:
                    self._cache, self._mask = cache, mask
                else:
                    self._cache, self._mask = _merge_caches(self._cache, self._mask, cache, mask)  # type: ignore
                self._rows.extend(part_rows)
            self._drop_rows([])                                   # trim columns that are padding in every row
        self.steps += 1
        for part_rows, _, _, logits in parts:
            for row in part_rows:
                row.pos += 1
            self._emit(part_rows, logits)

    def _decode_rows(self, rows: list[_Row]) -> tuple:
        """One decode step of ``rows``: all of the batch (its cache extended in place; cut back if the forward
        raises) or some of them (on a copy of their cache rows). ``(rows, cache, mask, logits)``."""
        assert self._cache is not None and self._mask is not None
        dev = self.set.device
        if len(rows) == len(self._rows):
            cache, mask = self._cache, self._mask
        else:
            where = {id(r): i for i, r in enumerate(self._rows)}
            index = torch.tensor([where[id(r)] for r in rows], device=dev)
            cache = DynamicCache(ddp_cache_data=[(layer.keys[index], layer.values[index])
                                                 for layer in _kv_layers(self._cache)])
            mask = self._mask[index]
        _give_room(cache)
        width = mask.shape[1]
        last = torch.tensor([[r.tokens[-1]] for r in rows], device=dev)
        positions = torch.tensor([[r.pos] for r in rows], device=dev)
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=dev)], 1)
        groups: dict[int, tuple[list[int], SharedPrefix]] = {}
        for i, r in enumerate(rows):
            if r.shared is not None:
                groups.setdefault(id(r.shared), ([], r.shared))[0].append(i)
        try:
            with (cascade_step(self._attn_configs, Plan(mask.bool(), [
                    (None if len(index) == len(rows) else torch.tensor(index, device=dev), prefix)
                    for index, prefix in groups.values()]))
                  if groups else contextlib.nullcontext()):
                out = self._forward([r.req.adapter for r in rows], input_ids=last, attention_mask=mask,
                                    position_ids=positions, **{self.cache_kw: cache})
        except Exception:
            for layer in _kv_layers(cache):          # layers the step reached hold one more entry: drop it
                if layer.keys is not None and layer.keys.shape[2] > width:
                    layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]
            raise
        return rows, cache, mask, out.logits[:, -1]

    def _fail_decoded(self, row: _Row, e: Exception) -> None:
        """``row`` raised in a decode step alone: it is left out of the rebuilt batch."""
        row.done = True
        self._fail_request(row.req, e)

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample one token for each of ``rows`` (logits ``[n, V]``), stream text, retire finished rows; a row
        whose sampling, text or sink raises fails alone."""
        probs = logits.float()
        guided = [(i, row.req.guide) for i, row in enumerate(rows) if row.req.guide is not None and not row.done]
        if guided:                               # guided rows: -inf where their grammar forbids the token
            from tuneforge.serving.guided import apply_masks

            probs = probs.clone() if probs is logits else probs
            try:
                apply_masks(probs, guided)
            except Exception:                    # a guide that raises: find it, row by row, below
                for i, guide in guided:
                    try:
                        apply_masks(probs, [(i, guide)])
                    except Exception as e:
                        rows[i].req.guide = _Broken(e)
        greedy = probs.argmax(-1).tolist()
        now = time.perf_counter()
        finished = []
        for i, row in enumerate(rows):
            try:
                if row.req.keep_logits:
                    row.req.logits.append(logits[i].detach().clone())
                reason = self._advance(row, greedy[i], probs[i], now)
                if reason is not None:
                    self._finish(row, reason)
                    finished.append(row)
            except Exception as e:
                log.error("request failed alone (%s)", _brief(e), exc_info=e)
                row.done = True
                self._fail(row.req, f"internal error while generating this request ({_brief(e)}); the other "
                                    "requests were not affected: retry it, and report the error if it persists", 500)
                finished.append(row)
        if finished:
            self._drop_rows(finished)

    def _advance(self, row: _Row, greedy: int, logits: torch.Tensor, now: float) -> str | None:
        """Take ``row``'s next token (``greedy``, or sampled from ``logits [V]``); its finish reason, if done."""
        if row.first_token_at is None:
            row.first_token_at = now
        if row.req.cancelled:
            return "cancelled"
        guide = row.req.guide
        if isinstance(guide, _Broken):
            raise guide.error
        tok = greedy if row.req.temperature <= 0 else self._sample(row, logits)
        if tok in self.eos_ids and (not row.req.ignore_eos or guide is not None):
            return "stop"                        # a guided row is offered EOS only where its grammar accepts
        if guide is not None:
            guide.consume(tok)
        row.tokens.append(tok)
        reason = self._stream(row)
        row.stopped_by_string = reason == "stop"
        if reason is None and guide is not None and guide.complete:
            reason = "stop"                      # the grammar admits nothing more: the answer is whole
        if reason is None and (len(row.tokens) >= row.req.max_tokens or row.pos >= self.max_context):
            reason = "length"
        return reason

    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        if row.generator is None and row.req.seed is not None:
            row.generator = torch.Generator(device=self.set.device).manual_seed(row.req.seed)
        # a temperature near 0 is greedy; below MIN_TEMPERATURE, logits / t would overflow to inf (softmax: NaN)
        probs = torch.softmax(logits / max(row.req.temperature, MIN_TEMPERATURE), -1)
        if row.req.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < row.req.top_p
            keep[0] = True                  # the likeliest token always (a top_p below float32's range keeps none)
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=row.generator).item())

    def _detokenize(self, row: _Row, final: bool = False) -> None:
        """Append the text of ``row``'s new tokens to ``row.text``, decoding only a window of recent tokens (as
        vLLM and TGI do: the window keeps merges across token boundaries right) and holding back a half
        multi-byte character until its other bytes arrive (``final``: flush it)."""
        before = self._text(row.tokens[row.prefix_offset:row.read_offset], row.req.keep_tokens)
        after = self._text(row.tokens[row.prefix_offset:], row.req.keep_tokens)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            row.text += after[len(before):]
            row.prefix_offset, row.read_offset = row.read_offset, len(row.tokens)

    def _text(self, ids: list[int], keep: frozenset[int]) -> str:
        """``ids`` as text without special tokens, except those in ``keep``."""
        if not keep:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))
        if self._special_ids is None:
            tok = self.tokenizer
            self._special_ids = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items()
                                                             if t.special}
        return str(self.tokenizer.decode([i for i in ids if i in keep or i not in self._special_ids],
                                         skip_special_tokens=False))

    def _stream(self, row: _Row) -> str | None:
        """Send the newly decoded text of ``row``; ``"stop"`` when a stop string appeared (text cut before it)."""
        self._detokenize(row)
        stops = row.req.stop
        if not stops:
            self._send(row, len(row.text))
            return None
        longest = max(len(s) for s in stops)
        start = max(0, row.sent - longest)
        hits = [at for s in stops if (at := row.text.find(s, start)) >= 0]
        if hits:
            row.text = row.text[:min(hits)]
            self._send(row, len(row.text))
            return "stop"
        self._send(row, max(row.sent, len(row.text) - (longest - 1)))   # hold back a possible stop's start
        return None

    def _send(self, row: _Row, upto: int) -> None:
        if upto > row.sent:
            row.req.sink(("token", row.text[row.sent:upto], len(row.tokens)))
            row.sent = upto

    def _finish(self, row: _Row, reason: str) -> None:
        row.done = True
        if reason != "cancelled" and not row.stopped_by_string:
            self._detokenize(row, final=True)
            self._send(row, len(row.text))
        usage = {"prompt_tokens": len(row.req.prompt_ids), "completion_tokens": len(row.tokens),
                 "total_tokens": len(row.req.prompt_ids) + len(row.tokens),
                 "prompt_tokens_details": {"cached_tokens": row.cached}}
        now = time.perf_counter()
        ttft = None if row.first_token_at is None else row.first_token_at - row.req.arrived
        if self.on_finish is not None:
            self.on_finish(row.req, usage, ttft, now - row.req.arrived, reason)
        row.req.sink(("done", _CLIENT_REASON.get(reason, reason), usage))

    def _fail(self, req: Request, message: str, status: int) -> None:
        """Answer ``req`` with an error (never raises: a sink that fails is logged)."""
        try:
            if self.on_finish is not None:
                self.on_finish(req, None, None, time.perf_counter() - req.arrived, "error")
            req.sink(("error", message, status))
        except Exception:
            log.exception("could not report an error to its request")

    def _safely(self, req: Request, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:
            self._fail(req, f"internal error while finishing this request ({_brief(e)})", 500)

    def _drop_rows(self, rows: list[_Row]) -> None:
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self._rows) if id(r) not in gone]
        for r in rows:
            if r.req.adapter is not None:
                self.registry.release(r.req.adapter)
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache, self._mask = None, None
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(keep, device=self.set.device)
        mask = self._mask[index]
        first = int(mask.any(0).nonzero()[0].item())          # leading columns that are padding in every row
        for layer in _kv_layers(self._cache):
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self._mask = mask[:, first:]


class _Broken:
    """The guide of a row whose mask computation raised: the row fails alone (500) when it is sampled."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _merge_caches(cache_a: DynamicCache, mask_a: torch.Tensor, cache_b: DynamicCache, mask_b: torch.Tensor,
                  ) -> tuple[DynamicCache, torch.Tensor]:
    """Stack two batches' KV caches along the batch, left-padding the shorter one: ``(cache, mask [B, L])``."""
    La, Lb = mask_a.shape[1], mask_b.shape[1]
    L = max(La, Lb)
    for la, lb in zip(_kv_layers(cache_a), _kv_layers(cache_b), strict=True):
        la.keys = torch.cat([_left_pad(la.keys, L), _left_pad(lb.keys, L)], 0)
        la.values = torch.cat([_left_pad(la.values, L), _left_pad(lb.values, L)], 0)
    mask = torch.cat([torch.nn.functional.pad(mask_a, (L - La, 0)), torch.nn.functional.pad(mask_b, (L - Lb, 0))], 0)
    return cache_a, mask


class _RoomyLayer(DynamicLayer):
    """A full-attention cache layer that appends into spare room instead of concatenating.

    transformers' ``DynamicLayer.update`` is ``torch.cat``: every decode step copies the whole batch's KV, which
    costs as much as the model's matmuls once prompts are a few hundred tokens long (a tools block, a cached
    prefix). Here ``keys`` / ``values`` are views ``[:, :, :L]`` of buffers with :attr:`room` spare columns; a step
    writes its column in place, and only a full buffer (every ``room`` steps) is copied. The engine's own edits
    (indexing rows, trimming or padding columns, merging batches) replace ``keys`` with a new tensor; the next
    update sees it is no longer a view of the buffer and copies it into a new one."""

    room = 64

    @classmethod
    def over(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> _RoomyLayer:
        """A layer holding the first ``length`` columns of the buffers ``keys`` / ``values`` ``[B, H, size, D]``."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer._buf = (keys, values)
        layer.keys, layer.values = keys[:, :, :length], values[:, :, :length]
        return layer

    @classmethod
    def copy_of(cls, keys: torch.Tensor, values: torch.Tensor) -> _RoomyLayer:
        """A layer holding a copy of ``keys`` / ``values`` ``[B, H, L, D]`` (and its room): nothing shared with them."""
        L = keys.shape[2]
        k = keys.new_empty((*keys.shape[:2], L + cls.room, keys.shape[3]))
        v = values.new_empty((*values.shape[:2], L + cls.room, values.shape[3]))
        k[:, :, :L], v[:, :, :L] = keys, values
        return cls.over(k, v, L)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        L, n = (keys.shape[2] if keys.dim() == 4 else 0), key_states.shape[2]
        buf: tuple[torch.Tensor, torch.Tensor] | None = getattr(self, "_buf", None)
        if (buf is None or keys.dim() != 4 or keys.data_ptr() != buf[0].data_ptr()
                or values.data_ptr() != buf[1].data_ptr() or keys.stride() != buf[0].stride()
                or keys.shape[:2] != key_states.shape[:2] or L + n > buf[0].shape[2]):
            size = L + n + self.room
            k = key_states.new_empty((*key_states.shape[:2], size, key_states.shape[3]))
            v = value_states.new_empty((*value_states.shape[:2], size, value_states.shape[3]))
            if L:
                k[:, :, :L], v[:, :, :L] = keys, values
            buf = self._buf = (k, v)
        buf[0][:, :, L:L + n] = key_states
        buf[1][:, :, L:L + n] = value_states
        self.keys, self.values = buf[0][:, :, :L + n], buf[1][:, :, :L + n]
        return self.keys, self.values


def _give_room(cache: DynamicCache) -> None:
    """Make ``cache``'s full-attention layers :class:`_RoomyLayer` (same tensors; later steps append in place)."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            roomy = _RoomyLayer()
            roomy.__dict__.update(layer.__dict__)
            cache.layers[i] = roomy


def _kv_layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers, each with ``keys`` / ``values`` ``[B, kv_heads, L, head_dim]`` (full attention)."""
    return list(cache.layers)


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, H, l, D] -> [B, H, length, D]`` with zeros in front."""
    return torch.nn.functional.pad(t, (0, 0, length - t.shape[2], 0)) if t.shape[2] < length else t


def _eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    return ids

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

Rows compute what they would alone: padding is masked out and positions are per row (tested: a request's
tokens in a busy batch equal its tokens alone). Text goes back through ``Request.sink`` callbacks, called on
the engine thread: ``("token", text, n_tokens)``, then ``("done", finish_reason, usage)`` or
``("error", message, status)``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from tuneforge.models.transformers_compat import cache_argument
from tuneforge.serving.adapters import AdapterLoadError, AdapterRegistry, AdapterSet, NoAdapterSlot

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
    keep_logits: bool = False                # record each step's logits in ``logits`` (tests)
    logits: list[torch.Tensor] = field(default_factory=list)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


@dataclass
class _Row:
    req: Request
    pos: int                                 # position id of the next token fed
    virtual: int = 0                         # prefix / soft-prompt length in this row's cache
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
    """

    def __init__(self, registry: AdapterRegistry, tokenizer: PreTrainedTokenizerBase, max_batch: int = 32,
                 max_prefill_tokens: int = 8192, eos_ids: set[int] | None = None, max_context: int | None = None,
                 on_finish: Callable[..., None] | None = None) -> None:
        self.registry = registry
        self.set: AdapterSet = registry.set
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.eos_ids = eos_ids if eos_ids is not None else _eos_ids(self.set.base, tokenizer)
        self.max_context = max_context or int(getattr(self.set.base.config, "max_position_embeddings", 2048))
        self.on_finish = on_finish
        self.cache_kw = cache_argument(self.set.base)
        self._waiting: deque[Request] = deque()
        self._commands: queue.Queue = queue.Queue()
        self._rows: list[_Row] = []
        self._prefilling: list[Request] = []     # admitted, not yet in the batch (failed together on an error)
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None         # [B, L] 1 where the cache holds a real entry
        self._wake = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.max_rows_seen = 0

    # ----------------------------------------------------------------------------------- public API

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="tuneforge-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, req: Request) -> None:
        """Queue ``req``; it joins the running batch at the next step."""
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
                self._admit()
                if self._rows:
                    self._decode()
            except Exception as e:   # never leave clients hanging: fail the batch, keep serving
                log.exception("engine step failed")
                for req in [r.req for r in self._rows] + self._prefilling:
                    self._fail(req, f"generation failed: {e}", 500)
                self._drop_rows([r for r in self._rows])
                for req in self._prefilling:
                    if req.adapter is not None:
                        self.registry.release(req.adapter)
                self._prefilling = []

    def _run_commands(self) -> None:
        while True:
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((True, fn()))
            except Exception as e:
                done.put((False, e))

    def _admit(self) -> None:
        new: list[Request] = []
        with self._wake:
            pending = list(self._waiting)
            self._waiting.clear()
        keep: list[Request] = []
        budget = self.max_prefill_tokens       # prompt tokens prefilled per step: running streams keep flowing
        for req in pending:
            if req.cancelled:
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

    # ------------------------------------------------------------------------------------- prefill

    def _prefill(self, reqs: list[Request]) -> None:
        plain = [r for r in reqs if not self._virtual_tokens(r)]
        virtual = [r for r in reqs if self._virtual_tokens(r)]
        chunk: list[Request] = []
        for req in plain:
            width = max([len(r.prompt_ids) for r in chunk] + [len(req.prompt_ids)])
            if chunk and width * (len(chunk) + 1) > self.max_prefill_tokens:
                self._prefill_plain(chunk)
                chunk = []
            chunk.append(req)
        if chunk:
            self._prefill_plain(chunk)
        for req in virtual:
            self._prefill_virtual(req)

    def _virtual_tokens(self, req: Request) -> int:
        adapter = self.set.adapters.get(req.adapter) if req.adapter else None
        return adapter.num_virtual_tokens if adapter is not None else 0

    def _prefill_plain(self, reqs: list[Request]) -> None:
        dev = self.set.device
        width = max(len(r.prompt_ids) for r in reqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs], device=dev)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs], device=dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.set.forward([r.adapter for r in reqs], input_ids=ids, attention_mask=mask, position_ids=positions,
                               use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        rows = [_Row(r, pos=len(r.prompt_ids)) for r in reqs]
        self._join(rows, cache, mask, out.logits[:, -1])

    def _prefill_virtual(self, req: Request) -> None:
        adapter = self.set.adapters[req.adapter]            # type: ignore[index]
        dev = self.set.device
        P, T = adapter.num_virtual_tokens, len(req.prompt_ids)
        ids = torch.tensor([req.prompt_ids], device=dev)
        mask = torch.ones((1, P + T), dtype=torch.long, device=dev)
        if adapter.kind == "prefix":
            cache = DynamicCache(ddp_cache_data=[(k.to(dev), v.to(dev)) for k, v in adapter.prefix_cache()])
            out = self.set.forward([req.adapter], input_ids=ids, attention_mask=mask,
                                   position_ids=torch.arange(P, P + T, device=dev)[None], use_cache=True,
                                   logits_to_keep=1, **{self.cache_kw: cache})
        else:   # prompt tuning: [S; E(x)] from position 0
            embeds = torch.cat([adapter.soft_prompt()[None].to(dev), self.set.embed(ids)], dim=1)
            cache = DynamicCache()
            out = self.set.forward([req.adapter], inputs_embeds=embeds, attention_mask=mask,
                                   position_ids=torch.arange(P + T, device=dev)[None], use_cache=True,
                                   logits_to_keep=1, **{self.cache_kw: cache})
        row = _Row(req, pos=P + T, virtual=P)
        self._join([row], cache, mask, out.logits[:, -1])

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Add prefilled ``rows`` (their ``cache``, ``mask [n, L]`` and last logits ``[n, V]``) to the batch."""
        for row in rows:
            if row.req.seed is not None and row.req.temperature > 0:
                row.generator = torch.Generator(device=self.set.device).manual_seed(row.req.seed)
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
        assert self._cache is not None and self._mask is not None
        dev = self.set.device
        last = torch.tensor([[r.tokens[-1]] for r in self._rows], device=dev)
        positions = torch.tensor([[r.pos] for r in self._rows], device=dev)
        self._mask = torch.cat([self._mask, torch.ones((len(self._rows), 1), dtype=self._mask.dtype, device=dev)], 1)
        out = self.set.forward([r.req.adapter for r in self._rows], input_ids=last, attention_mask=self._mask,
                               position_ids=positions, use_cache=True, logits_to_keep=1,
                               **{self.cache_kw: self._cache})
        self.steps += 1
        for row in self._rows:
            row.pos += 1
        self._emit(list(self._rows), out.logits[:, -1])

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample one token for each of ``rows`` (logits ``[n, V]``), stream text, retire finished rows."""
        tokens = self._sample(rows, logits.float())
        now = time.perf_counter()
        finished = []
        for i, (row, tok) in enumerate(zip(rows, tokens, strict=True)):
            if row.req.keep_logits:
                row.req.logits.append(logits[i].detach().clone())
            if row.first_token_at is None:
                row.first_token_at = now
            reason = None
            if row.req.cancelled:
                reason = "cancelled"
            elif tok in self.eos_ids and not row.req.ignore_eos:
                reason = "stop"
            else:
                row.tokens.append(tok)
                reason = self._stream(row)
                row.stopped_by_string = reason == "stop"
                if reason is None and (len(row.tokens) >= row.req.max_tokens or row.pos >= self.max_context):
                    reason = "length"
            if reason is not None:
                self._finish(row, reason)
                finished.append(row)
        if finished:
            self._drop_rows(finished)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        out = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            t = row.req.temperature
            if t <= 0:
                continue
            probs = torch.softmax(logits[i] / t, -1)
            if row.req.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < row.req.top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            out[i] = int(torch.multinomial(probs, 1, generator=row.generator).item())
        return out

    def _detokenize(self, row: _Row, final: bool = False) -> None:
        """Append the text of ``row``'s new tokens to ``row.text``, decoding only a window of recent tokens (as
        vLLM and TGI do: the window keeps merges across token boundaries right) and holding back a half
        multi-byte character until its other bytes arrive (``final``: flush it)."""
        window = row.tokens[row.prefix_offset:]
        before = str(self.tokenizer.decode(row.tokens[row.prefix_offset:row.read_offset], skip_special_tokens=True))
        after = str(self.tokenizer.decode(window, skip_special_tokens=True))
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            row.text += after[len(before):]
            row.prefix_offset, row.read_offset = row.read_offset, len(row.tokens)

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
                 "total_tokens": len(row.req.prompt_ids) + len(row.tokens)}
        now = time.perf_counter()
        ttft = (row.first_token_at or now) - row.req.arrived
        if self.on_finish is not None:
            self.on_finish(row.req, usage, ttft, now - row.req.arrived, reason)
        row.req.sink(("done", "stop" if reason == "cancelled" else reason, usage))

    def _fail(self, req: Request, message: str, status: int) -> None:
        if self.on_finish is not None:
            self.on_finish(req, None, None, time.perf_counter() - req.arrived, "error")
        req.sink(("error", message, status))

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

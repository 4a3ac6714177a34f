"""``tuneforge serve``: an OpenAI-compatible HTTP server for one base model and many adapters (FastAPI + uvicorn).

Endpoints: ``GET /v1/models`` (the base and every adapter, with ``parent``), ``POST /v1/chat/completions`` and
``POST /v1/completions`` (``stream: true`` answers with server-sent events), ``GET /health``, ``GET /metrics``
(Prometheus), and the admin endpoints ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter``
(vLLM's ``lora_name`` / ``lora_path`` bodies). The request's ``model`` picks the adapter (or the base model)
and the response's ``model`` names the one that answered. A chat prompt is rendered with the chat template
saved with the adapter's run (else the base model's), exactly as training rendered it.

Bad input never reaches the batch: the body goes through :func:`~tuneforge.serving.protocol.parse_body`, the
prompt through the tokenizer and :meth:`~tuneforge.serving.engine.Engine.validate`, each refusal a 400 naming
the field; a request that fails inside the engine fails alone (see :mod:`tuneforge.serving.engine`). The
request bodies and answers are published as OpenAPI at ``/openapi.json``.

A client that closes its connection cancels its request, streaming or not: streams notice when a write fails,
non-streaming requests through a task that waits for the connection's ``http.disconnect``
(:meth:`Server._collect_all`); the engine drops the row before its next decode step and the concurrency slot
is free again.

SIGTERM / Ctrl-C drain the server (:meth:`Server.run`): ``/health`` answers 503 ``draining`` and new requests
503 ``shutting_down`` while the listening socket stays open; in-flight requests run on for up to
``graceful_timeout`` seconds, and those still running then end with ``finish_reason: "length"`` (a stream gets
its final chunk, its usage if asked, and ``data: [DONE]``); then the process exits 0. A second signal exits at
once.

Python::

    from tuneforge.serving import ServeConfig, Server
    server = Server(ServeConfig(base="smollm2-135m-instruct", adapters={"tickets": "runs/quickstart"}))
    app = server.app                      # a FastAPI app; server.run() serves it with uvicorn
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.data.tool_formats import FORMATS, HERMES, ToolCallFormat, detect, special_marker_ids
from tuneforge.serving import protocol as P
from tuneforge.serving.adapters import AdapterLoadError, AdapterRegistry, AdapterSet, adapter_kind, check_base
from tuneforge.serving.engine import Engine, EngineStopped, InvalidRequest
from tuneforge.serving.engine import Request as GenRequest
from tuneforge.serving.guided import (
    JSON_OBJECT_SCHEMA,
    GrammarError,
    Grammars,
    Guide,
    json_schema_grammar,
    lark_grammar,
)
from tuneforge.serving.metrics import ServerMetrics
from tuneforge.serving.protocol import APIError
from tuneforge.serving.security import BodyLimit, adapter_path_under, check_admin, check_user
from tuneforge.serving.tool_calls import OutputSplitter, openai_calls, request_tools, split_answer, tool_call_grammar

log = logging.getLogger(__name__)


class ServeConfig(BaseModel):
    """Everything ``tuneforge serve`` takes (a YAML serve config has these keys; CLI flags override them)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="base model: built-in name, folder or .gguf file")
    base_name: str | None = Field(None, description="the base model's id in /v1/models (default: `base`)")
    adapters: dict[str, str] = Field(default_factory=dict, description="adapter name -> folder (run or package)")
    pinned: list[str] = Field(default_factory=list, description="adapters never evicted")
    adapter_root: str | None = Field(None, description="folders the admin endpoints may load adapters from")
    api_keys: list[str] = Field(default_factory=list, description="user keys (none: open)")
    admin_key: str | None = Field(None, description="key of the admin endpoints (none: they are off)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    dtype: str = "auto"
    device: str = "auto"
    max_batch: int = Field(32, ge=1, description="rows decoded together")
    max_loaded_adapters: int = Field(8, ge=1, description="adapters in memory at once (LRU eviction)")
    max_input_tokens: int = Field(4096, ge=1)
    max_output_tokens: int = Field(1024, ge=1)
    default_max_tokens: int = Field(256, ge=1, description="a chat request without max_tokens gets this many")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_concurrent: int = Field(256, ge=1, description="requests in flight; more are answered 429")
    lora_kernel: Literal["peft", "stacked"] = Field(
        "stacked", description="how LoRA rows of different adapters share a forward: stacked (two batched matmuls "
                               "per layer; 1.3x peft's on 8 mixed adapters, benchmarks/serve_throughput.py) or "
                               "peft's adapter_names (one small matmul pair per adapter per layer)")
    prefix_cache_mb: int = Field(
        1024, ge=0, description="memory (MiB) for the KV entries of prompts' leading 16-token blocks, reused by "
                                "later prompts that start the same way (system turn, tools, earlier turns); 0: off")
    cascade_decode: bool = Field(
        False, description="decode rows that share a cached prompt prefix (tools, a system turn) against one copy of "
                          "it, merging prefix and suffix attention by log-sum-exp (needs the prefix cache; models "
                          "with sliding windows or soft-capping keep every row's whole cache); false: each row holds "
                          "its whole prompt. Off by default: on 2 CPU cores it decoded slower than rows holding the "
                          "whole prompt (benchmarks/results/serve_cascade_cpu_2026-12-04.txt)")
    guided_decoding: bool = Field(
        True, description="honour response_format json_object / json_schema by masking each such request's logits "
                          "with its schema's grammar (llguidance); false: such requests are answered 400")
    tool_call_format: Literal["auto", "hermes", "mistral", "llama3_json", "granite"] = Field(
        "auto", description="the format models write tool calls in (parsed into tool_calls, forced by tool_choice "
                            "required or named): auto (detected from each model's chat template: the adapter's "
                            "own, else the base's), hermes, mistral, llama3_json or granite")
    graceful_timeout: float = Field(60.0, ge=0, description="seconds SIGTERM lets in-flight requests run on; "
                                                            "those still running then end with finish_reason length")

    @field_validator("api_keys")
    @classmethod
    def _keys_are_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not key or key != key.strip():
                raise ValueError("an API key must be non-empty, without spaces around it (an empty --api-key "
                                 "would count as keys configured while no request can match it)")
        return keys

    @field_validator("admin_key")
    @classmethod
    def _admin_key_is_a_key(cls, key: str | None) -> str | None:
        if key is not None and (not key or key != key.strip()):
            raise ValueError("the admin key must be non-empty, without spaces around it (leave it out to turn the "
                             "admin endpoints off)")
        return key

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> ServeConfig:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a serve config is a mapping of keys (base, adapters, ...)")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)


def base_trusts_remote_code(config: ServeConfig, base_path: Path | None) -> bool:
    """Whether the base model may run its own code: only when every adapter served was trained by a run that set
    ``trust_remote_code: true`` (its ``run.json``); a base that needs it otherwise is refused in one line."""
    from tuneforge.errors import ConfigError
    from tuneforge.models.remote_code import remote_code_classes
    from tuneforge.runs import run_trusts_remote_code

    if base_path is None or not remote_code_classes(base_path):
        return False
    refused = [name for name, path in config.adapters.items() if not run_trusts_remote_code(path)]
    if refused or not config.adapters:
        why = f"adapter(s) {', '.join(refused)} were not trained" if refused else "no adapter served was trained"
        raise ConfigError(f"base: {config.base!r} runs its own Python code on load "
                          f"({', '.join(remote_code_classes(base_path)[:3])}); serve runs it only for adapters whose "
                          f"runs set trust_remote_code: true, and {why} with it")
    return True


class Server:
    """The model, the engine thread and the FastAPI app around them.

    ``model`` / ``tokenizer``: an already loaded base model and its tokenizer (tests); otherwise
    ``config.base`` is loaded.
    """

    def __init__(self, config: ServeConfig, model: torch.nn.Module | None = None, tokenizer: Any = None) -> None:
        from tuneforge.models.loading import load_model, load_tokenizer
        from tuneforge.models.registry import resolve_model

        self.config = config
        self.base_name = config.base_name or config.base
        try:
            base_path: Path | None = Path(resolve_model(config.base))
        except Exception:
            base_path = None
        for path in config.adapters.values():        # a wrong folder fails before the model loads
            adapter_kind(path)
            check_base(path, base_path)
        trust = base_trusts_remote_code(config, base_path)
        if model is None:
            from tuneforge.models.dtype import pick_device, pick_dtype

            dev = pick_device(config.device)
            dtype, _ = pick_dtype(config.dtype, dev)
            model = load_model(config.base, dtype=dtype, device=dev, trust_remote_code=trust)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.base, trust_remote_code=trust)
        self.metrics = ServerMetrics()
        self.registry = AdapterRegistry(AdapterSet(model, base_path, lora_kernel=config.lora_kernel),
                                        max_loaded=config.max_loaded_adapters)
        for name, path in config.adapters.items():
            self.registry.register(name, path, pinned=name in config.pinned)
        unknown = [n for n in config.pinned if n not in config.adapters]
        if unknown:
            raise ValueError(f"pinned adapters {unknown} are not among the adapters ({', '.join(config.adapters)})")
        self.engine = Engine(self.registry, self.tokenizer, max_batch=config.max_batch, on_finish=self._finished,
                             prefix_cache_bytes=config.prefix_cache_mb << 20, cascade=config.cascade_decode)
        for tok in [self.tokenizer] + [entry.tokenizer for entry in self.registry.entries.values()]:
            self._stop_at_end_of_turn(tok)
        # response_format's grammars, compiled on a guided request's arrival (the tokenizer's too, on the first)
        self.grammars = Grammars(self.tokenizer, self.engine.vocab_size, self.engine.eos_ids)
        self.metrics.bind(lambda: len(self.registry.loaded), lambda: self.engine.running, lambda: self.engine.waiting,
                          lambda: self.engine.prefix_cache.bytes)
        self.in_flight = 0
        self.draining = False
        self._unloading: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._drain_begun = False
        self.app = self._build_app()
        self.app.state.server = self

    # ---------------------------------------------------------------------------------- life cycle

    def start(self) -> Server:
        if self.engine._thread is None:
            self.engine.start()
            # pinned adapters are loaded now, so the first request does not wait for them
            for name in self.config.pinned:
                self.engine.call(functools.partial(self._preload, name))
        return self

    def _preload(self, name: str) -> None:
        if self.registry.acquire(name):
            self.registry.release(name)

    def begin_drain(self) -> None:
        """Refuse new requests (503) and give the admitted ones ``graceful_timeout`` seconds to finish."""
        self.draining = True
        if not self._drain_begun:
            self._drain_begun = True
            self.engine.drain(self.config.graceful_timeout)

    def shutdown(self) -> None:
        self.begin_drain()
        self.engine.stop(drain=True)

    async def _drain_then_exit(self, uv: Any) -> None:
        self.begin_drain()
        deadline = time.monotonic() + self.config.graceful_timeout + 10      # + the last chunks' writing
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained: shutting down")
        uv.should_exit = True

    def run(self) -> None:
        """Serve on ``config.host:port`` until SIGTERM / Ctrl-C, then drain (module docstring) and return."""
        import uvicorn

        server = self

        class _Uvicorn(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                loop = server._loop
                if server._drain_task is not None or loop is None:    # a second signal, or not serving yet
                    super().handle_exit(sig, frame)
                    return
                log.info("signal %s: draining %d in-flight request(s) (at most %g s), refusing new ones", sig,
                         server.in_flight, server.config.graceful_timeout)
                server.draining = True
                loop.call_soon_threadsafe(server._start_drain, self)

        config = uvicorn.Config(self.app, host=self.config.host, port=self.config.port, log_level="info",
                                timeout_graceful_shutdown=10)
        _Uvicorn(config).run()

    def _start_drain(self, uv: Any) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit(uv))

    def _finished(self, req: GenRequest, usage: dict | None, ttft: float | None, latency: float, status: str) -> None:
        self.metrics.finished(req.adapter or self.base_name, usage, ttft, latency, status)

    # ------------------------------------------------------------------------------------- requests

    def resolve_model(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base model); 404 for anything else."""
        if model == self.base_name:
            return None
        if self.registry.get(model) is not None and model not in self._unloading:
            return model
        raise APIError(404, f"model {model!r} does not exist; GET /v1/models lists the models served",
                       param="model", code="model_not_found")

    def _stop_at_end_of_turn(self, tokenizer: Any) -> None:
        """Answers also end at the end-of-turn token of ``tokenizer``'s chat template (an adapter trained with another
        template than the base's: its own, saved with its run); one stop set serves every row."""
        if tokenizer is not None:
            from tuneforge.data.templates import end_of_turn_ids

            self.engine.eos_ids.update(end_of_turn_ids(tokenizer))

    def tokenizer_for(self, adapter: str | None) -> Any:
        entry = self.registry.get(adapter) if adapter else None
        return entry.tokenizer if entry is not None and entry.tokenizer is not None else self.tokenizer

    def tool_format(self, adapter: str | None) -> ToolCallFormat:
        """The format ``adapter``'s (None: the base model's) answers write calls in: ``tool_call_format``, or
        detected from its chat template (the one its prompts are rendered with)."""
        chosen = self.config.tool_call_format
        return FORMATS[chosen] if chosen != "auto" else detect(getattr(self.tokenizer_for(adapter), "chat_template",
                                                                       None))

    def chat_prompt_ids(self, adapter: str | None, messages: list[dict],
                        template_kwargs: dict[str, Any] | None = None, tools: list[dict] | None = None) -> list[int]:
        """Token ids of ``messages`` plus the generation prompt, rendered with the adapter's own chat template
        (the one saved with its run: what training rendered, with its run's ``template_kwargs``), else the base
        model's; ``template_kwargs`` (a request's ``chat_template_kwargs``) override the run's."""
        from tuneforge.data.rendering import prompt_ids

        tok = self.tokenizer_for(adapter)
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"messages: {adapter or self.base_name} has no chat template (a base model, or an "
                           "adapter trained without one): send a raw prompt to /v1/completions", param="messages")
        try:
            return prompt_ids(tok, messages, template_kwargs, tools=tools)
        except Exception as e:   # a template that rejects the conversation (roles out of order, ...)
            raise APIError(400, f"messages: the chat template refused them ({str(e).splitlines()[0][:200]})",
                           param="messages") from None

    def _check_lengths(self, prompt: list[int], max_tokens: int, param: str) -> None:
        c = self.config
        if len(prompt) > c.max_input_tokens:
            raise APIError(400, f"{param}: {len(prompt)} tokens, over the limit of {c.max_input_tokens}",
                           param=param, code="context_length_exceeded")
        if max_tokens > c.max_output_tokens:
            raise APIError(400, f"max_tokens: {max_tokens} is over the limit of {c.max_output_tokens}",
                           param="max_tokens")
        if len(prompt) + max_tokens > self.engine.max_context:
            raise APIError(400, f"{param}: {len(prompt)} prompt tokens + max_tokens {max_tokens} exceed the model's "
                           f"context of {self.engine.max_context}", param=param, code="context_length_exceeded")

    def tokenize_prompt(self, adapter: str | None, prompt: str) -> list[int]:
        try:
            return list(self.tokenizer_for(adapter)(prompt)["input_ids"])
        except Exception as e:
            raise APIError(400, f"prompt: the tokenizer refused it ({str(e).splitlines()[0][:200]})",
                           param="prompt") from None

    def _validate(self, gens: list[GenRequest], prompt_param: str) -> None:
        """The engine's checks (:meth:`Engine.validate`), as 400 naming the field, before anything is admitted."""
        for gen in gens:
            try:
                self.engine.validate(gen)
            except InvalidRequest as e:
                param = prompt_param if e.param == "prompt" else e.param
                raise APIError(400, f"{param}: {e.detail}", param=param, code="invalid_value") from None

    def guides(self, response_format: Any, count: int) -> list[Guide | None]:
        """``count`` guides of a request's ``response_format`` (``None`` each for text): its grammar compiled (or
        found in the cache) now, before the request joins a batch; :class:`APIError` 400 naming the field."""
        kind = getattr(response_format, "type", "text")
        if kind == "text":
            return [None] * count
        if not self.config.guided_decoding:
            raise APIError(400, f"response_format: {kind} needs guided decoding, which this server has off "
                           "(tuneforge serve --guided-decoding on); send response_format text, or ask its operator",
                           param="response_format", code="guided_decoding_off")
        param = "response_format.json_schema.schema" if kind == "json_schema" else "response_format"
        try:
            schema = response_format.json_schema.schema_ if kind == "json_schema" else JSON_OBJECT_SCHEMA
            grammar = json_schema_grammar(schema, param)
            return [self.grammars.guide(grammar, param) for _ in range(count)]
        except GrammarError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_schema") from None

    def tool_guide(self, tools: list[dict], forced: str, parallel: bool, response_format: Any,
                   fmt: ToolCallFormat = HERMES) -> Guide:
        """The guide that forces a call (``tool_choice`` required or named), its arguments valid against the tool's
        parameters; refused with guided decoding off, or beside a ``response_format`` other than text."""
        if getattr(response_format, "type", "text") != "text":
            raise APIError(400, "response_format: a forced tool call (tool_choice required or a function) is the "
                           "answer's format already; send response_format text", param="response_format")
        if not self.config.guided_decoding:
            raise APIError(400, "tool_choice: forcing a call needs guided decoding, which this server has off "
                           "(tuneforge serve --guided-decoding on); use tool_choice auto", param="tool_choice",
                           code="guided_decoding_off")
        try:
            grammar = tool_call_grammar(tools, forced, parallel, fmt, special_marker_ids(self.tokenizer, fmt))
            return self.grammars.guide(lark_grammar(grammar), "tools")
        except (GrammarError, ValueError) as e:
            raise APIError(400, f"tools: the parameters cannot be enforced ({str(e).splitlines()[0][:200]})",
                           param="tools", code="invalid_schema") from None

    def _admit(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.in_flight >= self.config.max_concurrent:
            self.metrics.rejected.labels("concurrency").inc()
            raise APIError(429, f"too many concurrent requests (limit {self.config.max_concurrent}); retry later",
                           code="rate_limit_exceeded")

    async def _generate(self, req: GenRequest) -> AsyncIterator[tuple]:
        """Submit ``req`` and yield its engine events; cancel it if the consumer goes away."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(ev: tuple) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ev)

        req.sink = sink
        try:
            self.engine.submit(req)
        except EngineStopped:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
        finished = False
        try:
            while True:
                ev = await events.get()
                yield ev
                if ev[0] != "token":
                    finished = True
                    return
        finally:
            if not finished:
                req.cancelled = True

    # -------------------------------------------------------------------------------------- the app

    def _build_app(self) -> FastAPI:
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            self.start()
            self._loop = asyncio.get_running_loop()
            yield
            await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

        app = FastAPI(title="tuneforge serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                      openapi_url="/openapi.json", description="OpenAI-compatible API of one base model and its "
                      "adapters (the request's `model`).")
        app.add_middleware(BodyLimit, max_bytes=self.config.max_body_bytes)
        cfg = self.config

        def openapi() -> dict:
            if app.openapi_schema is None:
                from fastapi.openapi.utils import get_openapi

                schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                     routes=app.routes)
                schema.setdefault("components", {}).setdefault("schemas", {}).update(P.openapi_components())
                app.openapi_schema = schema
            return app.openapi_schema
        app.openapi = openapi                           # type: ignore[method-assign]

        def errors(*statuses: int) -> dict:
            return {s: {"model": P.ErrorResponse, "description": _STATUS_MEANING[s]} for s in statuses}

        def answers(model: type[BaseModel], *statuses: int, chunk: type[BaseModel] | None = None) -> dict:
            ok: dict = {"model": model, "description": "the answer"}
            if chunk is not None:
                ok["content"] = {"text/event-stream": P.openapi_event_stream(chunk)}
                ok["description"] = "the answer; with `stream: true`, server-sent events ending with `data: [DONE]`"
            return {200: ok, **errors(*statuses)}

        @app.exception_handler(APIError)
        async def _api_error(request: Request, exc: APIError) -> JSONResponse:
            if exc.status >= 400 and exc.status != 429:
                self.metrics.rejected.labels(exc.code or str(exc.status)).inc()
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            return JSONResponse(P.error_body(str(exc.detail), P._error_type(exc.status_code)),
                                status_code=exc.status_code)

        @app.exception_handler(Exception)
        async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
            log.exception("unexpected error")
            return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

        def user(request: Request) -> None:
            check_user(request.headers.get("authorization"), cfg.api_keys, cfg.admin_key)

        def admin(request: Request) -> None:
            check_admin(request.headers.get("authorization"), cfg.api_keys, cfg.admin_key)

        @app.get("/health", response_model=None, responses={
            200: {"model": P.Health, "description": "serving"},
            503: {"model": P.Health, "description": "draining after SIGTERM: finishing in-flight requests"}})
        async def health() -> Response:
            body = {"status": "draining" if self.draining else "ok", "running": self.engine.running,
                    "waiting": self.engine.waiting, "loaded_adapters": self.registry.loaded}
            return JSONResponse(body, status_code=503 if self.draining else 200)

        @app.get("/metrics", response_class=PlainTextResponse, responses={200: {
            "description": "Prometheus metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}})
        async def metrics() -> Response:
            return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models", response_model=None, responses=answers(P.ModelList, 401))
        async def models(request: Request) -> dict:
            user(request)
            created = P.now()
            data = [{"id": self.base_name, "object": "model", "created": created, "owned_by": "tuneforge",
                     "root": self.config.base, "parent": None}]
            loaded = set(self.registry.loaded)
            for name in self.registry.names():
                entry = self.registry.get(name)
                if entry is None or name in self._unloading:
                    continue
                data.append({"id": name, "object": "model", "created": created, "owned_by": "tuneforge",
                             "root": str(entry.path), "parent": self.base_name, "method": entry.kind,
                             "loaded": name in loaded, "pinned": entry.pinned})
            return {"object": "list", "data": data}

        @app.post("/v1/chat/completions", response_model=None, openapi_extra=P.openapi_body(P.ChatCompletionRequest),
                  responses=answers(P.ChatCompletionResponse, 400, 401, 404, 413, 429, 500, 503,
                                    chunk=P.ChatCompletionChunk))
        async def chat(request: Request) -> Response:
            user(request)
            body = P.parse_body(P.ChatCompletionRequest, await request.body())
            adapter = self.resolve_model(body.model)
            tools, forced = request_tools(body.tools, body.tool_choice)
            prompt = self.chat_prompt_ids(adapter, body.conversation(), body.chat_template_kwargs, tools)
            max_tokens = body.limit() or cfg.default_max_tokens
            self._check_lengths(prompt, max_tokens, "messages")
            gen = GenRequest(prompt, adapter, max_tokens, body.temperature, body.top_p, body.seed, body.stop_list(),
                             body.ignore_eos)
            self._validate([gen], "messages")
            fmt = self.tool_format(adapter) if tools is not None else None
            if fmt is not None:           # the format's markers stay in the text, special tokens or not
                gen.keep_tokens = frozenset(special_marker_ids(self.tokenizer, fmt).values())
            if forced is not None and fmt is not None and tools is not None:   # required or named: a forced call
                gen.guide = await asyncio.to_thread(self.tool_guide, tools, forced, body.parallel_tool_calls,
                                                    body.response_format, fmt)
            else:
                (gen.guide,) = await asyncio.to_thread(self.guides, body.response_format, 1)
            self._admit()
            return await self._respond_chat(request, body, gen, fmt)

        @app.post("/v1/completions", response_model=None, openapi_extra=P.openapi_body(P.CompletionRequest),
                  responses=answers(P.CompletionResponse, 400, 401, 404, 413, 429, 500, 503,
                                    chunk=P.CompletionChunk))
        async def completions(request: Request) -> Response:
            user(request)
            body = P.parse_body(P.CompletionRequest, await request.body())
            adapter = self.resolve_model(body.model)
            prompts = [self.tokenize_prompt(adapter, p) for p in body.prompts()]
            max_tokens = body.max_tokens or min(16, cfg.max_output_tokens)
            for ids in prompts:
                self._check_lengths(ids, max_tokens, "prompt")
            gens = [GenRequest(ids, adapter, max_tokens, body.temperature, body.top_p, body.seed, body.stop_list(),
                               body.ignore_eos) for ids in prompts]
            self._validate(gens, "prompt")
            for gen, guide in zip(gens, await asyncio.to_thread(self.guides, body.response_format, len(gens)),
                                  strict=True):
                gen.guide = guide
            self._admit()
            return await self._respond_completion(request, body, gens)

        @app.post("/v1/load_lora_adapter", response_model=None, openapi_extra=P.openapi_body(P.LoadAdapterRequest),
                  responses=answers(P.AdapterStatus, 400, 401, 403, 413, 500, 503))
        async def load_adapter(request: Request) -> dict:
            admin(request)
            body = P.parse_body(P.LoadAdapterRequest, await request.body())
            if body.lora_name == self.base_name or self.registry.get(body.lora_name) is not None:
                raise APIError(400, f"lora_name: {body.lora_name!r} is already served; unload it first",
                               param="lora_name", code="adapter_exists")
            path = adapter_path_under(Path(cfg.adapter_root) if cfg.adapter_root else None, body.lora_path)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, self._load_now, body.lora_name, path, body.pinned)
            except AdapterLoadError as e:
                raise APIError(400, f"lora_path: {e}", param="lora_path", code="invalid_adapter") from None
            entry = self.registry.get(body.lora_name)
            return {"status": "ok", "lora_name": body.lora_name, "method": entry.kind if entry else None}

        @app.post("/v1/unload_lora_adapter", response_model=None,
                  openapi_extra=P.openapi_body(P.UnloadAdapterRequest),
                  responses=answers(P.AdapterStatus, 400, 401, 403, 404, 413, 500))
        async def unload_adapter(request: Request) -> dict:
            admin(request)
            body = P.parse_body(P.UnloadAdapterRequest, await request.body())
            if self.registry.get(body.lora_name) is None or body.lora_name in self._unloading:
                raise APIError(404, f"lora_name: no adapter {body.lora_name!r} is served", param="lora_name",
                               code="model_not_found")
            self._unloading.add(body.lora_name)
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._unload_when_idle, body.lora_name)
            finally:
                self._unloading.discard(body.lora_name)
            return {"status": "ok", "lora_name": body.lora_name}

        return app

    def _load_now(self, name: str, path: Path, pinned: bool) -> None:
        """Register ``path`` as ``name`` and load it between two decode steps (unregistered again on failure)."""
        entry = self.registry.register(name, path, pinned=pinned)

        def load() -> None:
            if not self.registry.acquire(name):
                raise AdapterLoadError(f"{path}: every adapter slot ({self.registry.max_loaded}) holds a pinned or "
                                       "busy adapter; unload one or raise --max-loaded-adapters")
            self.registry.release(name)
            self._stop_at_end_of_turn(entry.tokenizer)       # on the engine's thread, between two decode steps
        try:
            self.engine.call(load)
        except Exception:
            self.registry.forget(name)
            raise

    def _unload_when_idle(self, name: str) -> None:
        """Wait until no admitted request uses ``name`` (new ones are refused meanwhile), then unload it."""
        while True:
            busy = self.engine.call(lambda: name in self.engine.adapters_in_use())
            if not busy:
                self.engine.call(lambda: self.registry.unload(name))
                self.registry.forget(name)
                return
            time.sleep(0.02)

    async def _respond_chat(self, request: Request, body: P.ChatCompletionRequest, gen: GenRequest,
                            fmt: ToolCallFormat | None = None) -> Response:
        """The answer: a leading ``<think>`` block as ``reasoning_content``; with a tool call format ``fmt`` (the
        request has tools), its calls as ``tool_calls`` (``finish_reason: tool_calls``), anything that does not
        parse left as content."""
        tools = fmt is not None
        rid, created, model = P.new_id("chatcmpl"), P.now(), body.model
        parallel = body.parallel_tool_calls
        self.in_flight += 1
        if not body.stream:
            try:
                [(text, reason, usage)] = await self._collect_all(request, [gen])
            finally:
                self.in_flight -= 1
            reasoning, content, calls = split_answer(text, tools, fmt or HERMES)
            out_calls = openai_calls(calls, parallel, fmt or HERMES) if calls else None
            if out_calls and reason == "stop":
                reason = "tool_calls"
            return JSONResponse(P.chat_response(rid, model, created, content if content or not out_calls else None,
                                                reason, usage, out_calls, reasoning))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            splitter = OutputSplitter(tools, fmt or HERMES)
            try:
                yield _sse(P.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
                async for ev in self._generate(gen):
                    if ev[0] == "token":
                        for delta in splitter.feed(ev[1]):
                            yield _sse(P.chat_chunk(rid, model, created, delta))
                    elif ev[0] == "done":
                        rest, calls = splitter.finish()
                        for delta in rest:
                            yield _sse(P.chat_chunk(rid, model, created, delta))
                        reason = ev[1]
                        if calls:
                            # each call in one delta (name and the whole arguments), as OpenAI's clients accumulate
                            for i, call in enumerate(openai_calls(calls, parallel, fmt or HERMES)):
                                yield _sse(P.chat_chunk(rid, model, created, {"tool_calls": [{"index": i, **call}]}))
                            reason = "tool_calls" if reason == "stop" else reason
                        yield _sse(P.chat_chunk(rid, model, created, {}, reason))
                        if include_usage:
                            yield _sse(P.chat_chunk(rid, model, created, {}, usage=ev[2]))
                    else:
                        yield _sse(P.error_body(ev[1], P._error_type(ev[2])))
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _respond_completion(self, request: Request, body: P.CompletionRequest, gens: list[GenRequest],
                                  ) -> Response:
        rid, created, model = P.new_id("cmpl"), P.now(), body.model
        self.in_flight += 1
        if not body.stream:
            try:
                results = await self._collect_all(request, gens)
            finally:
                self.in_flight -= 1
            choices = [{"index": i, "text": (body.prompts()[i] if body.echo else "") + text, "finish_reason": reason,
                        "logprobs": None} for i, (text, reason, _) in enumerate(results)]
            usage = {k: sum(r[2][k] for r in results) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
            usage["prompt_tokens_details"] = {
                "cached_tokens": sum(r[2].get("prompt_tokens_details", {}).get("cached_tokens", 0) for r in results)}
            return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                                 "choices": choices, "usage": usage})

        async def events() -> AsyncIterator[str]:
            try:
                for i, gen in enumerate(gens):          # several prompts stream one after the other
                    if body.echo:
                        yield _sse(P.completion_chunk(rid, model, created, i, body.prompts()[i]))
                    async for ev in self._generate(gen):
                        if ev[0] == "token":
                            yield _sse(P.completion_chunk(rid, model, created, i, ev[1]))
                        elif ev[0] == "done":
                            yield _sse(P.completion_chunk(rid, model, created, i, "", ev[1]))
                        else:
                            yield _sse(P.error_body(ev[1], P._error_type(ev[2])))
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _collect_all(self, request: Request, gens: list[GenRequest]) -> list[tuple[str, str, dict]]:
        """The answers of ``gens`` (non-streaming); all of them cancelled when the client disconnects first or
        when one fails."""
        async def watch() -> None:        # the body is read: the next message is the client's disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass
            log.info("client went away: cancelling its request")
            for gen in gens:
                gen.cancelled = True

        watcher = asyncio.create_task(watch())
        try:
            return list(await asyncio.gather(*(self._collect(g) for g in gens)))
        except BaseException:
            for gen in gens:
                gen.cancelled = True
            raise
        finally:
            watcher.cancel()

    async def _collect(self, gen: GenRequest) -> tuple[str, str, dict]:
        parts: list[str] = []
        async for ev in self._generate(gen):
            if ev[0] == "token":
                parts.append(ev[1])
            elif ev[0] == "done":
                return "".join(parts), ev[1], ev[2]
            else:
                raise APIError(ev[2], ev[1])
        raise APIError(500, "generation ended without an answer")


_STATUS_MEANING = {400: "invalid request (`param` names the field)", 401: "missing or unknown key",
                   403: "this key may not do that, or the admin endpoints are off", 404: "no such model or adapter",
                   413: "request body over --max-body-bytes", 429: "too many concurrent requests: retry later",
                   500: "an internal fault of this request alone", 503: "shutting down, or no adapter slot"}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ServerThread:
    """Serve ``app`` with uvicorn on a background thread (tests, benchmarks): ``with ServerThread(app) as s: s.url``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.host = host

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(60)

"""Prometheus metrics of the server, per adapter (``model`` label: the adapter's name or the base model's).

* ``tuneforge_requests_total{model, status}``: finished requests (``status``: the finish reason, or ``error``);
* ``tuneforge_prompt_tokens_total{model}``, ``tuneforge_generation_tokens_total{model}``;
* ``tuneforge_prompt_cached_tokens_total{model}``: prompt tokens served from the prefix cache, not computed;
* ``tuneforge_time_to_first_token_seconds{model}`` and ``tuneforge_request_latency_seconds{model}``: histograms
  from arrival to the first token / to the last;
* ``tuneforge_rejected_requests_total{reason}``: answered 4xx/5xx before reaching the model (auth, limits, ...);
* ``tuneforge_loaded_adapters``, ``tuneforge_running_requests``, ``tuneforge_waiting_requests``,
  ``tuneforge_prefix_cache_bytes``: gauges.

Each server has its own registry (several servers in one process, as in the tests, do not collide).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tuneforge_requests", "finished generation requests", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("tuneforge_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.cached_tokens = Counter("tuneforge_prompt_cached_tokens", "prompt tokens served from the prefix cache",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("tuneforge_generation_tokens", "tokens generated", ["model"], registry=r)
        self.ttft = Histogram("tuneforge_time_to_first_token_seconds", "arrival to first token", ["model"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("tuneforge_request_latency_seconds", "arrival to last token", ["model"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("tuneforge_rejected_requests", "requests refused before generation", ["reason"],
                                registry=r)
        self.loaded_adapters = Gauge("tuneforge_loaded_adapters", "adapters loaded on the base model", registry=r)
        self.running = Gauge("tuneforge_running_requests", "requests in the running batch", registry=r)
        self.waiting = Gauge("tuneforge_waiting_requests", "requests waiting to join the batch", registry=r)
        self.prefix_cache_bytes = Gauge("tuneforge_prefix_cache_bytes", "memory held by cached prompt prefixes",
                                        registry=r)

    def bind(self, loaded: Callable[[], int], running: Callable[[], int], waiting: Callable[[], int],
             prefix_cache_bytes: Callable[[], int] = lambda: 0) -> None:
        self.loaded_adapters.set_function(loaded)
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.prefix_cache_bytes.set_function(prefix_cache_bytes)

    def finished(self, model: str, usage: dict | None, ttft: float | None, latency: float, status: str) -> None:
        self.requests.labels(model, status).inc()
        if usage is not None:
            self.prompt_tokens.labels(model).inc(usage["prompt_tokens"])
            self.cached_tokens.labels(model).inc(usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))
            self.generation_tokens.labels(model).inc(usage["completion_tokens"])
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        self.latency.labels(model).observe(latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)

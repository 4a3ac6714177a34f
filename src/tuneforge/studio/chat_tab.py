"""The Chat tab: the base model and one or more trained runs answering the same prompt side by side, streaming.

Generation goes through the serving engine (:class:`tuneforge.serving.server.Server`, as ``tuneforge serve``):
one base model in memory, each run an adapter on it, every column's request decoded in the same batch, each with
its run's own chat template. The server is built on the first message and kept while the base and the runs stay
the same.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuneforge.studio.runs_tab import list_runs

MAX_COLUMNS = 4                 # the base and up to three runs
BASE = "base"

_servers: dict[tuple, Any] = {}


def adapter_runs(folder: str | Path) -> list[str]:
    """The finished runs under ``folder`` (the ones a column can answer with)."""
    return [str(r.path) for r in list_runs(folder) if r.status.startswith("finished")]


def server_for(base: str, runs: list[str]) -> Any:
    """The serving engine with ``base`` and ``runs`` as adapters (named by their folder), started; cached."""
    from tuneforge.serving.server import ServeConfig, Server

    key = (base, tuple(runs))
    if key not in _servers:
        for old in list(_servers):
            _servers.pop(old).engine.stop(drain=False, timeout=5)
        adapters = {Path(r).name: r for r in runs}
        config = ServeConfig.model_validate({"base": base, "adapters": adapters, "prefix_cache_mb": 0})
        _servers[key] = Server(config).start()
    return _servers[key]


def stream_answers(base: str, runs: list[str], prompt: str, max_tokens: int = 64,
                   temperature: float = 0.0) -> Iterator[tuple[list[str], list[str]]]:
    """The answers of the base model and of each run to ``prompt`` as they grow: ``(texts, states)`` after each
    new piece, a state being ``generating``, ``done (stop|length), N pieces`` or ``error: ...``."""
    from tuneforge.serving.engine import Request

    server = server_for(base, runs)
    names: list[str | None] = [None] + [Path(r).name for r in runs]
    events: queue.Queue = queue.Queue()
    texts = [""] * len(names)
    pieces = [0] * len(names)
    states = ["generating"] * len(names)
    def sink_of(i: int) -> Callable[[tuple], None]:
        return lambda ev: events.put((i, ev))

    for i, name in enumerate(names):
        ids = server.chat_prompt_ids(name, [{"role": "user", "content": prompt}])
        server.engine.submit(Request(ids, adapter=name, max_tokens=max_tokens, temperature=temperature,
                                     sink=sink_of(i)))
    open_ = set(range(len(names)))
    while open_:
        i, ev = events.get(timeout=600)
        if ev[0] == "token":
            texts[i] += ev[1]
            pieces[i] += 1
        else:
            open_.discard(i)
            states[i] = f"done ({ev[1]}), {pieces[i]} pieces" if ev[0] == "done" else f"error: {ev[1]}"
        yield list(texts), list(states)


def build(folder: str, model: str, tab: Any = None) -> None:
    """The tab's components; ``tab``: its Tab, whose selection refreshes the list of runs."""
    import gradio as gr

    with gr.Row():
        base = gr.Textbox(model, label="base model", elem_id="chat-base", scale=2)
        runs = gr.Dropdown(adapter_runs(folder), multiselect=True, label="trained runs (adapters), up to 3",
                           elem_id="chat-runs", scale=3, allow_custom_value=True)
        refresh = gr.Button("Refresh runs", scale=1)
    with gr.Row():
        prompt = gr.Textbox(label="prompt", lines=2, elem_id="chat-prompt", scale=4)
        max_tokens = gr.Number(48, label="max new tokens", precision=0, minimum=1, maximum=1024, scale=1)
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
    with gr.Row():
        answers = [gr.Textbox(label=BASE if i == 0 else f"run {i}", lines=6, visible=i == 0,
                              elem_id=f"chat-answer-{i}") for i in range(MAX_COLUMNS)]
    status = gr.Markdown(elem_id="chat-status")

    def on_send(base_model: str, chosen: list[str] | None, text: str, limit: float | None) -> Iterator[list[Any]]:
        chosen = list(chosen or [])[:MAX_COLUMNS - 1]
        labels = [BASE] + [Path(r).name for r in chosen]
        shown = [gr.update(label=labels[i] if i < len(labels) else "", visible=i < len(labels), value="")
                 for i in range(MAX_COLUMNS)]
        yield [*shown, "loading the models..."]
        try:
            for texts, states in stream_answers(base_model, chosen, text, int(limit or 48)):
                line = " · ".join(f"{label}: {state}" for label, state in zip(labels, states, strict=True))
                yield [*(gr.update(value=texts[i]) if i < len(texts) else gr.update() for i in range(MAX_COLUMNS)),
                       line]
        except Exception as e:      # a folder that is not a run, a base the run was not trained on: one line
            yield [*(gr.update() for _ in range(MAX_COLUMNS)), f"**error:** {e}"]

    send.click(on_send, [base, runs, prompt, max_tokens], [*answers, status])
    refresh.click(lambda: gr.update(choices=adapter_runs(folder)), outputs=runs)
    if tab is not None:
        tab.select(lambda: gr.update(choices=adapter_runs(folder)), outputs=runs)

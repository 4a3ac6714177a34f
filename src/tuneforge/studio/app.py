"""The studio's page: the tabs side by side, served on 127.0.0.1 unless a login is set.

:func:`build_app` lays out the tabs (each in its own module); :func:`launch` serves them. Another host than a
loopback address (``0.0.0.0``, a LAN address) is refused without ``auth`` (``user:password``, or the
``TUNEFORGE_UI_AUTH`` environment variable): the studio starts processes and reads files, so on a network it must
ask who is there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
QUEUE_IDLE_SLEEP_S = 0.05       # Gradio's queue polls itself when idle: 1 ms by default (Windows: 50 ms)
PROGRESS_IDLE_SLEEP_S = 0.1     # ... and its progress loop every 10 ms (Windows: 100 ms)
AUTH_ENV = "TUNEFORGE_UI_AUTH"


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """``user:password`` as a pair; None for no value. Anything else is refused in one line."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"--auth / {AUTH_ENV}: write user:password (got {value[:40]!r})")
    return user, password


def check_host(host: str, auth: tuple[str, str] | None) -> None:
    """Refuse a non-loopback ``host`` without a login."""
    if host not in LOCAL_HOSTS and auth is None:
        raise ConfigError(f"--host {host}: the studio starts processes and reads your files, so it listens beyond "
                          f"this machine only with a login: add --auth user:password (or set {AUTH_ENV})")


def quickstart_data() -> list[str]:
    """The quickstart's data files, shipped in the package (``tuneforge/recipes/data``)."""
    from tuneforge.studio.data_tab import data_files

    return data_files(Path(__file__).resolve().parents[1] / "recipes" / "data")


def build_app(folder: str | Path = "runs", model: str | None = None, data_folder: str | Path | None = None) -> Any:
    """The studio as a Gradio Blocks app over the runs under ``folder``; ``model``: the default base model (the
    form's, the preview's tokenizer, the chat's base)."""
    import gradio as gr

    from tuneforge.models.registry import DEFAULT_MODEL
    from tuneforge.studio import chat_tab, data_tab, evaluate_tab, runs_tab, ship_tab, train_tab

    folder = str(Path(folder).resolve())
    model = model or DEFAULT_MODEL
    files = data_tab.data_files(*(p for p in (data_folder, ".") if p)) + quickstart_data()
    files.sort(key=lambda f: not f.endswith("tickets_train.jsonl"))       # the quickstart's training file first
    with gr.Blocks(title="tuneforge studio", analytics_enabled=False) as app:
        gr.Markdown(f"## tuneforge studio\nruns in `{folder}`")
        with gr.Tab("Runs", id="runs"):
            runs_tab.build(folder)
        with gr.Tab("Data", id="data"):
            data_tab.build(model, files)
        with gr.Tab("Train", id="train"):
            defaults = {"model": model}
            if files:
                defaults["data.train"] = files[0]
            train_tab.build(folder, defaults)
        with gr.Tab("Chat", id="chat") as chat:
            chat_tab.build(folder, model, chat)
        with gr.Tab("Evaluate", id="evaluate") as evaluate:
            evaluate_tab.build(folder, evaluate)
        with gr.Tab("Ship", id="ship") as ship:
            ship_tab.build(folder, model, ship)
        # every timer ticks, whatever tab is shown: pausing the hidden tabs' timers from each tab's select raced
        # with the tab's first render (the Train tab's live view never ticked in about 2 of 5 browser-test runs)
    return app


def calm_queue(app: Any) -> None:
    """Make Gradio's queue poll itself as it does on Windows (every 50 ms, progress every 100 ms) instead of every
    1 ms and 10 ms: idle, the studio's process then takes next to nothing from the cores a run trains on (measured
    by ``benchmarks/studio_targets.py``), at the cost of up to 50 ms on a click. A Gradio without these attributes is
    left as it is."""
    queue = getattr(app, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = QUEUE_IDLE_SLEEP_S
        queue.progress_update_sleep_when_free = PROGRESS_IDLE_SLEEP_S


def launch(folder: str | Path = "runs", host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
           model: str | None = None, block: bool = True) -> Any:
    """Serve the studio; ``auth``: ``user:password`` (default: ``TUNEFORGE_UI_AUTH``). Returns the app (with
    ``block=False``, at once: the server runs in a thread)."""
    login = parse_auth(auth or os.environ.get(AUTH_ENV))
    check_host(host, login)
    app = build_app(folder, model)
    app.queue(default_concurrency_limit=4)
    calm_queue(app)
    app.launch(server_name=host, server_port=port, auth=login, prevent_thread_lock=not block, quiet=True,
               footer_links=[])
    return app

"""Which engines train which method: one table, the :class:`~tuneforge.methods.registry.Method` records' ``engines``.

An engine is how ``tuneforge train`` runs a step: ``single`` (one process), ``ddp``, ``fsdp2`` or ``deepspeed``
(ZeRO-2 and ZeRO-3), one strategy each under ``training/strategies/``. A method lists the engines it is proven
on (``engines``; a method that lists none trains on one process only) and may say why an engine refuses it
(``engine_notes``). The strategies' ``check`` and ``tuneforge plan --accelerate-config`` both read this table
through :func:`engine_refusal`, so an engine refuses a method it was not declared for in one line that names the
method, the engine and the engines the method does train on.
"""

from __future__ import annotations

from tuneforge.methods.registry import get_method, methods

ENGINES = ("single", "ddp", "fsdp2", "deepspeed")
LABELS = {"single": "one process", "ddp": "DDP", "fsdp2": "FSDP2", "deepspeed": "DeepSpeed"}
_WITH = {"single": "on one process", "ddp": "with DDP", "fsdp2": "with FSDP2", "deepspeed": "with DeepSpeed"}
_HOW = {"ddp": "DDP (distributed_type MULTI_GPU)", "fsdp2": "FSDP2", "deepspeed": "DeepSpeed"}


def methods_on(engine: str) -> list[str]:
    """The registered methods ``engine`` trains, in registration order."""
    return [m.name for m in methods() if engine in m.engines]


def engine_refusal(method: str, engine: str) -> str | None:
    """One line saying why ``engine`` does not train ``method`` (None: it does).

    ``engine``: one of :data:`ENGINES`. The line names the method, the engine, the methods the engine trains
    and the engines the method trains on, e.g. ``method full with DeepSpeed is not tested yet (DeepSpeed trains
    lora); train it with DDP (distributed_type MULTI_GPU) or FSDP2, or on one process``; a method's own
    ``engine_notes[engine]`` replaces the part after ``method M with ENGINE``.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: use one of {', '.join(ENGINES)}")
    record = get_method(method)
    if engine in record.engines:
        return None
    where = f"method {method} {_WITH[engine]}"
    note = record.engine_notes.get(engine)
    if note:
        return f"{where}: {note}"
    others = [_HOW[e] for e in ENGINES if e in record.engines and e not in (engine, "single")]
    how = f"train it with {' or '.join(others)}" if others else ""
    if "single" in record.engines:
        how = f"{how}, or on one process" if how else "train it on one process"
    trained = " and ".join(methods_on(engine)) or "no method"
    return f"{where} is not tested yet ({LABELS[engine]} trains {trained}); {how or 'no engine trains it'}"

"""Cache tokenized training data by content hash, so a second run skips tokenization.

The trainer calls::

    key = {"data": [file_sha256(p) for p in files], "tokenizer": tokenizer_fingerprint(tok),
           "render": {"max_length": 1024, "train_on": "assistant", "system_prompt": None}}
    batches = cached_tokenize(key, lambda: tokenize_everything())

``file_sha256`` is :func:`tuneforge.fileutil.file_sha256`. The entry lives at
``<cache_dir()>/tokenized/<sha256 of the key>.pt`` (:func:`tuneforge.fileutil.cache_dir`: ``$TUNEFORGE_CACHE``
or ``~/.cache/tuneforge``). Anything that changes the tokens must be in ``key_parts``: a changed file,
tokenizer or render setting gives a new key. Writes go to a temporary file renamed into place, so a
crash or a concurrent run never leaves a half-written entry; an unreadable entry is recomputed.
Values are saved with :func:`torch.save` and loaded with ``weights_only=True``: tensors, lists,
dicts, tuples, strings and numbers (what tokenized data is made of).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from tuneforge.fileutil import cache_dir

log = logging.getLogger(__name__)
T = TypeVar("T")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 over what decides a tokenizer's output: vocabulary/merges, special tokens, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    from tuneforge.data.rendering import template_kwargs

    parts = {"class": type(tokenizer).__name__,
             "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
             "chat_template": getattr(tokenizer, "chat_template", None),
             "bos": getattr(tokenizer, "add_bos_token", None),
             "eos": getattr(tokenizer, "add_eos_token", None)}
    if template_kwargs(tokenizer):            # only when set: the keys of runs without them stay as they were
        parts["template_kwargs"] = template_kwargs(tokenizer)
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(key_parts: dict[str, Any]) -> str:
    """SHA-256 of ``key_parts`` as canonical JSON (sorted keys; non-JSON values by ``str``)."""
    blob = json.dumps(key_parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(key_parts: dict[str, Any]) -> Path:
    return cache_dir() / "tokenized" / f"{cache_key(key_parts)}.pt"


def cached_tokenize(key_parts: dict[str, Any], compute: Callable[[], T], enabled: bool = True) -> T:
    """``compute()``'s result, from the cache when ``key_parts`` was seen before (see module docstring)."""
    if not enabled or os.environ.get("TUNEFORGE_NO_CACHE"):
        return compute()
    path = cache_path(key_parts)
    if path.is_file():
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
            log.info("tokenized data from cache %s", path)
            return value
        except Exception as e:  # noqa: BLE001 - a corrupt/incompatible entry is rebuilt, never fatal
            log.warning("ignoring unreadable cache entry %s (%s); recomputing", path, e)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(value, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    (path.parent / f"{path.stem}.json").write_text(
        json.dumps(key_parts, sort_keys=True, indent=1, default=str) + "\n", encoding="utf-8")
    return value

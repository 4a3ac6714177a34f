"""Models that ship their own Python code: refused unless ``trust_remote_code: true``.

A model folder whose ``config.json`` (or ``tokenizer_config.json``) has an ``auto_map`` names classes in
``.py`` files of the model itself; transformers runs that code when it loads the model. tuneforge loads such a
model only when the run config says ``trust_remote_code: true`` (logged as a warning each time). Without it the
model is refused in one line, before anything of it loads. A hub id that is not a local folder cannot be read
beforehand: transformers refuses it itself.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tuneforge.errors import ConfigError

log = logging.getLogger(__name__)
_CONFIG_FILES = ("config.json", "tokenizer_config.json")


def remote_code_classes(path: str | Path) -> list[str]:
    """The ``auto_map`` classes of the model folder ``path`` (empty: it needs no code of its own)."""
    out: list[str] = []
    for name in _CONFIG_FILES:
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            auto_map = json.loads(file.read_text(encoding="utf-8")).get("auto_map") or {}
        except (ValueError, OSError, AttributeError):
            continue
        for value in auto_map.values() if isinstance(auto_map, dict) else ():
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str) and ref not in out:
                    out.append(ref)
    return out


def check_remote_code(model: str, path: str | Path, trust: bool) -> None:
    """Refuse ``model`` (resolved to ``path``) when it needs its own code and ``trust`` is off; warn when on."""
    classes = remote_code_classes(path)
    if not classes:
        return
    if not trust:
        raise ConfigError(f"model {model!r} runs its own Python code on load ({', '.join(classes[:3])} in "
                          f"{path}); read that code, then set trust_remote_code: true to allow it")
    log.warning("trust_remote_code: true: loading %s runs Python code shipped with it (%s)", model,
                ", ".join(classes[:3]))

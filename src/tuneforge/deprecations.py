"""Renamed and moved run-config keys: one table, applied whenever a config loads.

A key in :data:`MOVED` still loads for one more release: :func:`tuneforge.config.load_config` calls
:func:`upgrade` on the config file's tree (with the ``data=`` dict merged in) and on the ``--set`` overrides,
before validation, so an old key behaves everywhere as its new key would. For each old key found, its value
moves to the new key and one warning names the new key and the release that drops the old one. An old key and
its new key set to different values in the same place (both in the file, or both in ``--set``) is an error in
one line; an override still wins over the file, whichever of the two names either uses.

A removed section whose defaults took effect whenever it was written (``eval_task:`` meant at most 200 test
examples and 16 new tokens) carries those defaults over (:data:`SECTION_DEFAULTS`) where the new section
leaves the key unset, so an old config evaluates as before.

To retire a key: add a :class:`Moved` row; when its release comes, delete the row (the old key then fails as
an unknown key).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Moved:
    old: str            # dotted key as it was written: eval_task.file
    new: str            # where its value goes now: eval.data
    removed_in: str     # the release that no longer reads ``old``

    @property
    def section(self) -> str:
        return self.old.split(".", 1)[0]


MOVED: tuple[Moved, ...] = (
    Moved("eval_task.file", "eval.data", "0.2.0"),
    Moved("eval_task.max_examples", "eval.max_examples", "0.2.0"),
    Moved("eval_task.max_new_tokens", "eval.max_new_tokens", "0.2.0"),
    Moved("eval_task.labels", "eval.labels", "0.2.0"),
)

# old section -> {new key: value}: the old section's defaults, in force whenever the section was written
SECTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "eval_task": {"eval.max_examples": 200, "eval.max_new_tokens": 16},
}

_BY_OLD = {m.old: m for m in MOVED}
_SECTIONS = {m.section: m.removed_in for m in MOVED if "." in m.old}
_MISSING = object()


def _error(message: str) -> Exception:
    from tuneforge.errors import ConfigError

    return ConfigError(message)


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _put(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise _error(f"{source}: '{part}' must be a section to take {dotted}")
        node = node[part]
    node[parts[-1]] = value


def _unset(value: Any) -> bool:
    return value is _MISSING or value is None


def _warn(source: str, moved: Moved) -> None:
    log.warning("%s: %s is deprecated: use %s; %s goes in tuneforge %s", source, moved.old, moved.new,
                moved.section, moved.removed_in)


def _unknown(source: str, section: str, key: str) -> Exception:
    known = [m.old.split(".", 1)[1] for m in MOVED if m.section == section]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return _error(f"{source}: unknown key '{section}.{key}'{hint}; {section} is deprecated: write its keys as "
                  f"{_new_keys(section)}")


def _implied(source: str, section: str, tree: dict, taken: set[str]) -> list[tuple[str, Any]]:
    """The old section's defaults for the new keys that neither the tree nor ``taken`` sets (warned once)."""
    out = [(key, value) for key, value in SECTION_DEFAULTS.get(section, {}).items()
           if key not in taken and _unset(_get(tree, key))]
    if out:
        log.warning("%s: %s's defaults carry over to its new keys (%s; their own defaults differ): write them "
                    "under %s: to keep them when %s goes", source, section, ", ".join(f"{k}={v}" for k, v in out),
                    out[0][0].split(".", 1)[0], section)
    return out


def upgrade(tree: dict, overrides: list[tuple[str, Any]], source: str = "config") -> list[tuple[str, Any]]:
    """Move the deprecated keys of ``tree`` in place; return ``overrides`` with their deprecated keys renamed.

    ``tree``: the config file's mapping (and the ``data=`` dict), before the overrides; ``overrides``:
    ``(dotted key, value)`` pairs as ``--set`` gives them. Raises :class:`~tuneforge.errors.ConfigError`
    when an old key and its new key are set to different values in the same place.
    """
    from_file = {section: _move_section(tree, section, source) for section in _SECTIONS if section in tree}
    out: list[tuple[str, Any]] = []
    direct: dict[str, Any] = {}                   # new keys the overrides set by their own name
    renamed: dict[str, tuple[str, Any]] = {}      # new key -> (the old key that set it, value)
    touched: list[str] = []
    for key, value in overrides:
        section = key.split(".", 1)[0]
        if section not in _SECTIONS:
            direct[key] = value
            out.append((key, value))
            continue
        if key == section:                        # --set eval_task=null, or =a mapping: replaces the old section,
            _take_back(tree, from_file.pop(section, None))      # so what the file's moved goes back
            if value is None:
                log.warning("%s: --set %s=null: %s is deprecated; its keys are now %s", source, section, section,
                            _new_keys(section))
                continue
            if not isinstance(value, dict):
                raise _error(f"--set {key}: '{section}' must be a section; it is deprecated: set "
                             + _new_keys(section))
            pairs = [(f"{section}.{k}", v) for k, v in value.items()]
        else:
            pairs = [(key, value)]
        for old, v in pairs:
            moved = _BY_OLD.get(old)
            if moved is None:
                raise _unknown(f"--set {old}", section, old.split(".", 1)[1])
            _warn(f"--set {old}", moved)
            renamed[moved.new] = (old, v)
            out.append((moved.new, v))
        if section not in touched:
            touched.append(section)
    for new, (old, value) in renamed.items():
        if new in direct and direct[new] != value:
            raise _error(f"--set {old}={value!r} and --set {new}={direct[new]!r}: {old} is deprecated, "
                         f"keep only {new}")
    for section in touched:
        if from_file.get(section) is None:        # the old section made by --set: its defaults came with it
            out += _implied(source, section, tree, {k for k, _ in out})
    return out


@dataclass
class _Moves:
    """What moving one old section of the file changed, to take back when ``--set`` replaces that section."""
    values: dict[str, Any]                        # new key -> its value before (_MISSING: absent)
    parents: dict[str, Any]                       # new key's section -> its value before, when absent or null


def _move_section(tree: dict, section: str, source: str) -> _Moves | None:
    body = tree.pop(section)
    if body is None:                              # `eval_task: null` (an old run's config.yaml): nothing to move
        return None
    if not isinstance(body, dict):
        raise _error(f"{source}: '{section}' must be a section; it is deprecated: write {_new_keys(section)}")
    moves = _Moves({}, {})
    changes: list[tuple[str, Any]] = []
    for key, value in body.items():
        moved = _BY_OLD.get(f"{section}.{key}")
        if moved is None:
            raise _unknown(source, section, str(key))
        if value is None:
            continue
        current = _get(tree, moved.new)
        if not _unset(current) and current != value:
            raise _error(f"{source}: both {moved.old} ({value!r}) and {moved.new} ({current!r}) are set: "
                         f"{moved.old} is deprecated, keep only {moved.new}")
        _warn(source, moved)
        changes.append((moved.new, value))
    changes += _implied(source, section, tree, {k for k, _ in changes})
    for key, value in changes:
        parent = key.rsplit(".", 1)[0]
        if "." in key and parent not in moves.parents and _unset(_get(tree, parent)):
            moves.parents[parent] = _get(tree, parent)
        moves.values[key] = _get(tree, key)
        _put(tree, key, value, source)
    return moves


def _take_back(tree: dict, moves: _Moves | None) -> None:
    if moves is None:
        return
    for key, previous in moves.values.items():
        if previous is _MISSING:
            _drop(tree, key)
        else:
            _put(tree, key, previous, "config")
    for parent, previous in moves.parents.items():
        if _get(tree, parent) == {}:
            _drop(tree, parent)
            if previous is None:
                _put(tree, parent, None, "config")


def _new_keys(section: str) -> str:
    return ", ".join(m.new for m in MOVED if m.section == section)


def _drop(tree: dict, dotted: str) -> None:
    parent = _get(tree, dotted.rsplit(".", 1)[0]) if "." in dotted else tree
    if isinstance(parent, dict):
        parent.pop(dotted.rsplit(".", 1)[-1], None)

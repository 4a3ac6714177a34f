"""Data sources past one file: a folder of shards, a ``datasets`` ``save_to_disk`` folder, a Hub dataset id.

Wherever a data path is accepted (``data.train``, ``data.validation``, a mixture source, the ``tuneforge data``
commands) the path may be:

* a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, also ``.gz``): read by :mod:`tuneforge.data.loaders`;
* a **folder of shards**: every data file directly in it, by name (sorted, so the order is the same on every
  machine). All of one format (``.jsonl`` and ``.jsonl.gz`` are one format); a folder of mixed formats is a
  :class:`DataFileError` naming the folder and the formats found;
* a **``save_to_disk`` folder** of a ``datasets.Dataset`` or ``DatasetDict`` (it holds ``state.json`` or
  ``dataset_dict.json``): a DatasetDict's split is chosen by ``split`` (default ``train``);
* a **Hub dataset id**, ``hf://owner/name`` or ``owner/name`` (two names and a slash, with no data suffix, that
  is not a local path), loaded with ``datasets.load_dataset(id, split=split, revision=revision)``. Offline
  (``HF_HUB_OFFLINE=1``, or no network) an id that is not in the local cache is a :class:`DataFileError` naming
  it and what to do.

``split`` and ``revision`` are given after the path as a query: ``hf://owner/name?split=test&revision=v1.0``,
``saved_folder?split=validation`` (a mixture source also takes them as keys, :func:`with_options`).

Records of a ``save_to_disk`` folder or a Hub id come out as :class:`~tuneforge.data.loaders.RawRecord` whose
``source`` is the spec with its split (``hf://owner/name?split=train``) and whose ``line`` is the 1-based row, so
a reject names the source and the row. Their content hash (:func:`source_sha256`, part of the token-cache key):
shards, the names and SHA-256 of the files; a ``save_to_disk`` folder, the SHA-256 of every file in it with the
split; a Hub id, the loaded dataset's ``datasets`` fingerprint (which follows the downloaded files) with the id,
split and revision.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal
from urllib.parse import parse_qsl, urlencode

from tuneforge.data.errors import DataFileError

HUB_PREFIX = "hf://"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_OPTIONS = ("split", "revision")
_BATCH = 4096
SourceKind = Literal["file", "shards", "saved", "hub"]


@dataclass(frozen=True)
class Source:
    """A data path as given (``spec``) and what it is: ``kind``, the file, folder or Hub id (``location``), and the
    ``split`` and ``revision`` asked for (None: the default, ``train`` and the latest)."""

    spec: str
    kind: SourceKind
    location: str
    split: str | None = None
    revision: str | None = None

    @property
    def name(self) -> str:
        """The source with its split, as rejects and error messages name it (``hf://o/n?split=train``)."""
        if self.kind in ("file", "shards"):
            return self.location
        options = {"split": self.split or "train", "revision": self.revision}
        return f"{self.location}?{urlencode({k: v for k, v in options.items() if v})}"


def source_stem(spec: str | Path) -> str:
    """A name for files made from ``spec``: the file or folder name (a Hub id's name) up to its first dot, with a
    split other than ``train`` added (``saved?split=test`` -> ``saved_test``)."""
    location, options = _split_options(str(spec))
    stem = Path(location.removeprefix(HUB_PREFIX)).name.split(".")[0] or "data"
    split = options.get("split")
    return f"{stem}_{split}" if split and split != "train" else stem


def with_options(path: str, split: str | None = None, revision: str | None = None) -> str:
    """``path`` with ``split`` and ``revision`` added as its query (a mixture source's keys)."""
    options = {k: v for k, v in (("split", split), ("revision", revision)) if v}
    if not options:
        return path
    return f"{path}{'&' if '?' in path else '?'}{urlencode(options)}"


def _split_options(spec: str) -> tuple[str, dict[str, str]]:
    """``(location, {split, revision})``; a ``?`` that is part of an existing file's name is not a query."""
    if "?" not in spec or Path(spec).expanduser().exists():
        return spec, {}
    location, _, query = spec.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise DataFileError(f"{spec}: unknown option {', '.join(unknown)} after '?'; give split=NAME and/or "
                            "revision=REF (e.g. hf://owner/name?split=test&revision=main)")
    return location, options


def is_hub_id(location: str) -> bool:
    """``hf://...``, or ``owner/name`` with no data suffix that is not a local path."""
    if location.startswith(HUB_PREFIX):
        return True
    from tuneforge.data.raw import SUPPORTED_SUFFIXES

    lower = location.lower().removesuffix(".gz")
    return (bool(_HUB_ID.match(location)) and not lower.endswith(SUPPORTED_SUFFIXES)
            and not Path(location).expanduser().exists())


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def parse_source(spec: str | Path) -> Source:
    """What ``spec`` is (module docstring); a file or folder that does not exist is a :class:`DataFileError`."""
    spec = str(spec)
    location, options = _split_options(spec)
    if is_hub_id(location):
        return Source(spec, "hub", location.removeprefix(HUB_PREFIX), options.get("split"), options.get("revision"))
    path = Path(location).expanduser()
    if path.is_dir():
        kind: SourceKind = "saved" if is_saved_dataset(path) else "shards"
        if kind == "shards" and options:
            raise DataFileError(f"{spec}: split and revision are options of a save_to_disk folder or a Hub id, not of "
                                "a folder of shards: give the folder of the split you want")
        return Source(spec, kind, str(path), options.get("split"), options.get("revision"))
    if options:
        raise DataFileError(f"{spec}: split and revision are options of a save_to_disk folder or a Hub id; "
                            f"{location} is a file" if path.is_file() else f"{location}: data file not found")
    return Source(spec, "file", location)


def shard_files(folder: str | Path) -> list[Path]:
    """The data files directly in ``folder``, sorted by name; none, or more than one format, is a
    :class:`DataFileError` naming the folder (and the formats found)."""
    from tuneforge.data.raw import SUPPORTED_SUFFIXES, data_suffix

    folder = Path(folder)
    files: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            suffix = data_suffix(p)
        except DataFileError:
            continue
        files.setdefault(suffix, []).append(p)
    if not files:
        raise DataFileError(f"{folder}: a folder with no data file in it ({', '.join(SUPPORTED_SUFFIXES)}, optionally "
                            ".gz), and no save_to_disk dataset (state.json / dataset_dict.json)")
    if len(files) > 1:
        found = ", ".join(f"{len(v)} {k}" for k, v in sorted(files.items()))
        raise DataFileError(f"{folder}: a folder of shards holds one format, this one mixes {found}: move the files "
                            "of each format to their own folder (each may be a mixture source)")
    return next(iter(files.values()))


def _hub_error(source: Source, error: BaseException) -> DataFileError:
    offline = _offline()
    reason = "the Hub is offline (HF_HUB_OFFLINE=1)" if offline else f"it could not be loaded ({_first_line(error)})"
    split = source.split or "train"
    return DataFileError(
        f"{source.spec}: Hub dataset {source.location!r} (split {split}) is not in the local cache and {reason}: "
        f"where a network exists run python -c \"import datasets; datasets.load_dataset('{source.location}', "
        f"split='{split}').save_to_disk('DIR')\" and give DIR as the path"
        + ("" if not offline else ", or unset HF_HUB_OFFLINE to download it here"))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_dataset_of(source: Source) -> Any:
    """The ``datasets.Dataset`` of a ``saved`` or ``hub`` source (its split chosen); a split that is not there,
    or a Hub id that cannot be loaded, is a :class:`DataFileError` naming the source."""
    import datasets

    if source.kind == "saved":
        try:
            loaded = datasets.load_from_disk(source.location)
        except Exception as e:  # noqa: BLE001 - a damaged folder: one line naming it
            raise DataFileError(f"{source.spec}: the save_to_disk folder cannot be read ({_first_line(e)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            split = source.split or "train"
            if split not in loaded:
                raise DataFileError(f"{source.spec}: the saved DatasetDict has no split {split!r} (it has "
                                    f"{', '.join(loaded)}): add ?split=NAME to the path")
            return loaded[split]
        return loaded
    try:
        return datasets.load_dataset(source.location, split=source.split or "train", revision=source.revision)
    except ValueError as e:
        if "split" in str(e).lower() and "unknown" in str(e).lower():
            raise DataFileError(f"{source.spec}: {_first_line(e)}: add ?split=NAME to the id") from None
        raise _hub_error(source, e) from None
    except Exception as e:  # noqa: BLE001 - offline, not found, no network: one line naming the id
        raise _hub_error(source, e) from None


def iter_dataset_records(source: Source) -> Iterator[Any]:
    """The rows of a ``saved`` or ``hub`` source as :class:`~tuneforge.data.loaders.RawRecord` (row numbers from 1),
    read in Arrow batches (the values as ``pyarrow``'s ``to_pylist`` gives them, as for ``.parquet``). A column a
    row has no value in (null) is left out of its record: Arrow gives every row every column, so a chat record
    beside alpaca ones would otherwise carry ``instruction: null`` and match no format."""
    from tuneforge.data.raw import RawRecord

    dataset = load_dataset_of(source).with_format("arrow")
    name, index = source.name, 0
    for table in dataset.iter(batch_size=_BATCH):
        for row in table.to_pylist():
            index += 1
            yield RawRecord(name, index, {k: v for k, v in row.items() if v is not None})


def source_files(spec: str | Path) -> list[Path]:
    """The local data files of a file or shard-folder ``spec`` (in reading order); other kinds have none."""
    source = parse_source(spec)
    if source.kind == "file":
        return [Path(source.location)]
    if source.kind == "shards":
        return shard_files(source.location)
    return []


def source_sha256(spec: str | Path) -> str:
    """The content hash of ``spec``'s data (module docstring): it changes when the data does."""
    from tuneforge.fileutil import file_sha256

    source = parse_source(spec)
    if source.kind == "file":
        return file_sha256(source.location)
    h = hashlib.sha256()
    if source.kind == "shards":
        h.update("\n".join(f"{p.name} {file_sha256(p)}" for p in shard_files(source.location)).encode())
        return h.hexdigest()
    if source.kind == "saved":
        root = Path(source.location)
        listing = sorted(p for p in root.rglob("*") if p.is_file())
        h.update(f"saved {source.split or 'train'}\n".encode())
        h.update("\n".join(f"{p.relative_to(root)} {file_sha256(p)}" for p in listing).encode())
        return h.hexdigest()
    dataset = load_dataset_of(source)
    h.update(f"hub {source.location} {source.split or 'train'} {source.revision} {dataset._fingerprint}".encode())
    return h.hexdigest()


def check_source(spec: str | Path) -> None:
    """Fail before any work: a file that is missing or of an unknown type, an empty or mixed shard folder (the
    ``datasets`` kinds are checked when they are read)."""
    from tuneforge.data.raw import data_suffix

    source = parse_source(spec)
    if source.kind == "file":
        if not Path(source.location).is_file():
            raise DataFileError(f"{source.location}: data file not found")
        data_suffix(source.location)
    elif source.kind == "shards":
        shard_files(source.location)


def resolve_source(value: str, base: Path) -> str | None:
    """``value`` as a path from the current folder, then ``base``, keeping its query; a Hub id as it is; None when
    it is neither."""
    location, _ = _split_options(value)
    for candidate in (Path(location).expanduser(), base / location):
        if candidate.exists():
            return str(candidate) + value[len(location):]
    return value if is_hub_id(location) else None

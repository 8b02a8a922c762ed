"""Rows of a data file or hub data set: the one reader of JSONL, JSON, Parquet and `datasets` sources.

Every row comes with its number (the line of a JSONL file, the position in a JSON list, Parquet file or hub
split), so later checks can name it. Text files may start with a UTF-8 byte-order mark and end lines with CRLF
(as Windows tools write them); a byte that is not UTF-8 stops with the file, the line and the byte offset.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Rows:
    """The rows of one source, each with its 1-based number, and the name errors use for the source."""

    source: str
    numbered: list[tuple[int, Any]]

    def __len__(self) -> int:
        return len(self.numbered)


def is_local(path_or_id: str) -> bool:
    """A local file or directory, or something shaped like one (a missing file is not a hub id)."""
    path = Path(path_or_id).expanduser()
    return path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or path_or_id.startswith(("/", "./", "../", "~"))


def read_rows(path_or_id: str, split: str = "train", subset: str | None = None) -> Rows:
    """Rows of a local .jsonl/.json/.parquet file or saved data set directory, or of a hub data set's split."""
    if not is_local(path_or_id):
        return _hub_rows(path_or_id, subset, split)
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return _hub_rows(str(path), subset, split)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    return Rows(str(path), _jsonl_rows(path))


def _decode(raw: bytes, path: Path, line: int, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: line {line}: byte 0x{raw[exc.start]:02x} at byte offset {offset + exc.start} is not "
            f"UTF-8; save the file as UTF-8"
        ) from None


def _jsonl_rows(path: Path) -> list[tuple[int, Any]]:
    rows, offset = [], 0
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            start = offset
            offset += len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8) :], start + len(codecs.BOM_UTF8)
            text = _decode(raw, path, number, start)
            if not text.strip():
                continue
            try:
                rows.append((number, json.loads(text)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: row {number}: not valid JSON ({exc.msg})") from None
    return rows


def _json_rows(path: Path) -> Rows:
    """A JSON list of rows, an object holding one list ({"data": [...]}), or JSON Lines saved as .json."""
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = skip + exc.start
        line = data.count(b"\n", 0, at) + 1
        raise DataError(
            f"{path}: line {line}: byte 0x{data[at]:02x} at byte offset {at} is not UTF-8; save the file as UTF-8"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line: JSON Lines with a .json name
            return Rows(str(path), _jsonl_rows(path))
        raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(value) == 1 and len(lists) == 1 else [value]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of rows (got {type(value).__name__})")
    return Rows(str(path), list(enumerate(value, start=1)))


def _parquet_rows(path: Path) -> Rows:
    import datasets  # here, not at the top: pyarrow and pandas cost ~80 MB and a second, JSONL needs neither

    try:
        dataset = datasets.Dataset.from_parquet(str(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(
            f"{path}: cannot read as Parquet ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    return Rows(str(path), list(enumerate(dataset, start=1)))


def _hub_rows(name: str, subset: str | None, split: str) -> Rows:
    import datasets  # see _parquet_rows

    try:
        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, a wrong id, a missing split: one message names them
        lines = str(exc).splitlines() or [type(exc).__name__]
        raise DataError(
            f"data set {name!r} (subset {subset!r}, split {split!r}) could not be loaded: {lines[0][:200]}; "
            f"point data.source.path at a local .jsonl/.parquet copy"
        ) from None
    label = f"{name}[{subset}/{split}]" if subset else f"{name}[{split}]"
    return Rows(label, list(enumerate(dataset, start=1)))

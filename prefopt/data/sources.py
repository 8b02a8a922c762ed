"""Where preference pairs come from: local JSONL/JSON/Parquet files or hub data sets, validated row by row."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from prefopt.errors import DataError

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    pair_id: str


@dataclass
class RowStats:
    """What validation did to the rows of one source (written into the run's summary)."""

    rows: int = 0
    kept: int = 0
    dropped_identical: int = 0
    dropped_empty: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(rows=self.rows, kept=self.kept, dropped_identical=self.dropped_identical,
                    dropped_empty=self.dropped_empty)


def _text(value: Any, where: str, name: str) -> str:
    # Chat-style rows keep the answer as the last assistant message of a list of messages.
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        value = value[-1]["content"]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string (got {type(value).__name__})")
    return value


def validate_rows(rows: Iterable[dict], source: str, fields: dict[str, str] | None = None,
                  id_field: str | None = "pair_id", drop_identical: bool = True) -> tuple[list[PreferencePair], RowStats]:
    """Rows → pairs. Missing or non-string fields stop with file, row (1-based) and field named;
    empty or identical chosen/rejected rows are dropped and counted (`drop_identical=False` makes them errors)."""
    fields = fields or {f: f for f in FIELDS}
    pairs, stats = [], RowStats()
    for i, row in enumerate(rows, start=1):
        stats.rows += 1
        where = f"{source}: row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with fields {list(fields.values())}")
        values = {}
        for ours, theirs in fields.items():
            if theirs not in row or row[theirs] is None:
                raise DataError(f"{where}: missing field {theirs!r}")
            values[ours] = _text(row[theirs], where, theirs)
        if not values["chosen"].strip() or not values["rejected"].strip():
            if not drop_identical:
                raise DataError(f"{where}: empty 'chosen' or 'rejected'")
            stats.dropped_empty += 1
            continue
        if values["chosen"] == values["rejected"]:
            if not drop_identical:
                raise DataError(f"{where}: 'chosen' is identical to 'rejected'")
            stats.dropped_identical += 1
            continue
        pair_id = str(row.get(id_field, "")) if id_field and row.get(id_field) is not None else f"{Path(source).name}:{i}"
        pairs.append(PreferencePair(pair_id=pair_id, **values))
    stats.kept = len(pairs)
    return pairs, stats


def read_records(path_or_id: str, split: str = "train") -> tuple[list[dict], str]:
    """Rows of a local .jsonl/.json/.parquet file, or of a hub data set's split; returns (rows, source name)."""
    path = Path(path_or_id).expanduser()
    if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} does not exist")
        if path.suffix == ".jsonl":
            rows = []
            with path.open() as fh:
                for i, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}: row {i}: not valid JSON ({exc.msg})") from None
            return rows, str(path)
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of rows")
            return rows, str(path)
        import datasets  # parquet and anything else through the datasets library

        return list(datasets.load_dataset("parquet", data_files=str(path), split="train")), str(path)
    import datasets

    try:
        ds = datasets.load_dataset(path_or_id, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the hub is reported the same way
        raise DataError(f"data set {path_or_id!r} (split {split!r}) could not be loaded: {str(exc).splitlines()[0][:200]}; "
                        f"point data.path at a local .jsonl/.parquet copy") from None
    return list(ds), f"{path_or_id}[{split}]"


def load_rows(path_or_id: str, split: str = "train", fields: dict[str, str] | None = None,
              drop_identical: bool = True) -> tuple[list[PreferencePair], RowStats]:
    rows, source = read_records(path_or_id, split)
    pairs, stats = validate_rows(rows, source, fields, drop_identical=drop_identical)
    if not pairs:
        raise DataError(f"{source}: no usable preference pairs ({stats.rows} rows read)")
    return pairs, stats


@dataclass
class FileData:
    """Pairs from local files or a hub data set (`conf/data/jsonl.yaml`, `conf/data/hub.yaml`)."""

    path: str
    eval_path: str | None = None
    split: str = "train"
    eval_split: str | None = None
    eval_size: int = 64  # held-out pairs taken from the end of `path` when no eval_path/eval_split is given
    fields: dict[str, str] = field(default_factory=lambda: {f: f for f in FIELDS})
    drop_identical: bool = True

    def fingerprint(self) -> str:
        return json.dumps({"path": self.path, "eval_path": self.eval_path, "split": self.split,
                           "eval_split": self.eval_split, "eval_size": self.eval_size, "fields": self.fields},
                          sort_keys=True)

    def load(self) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, Any]]:
        train, stats = load_rows(self.path, self.split, self.fields, self.drop_identical)
        info = {"train": stats.as_dict()}
        if self.eval_path or self.eval_split:
            held, estats = load_rows(self.eval_path or self.path, self.eval_split or self.split, self.fields,
                                     self.drop_identical)
            info["eval"] = estats.as_dict()
        else:
            if len(train) <= self.eval_size:
                raise DataError(f"{self.path}: {len(train)} pairs is too few to hold out data.eval_size={self.eval_size}")
            train, held = train[: -self.eval_size], train[-self.eval_size:]
        return train, held, info

"""Where preference pairs come from: local JSONL/JSON/Parquet files or hub data sets, validated row by row.

Every preference format TRL documents is read (see the README's data section): standard rows (strings) and
conversational rows (lists of role/content messages), each with an explicit `prompt` or an implicit one (only
`chosen` and `rejected`, whole texts or conversations sharing their start: the prompt is the longest common
prefix, the completions what follows). `data.source.fields` maps our names to the row's, dotted paths reaching
nested fields (`chosen.solution`); the columns no field names are kept as the pair's `metadata`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.data.rows import read_rows
from prefopt.errors import ConfigError, DataError

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PreferencePair:
    """One pair: `prompt` is a string (standard rows) or the messages before the answer (conversational rows)."""

    prompt: str | tuple[dict, ...]
    chosen: str
    rejected: str
    pair_id: str
    metadata: dict = field(default_factory=dict, compare=False)  # the row's other columns (scores, ids, ...)


@dataclass
class RowStats:
    """What validation did to the rows of one source (written into the run's summary)."""

    rows: int = 0
    kept: int = 0
    dropped_identical: int = 0
    dropped_empty: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(
            rows=self.rows, kept=self.kept, dropped_identical=self.dropped_identical, dropped_empty=self.dropped_empty
        )


_MISSING = object()


def _get(row: dict, path: str) -> Any:
    """`row[path]`, or the nested field a dotted path names (`chosen.solution`); _MISSING when absent or null."""
    if path in row:
        return _MISSING if row[path] is None else row[path]
    node: Any = row
    for part in path.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return _MISSING
        node = node[part]
    return node


def _without(row: dict, paths: Iterable[str]) -> dict:
    """The row minus the fields `paths` consumed (a nested container keeps its other fields): the metadata."""
    rest = copy.deepcopy(row)
    for path in paths:
        if path in rest:
            del rest[path]
            continue
        *parents, leaf = path.split(".")
        node, chain = rest, []
        for part in parents:
            if not isinstance(node.get(part), dict):
                break
            chain.append((node, part))
            node = node[part]
        else:
            node.pop(leaf, None)
            for container, key in reversed(chain):  # drop containers left empty
                if not container[key]:
                    del container[key]
    return rest


def _messages(value: list, where: str, name: str) -> tuple[dict, ...]:
    out = []
    for i, m in enumerate(value, start=1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(
                f"{where}: field {name!r}: message {i} must have a string 'role' and 'content' (got {m!r:.80})"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _value(value: Any, where: str, name: str) -> str | tuple[dict, ...]:
    """A field as a string or a tuple of messages; anything else stops naming file, row and field."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return _messages(value, where, name)
    hint = ""
    if isinstance(value, dict) and value:
        texts = [k for k in sorted(value) if isinstance(value[k], str)] or sorted(value)
        hint = f" with fields {sorted(value)[:6]}: map one with data.source.fields, e.g. {name}.{texts[0]}"
    raise DataError(
        f"{where}: field {name!r} must be a string or a list of messages (got {type(value).__name__}{hint})"
    )


def _reply(messages: tuple[dict, ...], where: str, name: str) -> str:
    """The completion of a conversational row: exactly one assistant message."""
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise DataError(f"{where}: field {name!r}: the completion must be one assistant message (got roles {roles})")
    return messages[0]["content"]


def split_implicit(chosen, rejected, where: str) -> tuple[Any, str, str]:
    """TRL's implicit prompt: (prompt, chosen reply, rejected reply) from two whole texts or conversations.

    Conversations: the prompt is the longest common prefix of messages, each completion the one assistant
    message after it. Texts: the longest common prefix, cut back to the start of the word where they differ,
    so that each completion starts with its first differing word (" blue." / " green.").
    """
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be texts or both conversations")
    if isinstance(chosen, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n < min(len(chosen), len(rejected)):  # they differ inside a word: back up to its start
            while n > 0 and not chosen[n - 1].isspace():
                n -= 1
        while n > 0 and chosen[n - 1].isspace():
            n -= 1
        if n == 0:
            raise DataError(
                f"{where}: no 'prompt' field and 'chosen'/'rejected' share no prompt (implicit-prompt "
                f"rows start with the same text); map the prompt with data.source.fields.prompt"
            )
        return chosen[:n], chosen[n:], rejected[n:]
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(
            f"{where}: no 'prompt' field and 'chosen'/'rejected' share no first message (implicit-prompt "
            f"conversations start with the same turns); map the prompt with data.source.fields.prompt"
        )
    return chosen[:n], _reply(chosen[n:], where, "chosen"), _reply(rejected[n:], where, "rejected")


def _pair_values(row: dict, where: str, fields: dict[str, str], implicit: bool) -> dict[str, Any] | None:
    """prompt/chosen/rejected of a row (replies as strings); None for an implicit-prompt row whose two
    conversations are identical (nothing to split: counted as identical)."""
    values: dict[str, Any] = {}
    for ours in ("chosen", "rejected") if implicit else FIELDS:
        theirs = fields[ours]
        value = _get(row, theirs)
        if value is _MISSING:
            raise DataError(f"{where}: missing field {theirs!r}")
        values[ours] = _value(value, where, theirs)
    if implicit:
        if values["chosen"] == values["rejected"]:
            return None
        values["prompt"], values["chosen"], values["rejected"] = split_implicit(
            values["chosen"], values["rejected"], where
        )
        return values
    for name in ("chosen", "rejected"):
        if not isinstance(values[name], str):
            values[name] = _reply(values[name], where, fields[name])
    return values


def validate_rows(
    rows: Iterable,
    source: str,
    fields: dict[str, str] | None = None,
    id_field: str | None = "pair_id",
    drop_identical: bool = True,
) -> tuple[list[PreferencePair], RowStats]:
    """Rows (or (number, row) pairs) → pairs. Missing or malformed fields stop with file, row (1-based) and field
    named; empty or identical chosen/rejected rows are dropped and counted (`drop_identical=False`: errors).

    A source whose first row has no prompt field (or `fields.prompt: null`) is in TRL's implicit-prompt format.
    """
    fields = {**{f: f for f in FIELDS}, **(fields or {})}
    pairs, stats, implicit, first = [], RowStats(), None, None
    for i, item in enumerate(rows, start=1):
        number, row = item if isinstance(item, tuple) else (i, item)
        stats.rows += 1
        where = f"{source}: row {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with fields {[v for v in fields.values() if v]}")
        if implicit is None:  # decided by the first row: a source is in one format
            implicit, first = not fields["prompt"] or (fields["prompt"] == "prompt" and "prompt" not in row), number
        elif implicit and fields["prompt"] and _get(row, fields["prompt"]) is not _MISSING:
            raise DataError(f"{where}: has a 'prompt' but row {first} has none (implicit prompt); one format per file")
        values = _pair_values(row, where, fields, implicit)
        if values is not None and (not values["chosen"].strip() or not values["rejected"].strip()):
            if not drop_identical:
                raise DataError(f"{where}: empty 'chosen' or 'rejected'")
            stats.dropped_empty += 1
            continue
        if values is None or values["chosen"] == values["rejected"]:
            if not drop_identical:
                raise DataError(f"{where}: 'chosen' is identical to 'rejected'")
            stats.dropped_identical += 1
            continue
        used = [fields[f] for f in FIELDS if fields[f] and (f != "prompt" or not implicit)]
        pair_id = str(row[id_field]) if id_field and row.get(id_field) is not None else f"{Path(source).name}:{number}"
        pairs.append(
            PreferencePair(pair_id=pair_id, metadata=_without(row, used + ([id_field] if id_field else [])), **values)
        )
    stats.kept = len(pairs)
    return pairs, stats


def load_rows(
    path_or_id: str,
    split: str = "train",
    fields: dict[str, str] | None = None,
    drop_identical: bool = True,
    subset: str | None = None,
) -> tuple[list[PreferencePair], RowStats]:
    rows = read_rows(path_or_id, split, subset)
    pairs, stats = validate_rows(rows.numbered, rows.source, fields, drop_identical=drop_identical)
    if not pairs:
        raise DataError(f"{rows.source}: no usable preference pairs ({stats.rows} rows read)")
    return pairs, stats


def held_out_count(eval_size: float, total: int, where: str, key: str = "data.source.eval_size") -> int:
    """How many of `total` pairs to hold out: a fraction in (0, 0.5] (at least 1 pair) or a count of at most half."""
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)) or not eval_size > 0:
        raise ConfigError(f"{key} must be a fraction in (0, 0.5] or a count >= 1 (got {eval_size!r})")
    if eval_size < 1:
        if eval_size > 0.5:
            raise ConfigError(f"{key}={eval_size}: at most half of the pairs (0.5) can be held out")
        count = min(max(1, round(eval_size * total)), max(1, total // 2))  # at least 1, at most half
    elif float(eval_size).is_integer():
        count = int(eval_size)
        if count > total // 2:
            raise DataError(
                f"{where}: {key}={count} is more than half of the {total} pairs; hold out at most "
                f"{total // 2} (or a fraction, e.g. {key}=0.05)"
            )
    else:
        raise ConfigError(f"{key} must be a fraction in (0, 0.5] or a whole count >= 1 (got {eval_size!r})")
    if count > total // 2:
        raise DataError(
            f"{where}: {total} pairs are too few to hold out {count} ({key}={eval_size}) and train on the rest"
        )
    return count


@dataclass
class FileData:
    """Pairs from local files or a hub data set (`conf/data/jsonl.yaml`, `conf/data/hub.yaml`)."""

    path: str
    eval_path: str | None = None
    split: str = "train"
    eval_split: str | None = None
    eval_size: float = 0.05  # held out from the end of `path` when no eval_path/eval_split: a fraction or a count
    fields: dict[str, str] = field(default_factory=lambda: {f: f for f in FIELDS})
    drop_identical: bool = True
    subset: str | None = None  # a hub data set's configuration (e.g. trl-internal-testing/zen's `standard_preference`)
    eval_key: str = (
        "data.source.eval_size"  # the key errors name for eval_size (the verified-math loop: pairs.eval_size)
    )

    def __post_init__(self):
        self.fields = dict(self.fields or {})  # a plain dict (Hydra hands a DictConfig), for fingerprints

    def fingerprint(self) -> str:
        return json.dumps(
            {
                "path": self.path,
                "eval_path": self.eval_path,
                "split": self.split,
                "eval_split": self.eval_split,
                "eval_size": self.eval_size,
                "fields": self.fields,
                "subset": self.subset,
            },
            sort_keys=True,
        )

    def load(self) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, Any]]:
        fields = self.fields
        train, stats = load_rows(self.path, self.split, fields, self.drop_identical, self.subset)
        info = {"train": stats.as_dict()}
        if self.eval_path or self.eval_split:
            held, estats = load_rows(
                self.eval_path or self.path, self.eval_split or self.split, fields, self.drop_identical, self.subset
            )
            info["eval"] = estats.as_dict()
        else:
            n = held_out_count(self.eval_size, len(train), self.path, self.eval_key)
            train, held = train[:-n], train[-n:]
        return train, held, info

"""Preference data: rows of files and hub sets, pairs in every TRL format, tokenization with truncation, batching."""

from prefopt.data.batching import PairBatcher, PreferenceBatch, TokenizedPair, TokenizeStats, tokenize_pairs
from prefopt.data.rows import Rows, read_rows
from prefopt.data.sources import FileData, PreferencePair, load_rows

__all__ = [
    "PreferenceBatch",
    "PairBatcher",
    "TokenizedPair",
    "TokenizeStats",
    "tokenize_pairs",
    "Rows",
    "read_rows",
    "FileData",
    "PreferencePair",
    "load_rows",
]

"""Preference data: sources (synthetic arithmetic, local files, hub sets), validation, tokenization, batching."""

from prefopt.data.batching import PreferenceBatch, PairBatcher, TokenizedPair, tokenize_pairs
from prefopt.data.sources import PreferencePair, load_rows

__all__ = ["PreferenceBatch", "PairBatcher", "TokenizedPair", "tokenize_pairs", "PreferencePair", "load_rows"]

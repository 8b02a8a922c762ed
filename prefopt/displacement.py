"""Token-level displacement on the held-out pairs: on which pairs, and where in the response, the policy's
log-probability moves away from the reference's.

At every evaluation the engine scores each held-out pair token by token under the policy and the reference
(`PairLogps.chosen_token_logps` / `rejected_token_logps`; a reference cache keeps the reference's). Per pair this
module turns them into the change log π − log π_ref of the chosen and of the rejected response: in total, per token,
per relative-position bin (`BINS` bins over the response) and over the first `FIRST_TOKENS` tokens against the rest.
The pairs go to `<run_dir>/displacement/step_<N>.jsonl` (one JSON object per pair, with its prompt and responses as
text), their share and size to the `eval/displacement/...` scalars, and their distributions to W&B histograms
(`prefopt.tracking.RunLog.log_histograms`) and the report (`prefopt.reporting.displaced`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prefopt.data.batching import TokenizedPair
from prefopt.io import atomic_write_text
from prefopt.losses import PairLogps

BINS = 10  # relative-position bins over a response
FIRST_TOKENS = 4  # the response's first tokens, against the rest
DIRECTORY = "displacement"  # in the run directory: one step_<N>.jsonl per evaluation
PREFIX = "eval/displacement/"
# per-pair values whose distribution over the pairs goes to W&B as a histogram (PREFIX + "hist/" + name)
HISTOGRAMS = ("chosen_delta_per_token", "rejected_delta_per_token", "chosen_delta", "rejected_delta", "margin_delta")

# One pair's per-token log-probs at one evaluation: (pair id, policy chosen, reference chosen, policy rejected,
# reference rejected), each the response's n tokens in order.
Row = tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _number(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def response_change(policy: Any, reference: Any, bins: int = BINS, first: int = FIRST_TOKENS) -> dict[str, Any]:
    """The change d_t = log π(y_t) − log π_ref(y_t) over one response's n tokens.

    `delta` = Σ d_t, `delta_per_token` = Σ d_t / n; `bins`: the mean d_t of the tokens in each relative-position
    bin (token t, counted from 0, is in bin ⌊bins·(t + ½)/n⌋: a response shorter than `bins` leaves bins empty,
    None); `first` / `rest`: the mean d_t over the first `first` tokens and over the others (None when none)."""
    p, r = np.asarray(policy, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    d, n = p - r, p.shape[0]
    where = np.minimum(np.floor(bins * (np.arange(n) + 0.5) / max(n, 1)).astype(int), bins - 1)
    counts = np.bincount(where, minlength=bins)
    sums = np.bincount(where, weights=d, minlength=bins)
    return {
        "tokens": n,
        "logp": float(p.sum()),
        "ref_logp": float(r.sum()),
        "delta": float(d.sum()),
        "delta_per_token": float(d.sum() / n) if n else None,
        "bins": [float(s / c) if c else None for s, c in zip(sums, counts)],
        "first": _number(d[:first].mean()) if n else None,
        "rest": _number(d[first:].mean()) if n > first else None,
        "token_delta": [round(float(x), 5) for x in d],
    }


def pair_record(step: int, row: Row, texts: dict[str, str]) -> dict[str, Any]:
    """One line of the displacement file: a pair's changes (`response_change`, `chosen_...` and `rejected_...`),
    the change of its margin, and its texts (prompt, chosen, rejected) last."""
    pair_id, pc, rc, pr, rr = row
    record: dict[str, Any] = {"step": step, "pair_id": pair_id}
    changes = {side: response_change(p, r) for side, p, r in (("chosen", pc, rc), ("rejected", pr, rr))}
    for side, change in changes.items():
        record.update({f"{side}_{k}": v for k, v in change.items() if k != "token_delta"})
    record["margin_delta"] = changes["chosen"]["delta"] - changes["rejected"]["delta"]
    record.update({f"{side}_token_delta": changes[side]["token_delta"] for side in changes})
    record.update({f"{k}_text": v for k, v in texts.items()})
    return record


def _per_token(logps: PairLogps) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each pair's per-token log-probs (chosen, rejected), in batch order (`logps` with per-token values)."""
    if logps.chosen_token_logps is None or logps.rejected_token_logps is None:
        raise ValueError("displacement rows need the per-token log-probs of the policy and the reference")
    chosen, rejected = (
        t.detach().float().cpu().numpy() for t in (logps.chosen_token_logps, logps.rejected_token_logps)
    )
    n_c, n_r = logps.chosen_tokens.long().tolist(), logps.rejected_tokens.long().tolist()
    return [(chosen[i, : n_c[i]], rejected[i, : n_r[i]]) for i in range(len(n_c))]


def token_logps(pairs: Sequence[TokenizedPair], logps: PairLogps) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each pair's per-token log-probs (chosen, rejected) of one evaluated micro-batch, by pair id."""
    return {p.pair_id: values for p, values in zip(pairs, _per_token(logps))}


def batch_rows(pairs: Sequence[TokenizedPair], policy: PairLogps, reference: PairLogps) -> list[Row]:
    """The `Row`s of one evaluated micro-batch (both `PairLogps` computed with per-token values)."""
    return [
        (p.pair_id, pc, rc, pr, rr) for p, (pc, pr), (rc, rr) in zip(pairs, _per_token(policy), _per_token(reference))
    ]


def start_rows(
    pairs: Sequence[TokenizedPair], policy: PairLogps, start: dict[str, tuple[np.ndarray, np.ndarray]]
) -> list[Row]:
    """The `Row`s of one evaluated micro-batch against per-token log-probs kept by pair id (`token_logps`): a
    reference-free loss's starting policy, recorded before its first step."""
    rows: list[Row] = []
    for p, (pc, pr) in zip(pairs, _per_token(policy)):
        sc, sr = start[p.pair_id]
        rows.append((p.pair_id, pc, sc, pr, sr))
    return rows


def summary(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The `eval/displacement/...` scalars over the pairs (see docs/displacement.md). A size over the pairs whose
    chosen log-prob fell is absent when none fell; a first/rest mean when no response has such tokens."""
    if not records:
        return {}
    col = lambda k: np.array([np.nan if r[k] is None else r[k] for r in records], dtype=np.float64)  # noqa: E731
    chosen, rejected = col("chosen_delta"), col("rejected_delta")
    per_token = col("chosen_delta_per_token")
    fell = chosen < 0
    out = {
        "chosen_fell": fell.mean(),
        "rejected_fell": (rejected < 0).mean(),
        "both_fell": (fell & (rejected < 0)).mean(),
        "margin_grew": (col("margin_delta") > 0).mean(),
    }
    if fell.any():
        out.update(
            chosen_fell_mean=chosen[fell].mean(),
            chosen_fell_median=np.median(chosen[fell]),
            chosen_fell_mean_per_token=per_token[fell].mean(),
            chosen_fell_median_per_token=np.median(per_token[fell]),
        )
    for side in ("chosen", "rejected"):
        values = col(f"{side}_delta_per_token")
        out.update({f"{side}_delta_per_token_p{q}": np.percentile(values, q) for q in (10, 50, 90)})
        for part in ("first", "rest"):
            part_values = col(f"{side}_{part}")
            if np.isfinite(part_values).any():
                out[f"{side}_{part}_delta_per_token"] = np.nanmean(part_values)
    return {PREFIX + k: float(v) for k, v in out.items()}


def histograms(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The per-pair values of `HISTOGRAMS`, by W&B key."""
    return {f"{PREFIX}hist/{k}": np.array([r[k] for r in records if r[k] is not None]) for k in HISTOGRAMS}


def profile(records: Sequence[dict[str, Any]], side: str) -> np.ndarray:
    """(pairs, BINS): each pair's mean per-token change per relative-position bin of its `side` response (NaN:
    no token in that bin)."""
    return np.array([[np.nan if v is None else v for v in r[f"{side}_bins"]] for r in records], dtype=np.float64)


def step_path(run_dir: Path | str, step: int) -> Path:
    return Path(run_dir) / DIRECTORY / f"step_{step:08d}.jsonl"


def write(run_dir: Path | str, step: int, records: Sequence[dict[str, Any]]) -> Path:
    """The evaluation's pairs as `<run_dir>/displacement/step_<N>.jsonl` (replaced whole; a resumed run rewrites
    the steps it evaluates again)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return atomic_write_text(step_path(run_dir, step), text, what="displacement")


def steps(run_dir: Path | str) -> dict[int, Path]:
    """The run's displacement files by evaluation step (empty when it wrote none)."""
    found = {}
    for path in (Path(run_dir) / DIRECTORY).glob("step_*.jsonl"):
        try:
            found[int(path.stem[len("step_") :])] = path
        except ValueError:
            continue
    return dict(sorted(found.items()))


def read(path: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def most_displaced(records: Sequence[dict[str, Any]], n: int = 5) -> list[dict[str, Any]]:
    """The `n` pairs whose chosen log-prob fell most per token (most negative `chosen_delta_per_token` first)."""
    ranked = [r for r in records if r["chosen_delta_per_token"] is not None]
    return sorted(ranked, key=lambda r: r["chosen_delta_per_token"])[:n]


def pair_texts(tokenizer) -> Callable[[TokenizedPair], dict[str, str]]:
    """A pair's prompt and responses as the model read them (decoded token ids: template and truncation included)."""

    def texts(pair: TokenizedPair) -> dict[str, str]:
        return {
            "prompt": tokenizer.decode(list(pair.prompt_ids)),
            "chosen": tokenizer.decode(list(pair.chosen_ids)),
            "rejected": tokenizer.decode(list(pair.rejected_ids)),
        }

    return texts


class DisplacementLog:
    """The engine's evaluation hands it the rows of every rank; it writes the file (main process) and returns the
    scalars and histogram values. `describe` gives a pair's texts (`pair_texts`); without it the file has ids only."""

    def __init__(
        self,
        run_dir: Path | str,
        eval_pairs: Sequence[TokenizedPair],
        describe: Callable[[TokenizedPair], dict[str, str]] | None = None,
    ):
        self.run_dir, self.describe = Path(run_dir), describe
        self.order = {p.pair_id: i for i, p in reversed(list(enumerate(eval_pairs)))}
        self.pairs = {p.pair_id: p for p in eval_pairs}
        self.texts: dict[str, dict[str, str]] = {}  # decoded once, at the first evaluation

    def _texts(self, pair_id: str) -> dict[str, str]:
        if self.describe is None:
            return {}
        if pair_id not in self.texts:
            self.texts[pair_id] = self.describe(self.pairs[pair_id])
        return self.texts[pair_id]

    def finish(self, step: int, rows: Sequence[Row], is_main: bool = True) -> tuple[dict[str, float], dict]:
        """(scalars, histogram values) of one evaluation over all `rows`; the main process writes the file."""
        rows = sorted(rows, key=lambda row: self.order.get(row[0], len(self.order)))
        records = [pair_record(step, row, self._texts(row[0]) if is_main else {}) for row in rows]
        if is_main:
            write(self.run_dir, step, records)
        return summary(records), histograms(records)

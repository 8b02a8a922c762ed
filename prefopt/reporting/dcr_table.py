"""The DCR study's table: one row per loss, verified accuracy before/after and the degraded-chosen-response signals.

    python -m prefopt.dcr outputs/dcr_arith/2026-11-22/07-00-00      # any sweep or run directories

`DCRTableCallback` writes it at the end of `python -m prefopt.run -m experiment=dcr_arith loss=...`
(conf/experiment/dcr_arith.yaml). Runs are read with `prefopt.reporting.sweep.collect`, so a killed run shows its
last logged values. Columns (final values, on the held-out preference pairs where the metric is per pair):

- verified accuracy before / after preference training (`eval/verified_before/mean`, `eval/verified/mean`)
- `eval/rewards/chosen`, `eval/rewards/rejected`: β·log(π/π_ref) summed over the completion
- `eval/dcr/chosen_reward_below_zero`: share of pairs whose chosen reward fell below zero
- `eval/dcr/chosen_logp_delta_per_token`: mean change of the chosen completion's log-prob per token
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from prefopt.io import atomic_write_text
from prefopt.reporting.compare import METHODS, compare, num, pct
from prefopt.reporting.sweep import collect, csv_text, differing, markdown_table

log = logging.getLogger(__name__)

COLUMNS = [
    ("acc before", "eval/verified_before/mean"),
    ("acc after", "eval/verified/mean"),
    ("rewards/chosen", "eval/rewards/chosen"),
    ("rewards/rejected", "eval/rewards/rejected"),
    ("chosen reward < 0", "eval/dcr/chosen_reward_below_zero"),
    ("chosen Δlogp/token", "eval/dcr/chosen_logp_delta_per_token"),
]


def dcr_rows(paths: Iterable[str | Path]) -> tuple[list[dict[str, Any]], list[str], Path | None]:
    """One row per run: loss, the overrides besides the loss that differ between runs (seed, lr, ...), COLUMNS."""

    records, root = collect([str(p) for p in paths])
    extra = [k for k in differing(records)[0] if k != "loss"]
    rows = []
    for r in records:
        row: dict[str, Any] = {"loss": r.loss or r.overrides.get("loss", r.name), "run": r.name, "status": r.status}
        row.update({k: r.overrides.get(k, "") for k in extra})
        row.update({key: r.final.get(key) for _, key in COLUMNS})
        rows.append(row)
    return rows, extra, root


def means_by_loss(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The mean of each column over the runs of each loss (in first-seen order), with the run count."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        agg = out.setdefault(
            row["loss"], {"loss": row["loss"], "runs": 0, "status": "complete", **{key: [] for _, key in COLUMNS}}
        )
        agg["runs"] += 1
        for _, key in COLUMNS:
            if row[key] is not None:
                agg[key].append(row[key])
    for agg in out.values():
        for _, key in COLUMNS:
            agg[key] = sum(agg[key]) / len(agg[key]) if agg[key] else None
    return list(out.values())


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if "verified" in key:
        return f"{100 * value:.1f}%"
    if "below_zero" in key:
        return f"{value:.2f}"
    return f"{value:+.3f}"


def seed_table(paths: Sequence[str | Path], baseline: str | None = None) -> tuple[str, dict]:
    """One row per setting (the runs of a loss over seeds): accuracy before/after, the paired difference
    against the baseline, preservation, improvement (per benchmark), the held-out pairs' reward accuracy (is the
    preference training healthy: above ½?), the chosen reward and its DCR share, each
    with its 95% interval (`prefopt.reporting.compare`)."""
    result = compare(collect([str(p) for p in paths])[0], baseline)
    names, base = result["benchmarks"], result["baseline"]
    tag = (lambda n, c: f"{n} {c}") if len(names) > 1 else (lambda n, c: c)  # noqa: E731
    header = ["setting", "seeds"]
    for n in names:
        header += [tag(n, c) for c in ("acc before", "acc after", f"Δ acc vs {base}", "preserved", "improved")]
    header += ["held-out reward acc", "rewards/chosen", "chosen reward < 0"]
    body = []
    for g in result["groups"]:
        row = [g.label, " ".join(str(s) for s in g.seeds)]
        for n in names:
            row += [
                pct(g.before.get(n)),
                pct(g.accuracy.get(n)),
                pct(g.versus.get(n), signed=True),
                pct(g.preserved.get(n)),
                pct(g.improved.get(n)),
            ]
        row += [
            num(g.scalars.get("eval/rewards/accuracies")),
            num(g.scalars.get("eval/rewards/chosen")),
            num(g.scalars.get("eval/dcr/chosen_reward_below_zero")),
        ]
        body.append(row)
    return markdown_table(header, body), result


def markdown(rows: list[dict[str, Any]], extra: Sequence[str] = ()) -> str:

    header = ["loss", *extra, *(name for name, _ in COLUMNS)]
    body = [
        [
            row["loss"] + ("" if row["status"] == "complete" else f" ({row['status']})"),
            *(row.get(k, "") for k in extra),
            *(_fmt(row[key], key) for _, key in COLUMNS),
        ]
        for row in rows
    ]
    return markdown_table(header, body)


def write_dcr_table(
    paths: Iterable[str | Path], out_dir: str | Path | None = None, echo: bool = True, baseline: str | None = None
) -> dict:
    """Write `dcr_table.md` and `dcr_table.csv` over the runs under `paths`; returns the rows and files.

    The markdown starts with one row per setting over its seeds (intervals, paired differences against
    `baseline`: dpo when present), then every run; with several runs per loss, also the plain means per loss.
    """
    paths = list(paths)
    rows, extra, root = dcr_rows(paths)
    out = Path(out_dir or root or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, extra)
    means = means_by_loss(rows)
    if len(means) < len(rows):
        counts = ", ".join(f"{m['loss']}: {m['runs']}" for m in means)
        table += f"\n\nMean over the runs of each loss ({counts}):\n\n" + markdown(means)
    intervals, comparison = seed_table(paths, baseline)
    method = (
        f"Accuracy, preservation and improvement in %, differences in points; each cell `estimate [95% "
        f"interval]` (and p). {METHODS.format(baseline=comparison['baseline'] or 'baseline')}"
    )
    md = out / "dcr_table.md"
    atomic_write_text(
        md,
        f"# DCR study\n\n{intervals}\n\n{method}\n\n## Each run\n\n{table}\n\nAccuracy: greedy "
        "pass@1, answers checked by math-verify, on the held-out problems, before and after preference "
        "training. Rewards (β·log π/π_ref, summed over the completion) and the DCR signals: final values "
        "on the held-out on-policy pairs.\n",
    )
    path = out / "dcr_table.csv"
    atomic_write_text(
        path, csv_text(["loss", *extra, "run", "status", *(key for _, key in COLUMNS)], rows), what="DCR table"
    )
    if echo:
        print(f"{intervals}\n\n{table}")
        print(f"\nDCR table: {md} and {path}")
    return {
        "rows": rows,
        "means": means,
        "table": table,
        "intervals": intervals,
        "comparison": comparison,
        "files": {"md": md, "csv": path},
    }


class DCRTableCallback(Callback):
    """Hydra callback: the DCR table over the sweep directory when a multirun ends (never raises)."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        try:
            baseline = OmegaConf.select(config, "report.baseline", default=None)
            write_dcr_table([config.hydra.sweep.dir], baseline=None if baseline is None else str(baseline))
        except Exception as exc:  # noqa: BLE001 - the runs are what matter
            log.warning("DCR table not written (%s: %s)", type(exc).__name__, exc)

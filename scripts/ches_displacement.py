"""Does CHES predict which pairs displace? The correlation over a finished study's held-out pairs.

    python scripts/ches_displacement.py --sweep-dir outputs/smol_math/study-...   [--doc docs/results/ches_smol.md]

For every run of the sweep (a `prefopt.run -m` directory whose runs sampled their pairs with `pairs.ches=true`), the
held-out pairs of its last evaluation (`<run>/displacement/step_<N>.jsonl`) are joined by `pair_id` with their
CHES scores (in the run's pair file, `summary.json` → `mathloop.pairs.path`, scored under the starting model before
training). Razin et al. (arXiv 2410.08847) find that the pairs whose responses' hidden embeddings are most alike
(high CHES) are the ones whose chosen log-probability falls: a negative correlation between CHES and the chosen
response's change. The table gives, per loss, Spearman's rho between each score (raw CHES and the
length-normalised one the paper filters by) and the change of the chosen log-probability (total, and per token),
pooled over the seeds' pairs, with its p-value, and the chosen change of the top-CHES quarter against the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml
from scipy import stats as sps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefopt import displacement  # noqa: E402
from prefopt.reporting.doc_page import write_doc_page  # noqa: E402
from prefopt.reporting.sweep import markdown_table  # noqa: E402


def run_pairs(run: Path) -> list[dict]:
    """The run's held-out pairs at its last evaluation, each with its CHES scores; [] when there is nothing."""
    steps = displacement.steps(run)
    summary_path = run / "summary.json"
    if not steps or not summary_path.is_file():
        return []
    pairs_file = (json.loads(summary_path.read_text()).get("mathloop") or {}).get("pairs", {}).get("path")
    if not pairs_file:
        return []
    path = Path(pairs_file) if Path(pairs_file).is_absolute() else ROOT / pairs_file
    scores = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if "ches" in row:
            scores[row["pair_id"]] = (row["ches"], row["ches_length_normalized"])
    out = []
    for record in displacement.read(steps[max(steps)]):
        if record["pair_id"] in scores:
            ches, normalized = scores[record["pair_id"]]
            out.append({**record, "ches": ches, "ches_length_normalized": normalized})
    return out


def correlation(x: list[float], y: list[float]) -> str:
    rho, p = sps.spearmanr(x, y)
    return f"{rho:+.2f} (p = {p:.2g})"


def table(sweep: Path) -> str:
    by_loss: dict[str, list[dict]] = defaultdict(list)
    seeds: dict[str, set] = defaultdict(set)
    for run in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        loss = config["loss"].get("key") or run.name
        records = run_pairs(run)
        if records:  # a run still going (or without scores) adds nothing, not even its seed
            by_loss[loss] += records
            seeds[loss].add(config["seed"])
    header = [
        "loss",
        "seeds",
        "pairs",
        "rho(CHES, chosen change)",
        "rho(CHES, chosen change per token)",
        "rho(normalised CHES, chosen change per token)",
        "chosen change per token: top-CHES quarter / rest",
    ]
    rows = []
    for loss, records in by_loss.items():
        if len(records) < 3:
            continue
        ches = [r["ches"] for r in records]
        normalized = [r["ches_length_normalized"] for r in records]
        total = [r["chosen_delta"] for r in records]
        per_token = [r["chosen_delta_per_token"] for r in records]
        cut = np.quantile(normalized, 0.75)
        top = [d for d, s in zip(per_token, normalized) if s >= cut]
        rest = [d for d, s in zip(per_token, normalized) if s < cut]
        rows.append(
            [
                loss,
                ",".join(str(s) for s in sorted(seeds[loss])),
                str(len(records)),
                correlation(ches, total),
                correlation(ches, per_token),
                correlation(normalized, per_token),
                f"{np.mean(top):+.4f} / {np.mean(rest):+.4f}",
            ]
        )
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep-dir", required=True, help="a finished `prefopt.run -m` sweep with pairs.ches=true")
    ap.add_argument("--doc", help="also write the table as a results page of the documentation (docs/results/...)")
    args = ap.parse_args(argv)
    sweep = Path(args.sweep_dir)
    header = (sweep / "study_header.md").read_text().strip() if (sweep / "study_header.md").is_file() else ""
    body = f"Sweep: `{sweep.relative_to(ROOT) if sweep.is_absolute() else sweep}`\n\n{header}\n\n{table(sweep)}\n"
    print(body)
    if args.doc:
        print(f"wrote {write_doc_page(args.doc, 'CHES against the measured displacement', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Is the tiny reward model of `experiment=rm_arith` meaningful? Its agreement with the answer checker, over seeds.

    python scripts/rm_agreement.py                                   # reward seeds 0,1,2, the experiment's defaults
    python scripts/rm_agreement.py --seeds 0,1,2 reward.source=data reward.steps=300 reward.lr=3e-4
    python scripts/rm_agreement.py --seeds 0,1,2,3,4 --doc docs/results/rm_agreement.md   # also write the results page

Composes `experiment=rm_arith` with the overrides given, then for each seed runs only the (cached) warm-up and the
(cached) reward stage with `reward.seed` set to it: the warm-up, and so the policy whose answers are judged, is the
same for every seed; the seed moves the reward model's data draw, head and batch order. It prints one row per seed
and their mean: the agreement with the checker (of the pairs the checker tells apart, the share the model orders the
same way) on the data's 50 held-out pairs, on every (correct, wrong) pair of the policy's samples of the 50 held-out
problems, and on fresh samples of the training problems whose answers the model never saw (the answers the labeller
ranks), each with its 95% interval from `reward.json`. The samples are drawn as the pair labeller draws its own
(`pairs.k` at `pairs.temperature`: 8 at 0.7 in experiment=rm_arith). A reward model that is cached already is read,
not trained
again (its seconds are those of the run that trained it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefopt.reporting.doc_page import write_doc_page  # noqa: E402

SETS = (
    ("agreement", "held-out data pairs"),
    ("on_policy_agreement", "held-out problems' samples"),
    ("fresh_answer_agreement", "fresh answers, training problems"),
)


def cell(m: dict) -> str:
    if not m["pairs"]:  # no pair the checker tells apart (a policy that is always right or always wrong there)
        return "- (0)"
    return f"{m['agreement']:.3f} [{m['low']:.3f}, {m['high']:.3f}] ({m['pairs']})"


def mean(values: list[float]) -> str:
    kept = [v for v in values if v == v]
    return f"{sum(kept) / len(kept):.3f}" if kept else "-"


def measure(overrides: list[str], seed: int, workdir: Path) -> dict:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from prefopt import compose
    from prefopt.config import conf_dir
    from prefopt.mathloop.stages.reward_training import cached_reward

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hcompose(
            "config", overrides=["experiment=rm_arith", "train.progress=false", *overrides, f"reward.seed={seed}"]
        )
    plan = compose.build(cfg)
    hardware = plan.hardware.setup()
    spec, _, _ = plan.loop.cached_warmup(plan.model, plan.data, hardware, workdir)
    model_dir, _ = cached_reward(plan.loop, spec, plan.data, hardware, workdir)
    return json.loads((model_dir.parent / "reward.json").read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(v) for v in text.split(",")],
        default=[0, 1, 2],
        help="reward.seed values, comma-separated (default 0,1,2)",
    )
    parser.add_argument("--doc", help="also write the table as a results page of the documentation (docs/results/...)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on top of experiment=rm_arith")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            record = measure(args.overrides, seed, Path(tmp) / str(seed))
            rows.append((seed, record))
            print(f"seed {seed}: " + "; ".join(f"{name} {cell(record[key])}" for key, name in SETS), flush=True)
    print(
        f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; experiment=rm_arith {' '.join(args.overrides)}\n"
    )
    lines = [
        "| reward.seed | source | train pairs | " + " | ".join(name for _, name in SETS) + " | seconds |",
        "|---|---|---|" + "---|" * len(SETS) + "---|",
    ]
    for seed, record in rows:
        pairs = sum(v for k, v in record["training"].items() if k.endswith("_pairs"))
        lines.append(
            f"| {seed} | {record['reward']['source']} | {pairs} | "
            + " | ".join(cell(record[key]) for key, _ in SETS)
            + f" | {record['seconds']:.0f} |"
        )
    means = [mean([record[key]["agreement"] for _, record in rows]) for key, _ in SETS]
    lines.append(f"| mean of {len(rows)} | | | " + " | ".join(means) + " | |")
    print("\n".join(lines))
    if args.doc:
        body = (
            "Agreement of the tiny reward model of `experiment=rm_arith` with the answer checker, per reward seed: "
            "the share of the checker's (correct, wrong) pairs it orders the same way, with its 95% interval and "
            "the number of pairs. [Studies](../studies.md) says what it shows.\n\n" + "\n".join(lines)
        )
        title = "Reward-model agreement with the answer checker, over reward seeds"
        print(f"\nwrote {write_doc_page(args.doc, title, body)}")


if __name__ == "__main__":
    main()

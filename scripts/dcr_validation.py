"""A study's settings sweep on the validation split: run it, then print the table docs/studies.md shows.

    python scripts/dcr_validation.py                          # the DCR miniature's grid, DPO, seed 0, on arith_val
    python scripts/dcr_validation.py --experiment smol_math   # the real-model study's grid
    python scripts/dcr_validation.py --sweep-dir DIR [DIR...]  # the table of finished sweeps

Every run is `python -m prefopt.run -m experiment=<experiment> loss=dpo seed=0 "evaluation.benchmarks=[arith_val]"`
plus one line of the experiment's grid (GRIDS): accuracy is measured on the validation problems (`arith_val`), never
on the held-out `arith` the study reports. The rule, fixed before any loss is compared: a setting is healthy when
the held-out pairs' reward accuracy ends above ½ (the pairs of the last pair-sampling problems, which no training
pair comes from; for smol_math the whole 95% interval must be above ½); among healthy settings the one with the best
validation accuracy after training is chosen (`conf/experiment/<experiment>.yaml`). The table: validation accuracy
before → after, preservation and improvement (Clopper-Pearson 95% intervals), the held-out reward accuracy at every
evaluation (every `eval_every` steps and the last) with a Clopper-Pearson interval on the last, and the chosen reward.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from dcr_study import run_logged, sweep_header  # noqa: E402
from prefopt.reporting.sweep import markdown_table  # noqa: E402
from prefopt.stats import proportion  # noqa: E402

BASE = ["loss=dpo", "seed=0", "evaluation.benchmarks=[arith_val]", "steps=null"]
GRIDS = {
    "dcr_mini": [
        ["pairs.eval_size=200", "pairs.max_pairs_per_prompt=1", "lr=3e-5,1e-4", "epochs=1,3"],
        ["pairs.eval_size=200", "pairs.max_pairs_per_prompt=4", "lr=1e-5,3e-5", "epochs=3"],
    ],
    # LoRA r = 16 on 135M parameters, ~85 training pairs: the paper's lr 5e-6 (7B, thousands of pairs) barely moves it
    "smol_math": [
        ["pairs.max_pairs_per_prompt=1", "lr=2e-5,1e-4,4e-4", "epochs=2"],
    ],
}
SHOWN = ("pairs.max_pairs_per_prompt", "lr", "epochs")


def run_grid(experiment: str, extra: list[str]) -> tuple[list[Path], str]:
    started = datetime.now(timezone.utc)
    dirs, commands = [], []
    for n, line in enumerate(GRIDS[experiment]):
        sweep = ROOT / "outputs" / experiment / f"validation-{started:%Y-%m-%d_%H-%M-%S}" / str(n)
        cmd = [
            sys.executable,
            "-m",
            "prefopt.run",
            "-m",
            f"experiment={experiment}",
            *BASE,
            *line,
            *extra,
            f"hydra.sweep.dir={sweep}",
        ]
        commands.append(run_logged(cmd, "dcr_validation", sweep))
        dirs.append(sweep)
    return dirs, "\n".join(f"- command: `{c}`" for c in commands)


def row(run: Path) -> list[str] | None:
    if not (run / "summary.json").is_file():
        return None
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    setting = {
        "pairs.max_pairs_per_prompt": config["pairs"]["max_pairs_per_prompt"],
        "lr": config["lr"],
        "epochs": config["epochs"],
    }
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    accs = [r["eval/rewards/accuracies"] for r in history if "eval/rewards/accuracies" in r]
    n_pairs = int(config["pairs"]["eval_size"])
    last = proportion(round(accs[-1] * n_pairs), n_pairs) if accs else None

    def pct(what: str) -> str:
        value, low, high = (metrics.get(f"eval/{what}{end}/arith_val") for end in ("", "_low", "_high"))
        if value is None:
            return "-"
        return f"{100 * value:.0f}" + (f" [{100 * low:.0f}, {100 * high:.0f}]" if low is not None else "")

    return [
        " ".join(f"{k}={setting[k]}" for k in SHOWN),
        str(history[-1].get("step", "?")),
        f"{100 * metrics['eval/verified_before/arith_val']:.1f} → {100 * metrics['eval/verified/arith_val']:.1f}",
        pct("preserved"),
        pct("improved"),
        " ".join(f"{a:.2f}" for a in accs) + (f" [{last.low:.2f}, {last.high:.2f}]" if last else ""),
        f"{metrics.get('eval/rewards/chosen', float('nan')):+.3f}",
        "-" if last is None else ("yes" if last.low is not None and last.low > 0.5 else "no"),
    ]


def table(dirs: list[Path]) -> str:
    header = [
        "setting",
        "steps",
        "val acc % before → after",
        "preserved %",
        "improved %",
        "held-out reward acc (every eval; 95% CI of the last)",
        "rewards/chosen",
        "95% CI above ½",
    ]
    rows = [
        r
        for d in dirs
        for run in sorted(d.iterdir(), key=lambda p: p.name)
        if run.name.isdigit()
        for r in [row(run)]
        if r
    ]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="dcr_mini", choices=sorted(GRIDS))
    ap.add_argument("--sweep-dir", nargs="*", help="finished sweeps: print their table (header from study_header.md)")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args(argv)
    if args.sweep_dir:
        dirs = [Path(d) for d in args.sweep_dir]
        header = "\n".join(
            (d / "study_header.md").read_text().strip() for d in dirs if (d / "study_header.md").is_file()
        )
    else:
        t0, started = time.perf_counter(), datetime.now(timezone.utc)
        dirs, commands = run_grid(args.experiment, args.extra)
        header = sweep_header(f"{args.experiment} validation sweep", started, t0, commands)
        for d in dirs:
            (d / "study_header.md").write_text(header)
    print(header + "\n")
    print(table(dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

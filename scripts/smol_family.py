"""Which problem family the real-model study trains on: the starting model's greedy accuracy per family.

    python scripts/smol_family.py                       # the documented candidates, 200 validation problems each
    python scripts/smol_family.py --sweep-dir DIR       # the table of a finished sweep

The BPO protocol in miniature (`experiment=smol_math`) needs problems the starting SmolLM2-135M-Instruct solves
sometimes but not always: greedy accuracy between 25% and 70% on a validation split, never on the held-out set.
For every candidate family (largest operand, operators) this runs
`python -m prefopt.evaluate experiment=smol_math evaluation.benchmarks=[arith_val]` on 200 validation problems
of that family (drawn from the whole family: the held-out, pair and training splits are set to 0 here; a family
of fewer problems is measured whole), with the experiment's prompt (the paper's `\\boxed{}` instruction) and
generation settings, and prints greedy accuracy (the stored answers scored by the current answer checker) with
its Clopper-Pearson 95% interval, the share of answers with a filled `\\boxed{}`, and whether the family has
room for the study's 1,200 problems (500 held out, 200 validation, 400 pair sampling, 100 training).
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
from prefopt.answers import last_boxed  # noqa: E402
from prefopt.reporting.sweep import markdown_table  # noqa: E402
from prefopt.stats import proportion  # noqa: E402
from prefopt.verify import AnswerChecker  # noqa: E402

CANDIDATES = "9:+,9:+-,20:+,20:+-,25:+-,30:+,40:+"
NEEDED = 500 + 200 + 400 + 100


def run(candidates: str, extra: list[str]) -> tuple[Path, str]:
    sweep = ROOT / "outputs" / "smol_math" / f"family-{datetime.now(timezone.utc):%Y-%m-%d_%H-%M-%S}"
    cmds = []
    for n, candidate in enumerate(candidates.split(",")):
        largest, ops = candidate.split(":")
        n_val = min(200, (int(largest) + 1) ** 2 * len(ops))  # a family of fewer problems is measured whole
        cmd = [
            sys.executable,
            "-m",
            "prefopt.evaluate",
            "experiment=smol_math",
            "evaluation.benchmarks=[arith_val]",
            f"data.source.ops={ops}",
            f"data.source.max_operand={largest}",
            "data.source.n_eval=0",
            "data.source.n_pairs=0",
            "data.source.n_train=0",
            f"data.source.n_val={n_val}",
            *extra,
            f"hydra.run.dir={sweep / str(n)}",
        ]
        cmds.append(run_logged(cmd, "smol_family", sweep / str(n)))
    return sweep, "\n".join(f"- command: `{c}`" for c in cmds)


def rows(sweep: Path) -> list[list[str]]:
    out = []
    with AnswerChecker() as checker:  # the loop's checker: worker processes, a timeout per answer
        for summary in sorted(sweep.glob("*/summary.json"), key=lambda p: int(p.parent.name)):
            config = yaml.safe_load((summary.parent / ".hydra" / "config.yaml").read_text())
            source = config["data"]["source"]
            m, ops = int(source["max_operand"]), str(source["ops"])
            text = (summary.parent / "verified" / "arith_val.jsonl").read_text(encoding="utf-8")
            answers = [json.loads(line) for line in text.splitlines() if line.strip()]
            # scored again by the current checker: the greedy answers do not depend on it, the verdicts may
            verdicts = checker.check_many([a["output"] for a in answers], [a["gold"] for a in answers])
            ci = proportion(sum(v.correct for v in verdicts), len(answers))
            boxed = f"{100 * sum(last_boxed(a['output']) is not None for a in answers) / len(answers):.0f}"
            space = (m + 1) ** 2 * len(ops)
            fits = 25 <= 100 * ci.estimate <= 70
            out.append(
                [
                    f"a {' or '.join(ops)} b, a, b in 0..{m}",
                    str(space),
                    f"{100 * ci.estimate:.1f} [{100 * ci.low:.1f}, {100 * ci.high:.1f}]",
                    boxed,
                    ("yes" if fits else "no") + ("" if space >= NEEDED else f"; {space} < {NEEDED} problems"),
                ]
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", default=CANDIDATES, help="max_operand:ops, comma-separated")
    ap.add_argument("--sweep-dir", help="a finished sweep: print its table")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = ap.parse_args(argv)
    if args.sweep_dir:
        sweep = Path(args.sweep_dir)
        header = (sweep / "study_header.md").read_text().strip() if (sweep / "study_header.md").is_file() else ""
    else:
        t0, started = time.perf_counter(), datetime.now(timezone.utc)
        sweep, commands = run(args.candidates, args.extra)
        header = sweep_header("SmolLM2-135M-Instruct greedy accuracy per problem family", started, t0, commands)
        (sweep / "study_header.md").write_text(header)
    print(header + "\n")
    head = [
        "family",
        "problems",
        "greedy accuracy % [95% CI]",
        "answers with a filled \\boxed{} %",
        "25-70% and room for the study",
    ]
    print(markdown_table(head, rows(sweep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

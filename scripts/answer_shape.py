"""How a study's answers changed shape: length and form of the greedy answers before and after training, per loss.

    python scripts/answer_shape.py --sweep-dir outputs/smol_math/study-...

For every run of a finished `prefopt.run -m` sweep, its held-out greedy answers before (`verified_before/`) and after
(`verified/`) training are read; the table gives, per loss over its seeds (pooled answers), the mean answer length in
characters, the share of short answers (under 40 characters: `16 + 22 = 38`), the share that state a value after
"the answer is", and the accuracy, before → after. It tells a change of form (a model that stops rambling and states
its sum) from a change of arithmetic.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefopt.answers import stated_answer  # noqa: E402
from prefopt.reporting.sweep import markdown_table  # noqa: E402

SHORT = 40  # characters


def shape(answers: list[dict]) -> dict[str, float]:
    n = len(answers)
    return {
        "length": sum(len(a["output"]) for a in answers) / n,
        "short": sum(len(a["output"]) < SHORT for a in answers) / n,
        "stated": sum(stated_answer(a["output"]) is not None for a in answers) / n,
        "accuracy": sum(bool(a["correct"]) for a in answers) / n,
    }


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def table(sweep: Path) -> str:
    before: dict[str, list[dict]] = defaultdict(list)
    after: dict[str, list[dict]] = defaultdict(list)
    seeds: dict[str, set] = defaultdict(set)
    for run in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        loss = config["loss"].get("key") or run.name
        pre, post = sorted((run / "verified_before").glob("*.jsonl")), sorted((run / "verified").glob("*.jsonl"))
        if not pre or not post:
            continue
        seeds[loss].add(config["seed"])
        for path in pre:
            before[loss] += read(path)
        for path in post:
            after[loss] += read(path)
    header = ["loss", "seeds", "answers", "mean length (chars)", f"under {SHORT} chars", "state a value", "accuracy"]
    rows = []
    for loss in before:
        b, a = shape(before[loss]), shape(after[loss])
        rows.append(
            [
                loss,
                ",".join(str(s) for s in sorted(seeds[loss])),
                str(len(after[loss])),
                f"{b['length']:.0f} → {a['length']:.0f}",
                f"{100 * b['short']:.0f}% → {100 * a['short']:.0f}%",
                f"{100 * b['stated']:.0f}% → {100 * a['stated']:.0f}%",
                f"{100 * b['accuracy']:.1f}% → {100 * a['accuracy']:.1f}%",
            ]
        )
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep-dir", required=True, help="a finished `prefopt.run -m` sweep with verified evaluations")
    args = ap.parse_args(argv)
    print(table(Path(args.sweep_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m prefopt.report PATH... [--out DIR] [--wandb ENTITY/PROJECT/GROUP]`: a sweep report (see
prefopt.reporting.sweep)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefopt.errors import PrefoptError
from prefopt.reporting.sweep import write_report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m prefopt.report",
        description="Sweep reports: a table and plots over run directories, a multirun directory, or a W&B group.",
    )
    parser.add_argument(
        "paths", nargs="*", metavar="PATH", help="run directories, multirun directories, or wandb:ENTITY/PROJECT/GROUP"
    )
    parser.add_argument("--out", type=Path, help="where to write (default: the sweep directory / common parent)")
    parser.add_argument(
        "--wandb",
        action="append",
        default=[],
        metavar="ENTITY/PROJECT/GROUP",
        help="a W&B group to read through the API (same as PATH wandb:ENTITY/PROJECT/GROUP)",
    )
    parser.add_argument(
        "--baseline",
        metavar="LOSS",
        default=None,
        help="compare every setting with the same setting under this loss (default: dpo when a run "
        "used it; none: no paired differences)",
    )
    parser.add_argument(
        "--along",
        default="beta",
        metavar="KEY[,KEY]",
        help="the overrides whose settings of one loss make one line of the KL frontier (default: beta; e.g. "
        "beta,lr where β hardly moves the distance); β is always one",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    paths = list(args.paths) + [f"wandb:{w}" for w in args.wandb]
    if not paths:
        parser.error("give at least one PATH (or --wandb ENTITY/PROJECT/GROUP)")
    try:
        along = [key.strip() for key in args.along.split(",") if key.strip()]  # β always traces a line
        write_report(paths, args.out, echo=True, baseline=args.baseline, along=along)
    except PrefoptError as exc:
        print(f"prefopt.report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

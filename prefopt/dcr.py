"""`python -m prefopt.dcr RUN_OR_SWEEP_DIR [...] [--baseline LOSS]`: the DCR study's table (see
prefopt.reporting.dcr_table)."""

from __future__ import annotations

import argparse
import sys

from prefopt.errors import PrefoptError
from prefopt.reporting.dcr_table import write_dcr_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prefopt.dcr",
        description="The DCR study's table over run "
        "or sweep directories: per loss over seeds with 95% intervals, and every run.",
    )
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP_DIR")
    parser.add_argument("--out", help="where to write dcr_table.md/.csv (default: the directories' common parent)")
    parser.add_argument(
        "--baseline", metavar="LOSS", help="paired differences against this loss (default: dpo when present; none: off)"
    )
    args = parser.parse_args(argv)
    try:
        write_dcr_table(args.paths, args.out, baseline=args.baseline)
    except PrefoptError as exc:
        print(f"prefopt.dcr: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

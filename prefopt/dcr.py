"""`python -m prefopt.dcr RUN_OR_SWEEP_DIR [...]`: the DCR study's table (see prefopt.reporting.dcr)."""

from __future__ import annotations

import sys

from prefopt.reporting.dcr import write_dcr_table


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m prefopt.dcr RUN_OR_SWEEP_DIR [...]")
        return 0 if args else 2
    write_dcr_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

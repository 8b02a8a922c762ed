"""`python -m prefopt.wandb_dashboard ENTITY/PROJECT GROUP [--kind workspace] [--dry-run]`: a W&B DCR dashboard.

The charts are built by `prefopt.reporting.dashboard`; needs the optional `wandb-workspaces` package.
"""

from __future__ import annotations

import argparse
import sys

from prefopt.reporting.dashboard import build_report, build_workspace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prefopt.wandb_dashboard",
        description="A W&B report (or saved workspace view) that compares one group's runs on the DCR metrics.",
    )
    parser.add_argument("project", metavar="ENTITY/PROJECT")
    parser.add_argument("group", metavar="GROUP", help="the W&B group: the sweep's name")
    parser.add_argument("--kind", choices=("report", "workspace"), default="report")
    parser.add_argument("--title", help="the report's title / the view's name (default: DCR <group>)")
    parser.add_argument("--dry-run", action="store_true", help="build and print it; save nothing")
    args = parser.parse_args(argv)
    entity, _, project = args.project.partition("/")
    if not entity or not project or "/" in project:
        parser.error(f"expected ENTITY/PROJECT, got {args.project!r}")
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        print(
            "prefopt.wandb_dashboard: error: the optional package wandb-workspaces is not installed "
            "(pip install wandb-workspaces), or make the dashboard by hand: docs/reports.md, 'W&B dashboards'",
            file=sys.stderr,
        )
        return 2
    try:
        built = (
            build_report(wr, entity, project, args.group, args.title)
            if args.kind == "report"
            else build_workspace(ws, wr, entity, project, args.group, args.title)
        )
        if args.dry_run:
            print(built)
            return 0
        built.save()
    except Exception as exc:  # noqa: BLE001 - network, login, API: one line
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"prefopt.wandb_dashboard: error: {type(exc).__name__}: {first}", file=sys.stderr)
        return 2
    print(getattr(built, "url", "") or f"saved {args.kind} for group {args.group} in {entity}/{project}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

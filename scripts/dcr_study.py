"""The DCR study's table (docs/results/): run the seed sweep, then print the table with the date, machine and command.

    python scripts/dcr_study.py                                  # 5 losses x 3 seeds, docs/results/dcr_arith.md
    python scripts/dcr_study.py --losses dpo,bpo --seeds 0,1 --extra experiment=dcr_mini
    python scripts/dcr_study.py --sweep-dir outputs/dcr_arith/2026-11-30/21-55-00   # table of a finished sweep
    python scripts/dcr_study.py --experiment dcr_mini --doc docs/results/dcr_mini.md   # also write the results page

It runs `python -m prefopt.run -m experiment=<experiment> seed=<seeds> loss=<losses> [extra...]` (unless
`--sweep-dir` names a finished sweep), then `prefopt.reporting.dcr_table.write_dcr_table` over the sweep, and prints
a header (UTC date, machine: CPU model, cores, load average, torch threads; the exact command; the sweep's wall
time) followed by the table per loss over seeds (95% intervals, paired differences against DPO,
preservation/improvement) that docs/results/ shows. Wall times depend on the machine and on its other load.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefopt.reporting.dcr_table import write_dcr_table  # noqa: E402
from prefopt.reporting.doc_page import write_doc_page  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{cpu}; {os.cpu_count()} cores; load average {load}; {platform.system()} {platform.release()}"


def sweep_header(title: str, started: datetime, t0: float, commands: str) -> str:
    """A validation or measuring sweep's header: title and UTC start, machine, the commands' lines, wall time."""
    wall = (time.perf_counter() - t0) / 60
    when = f"{started:%Y-%m-%d %H:%M} UTC"
    return f"## {title}, {when}\n\n- machine: {machine()}\n{commands}\n- wall time: {wall:.1f} min\n"


def run_logged(cmd: list[str], script: str, where: Path) -> str:
    """Run one command (`python -m ...`, its last argument the output directory) from the repository root and stop
    the script if it fails; returns the command as a header shows it, without the output directory."""
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise SystemExit(f"{script}: the run failed; see {where}")
    return shlex.join(["python", *cmd[1:-1]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="dcr_arith")
    ap.add_argument("--losses", default="dpo,ipo,slic,caldpo,bpo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    ap.add_argument(
        "--sweep-dir",
        help="a finished sweep: print its table without running anything (with the "
        "date, machine and command of the run that made it, from its study_header.md)",
    )
    ap.add_argument("--doc", help="also write the table as a results page of the documentation (docs/results/...)")
    args = ap.parse_args(argv)
    started = datetime.now(timezone.utc)
    if args.sweep_dir:
        sweep, command, wall = Path(args.sweep_dir), "(an existing sweep)", None
    else:
        sweep = ROOT / "outputs" / args.experiment / f"study-{started:%Y-%m-%d_%H-%M-%S}"
        cmd = [
            sys.executable,
            "-m",
            "prefopt.run",
            "-m",
            f"experiment={args.experiment}",
            f"seed={args.seeds}",  # seeds outermost: each seed's pairs are sampled once, then every loss trains on them
            f"loss={args.losses}",
            *args.extra,
            f"hydra.sweep.dir={sweep}",
        ]
        command = shlex.join(["python", *cmd[1:]])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"dcr_study: the sweep failed (exit {proc.returncode}); see {sweep}", file=sys.stderr)
            return proc.returncode
    header = sweep / "study_header.md"  # the run's date, machine and command, kept for a later re-tabulation
    if args.sweep_dir and header.is_file():
        text = header.read_text()
    else:
        text = (
            f"## DCR study, {started:%Y-%m-%d %H:%M} UTC\n\n- machine: {machine()}\n- command: `{command}`\n"
            + (f"- sweep wall time: {wall / 60:.1f} min (shared or busy machines are slower)\n" if wall else "")
            + f"- sweep directory: {sweep}\n"
        )
        if not args.sweep_dir:
            header.write_text(text)
    print("\n" + text)
    result = write_dcr_table([sweep], echo=False)
    print(result["intervals"])
    print(f"\nEvery run: {result['files']['md']}")
    if args.doc:
        body = (
            text.replace("## ", "### ", 1) + "\n" + result["intervals"] + "\n\n[Studies](../studies.md) says what "
            "the columns mean and what the table shows."
        )
        print(f"wrote {write_doc_page(args.doc, f'DCR study: experiment={args.experiment}', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A real single-node SLURM cluster for the `slurm` tests: munged, slurmctld and slurmd as child processes.

Debian's `slurm-wlm` and `munge` packages are installed when missing. Everything the daemons write (munge key,
socket, slurm.conf, state, spool, logs) lives in one temporary directory; the SLURM commands find the cluster
through `SLURM_CONF`. `stop()` cancels the cluster's jobs, ends the three daemons `start()` started (by their
`Popen`), then kills what is left of its jobs: processes whose environment carries this cluster's `SLURM_CONF`.

What a container needs that a real cluster does not:
- no cgroup plugins: `proctrack/linuxproc` and `task/none` (chosen up front; the cgroup plugins were not tried);
- munged runs as root (`--force`) on a socket in the temporary directory, whose directory needs o+x, and SLURM is
  told that socket (`AuthInfo`); the key is a fresh random one (mode 0400);
- `SlurmdSpoolDir` must exist as written (no `%n`), `MailProg=/bin/true` (none is installed); the `mpi/pmix` load
  errors in the logs are harmless;
- the node is this host (`hostname`), addressed as 127.0.0.1, with its CPUs and 90% of its memory;
- ports are picked free at start, so two clusters (two test sessions) on one machine do not collide.

Run `python -m tests.helpers.slurm_cluster` to start one by hand (Ctrl-C or SIGTERM stops it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch")


class ClusterError(RuntimeError):
    """The cluster could not be installed or started (the message says which step and where its log is)."""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)


def install_packages() -> None:
    """`apt-get install slurm-wlm munge` when a daemon is missing (needs root; one line on failure)."""
    if all(_which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterError("slurm-wlm/munge are not installed and this is not a root Debian machine to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["?"]
            raise ClusterError(f"`{' '.join(cmd)}` failed: {last[0]}")
    if not all(_which(d) for d in DAEMONS):
        raise ClusterError(f"installed {' '.join(PACKAGES)} but {[d for d in DAEMONS if not _which(d)]} are missing")


def _memory_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


class SlurmCluster:
    """One partition `debug` with this host as its only node; `env` is what SLURM commands and jobs need."""

    def __init__(self, root: Path | None = None, cpus: int | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="prefopt-slurm-"))
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._held_since: dict[str, float] = {}  # requeued job id -> when release_requeued first saw it held

    # -- configuration ------------------------------------------------------------------------------------
    def write_config(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o711)  # clients need to reach the socket inside
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        ctld_port, slurmd_port = _free_ports(2)
        # Slightly less than all of it: slurmd refuses a node whose RealMemory exceeds what it measures.
        memory = int(_memory_mb() * 0.9)
        r = self.root
        self.conf.write_text(f"""\
# written by tests/helpers/slurm_cluster.py: a single-node cluster for prefopt's `slurm` tests
ClusterName=prefopt-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket.2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
MailProg=/bin/true
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in this container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# finished jobs leave the controller's table soon; requeue is allowed (by the job or on preemption)
MinJobAge=5
JobRequeue=1
KillWait=30
InactiveLimit=0
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        self.env.update(SLURM_CONF=str(self.conf))

    # -- processes ----------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.root / "log" / f"{name}.out"
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
                raise ClusterError(
                    f"{name} exited with {proc.returncode}: {tail[0] if tail else '(no output)'} "
                    f"(logs in {self.root / 'log'})"
                )

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(0.3)
        raise ClusterError(f"{what} not ready after {timeout:.0f} s (logs in {self.root / 'log'})")

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A SLURM command against this cluster."""
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise ClusterError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        return proc

    def start(self) -> SlurmCluster:
        install_packages()
        self.write_config()
        m = self.root / "munge"
        try:
            self._spawn(
                "munged",
                [
                    _which("munged"),
                    "--foreground",
                    "--force",
                    f"--key-file={m}/munge.key",
                    f"--socket={m}/munge.socket.2",
                    f"--pid-file={m}/munged.pid",
                    f"--log-file={self.root}/log/munged.log",
                    f"--seed-file={m}/munged.seed",
                ],
            )
            self._wait("munged", lambda: (m / "munge.socket.2").exists(), 30)
            # -i: ignore any old state; -D: foreground, so the process we hold is the daemon
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(
                "slurmctld",
                lambda: (
                    self.run("scontrol", "ping", check=False).returncode == 0
                    and "UP" in self.run("scontrol", "ping", check=False).stdout
                ),
                60,
            )
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
            self._wait("slurmd (node idle in sinfo)", self._node_idle, 60)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
        return out.startswith("idle")

    def jobs(self) -> list[tuple[str, str, str]]:
        """(job id, state, reason) of every job in the queue."""
        out = self.run("squeue", "-h", "-o", "%i|%T|%r", check=False).stdout
        return [tuple(line.split("|", 2)) for line in out.splitlines() if line.count("|") == 2]

    def release_requeued(self, settle_s: float = 2.0) -> list[str]:
        """Start requeued jobs now: SLURM holds a requeued job for 120 s (its EligibleTime), then waits for the next
        scheduler pass; tests would spend minutes waiting. Returns the ids released.

        A job is released once it has been held for `settle_s`: started again within the second its previous run's
        credential was revoked, slurmd refuses the new one ("Killing non-startable batch JobId=N: Job credential
        revoked", whole-second times) and the job ends instead of resuming."""
        held = {job for job, state, reason in self.jobs() if state == "PENDING" and reason == "BeginTime"}
        now = time.time()
        seen = self._held_since
        for job in list(seen):
            if job not in held:
                del seen[job]
        released = []
        for job in sorted(held):
            if now - seen.setdefault(job, now) >= settle_s:
                self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
                released.append(job)
                del seen[job]
        return released

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel this cluster's jobs and wait until they are gone (their slurmstepd processes end with them)."""
        ids = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if ids:  # SIGKILL: submitit's jobs ignore SIGTERM outside the training loop (they wait for KillWait)
            self.run("scancel", "--signal=KILL", "--full", *ids, check=False)
            self.run("scancel", *ids, check=False)
        deadline = time.time() + timeout
        while ids and time.time() < deadline:
            ids = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            time.sleep(0.5)

    def leftovers(self) -> list[int]:
        """Processes that carry this cluster's SLURM_CONF (job steps, srun, slurmstepd), other than this one."""
        mark = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def stop(self) -> None:
        """Cancel the jobs, SIGTERM to each daemon this object started (slurmd, slurmctld, munged), then SIGKILL
        to whatever is left of this cluster's jobs (found by its SLURM_CONF in their environment)."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background, where SIGINT is ignored
    signal.signal(signal.SIGTERM, _interrupt)
    with SlurmCluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf}  # cluster up; Ctrl-C or SIGTERM stops it", flush=True)
        try:
            while True:
                signal.pause()
        except KeyboardInterrupt:
            pass
    sys.exit(0)

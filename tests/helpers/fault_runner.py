"""`python tests/helpers/fault_runner.py POINT:N [overrides]`: prefopt.run with a fault at a named point (tests only).

Points: `mid_step:N` SIGKILL after step N's backward, before its optimizer update; `mid_save:N` SIGKILL inside
the N-th checkpoint save (weights written, trainer state and marker not yet); `sigterm:N` SIGTERM to itself
during step N (the graceful path); `after_final:1` SIGKILL after the final checkpoint, before summary.json;
`enospc_save:N` the N-th checkpoint's trainer-state write fails with OSError(ENOSPC); `fill_disk:N` after the N-th
checkpoint, fill the filesystem of the file $PREFOPT_FILL (the run's) with that file, leaving $PREFOPT_FILL_LEAVE
bytes (default 64 KiB) free, so that the next checkpoint meets a really full disk.
"""

import errno
import os
import signal
import sys

point, n = sys.argv[1].split(":")
n = int(n)
sys.argv = ["prefopt.run"] + sys.argv[2:]

import prefopt.checkpoint as checkpoint  # noqa: E402
import prefopt.engine as engine  # noqa: E402
import prefopt.tracking as tracking  # noqa: E402


def kill(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)


if point in ("mid_step", "sigterm"):
    real_step = engine.Trainer.train_step

    def train_step(self):
        if self.step + 1 == n:
            real_opt_step = self.optimizer.step

            def opt_step(*a, **k):
                if point == "mid_step":
                    kill()
                kill(signal.SIGTERM)  # recorded by the handler; the loop checkpoints after this step
                return real_opt_step(*a, **k)

            self.optimizer.step = opt_step
        return real_step(self)

    engine.Trainer.train_step = train_step
elif point == "mid_save":
    real_save, calls = checkpoint.torch.save, {"n": 0}

    def save(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            kill()
        return real_save(*a, **k)

    checkpoint.torch.save = save
elif point == "enospc_save":
    real_save, calls = checkpoint.torch.save, {"n": 0}

    def save(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(*a, **k)

    checkpoint.torch.save = save
elif point == "fill_disk":
    real_ckpt, calls = engine.save_checkpoint, {"n": 0}

    def save_checkpoint(*a, **k):
        path = real_ckpt(*a, **k)
        calls["n"] += 1
        if calls["n"] == n:
            filler, leave = os.environ["PREFOPT_FILL"], int(os.environ.get("PREFOPT_FILL_LEAVE", "65536"))
            st = os.statvfs(os.path.dirname(filler))
            with open(filler, "wb") as fh:
                fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
        return path

    engine.save_checkpoint = save_checkpoint
elif point == "after_final":
    tracking.RunLog.finish = lambda self, summary: kill()

from prefopt.compose import quiet_other_ranks as _quiet_other_ranks  # noqa: E402
from prefopt.run import main  # noqa: E402

_quiet_other_ranks()
main()

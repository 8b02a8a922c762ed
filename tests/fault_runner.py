"""`python tests/fault_runner.py POINT:N [overrides]`: prefopt.run with a fault at a named point (tests only).

Points: `mid_step:N` SIGKILL after step N's backward, before its optimizer update; `mid_save:N` SIGKILL inside
the N-th checkpoint save (weights written, trainer state and marker not yet); `sigterm:N` SIGTERM to itself
during step N (the graceful path); `after_final:1` SIGKILL after the final checkpoint, before summary.json.
"""

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
elif point == "after_final":
    tracking.RunLog.finish = lambda self, summary: kill()

from prefopt.compose import quiet_other_ranks as _quiet_other_ranks  # noqa: E402
from prefopt.run import main  # noqa: E402

_quiet_other_ranks()
main()

"""`python -m prefopt.sft [policy=DIR] [warmup.steps=...]`: the warm-up stage alone; writes <run_dir>/final."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import prefopt  # noqa: F401 - registers the config resolvers
from prefopt import compose
from prefopt.config import conf_dir
from prefopt.mathloop.jobs import sft_job


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
@compose.entry
def main(cfg: DictConfig) -> None:
    plan = compose.build(cfg, job_type="warmup")
    run_dir = plan.run_dir("outputs/sft")
    sft_job(plan.loop, plan.model, plan.data, plan.hardware, run_dir, wandb=plan.job_wandb(run_dir))


if __name__ == "__main__":
    main()

"""`python -m prefopt.pairs [policy=DIR] [pairs.k=8 pairs.temperature=1.0 ...]`: on-policy pairs + provenance."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import prefopt  # noqa: F401 - registers the config resolvers
from prefopt import compose
from prefopt.config import conf_dir
from prefopt.mathloop.jobs import pairs_job


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
@compose.entry
def main(cfg: DictConfig) -> None:
    plan = compose.build(cfg)
    pairs_job(plan.loop, plan.model, plan.data, plan.hardware, plan.run_dir("outputs/pairs"))


if __name__ == "__main__":
    main()

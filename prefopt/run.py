"""`python -m prefopt.run [group=option ...] [key=value ...]`: one preference-optimization run (or a sweep with -m).

An entry point only: the config goes through the composition root (`prefopt.compose.build`) and the plan to
`prefopt.training.train`. `validate=true` reports every problem (data rows included) and loads no model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

import prefopt  # noqa: F401 - registers the config resolvers
from prefopt import compose, training
from prefopt.config import conf_dir


def train(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    """Compose `cfg` into a plan and train it (what the Hydra main does; tests call it directly)."""
    return training.train(compose.build(cfg), run_dir)


def validate(cfg: DictConfig) -> None:
    """Print every problem of the config, its files and data rows; exit 2 when there is any."""
    _, found = compose.collect(cfg, read_data=True)
    print(compose.report(found))
    if found:
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
@compose.entry
def main(cfg: DictConfig) -> float | None:
    if cfg.get("validate") is True:
        validate(cfg)
        return None
    summary = train(cfg)
    if summary.get("rank", 0) != 0:
        return None
    return summary["metrics"].get("eval/loss")  # the objective a Hydra sweeper minimises


if __name__ == "__main__":
    compose.quiet_other_ranks()
    main()

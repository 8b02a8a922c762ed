"""`python -m prefopt.reference [overrides]`: build the reference log-prob cache of a run as its own job.

The same inputs as `python -m prefopt.run` with the same overrides (warm-up, pairs, tokenization), then one
no-grad pass of the initial policy; no training. `reference_cache=DIR` (default: auto) says where.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import prefopt  # noqa: F401 - registers the config resolvers
from prefopt import compose, training
from prefopt.config import conf_dir
from prefopt.refcache import cache_dir


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
@compose.entry
def main(cfg: DictConfig) -> None:
    plan = compose.build(cfg)
    directory = plan.reference_cache or cache_dir("auto", plan.loss)
    assert directory is not None  # "auto" is a directory for a loss with a reference (cache_dir refuses others)
    result = training.build_reference_cache(plan, directory)
    print(f"prefopt: reference log-probs of {result['pairs']} pairs -> {result['path']}")


if __name__ == "__main__":
    main()

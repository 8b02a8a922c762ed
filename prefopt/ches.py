"""`python -m prefopt.ches data=jsonl data.source.path=FILE [model=... policy=DIR]`: CHES of every pair in a file.

Scores each pair of `data.source.path` by its centered hidden embedding similarity under the model (or the
saved policy `policy=DIR`), tokenized as a preference run with the same `data.*` settings tokenizes it
(`prefopt.ches_scores`, docs/ches.md). Writes `<stem>.ches.jsonl` beside a local file (the run directory's
`pairs.ches.jsonl` for a hub data set): the rows as they were plus `ches` and `ches_length_normalized`, a pair
file that `data.drop_top_ches` reads without loading a model; and `<that file>.provenance.json`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import prefopt  # noqa: F401 - registers the config resolvers
from prefopt import compose
from prefopt.ches_scores import score_file, scored_path
from prefopt.config import conf_dir
from prefopt.errors import ConfigError
from prefopt.mathloop.fingerprints import weights_id


def ches_job(plan, run_dir) -> dict:
    """Load the starting policy, score the plan's pair file; returns the provenance record."""
    if not hasattr(plan.data, "fields"):
        raise ConfigError("prefopt.ches scores a pair file: choose data=jsonl data.source.path=FILE (or data=hub)")
    hw = plan.hardware.setup()
    spec = plan.loop.start_spec(plan.model)
    model, tokenizer = plan.loop.load(spec, hw)
    out = scored_path(plan.data, run_dir)
    tokenize = dict(plan.tokenize, completion_eos=spec.completion_eos)
    record = score_file(model, tokenizer, plan.data, tokenize, out, {"model": weights_id(spec), "tokenize": tokenize})
    counts = record["ches"]
    print(
        f"prefopt: CHES of {counts['scored']} of {counts['pairs']} pairs -> {out} (provenance: {out}.provenance.json)"
    )
    hw.teardown()
    return record


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
@compose.entry
def main(cfg: DictConfig) -> None:
    plan = compose.build(cfg)
    ches_job(plan, plan.run_dir("outputs/ches"))


if __name__ == "__main__":
    main()

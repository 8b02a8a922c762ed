"""On-policy preference pairs from verified samples: chosen = verified correct, rejected = verified wrong.

The pairs stage of the verified-math loop (`python -m prefopt.pairs policy=DIR`) samples k completions per prompt from
a policy (`prefopt.generate`),
checks each final answer with `prefopt.verify.AnswerChecker`, and hands prompts, samples and verdicts to
`build_pairs`; `write_pairs` writes a JSONL file that `data=jsonl data.source.path=...` reads, with its
provenance beside it. A preference run does the same through `prefopt.mathloop.loop`, cached.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Any, Literal

from prefopt.errors import ConfigError, DataError
from prefopt.io import atomic_write_text
from prefopt.mathloop.benchmarks import BenchmarkSpec


@dataclass
class PairStats:
    """What pair building saw and kept. correct + wrong + no_answer + timeout + error == samples."""

    prompts: int = 0
    samples: int = 0
    correct: int = 0
    wrong: int = 0
    no_answer: int = 0
    timeout: int = 0
    error: int = 0
    dropped_all_correct: int = 0
    dropped_all_wrong: int = 0
    pairs: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PairsConfig:
    """`pairs:` in conf/mathloop.yaml: what to sample, and from which problems."""

    k: int = 8  # completions per prompt
    temperature: float = 0.7
    seed: int = 0
    max_pairs_per_prompt: Any = 1  # an integer, or "all"
    eval_size: int = 32  # pairs held out (the file's last ones) for the preference run's eval metrics
    # Problems with gold answers; path null: the generated arithmetic problems of the run's data config.
    path: str | None = None
    split: str | None = "train"
    problem_field: str = "problem"
    answer_field: str = "answer"
    answer_transform: str | None = None
    limit: int | None = None
    output: str | None = None  # the pairs entry point's file (null: pairs.jsonl in its run directory)
    labeler: Any = (
        None  # how samples become pairs (conf/pairs/labeler/: verifier | reward_model; prefopt.mathloop.labelers)
    )
    ches: bool = False  # score each pair by CHES under the sampling policy (prefopt.ches_scores), in its row

    def __post_init__(self):
        validate_sampling(self.k, self.temperature)
        validate_pair_limit(self.max_pairs_per_prompt)
        if self.eval_size < 0:
            raise ConfigError(f"pairs.eval_size must be >= 0 (got {self.eval_size})")
        if not isinstance(self.ches, bool):
            raise ConfigError(f"pairs.ches must be true or false (got {self.ches!r})")

    def problems(self):
        """The BenchmarkSpec of `path` (None when the problems are the generated arithmetic ones)."""
        if self.path is None:
            return None
        return BenchmarkSpec(
            name="pairs",
            path=self.path,
            split=self.split,
            problem_field=self.problem_field,
            answer_field=self.answer_field,
            answer_transform=self.answer_transform,
            limit=self.limit,
            key="pairs",
        )

    def fingerprint(self) -> dict:
        """What the pairs depend on (not eval_size or output: they only split or place the same file)."""
        d = asdict(self)
        for name in ("eval_size", "output"):
            d.pop(name)
        d["labeler"] = self.labeler.fingerprint() if self.labeler is not None else None
        if not self.ches:  # part of the key only when on (the keys of pair files without scores stay valid)
            d.pop("ches")
        return d


def validate_sampling(k: Any, temperature: Any, key: str = "pairs") -> None:
    """Refuse sampling settings that cannot give a prompt both a right and a wrong sample (`key`: the config node)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ConfigError(
            f"{key}.k must be an integer >= 2 (a pair needs two different samples of one prompt), got {k!r}"
        )
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ConfigError(
            f"{key}.temperature must be > 0 (at temperature 0 all k samples of a prompt are the same), "
            f"got {temperature!r}"
        )


def validate_pair_limit(limit: Any, name: str = "pairs.max_pairs_per_prompt") -> None:
    """Refuse a per-prompt pair limit that is neither an integer >= 1 nor "all" (`name`: the config key)."""
    if limit != "all" and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"{name} must be an integer >= 1 or 'all', got {limit!r}")


def _status(verdict: Any, where: str) -> str:
    status = getattr(verdict, "status", None)
    if status not in ("correct", "wrong", "no_answer", "timeout", "error"):
        raise DataError(f"{where}: expected a Verdict with a status, got {verdict!r}")
    return status


def build_pairs(
    prompts: Sequence[Any],
    samples: Sequence[Sequence[str]],
    verdicts: Sequence[Sequence[Any]],
    seed: int | random.Random = 0,
    max_pairs_per_prompt: int | Literal["all"] = 1,
) -> tuple[list[dict], PairStats]:
    """Pairs (chosen verified correct, rejected not) from each prompt's k samples, and their counts.

    `samples[i]` and `verdicts[i]` are prompt i's completions and their `Verdict`s; no_answer, timeout
    and error count as wrong. A prompt whose samples are all correct or all wrong gives no pair and is
    counted as dropped. Each prompt gives up to `max_pairs_per_prompt` distinct (chosen, rejected) pairs
    drawn at random (`seed`: an int or a `random.Random`), or every combination with "all".
    """
    if len(samples) != len(prompts) or len(verdicts) != len(prompts):
        raise DataError(
            f"build_pairs got {len(prompts)} prompts, {len(samples)} sample lists and {len(verdicts)} verdict lists"
        )
    limit = max_pairs_per_prompt
    validate_pair_limit(limit)
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)

    stats = PairStats(prompts=len(prompts))
    pairs: list[dict] = []
    for i, (prompt, completions, checks) in enumerate(zip(prompts, samples, verdicts)):
        if len(completions) != len(checks):
            raise DataError(f"prompt {i}: {len(completions)} samples but {len(checks)} verdicts")
        right: list[int] = []
        wrong: list[int] = []
        for j, verdict in enumerate(checks):
            status = _status(verdict, f"prompt {i}, sample {j}")
            setattr(stats, status, getattr(stats, status) + 1)
            (right if status == "correct" else wrong).append(j)
        stats.samples += len(completions)
        if not wrong:
            stats.dropped_all_correct += 1
            continue
        if not right:
            stats.dropped_all_wrong += 1
            continue

        # Distinct texts only: k samples often repeat a completion, and a repeated pair is not new signal.
        combos, seen = [], set()
        for c, r in product(right, wrong):
            key = (completions[c], completions[r])
            if key not in seen and key[0] != key[1]:
                seen.add(key)
                combos.append((c, r))
        if limit != "all" and len(combos) > limit:
            combos = rng.sample(combos, limit)
        for c, r in combos:
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": completions[c],
                    "rejected": completions[r],
                    "pair_id": f"{i}-{c}-{r}",
                    "prompt_index": i,
                    "chosen_index": c,
                    "rejected_index": r,
                }
            )
    stats.pairs = len(pairs)
    return pairs, stats


def provenance_path(path: str | os.PathLike) -> Path:
    """Where `write_pairs` puts the provenance of the pairs file `path`: `<path>.provenance.json`."""
    path = Path(path)
    return path.with_name(path.name + ".provenance.json")


def write_pairs(
    path: str | os.PathLike,
    pairs: Sequence[dict],
    provenance: dict,
    stats: PairStats | None = None,
) -> Path:
    """Write pairs as JSONL rows {prompt, chosen, rejected, pair_id} and `<path>.provenance.json` beside them.

    `provenance` says what made them (policy, k, temperature, seed, ...); `stats` adds the counts under
    "counts". Returns the provenance file's path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # chosen/rejected_score: reward-model pairs; ches*: pairs.ches=true (prefopt.ches_scores)
    kept = (
        "prompt",
        "chosen",
        "rejected",
        "pair_id",
        "chosen_score",
        "rejected_score",
        "ches",
        "ches_length_normalized",
    )
    lines = [json.dumps({k: p[k] for k in kept if k in p}, ensure_ascii=False) for p in pairs]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    record = dict(provenance)
    record["file"] = path.name
    record["num_pairs"] = len(pairs)
    if stats is not None:
        record["counts"] = stats.as_dict()
    meta = provenance_path(path)
    atomic_write_text(meta, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return meta


def sample_pairs(
    generator,
    rows: Sequence[dict],
    prompts: Sequence[str],
    config: PairsConfig,
    labeler,
    context,
) -> tuple[list[dict], Any, dict]:
    """Sample `config.k` completions of each prompt and let `labeler` turn them into pairs.

    `prompts[i]` is row i's problem rendered the way the preference run will render it (so the samples
    are on-policy for that run); the pairs keep the raw problem text as their `prompt`. `labeler` is a
    `prefopt.mathloop.labelers` object and `context` its `LabelContext`. Returns (pairs, stats, extra
    counts for the provenance).
    """
    validate_sampling(config.k, config.temperature)
    if len(rows) != len(prompts):
        raise DataError(f"sample_pairs got {len(rows)} problems but {len(prompts)} prompts")
    done = generator.generate(list(prompts), n=config.k, temperature=config.temperature, seed=config.seed)
    pairs, stats, extra = labeler.label(rows, done.texts, context)
    return pairs, stats, {"unfinished_samples": done.unfinished, **extra}

"""The judged evaluation: the policy's greedy answers vs a baseline's on a prompt set, judged pairwise.

Prompts come from a local JSONL/Parquet file or a hub id (`evaluation.judge.prompts`, field
`evaluation.judge.prompt_field`), else from the run's held-out generated problems. The baseline is a file of
reference answers (row order = prompt order) or the starting policy's greedy answers. The judge
(`prefopt.mathloop.judging.judges`) gives a preference per prompt; `prefopt.mathloop.judging.win_rates` the win rates
with 95%
intervals. Per-prompt rows (prompt, both answers, lengths, preference, the judge's scores or verdicts) go to
`<run_dir>/judged.jsonl`; metrics are `<prefix>/win_rate`, `<prefix>/lc_win_rate`, ... (`eval/judge/...`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from prefopt.data.rows import read_rows
from prefopt.errors import ConfigError, DataError
from prefopt.io import atomic_write_text
from prefopt.mathloop.judging.win_rates import judged_stats

log = logging.getLogger("prefopt")


def _field_values(path: str, split: str, name: str, key: str, limit: int | None) -> list[str]:
    read = read_rows(path, split)
    numbered = read.numbered[:limit] if limit is not None else read.numbered
    out = []
    for i, row in numbered:
        value = row.get(name) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{read.source}: row {i}: no text field {name!r} ({key}={name})")
        out.append(value)
    if not out:
        raise DataError(f"{read.source}: no rows")
    return out


def judge_prompts(settings, generated: Sequence[dict]) -> list[str]:
    """The prompt texts: `settings.prompts`' prompt field, else the generated problems; at most `limit`."""
    if settings.prompts is None:
        rows = list(generated)[: settings.limit] if settings.limit is not None else list(generated)
        if not rows:
            raise ConfigError("evaluation.judge.prompts: this run generates no problems; set a prompt file")
        return [r["problem"] for r in rows]
    return _field_values(
        settings.prompts, settings.split, settings.prompt_field, "evaluation.judge.prompt_field", settings.limit
    )


def reference_answers(settings, count: int) -> list[str] | None:
    """The baseline file's answers for the first `count` prompts (None: the baseline is the starting policy)."""
    if settings.baseline is None:
        return None
    answers = _field_values(
        settings.baseline, "train", settings.baseline_field, "evaluation.judge.baseline_field", None
    )
    if len(answers) < count:
        raise DataError(f"{settings.baseline}: {len(answers)} reference answers for {count} prompts")
    return answers[:count]


def greedy_answers(generator, rendered: Sequence[str], seed: int = 0) -> list[str]:
    done = generator.generate(list(rendered), n=1, temperature=0.0, seed=seed)
    return [texts[0] for texts in done.texts]


def judged_evaluation(
    judge,
    prompts: Sequence[str],
    policy: Sequence[str],
    baseline: Sequence[str],
    device,
    out_path: Path | None,
    prefix: str = "eval/judge",
) -> tuple[dict, dict]:
    """(metrics, details) of `judge` on the answers; per-prompt rows to `out_path` (JSONL)."""
    verdicts = judge.judge(prompts, policy, baseline, device)
    lengths = [len(a) for a in policy], [len(b) for b in baseline]
    stats = judged_stats([v["preference"] for v in verdicts], *lengths, resamples=judge.resamples, seed=judge.seed)
    if out_path is not None:
        rows = [
            {
                "index": i,
                "prompt": p,
                "policy": a,
                "baseline": b,
                "policy_length": len(a),
                "baseline_length": len(b),
                **v,
            }
            for i, (p, a, b, v) in enumerate(zip(prompts, policy, baseline, verdicts))
        ]
        atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    log.info(
        "%s: win rate %.3f [%.3f, %.3f], length-controlled %.3f [%.3f, %.3f] over %d prompts (lengths %.0f vs %.0f)",
        prefix,
        stats.win_rate,
        stats.win_rate_low,
        stats.win_rate_high,
        stats.lc_win_rate,
        stats.lc_win_rate_low,
        stats.lc_win_rate_high,
        stats.prompts,
        stats.policy_length,
        stats.baseline_length,
    )
    return stats.metrics(prefix), {**judge.describe(), **asdict(stats)}

"""Where the DCR miniature's held-out reward accuracy comes from: the same accuracy, split by kind of pair.

    python scripts/dcr_pair_kinds.py outputs/dcr_mini/study-...        # every run of a finished sweep
    python scripts/dcr_pair_kinds.py RUN_DIR [RUN_DIR...]

For each finished run it reads the held-out pairs the run was evaluated on (the last `pairs.eval_size` pairs of its
cached pair file, `summary.json` → mathloop.pairs.path), the reference (its warm-up policy) and its trained policy
(`RUN/final`), and recomputes the reward accuracy, 1[(log π − log π_ref)(chosen) > (log π − log π_ref)(rejected)],
with the run's own rendering (its Hydra overrides, composed again). Each pair is one of:

- `miscopy`: the rejected answer states the right operands and boxes the first operand instead of its own result
  (the systematic mistake `data.source.miscopied` puts into the warm-up's SFT targets);
- `arithmetic`: both answers state the prompt's operands and box their own result, which differs: only the sum
  tells them apart;
- `other`: anything else (a restated operand or result that differs, a malformed answer).

The table gives, per setting (the overrides except `seed`), the share of each kind and its reward accuracy, the mean
over seeds with the pooled count; `all` reproduces the run's `eval/rewards/accuracies`. A second table sorts the
starting policy's wrong greedy answers on `arith` (`RUN/verified_before/arith.jsonl`) the same way and gives the share
of each kind the trained policy solves (`RUN/verified/arith.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

ANSWER = re.compile(r"(-?\d+) ([+\-*]) (-?\d+) = (-?\d+)\. The answer is \\boxed\{(-?\d+)\}\.$")
PROMPT = re.compile(r"What is (-?\d+) ([+\-*]) (-?\d+)\?$")
KINDS = ("miscopy", "arithmetic", "other")


def worked(prompt: str, text: str) -> tuple[str, str, str] | None:
    """(stated result, boxed answer, first operand) of a worked answer that states `prompt`'s operands, else None."""
    q, a = PROMPT.search(prompt.strip()), ANSWER.match(text.strip())
    if not (q and a) or a.groups()[:3] != q.groups():
        return None
    return a.group(4), a.group(5), q.group(1)


def answer_kind(prompt: str, output: str) -> str:
    """The kind of one worked answer to `prompt`: `miscopy` (it states the prompt's operands and boxes the first one,
    not the result it states), `arithmetic` (it states the prompt's operands and boxes the result it states, right or
    wrong), `other`."""
    parsed = worked(prompt, output)
    if parsed is None:
        return "other"
    stated, boxed, first = parsed
    if boxed == first and stated != boxed:
        return "miscopy"
    return "arithmetic" if stated == boxed else "other"


def kind(prompt: str, chosen: str, rejected: str) -> str:
    """The kind of a (correct, wrong) pair of worked answers to `prompt` (see the module docstring)."""
    c = worked(prompt, chosen)
    if c is None or worked(prompt, rejected) is None:
        return "other"
    r = answer_kind(prompt, rejected)
    if r == "miscopy":
        return "miscopy"
    return "arithmetic" if r == "arithmetic" and c[0] == c[1] else "other"


def fixed_kinds(run: Path, benchmark: str = "arith") -> dict[str, list[bool]] | None:
    """{kind: [now solved, per problem the starting policy failed]} from the run's per-problem files."""
    before, after = run / "verified_before" / f"{benchmark}.jsonl", run / "verified" / f"{benchmark}.jsonl"
    if not (before.is_file() and after.is_file()):
        return None
    out: dict[str, list[bool]] = defaultdict(list)
    for b, a in zip(*([json.loads(line) for line in f.read_text().splitlines()] for f in (before, after))):
        if not b["correct"]:
            out[answer_kind(b["problem"], b["output"])].append(bool(a["correct"]))
    return out


def runs_of(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if (p / "summary.json").is_file():
            out.append(p)
        else:  # a sweep: its runs 0, 1, ..., 10, ... in launch order
            out.extend(
                sorted((d for d in p.iterdir() if (d / "summary.json").is_file()), key=lambda d: (len(d.name), d.name))
            )
    return out


def run_kinds(run: Path) -> tuple[str, dict[str, list[bool]]]:
    """(setting, {kind: [reward-accurate per held-out pair]}) of one finished run."""
    import torch
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt import compose
    from prefopt.config import conf_dir
    from prefopt.data.batching import collate, tokenize_pairs
    from prefopt.data.sources import PreferencePair
    from prefopt.logprobs import plain_sequence_logps

    summary = json.loads((run / "summary.json").read_text())
    overrides = [o for o in summary["overrides"] if not o.startswith(("hydra.", "train.progress", "warmup.progress"))]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hcompose("config", overrides=overrides)
    plan = compose.build(cfg)
    loop = summary["mathloop"]
    eval_size = summary["data"]["tokenize"]["eval"]["pairs"]
    rows = [json.loads(line) for line in (ROOT / loop["pairs"]["path"]).read_text().splitlines()][-eval_size:]
    reference = ROOT / loop["warmup"]["path"] / "policy"
    tokenizer = AutoTokenizer.from_pretrained(reference)
    pairs = [
        PreferencePair(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], pair_id=r["pair_id"])
        for r in rows
    ]
    args = dict(plan.loop.tokenize, completion_eos=plan.model.completion_eos)
    tokenized, _ = tokenize_pairs(pairs, tokenizer, **args)

    def margins(path: Path) -> torch.Tensor:
        model, out = AutoModelForCausalLM.from_pretrained(path).eval(), []
        with torch.no_grad():
            for i in range(0, len(tokenized), 50):
                batch = collate(tokenized[i : i + 50], tokenizer.pad_token_id)
                logps, _ = plain_sequence_logps(model, batch)
                out.append(logps[: batch.num_pairs] - logps[batch.num_pairs :])
        return torch.cat(out)

    won = (margins(run / "final") - margins(reference) > 0).tolist()
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for r, w in zip(rows, won):
        by_kind[kind(r["prompt"], r["chosen"], r["rejected"])].append(w)
        by_kind["all"].append(w)
    setting = " ".join(o for o in summary["overrides"] if o.split("=")[0] in ("loss", "lr", "epochs")) or "default"
    return setting, by_kind


def by_setting(results: list[tuple[str, dict[str, list[bool]]]]) -> dict[str, list[dict[str, list[bool]]]]:
    """The runs' {kind: outcomes} grouped by setting (the seeds of one setting together), in first-seen order."""
    grouped: dict[str, list[dict[str, list[bool]]]] = defaultdict(list)
    for setting, outcomes in results:
        grouped[setting].append(outcomes)
    return grouped


def fixed_table(results: list[tuple[str, dict[str, list[bool]]]]) -> str:
    """Per setting: the starting policy's wrong answers by kind (per seed) and the share of each the run solves."""
    grouped = by_setting(results)
    lines = [
        "| setting | seeds | " + " | ".join(f"{k}: wrong before, solved after" for k in KINDS) + " |",
        "|---" * (2 + len(KINDS)) + "|",
    ]
    for setting, runs in grouped.items():
        cells = []
        for k in KINDS:
            wrong, solved = sum(len(r.get(k, [])) for r in runs), sum(sum(r.get(k, [])) for r in runs)
            cells.append(f"{wrong / len(runs):.0f}, {solved / wrong:.0%}" if wrong else "0, -")
        lines.append(f"| {setting} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: list[tuple[str, dict[str, list[bool]]]]) -> str:
    """Per setting: each kind's share of the held-out pairs (pooled) and its reward accuracy (mean over seeds)."""
    grouped = by_setting(results)
    lines = [
        "| setting | seeds | held-out pairs | "
        + " | ".join(f"{k}: share, reward acc" for k in KINDS)
        + " | all: reward acc |",
        "|---" * (4 + len(KINDS)) + "|",
    ]
    for setting, runs in grouped.items():
        n = sum(len(r["all"]) for r in runs)
        cells = []
        for k in (*KINDS, "all"):
            count = sum(len(r.get(k, [])) for r in runs)
            accs = [sum(r[k]) / len(r[k]) for r in runs if r.get(k)]
            acc = f"{sum(accs) / len(accs):.2f}" if accs else "-"
            cells.append(acc if k == "all" else f"{count / n:.0%}, {acc}")
        lines.append(f"| {setting} | {len(runs)} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dcr_study import machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="finished runs, or sweep directories holding them")
    args = ap.parse_args(argv)
    runs = runs_of(args.dirs)
    if not runs:
        print(f"dcr_pair_kinds: no finished run (summary.json) under {' '.join(args.dirs)}", file=sys.stderr)
        return 1
    results = [run_kinds(run) for run in runs]
    fixed = [(setting, f) for (setting, _), f in zip(results, map(fixed_kinds, runs)) if f is not None]
    print(f"## Held-out reward accuracy by kind of pair, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print(f"- machine: {machine()}")
    print(f"- command: `python scripts/dcr_pair_kinds.py {' '.join(args.dirs)}`\n")
    print(table(results))
    if fixed:
        print(
            "\nThe starting policy's wrong greedy answers on `arith` by kind (mean count per seed), and the share of "
            "them each run solves:\n"
        )
        print(fixed_table(fixed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

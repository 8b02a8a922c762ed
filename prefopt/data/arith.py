"""The embedded default data: synthetic, verifiable arithmetic with answers in `\\boxed{}` form.

It is the CPU-scale analogue of the math reasoning sets of the BPO paper: every problem has an exact answer,
so a verifier can label sampled solutions, and chosen/rejected pairs are (correct, wrong) worked answers.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from prefopt.data.sources import PreferencePair
from prefopt.errors import ConfigError

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def worked_answer(a: int, op: str, b: int, result: int, boxed: int | None = None) -> str:
    """The worked answer `a op b = result`, boxing `result` (or `boxed`: a miscopied final answer)."""
    return f"{a} {op} {b} = {result}. The answer is \\boxed{{{result if boxed is None else boxed}}}."


def wrong_result(rng: random.Random, correct: int) -> int:
    """A plausible mistake: off by one or ten, or a swapped/mistyped last digit."""
    delta = rng.choice([-10, -2, -1, 1, 2, 10])
    return correct + delta


def plausible_mistakes(a: int, op: str, b: int) -> list[int]:
    """The distinct wrong results a worked answer of `a op b` plausibly boxes: off by one, two or ten, an operand
    copied instead of the result, the other operator's result (a sign slip); sorted."""
    right = solve(a, op, b)
    other = solve(a, "-" if op == "+" else "+", b) if op in "+-" else a + b
    return sorted({right + d for d in (-10, -2, -1, 1, 2, 10)} | {a, b, other} - {right})


def noisy_working(rng: random.Random, a: int, op: str, b: int, max_operand: int) -> tuple[int, str, int, int]:
    """A restated working as an undertrained policy writes it: each operand miscopied half the time, the stated
    result that working's own value a third of the time and otherwise the true result with a slip of 0, ±1, ±2 or 10."""
    a2 = a if rng.random() < 0.5 else rng.randint(0, max_operand)
    b2 = b if rng.random() < 0.5 else rng.randint(0, max_operand)
    stated = solve(a2, op, b2) if rng.random() < 1 / 3 else solve(a, op, b) + rng.choice([-2, -1, 0, 0, 1, 2, 10])
    return a2, op, b2, stated


def problems(n: int, seed: int, max_operand: int, ops: str, exclude: set | None = None) -> list[tuple[int, str, int]]:
    """`n` distinct problems (a, op, b), none of them in `exclude`."""
    for op in ops:
        if op not in OPS:
            raise ConfigError(f"data.ops: unknown operator {op!r} (valid: {''.join(OPS)})")
    space = (max_operand + 1) ** 2 * len(ops)
    exclude = exclude or set()
    if n > space - len(exclude):
        raise ConfigError(
            f"data: {n} more distinct problems requested but only {space - len(exclude)} of the {space} with "
            f"max_operand={max_operand}, ops={ops!r} are left after the other splits ({len(exclude)}); lower "
            f"data.source.n_eval/n_val/n_pairs/n_train or raise data.source.max_operand"
        )
    rng, seen = random.Random(seed), set(exclude)
    out: list[tuple[int, str, int]] = []
    while len(out) < n:
        p = (rng.randint(0, max_operand), rng.choice(ops), rng.randint(0, max_operand))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def solve(a: int, op: str, b: int) -> int:
    return OPS[op](a, b)


@dataclass
class ArithmeticData:
    """Pairs (correct worked answer, wrong one) for train and held-out problems (`conf/data/arith.yaml`)."""

    n_train: int = 150
    n_eval: int = 50
    max_operand: int = 9
    ops: str = "+-"
    seed: int = 1234
    n_pairs: int = 0  # problems of their own for on-policy pair sampling (0: sample on the training problems)
    n_val: int = 0  # validation problems (the `arith_val` benchmark): in no other split, for choosing settings
    # Share of the training problems whose SFT target (the warm-up's, `sft_load`) boxes the first operand instead of
    # the result: a noisy SFT set, so the policy miscopies its final answer now and then, a systematic mistake the
    # checker catches and preference pairs can teach away. The preference pairs (`load`) and benchmarks stay clean.
    miscopied: float = 0.0

    def __post_init__(self):
        if (
            not isinstance(self.miscopied, (int, float))
            or isinstance(self.miscopied, bool)
            or not 0 <= self.miscopied <= 1
        ):
            raise ConfigError(f"data.source.miscopied must be a share between 0 and 1, got {self.miscopied!r}")

    def _fields(self, leave_out: tuple = ()) -> str:
        # n_val=0 and miscopied=0 leave the fingerprint (and so every cache key) of data made before they existed
        # unchanged
        return json.dumps(
            {k: v for k, v in self.__dict__.items() if k not in leave_out and (k not in ("n_val", "miscopied") or v)},
            sort_keys=True,
        )

    def fingerprint(self) -> str:
        return self._fields()

    def train_fingerprint(self) -> str:
        """What the training and held-out pairs depend on: the warm-up's key (pair and validation problems are
        drawn after them, so `n_pairs` and `n_val` leave a cached warm-up valid)."""
        return self._fields(leave_out=("n_pairs", "n_val"))

    def split_problems(self) -> tuple[list, list]:
        held = problems(self.n_eval, self.seed + 1, self.max_operand, self.ops)
        train = problems(self.n_train, self.seed, self.max_operand, self.ops, exclude=set(held))
        return train, held

    def pair_problems(self) -> list:
        """Problems for on-policy pair sampling: `n_pairs` of their own (neither train nor held out), else train."""
        train, held = self.split_problems()
        if not self.n_pairs:
            return train
        return problems(self.n_pairs, self.seed + 4, self.max_operand, self.ops, exclude=set(train) | set(held))

    def val_problems(self) -> list:
        """`n_val` validation problems, in neither train, held-out nor pair problems."""
        train, held = self.split_problems()
        taken = set(train) | set(held) | (set(self.pair_problems()) if self.n_pairs else set())
        return problems(self.n_val, self.seed + 5, self.max_operand, self.ops, exclude=taken)

    def problem_rows(self, split: str) -> list[dict]:
        """{problem, answer, index} rows (the shape of a benchmark file) of `split`: train, eval, pairs or val."""
        if split == "pairs":
            probs = self.pair_problems()
        elif split == "val":
            probs = self.val_problems()
        elif split in ("train", "eval"):
            probs = self.split_problems()[split == "eval"]
        else:
            raise ValueError(f"unknown split {split!r} (train, eval, pairs or val)")
        return [{"problem": question(*p), "answer": str(solve(*p)), "index": i} for i, p in enumerate(probs)]

    def miscopied_indices(self, n: int) -> set[int]:
        """Which of the `n` training problems get a miscopied answer: round(miscopied × n) of them, fixed by `seed`."""
        if not self.miscopied:
            return set()
        return set(random.Random(self.seed + 6).sample(range(n), round(self.miscopied * n)))

    def pairs(
        self, probs: list, seed: int, prefix: str, miscopied: set[int] | frozenset[int] = frozenset()
    ) -> list[PreferencePair]:
        rng = random.Random(seed)
        out = []
        for i, (a, op, b) in enumerate(probs):
            right = solve(a, op, b)
            chosen = worked_answer(a, op, b, right, boxed=a if i in miscopied else None)
            out.append(
                PreferencePair(
                    prompt=question(a, op, b),
                    chosen=chosen,
                    rejected=worked_answer(a, op, b, wrong_result(rng, right)),
                    pair_id=f"{prefix}{i}",
                )
            )
        return out

    def load(self, miscopy: bool = False) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, Any]]:
        """(train pairs, held-out pairs, counts); `miscopy`: a `miscopied` share of the training chosen answers box
        the first operand (the warm-up's noisy SFT targets, `sft_load`); preference pairs are always clean."""
        train, held = self.split_problems()
        picked = self.miscopied_indices(len(train)) if miscopy else set()
        return (
            self.pairs(train, self.seed + 2, "arith-train-", picked),
            self.pairs(held, self.seed + 3, "arith-eval-"),
            {"train": {"rows": len(train), "kept": len(train)}, "eval": {"rows": len(held), "kept": len(held)}},
        )

    def contrast_pairs(self, per_problem: int, seed: int) -> list[PreferencePair]:
        """Contrastive pairs on the training problems for a reward model (`reward.source=contrasts`).

        For each training problem, `per_problem` of its plausible mistakes (fewer where it has fewer), each twice:
        a clean pair (the correct worked answer against the same working with the mistake), and a pair whose workings
        are restated with noise (`noisy_working`; the rejected answer shares the chosen one's working half the time)
        while the boxes stay right and wrong. The answer checker reads only the box, so the second kind teaches a
        reward model to judge the box against the question, not the working: what it meets in a policy's samples."""
        rng, out = random.Random(seed), []
        for i, (a, op, b) in enumerate(self.split_problems()[0]):
            right, prompt = solve(a, op, b), question(a, op, b)
            mistakes = plausible_mistakes(a, op, b)
            rng.shuffle(mistakes)
            for j, wrong in enumerate(mistakes[:per_problem]):
                out.append(
                    PreferencePair(
                        prompt=prompt,
                        chosen=worked_answer(a, op, b, right),
                        rejected=worked_answer(a, op, b, wrong),
                        pair_id=f"arith-contrast-{i}-{j}",
                    )
                )
                working = noisy_working(rng, a, op, b, self.max_operand)
                other = working if rng.random() < 0.5 else noisy_working(rng, a, op, b, self.max_operand)
                out.append(
                    PreferencePair(
                        prompt=prompt,
                        chosen=worked_answer(*working, boxed=right),
                        rejected=worked_answer(*other, boxed=wrong),
                        pair_id=f"arith-contrast-{i}-{j}-noisy",
                    )
                )
        return out

    def sft_load(self) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, Any]]:
        """What the warm-up (SFT on the chosen answers) trains on: `load()` with the `miscopied` share applied."""
        return self.load(miscopy=True)

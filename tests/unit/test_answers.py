"""Answer checking as good as the Qwen2.5-Math harness: gold answers as MATH-500, OlympiadBench and Minerva write them.

Each gold, written back by a model as `\\boxed{gold}`, must verify; the same output against a near-miss gold must
not. The three golds math-verify alone marked wrong (`\\$18.90`, `\\$32,\\!348`, `$221,$8$`) come first
(docs/decisions.md#answer-checking).
"""

from __future__ import annotations

import pytest

from prefopt.answers import normalize_answer, same_answer
from prefopt.verify import AnswerChecker, check_answer

# (gold, a different gold the same output must not match, kind)
GOLDS = [
    (r"\$18.90", r"\$18.09", "money (MATH-500)"),
    (r"\$32,\!348", r"\$32,\!384", "money with thousands (MATH-500)"),
    (r"$221,$8$", r"$221,$9$", "multiple answers (OlympiadBench)"),
    (r"\$0.25", r"\$2.50", "money"),
    (r"\$1{,}000", r"\$10{,}000", "money with {,}"),
    (r"10{,}080", r"10{,}800", "{,} thousands"),
    (r"1,000,000", r"1,000,001", "plain comma thousands"),
    (r"5\text{ cm}", r"6\text{ cm}", "unit in \\text"),
    (r"12\text{ inches}", r"14\text{ inches}", "unit in \\text"),
    (r"50 \mathrm{~km}", r"40 \mathrm{~km}", "unit in \\mathrm (Minerva)"),
    (r"6 \mathrm{~m}^2", r"9 \mathrm{~m}^2", "squared unit"),
    (r"27^\circ", r"63^\circ", "degrees"),
    (r"120^{\circ}", r"60^{\circ}", "degrees in braces"),
    (r"10\%", r"20\%", "percentage"),
    (r"12.5\%", r"1.25\%", "percentage"),
    (r"\left[ -\frac{1}{2}, \frac{1}{2} \right]", r"\left( -\frac{1}{2}, \frac{1}{2} \right)", "interval"),
    (r"(-\infty, -4) \cup (4, \infty)", r"(-\infty, -4] \cup [4, \infty)", "union of intervals"),
    (r"[0, \infty)", r"(0, \infty)", "half-open interval"),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 \\ 4 & 3 \end{pmatrix}", "matrix"),
    (r"\begin{pmatrix} -1 \\ 3 \\ 5 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 3 \\ 5 \end{pmatrix}", "vector"),
    (r"2, -2", r"2, -3", "multiple answers"),
    (r"-1, 2, 3", r"-1, 2, 4", "multiple answers"),
    (r"\{1, 2, 3\}", r"\{1, 2, 4\}", "set"),
    (r"(1, -2)", r"(-2, 1)", "point"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{3} \right)", "polar point"),
    (r"\text{Evelyn}", r"\text{Angela}", "text answer"),
    (r"\text{(C)}", r"\text{(D)}", "choice letter"),
    (r"\text{odd}", r"\text{even}", "text answer"),
    (r"\text{Sunday}", r"\text{Monday}", "text answer"),
    (r"\frac{14}{3}", r"\frac{13}{3}", "fraction"),
    (r"\dfrac{9}{2}", r"\dfrac{7}{2}", "\\dfrac"),
    (r"\tfrac{1}{4}", r"\tfrac{1}{3}", "\\tfrac"),
    (r"-\frac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{2}", "fraction with sqrt"),
    (r"3\sqrt{13}", r"2\sqrt{13}", "sqrt"),
    (r"\sqrt{2}", r"\sqrt{3}", "sqrt"),
    (r"4\pi", r"2\pi", "pi"),
    (r"\frac{\pi}{4}", r"\frac{\pi}{3}", "pi"),
    (r"1.2 \times 10^{5}", r"1.2 \times 10^{6}", "scientific notation"),
    (r"7.5 \times 10^{-3}", r"7.5 \times 10^{-4}", "scientific notation (Minerva)"),
    (r"6 - 5i", r"6 + 5i", "complex number"),
    (r"x^2 + 7x + 10", r"x^2 + 7x + 12", "polynomial"),
    (r"y = 2x + 3", r"y = 2x - 3", "equation"),
    (r"p - q", r"q - p", "expression"),
    (r"\frac{1}{2} k T", r"\frac{3}{2} k T", "physics expression (Minerva)"),
    (r"2^{2016}", r"2^{2015}", "power (OlympiadBench)"),
    (r"0.5", r"0.25", "decimal"),
    (r"9", r"8", "integer"),
    (r"-2", r"2", "negative integer"),
    (r"0", r"1", "zero"),
]

# (model output, gold): equivalent, but not written the same way.
EQUIVALENT = [
    (r"\boxed{18.90}", r"\$18.90"),
    (r"\boxed{18.9}", r"\$18.90"),
    (r"The total is $\boxed{\$18.90}$.", r"18.90"),
    (r"\boxed{32348}", r"\$32,\!348"),
    (r"\boxed{32,348}", r"\$32,\!348"),
    (r"\boxed{221, 8}", r"$221,$8$"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\frac{1}{2}}", r"0.5"),
    (r"\boxed{\frac12}", r"\dfrac{1}{2}"),
    (r"\boxed{4.5}", r"\dfrac{9}{2}"),
    (r"\boxed{90}", r"90^\circ"),
    (r"\boxed{90^{\circ}}", r"90^\circ"),
    (r"\boxed{10}", r"10\%"),
    (r"\boxed{5}", r"5\text{ cm}"),
    (r"\boxed{5 \text{ centimeters}}", r"5\text{ cm}"),
    (r"\boxed{10080}", r"10{,}080"),
    (r"\boxed{[0,\infty)}", r"\left[0, \infty\right)"),
    (r"\boxed{\text{Evelyn}}", r"Evelyn"),
    (r"\boxed{evelyn}", r"\text{Evelyn}"),
    (r"\boxed{\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}}", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"),
    (r"\boxed{x = 5}", r"5"),
    (r"\boxed{120000}", r"1.2 \times 10^{5}"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{2\sqrt{3}.}", r"2\sqrt{3}"),
]


def _box(gold: str) -> str:
    return f"So the final answer is $\\boxed{{{gold}}}$."


@pytest.mark.parametrize("gold,other,kind", GOLDS, ids=[f"{i}-{k}" for i, (_, _, k) in enumerate(GOLDS)])
def test_the_gold_written_back_verifies_and_a_different_gold_does_not(gold, other, kind):
    right = check_answer(_box(gold), gold)
    assert right.correct and right.status == "correct", (gold, right)
    assert right.extracted == gold
    wrong = check_answer(_box(gold), other)
    assert not wrong.correct and wrong.status == "wrong", (gold, other, wrong)


def test_there_are_at_least_40_golds_of_every_kind_asked_for():
    kinds = " ".join(k for _, _, k in GOLDS)
    assert len(GOLDS) >= 40
    for kind in (
        "money",
        "unit",
        "degrees",
        "interval",
        "matrix",
        "multiple answers",
        "text",
        "fraction",
        "sqrt",
        "pi",
        "percentage",
        "scientific",
        "set",
    ):
        assert kind in kinds, kind


@pytest.mark.parametrize("output,gold", EQUIVALENT)
def test_equivalent_forms_verify(output, gold):
    verdict = check_answer(output, gold)
    assert verdict.correct, (output, gold, verdict)


def test_the_reported_golds_through_the_checker_pool():
    # The path `prefopt.evaluate` takes: worker processes, each running check_answer.
    golds = [r"\$18.90", r"\$32,\!348", r"$221,$8$"]
    with AnswerChecker(timeout_s=10, workers=1) as checker:
        verdicts = checker.check_many([_box(g) for g in golds] + [_box(r"\$18.09")], golds + [r"\$18.90"])
    assert [v.status for v in verdicts] == ["correct", "correct", "correct", "wrong"]


@pytest.mark.parametrize(
    "answer,normal",
    [
        (r"\$32,\!348", "32348"),
        (r"$221,$8$", "221,8"),
        (r"10{,}080", "10080"),
        (r"1,000", "1000"),
        (r"1,5", "1,5"),  # not a thousands group: two answers (or a decimal comma) stay as written
        (r"90^{\circ}", "90"),
        (r"25^\circ\text{C}", "25"),
        (r"12.5\%", "12.5"),
        (r"5\text{ cm}", "5"),
        (r"\text{Evelyn}", "Evelyn"),
        (r"\left( 3, \dfrac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"\begin{bmatrix} 1 \\ 2 \end{bmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),  # `\\` is a row break, kept
        (r"x = 5.", "5"),
        (r"2.00", "2"),
        (r"18.90", "18.90"),
        (r".5", "0.5"),
        (r"\frac12", r"\frac{1}{2}"),
        (r"\sqrt3", r"\sqrt{3}"),
        (r"2\pi r", r"2\pi r"),  # the space that ends a command name stays
        (r"a \leq b", r"a\le b"),
    ],
)
def test_normalize_answer(answer, normal):
    assert normalize_answer(answer) == normal


def test_same_answer_needs_something_to_compare():
    assert not same_answer("", "")
    assert not same_answer(r"\$", "$")  # both normalise to nothing
    assert same_answer(r"\text{Yes}", "yes")
    assert not same_answer("x", "X")  # one letter is a variable: case matters; words ignore it

"""The answer checker: math-verify equivalences, no-answer outputs, and per-answer timeouts in the pool."""

from __future__ import annotations

import os
import threading
import time

import pytest

from prefopt.errors import ConfigError
from prefopt.mathloop.benchmarks import score
from prefopt.verify import AnswerChecker, Verdict, check_answer, extract_answer, last_boxed

TIMEOUT_S = 1.5


def _check_with_faults(output: str, gold: str) -> Verdict:
    """The real check, except for outputs that sleep past the timeout, raise, or kill their worker."""
    if output == "SLEEP":
        time.sleep(60)
    if output == "RAISE":
        raise RuntimeError("boom")
    if output == "CRASH":
        os._exit(3)
    return check_answer(output, gold)


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(timeout_s=TIMEOUT_S, workers=2, check_fn=_check_with_faults) as c:
        yield c


EQUIVALENT = [
    (r"So the answer is \boxed{1/2}.", "0.5"),
    (r"\boxed{1/2}", r"\frac{1}{2}"),
    (r"\boxed{\frac{1}{2}}", "0.5"),
    ("x=3", "3"),
    ("Solving, we get $x = 3$.", "3"),
    (r"\boxed{x = 3}", "3"),
    (r"\boxed{81}", "81"),
    (r"The total is \boxed{81}", "$81$"),
    (r"\boxed{\sqrt{2}}", r"\sqrt{2}"),
    (r"First \boxed{2}, but correcting: \boxed{4}", "4"),
]

WRONG = [
    (r"\boxed{1/3}", "0.5"),
    (r"\boxed{82}", "81"),
    ("x=4", "3"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{3}"),
    (r"\boxed{3} then \boxed{4}", "3"),  # the last box is the answer
]


def test_equivalent_forms_are_correct(checker):
    verdicts = checker.check_many([o for o, _ in EQUIVALENT], [g for _, g in EQUIVALENT])
    for (output, gold), v in zip(EQUIVALENT, verdicts):
        assert v == Verdict(True, "correct", v.extracted), (output, gold, v)
    assert verdicts[0].extracted == "1/2"
    assert verdicts[6].extracted == "81"


def test_wrong_answers_are_wrong(checker):
    verdicts = checker.check_many([o for o, _ in WRONG], [g for _, g in WRONG])
    assert [v.status for v in verdicts] == ["wrong"] * len(WRONG)
    assert not any(v.correct for v in verdicts)
    assert verdicts[1].extracted == "82"
    assert verdicts[4].extracted == "4"


def test_no_extractable_answer_is_counted_separately(checker):
    verdicts = checker.check_many(["I am not sure how to solve this.", "", r"\boxed{7}"], ["7", "7", "7"])
    assert verdicts[0] == Verdict(False, "no_answer", None)
    assert verdicts[1] == Verdict(False, "no_answer", None)
    counts = score(verdicts)
    assert counts["no_answer"] == 2 and counts["correct"] == 1 and counts["wrong"] == 0
    assert counts["accuracy"] == pytest.approx(1 / 3)


def test_timeout_counts_as_wrong_and_pool_keeps_working(checker):
    before = checker.timeouts
    outputs = [r"\boxed{1}", "SLEEP", r"\boxed{2}", r"\boxed{3}", r"\boxed{5}"]
    start = time.monotonic()
    verdicts = checker.check_many(outputs, ["1", "1", "2", "3", "4"])
    elapsed = time.monotonic() - start
    assert verdicts[1] == Verdict(False, "timeout", None)
    assert [v.status for v in verdicts] == ["correct", "timeout", "correct", "correct", "wrong"]
    assert checker.timeouts == before + 1
    assert elapsed < TIMEOUT_S + 5  # the sleeping check (60 s) was cut off, not waited for
    assert score(verdicts)["timeout"] == 1
    # The killed worker was replaced: later calls still use every worker and still time out properly.
    assert [v.status for v in checker.check_many([r"\boxed{9}"] * 6, ["9"] * 6)] == ["correct"] * 6
    assert checker.check("SLEEP", "1").status == "timeout"
    assert checker.check(r"\boxed{1/2}", "0.5").correct


def test_a_raising_or_crashing_check_is_an_error_not_a_failure(checker):
    verdicts = checker.check_many(["RAISE", r"\boxed{2}", "CRASH", r"\boxed{3}"], ["1", "2", "1", "3"])
    assert [v.status for v in verdicts] == ["error", "correct", "error", "correct"]
    assert checker.check(r"\boxed{4}", "4").correct


def test_checker_works_outside_the_main_thread(checker):
    # math-verify's own timeout (signal.alarm) raises here; the pool's does not.
    result = {}
    thread = threading.Thread(target=lambda: result.update(v=checker.check_many(["x=3", "SLEEP"], ["3", "3"])))
    thread.start()
    thread.join(timeout=30)
    assert [v.status for v in result["v"]] == ["correct", "timeout"]


def test_check_many_validates_lengths(checker):
    with pytest.raises(ValueError, match="2 outputs but 1 gold"):
        checker.check_many(["1", "2"], ["1"])
    assert checker.check_many([], []) == []


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="timeout_s"):
        AnswerChecker(timeout_s=0)
    with pytest.raises(ConfigError, match="workers"):
        AnswerChecker(workers=0)


def test_extract_answer():
    assert extract_answer(r"so $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{1} and finally \boxed{2}") == "2"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert extract_answer(r"\boxed{5} then \boxed{6") == "5"  # a box cut off mid-way does not count
    assert extract_answer(r"\fbox{7}") == "7"
    assert extract_answer(r"answer: \boxed 8$") == "8"
    assert extract_answer("Therefore x = 3") == "3"  # math-verify's own extraction
    assert extract_answer("no answer here") is None
    assert extract_answer(r"\boxed{}") is None
    assert last_boxed(r"\boxed{a{b}c} \boxedsomething") == "a{b}c"


def test_check_fn_by_name_and_a_bad_one():
    with AnswerChecker(timeout_s=TIMEOUT_S, workers=1, check_fn="prefopt.verify:check_answer") as c:
        assert c.check(r"\boxed{2}", "2") == Verdict(True, "correct", "2")
    with AnswerChecker(workers=1, check_fn="no_such_module:check") as c:
        with pytest.raises(RuntimeError, match="could not start: ModuleNotFoundError"):
            c.check("1", "1")


# Answers SmolLM2-135M-Instruct wrote to `What is a + b?` with the paper's \boxed{} instruction (experiment=smol_math),
# none of them with a filled box, each with the verdict a reader gives it: (output, gold, extracted, correct).
UNBOXED = [
    ("1. Add 10 to 30: 30 + 10 = 40\n\nSo, the answer is 40.", "40", "40", True),
    ("14 + 30 = 44\n\nThe answer is within \\boxed{}.", "44", "44", True),  # an empty box states nothing
    ("12 + 39 = 52\n\nThe answer is within \\boxed{}.", "51", "52", False),
    ("10 + 0 = 10\n\nThe answer is within the specified format.", "10", "10", True),
    ("1. 31 + 12 = 25\n2. 31 + 12 = 43\n\nSo, the answer is: 43", "43", "43", True),
    ("the sum of 40 and 31.\n2. 40 + 31 = 71\n\nSo, the answer is 40 + 31 = 71.", "71", "71", True),
    ("So, the final answer is 24 - 20 = 10.\n\nThe answer is 10.", "4", "10", False),
    # a restated question: math-verify evaluates `2 + 40` and would credit it
    ("1 + 40 = 2 + 40 = 2 + 40 = 2 + 40", "42", "40", False),
    ("we can add 14 to 4 again, which gives us 4.\n\nSo, the answer is 4 + 14", "18", "4", False),
    ("Now, we can add 26 and 12 using the formula for multiplication: 26 + 12 =", "38", "12", False),
    # math-verify alone reads `3` out of this
    (
        "The sum of 0 and 3 is 0, which is the only possible value that can be added to 3 to get 0.\n\n"
        "So, the answer is 0.\n\nThis is the only possible answer that can be added to 3 to get 0, which is 0.",
        "3",
        "0",
        False,
    ),
    ("The answer is 1,234.", "1234", "1234", True),
    ("so the probability is $\\frac{3}{8}$", "\\frac{3}{8}", "\\frac{3}{8}", True),  # LaTeX: math-verify's
]


@pytest.mark.parametrize("output,gold,extracted,correct", UNBOXED)
def test_unboxed_answers_are_read_as_the_harness_reads_them(output, gold, extracted, correct):
    verdict = check_answer(output, gold)
    assert (verdict.extracted, verdict.correct) == (extracted, correct)
    assert verdict.status == ("correct" if correct else "wrong")
    assert extract_answer(output) == extracted

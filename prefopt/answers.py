"""Answer strings normalised the way the Qwen2.5-Math evaluation harness normalises them before comparing.

The harness (QwenLM/Qwen2.5-Math `evaluation/parser.py`, `strip_string`, itself grown from Hendrycks' MATH
`is_equiv`) takes two answers as equal when their normalised strings are equal, before any symbolic test.
math-verify alone misses some of those: a gold `\\$18.90` or `\\$32,\\!348` (MATH-500) or `$221,$8$`
(OlympiadBench) does not parse, so even the identical output was marked wrong. `normalize_answer` removes what
carries no mathematical content (dollar signs, LaTeX spacing, thousands separators, `\\left`/`\\right`, a
trailing unit in `\\text{}`, degree signs, percent signs, a trailing full stop, spaces) and spells what has two
spellings one way (`\\dfrac` → `\\frac`, `bmatrix` → `pmatrix`, `\\leq` → `\\le`, `.5` → `0.5`).
The word lists of the harness (units of MathQA: `a`, `t`, `s`, ...) are left out: they also delete variables.
`last_boxed` finds the answer in a model output: the content of its last complete `\\boxed{}`.
"""

from __future__ import annotations

import re

# LaTeX spacing (thin/medium/thick/negative space, a control space, `~`) and style wrappers; a row break
# `\\\\` (matrices) is matched first so that its second backslash is not read as the start of `\ `.
_SPACING = re.compile(r"\\\\|\\[,:;! ]|~|\\q?quad(?![a-zA-Z])|\\displaystyle|\\textstyle")
# `\left(`, `\right]`, `\left.` (an invisible delimiter): the delimiter stays, the sizing goes.
_LEFT_RIGHT = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])(\.)?")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree")
# A trailing unit: `5\text{ cm}`, `18\mbox{ dollars}`, `3\,\mathrm{m}^2` (the number must remain).
_TRAILING_UNIT = re.compile(r"\\(?:text|textrm|mbox|mathrm)\s*\{[^{}]*\}(?:\^\{?\d\}?)?$")
_TEXT = re.compile(r"\\(?:text|textrm|textbf|mbox|mathrm)\s*\{([^{}]*)\}")
# A whole answer that is one number written with thousands commas: `32,348`, `-1,000,000.5`.
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
# `x = 3`, `k=5`, `a_1 = 2`: a name of at most two characters (or one with a subscript) on the left.
_NAME_EQ = re.compile(r"^[a-zA-Z](?:_\{?\w\}?|\w)?=(?!=)")
_COMMAND_SPACE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")  # \frac12
_SQRT_SHORT = re.compile(r"\\sqrt(\w)")  # \sqrt2, \sqrt x
_TRAILING_ZEROS = re.compile(r"(\d)\.0+(?=\D|$)")  # 5.00 -> 5 (the harness does the same; 18.90 stays)


def _strip_dollars(s: str) -> str:
    s = s.replace("\\$", "")  # money
    s = s.replace("$", "")  # math delimiters: `$221,$8$` is two answers, 221 and 8
    return s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")


def normalize_answer(answer: str) -> str:
    """The answer as the harness compares it: `\\$32,\\!348` → `32348`, `$221,$8$` → `221,8`."""
    s = str(answer).strip().replace("\n", " ")
    s = _strip_dollars(s)
    s = s.replace("{,}", ",")  # `10{,}000`: LaTeX's comma without the space after it
    s = _SPACING.sub(lambda m: m.group(0) if m.group(0) == "\\\\" else "", s)
    s = _LEFT_RIGHT.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("bmatrix", "pmatrix").replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\varnothing", "\\emptyset")
    s = s.strip().rstrip(".").strip()
    unitless = _TRAILING_UNIT.sub("", s).strip()
    if unitless:  # `\text{Evelyn}` alone is the answer, not a unit
        s = unitless
    s = _TEXT.sub(r"\1", s)
    s = _COMMAND_SPACE.sub("\\1\0", s)  # `\pi r` keeps one space: `\pir` would be another command
    s = re.sub(r"\s+", "", s).replace("\0", " ")
    s = s.rstrip(".")
    s = _NAME_EQ.sub("", s, count=1) if s.count("=") == 1 else s
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # .5 -> 0.5
    s = _TRAILING_ZEROS.sub(r"\1", s)
    return s


def same_answer(a: str, b: str) -> bool:
    """True when the two answers are equal after `normalize_answer` (words compared without case)."""
    na, nb = normalize_answer(a), normalize_answer(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    words = len(na) > 1 and na.isalpha() and nb.isalpha()  # `x` and `X` are different variables
    return words and na.casefold() == nb.casefold()


# ----------------------------------------------------------------------------------------------------------
# Extraction


_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _braced(text: str, start: int) -> int | None:
    """Index just past the `}` closing the `{` at `start`, or None when the braces never balance."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # an escaped character (`\{`, `\}`, `\\`) is not a group delimiter
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`) in `text`, else None.

    Braces are matched, so nested groups (`\\boxed{\\frac{1}{2}}`) come out whole; a box cut off before
    its closing brace (a truncated generation) does not count, nor does an empty one.
    """
    found: str | None = None
    i = 0
    while True:
        hits = [(text.find(cmd, i), cmd) for cmd in _BOX_COMMANDS]
        hits = [(pos, cmd) for pos, cmd in hits if pos >= 0]
        if not hits:
            return found
        pos, cmd = min(hits)
        j = pos + len(cmd)
        if j < len(text) and (text[j].isalpha()):  # `\boxedsomething` is another macro
            i = j
            continue
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _braced(text, j)
            if end is not None:
                content = text[j + 1 : end - 1].strip()
                if content:
                    found = content
                i = end
                continue
            i = j + 1
        elif j > pos + len(cmd):  # `\boxed 5`: the answer runs to the next space or `$`
            k = j
            while k < len(text) and not text[k].isspace() and text[k] != "$":
                k += 1
            if k > j:
                found = text[j:k]
            i = k
        else:
            i = j


# Answers without a box: the harness's order (QwenLM/Qwen2.5-Math `evaluation/parser.py`, `extract_answer`): the
# value after the last "the answer is", else the last number of the output. A number with thousands commas counts
# as one; a list marker `1.` ends at its digits.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])|-?\d+(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?\s*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\n|\.(?=\s|$)")  # a full stop, not a decimal point
# An expression of plain numbers and operators (`2 + 40`, `26 + 12 =`): a restated question or a working, not a value.
_PLAIN_ARITHMETIC = re.compile(r"^[-+]?\d[\d.,]*(?:\s*(?:[-+*/×÷=]|\\times|\\cdot|\\div)\s*[-+]?\d[\d.,]*)+\s*=?$")


def stated_answer(text: str) -> str | None:
    """The value stated after the last "the answer is" of `text`, else None: the number that starts the rest of
    its sentence, or, when the sentence is a working (`the answer is 3 + 12 = 15.`), the number after its last `=`.
    `So, the answer is 40.` → `40`; `The answer is within \\boxed{}.` states none."""
    hits = list(_ANSWER_IS.finditer(text))
    if not hits:
        return None
    sentence = _SENTENCE_END.split(text[hits[-1].end() :], maxsplit=1)[0]
    value = sentence.rsplit("=", 1)[-1].strip().lstrip("$").strip()
    number = _NUMBER.match(value)
    return number.group(0).replace(",", "") if number else None


def last_number(text: str) -> str | None:
    """The last number written in `text`, thousands commas removed; None when there is none."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def plain_arithmetic(answer: str) -> bool:
    """Whether `answer` is plain numbers joined by operators (`2 + 40`): an expression the output never evaluated.
    math-verify would evaluate it and credit a model that only restated the question."""
    return bool(_PLAIN_ARITHMETIC.match(answer.strip()))

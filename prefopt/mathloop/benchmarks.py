"""Math benchmark sets for evaluation: loading `problem`/`answer` rows, prompt templates, accuracy."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.data.rows import LOCAL_SUFFIXES, is_local, read_rows
from prefopt.errors import ConfigError, DataError
from prefopt.verify import last_boxed

log = logging.getLogger("prefopt")

# The instruction of Qwen2.5-Math's chain-of-thought evaluation (its `qwen25-math-cot` prompt type),
# which the Llama-3.1 template reuses so both families are asked for the same answer format.
COT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# `data`: the run's own prompt (data.system_prompt, the problem, data.user_suffix), the one training and pair
# sampling render (prefopt.data.batching.render_prompt), so all three stages see the same bytes.
PROMPT_FAMILIES = ("qwen_math", "llama3", "plain", "data")


# ----------------------------------------------------------------------------------------------------------
# Gold-answer transforms: small hooks named by `answer_transform` in conf/benchmark/*.yaml


def _gsm8k_answer(value: Any) -> Any:
    # GSM8K's `answer` is a worked solution ending in "#### 72"; the gold answer is what follows `####`.
    if not isinstance(value, str) or "####" not in value:
        raise ValueError("has no '#### <answer>' line")
    return value.rsplit("####", 1)[1].strip().replace(",", "")


def _boxed_answer(value: Any) -> Any:
    # Sets that store a full solution (MATH's `solution`): the gold answer is its last \boxed{}.
    boxed = last_boxed(value) if isinstance(value, str) else None
    if boxed is None:
        raise ValueError("has no \\boxed{} answer")
    return boxed


def _join_answer(value: Any) -> Any:
    # OlympiadBench stores `final_answer` as a list (several parts of one answer): join them.
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError("is an empty list or holds non-scalar items")
        return ", ".join(str(v) for v in value)
    return value


ANSWER_TRANSFORMS: dict[str, Callable[[Any], Any]] = {
    "gsm8k": _gsm8k_answer,
    "boxed": _boxed_answer,
    "join": _join_answer,
}


# ----------------------------------------------------------------------------------------------------------
# Loading


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


# Field layouts a benchmark file may come in: the Hugging Face hub copies (HuggingFaceH4/MATH-500, math-ai/amc23, ...)
# and the Qwen2.5-Math evaluation harness's `data/<name>/test.jsonl` files (what the BPO paper scored on). The first
# field of each list that the file's first row has is used.
PROBLEM_FIELDS = ("problem", "question")
# (field, transform): OlympiadBench's `final_answer` list; a plain `answer` (GSM8K's ends in '#### N', detected from
# the value); Minerva Math's harness file has only a worked `solution` whose last \boxed{} is the answer.
ANSWER_FIELDS = (("final_answer", "join"), ("answer", None), ("solution", "boxed"))


def detect_fields(
    row: dict, where: str, key: str, problem_field: str | None, answer_field: str | None, answer_transform: str | None
) -> tuple[str, str, str | None]:
    """(problem field, answer field, answer transform) of a file, from its first row; set fields are kept as set.

    A detected answer field brings its transform (`join` for `final_answer`, `gsm8k` for an answer with
    '#### N', `boxed` for a solution) unless `answer_transform` is set; an answer field that was set keeps
    `answer_transform` as is.
    """
    if problem_field is None:
        problem_field = next((f for f in PROBLEM_FIELDS if f in row), None)
    if answer_field is None:
        found = next(((f, t) for f, t in ANSWER_FIELDS if f in row), None)
        if found is not None:
            answer_field, detected = found
            value = row[found[0]]
            if detected is None and isinstance(value, str) and "####" in value:
                detected = "gsm8k"
            answer_transform = answer_transform or detected
    if problem_field is None or answer_field is None:
        raise DataError(
            f"{where}: cannot tell its layout (neither the Hugging Face nor the Qwen2.5-Math harness fields); "
            f"its rows have the fields {sorted(row)}: set {key}.problem_field and {key}.answer_field "
            f"(and {key}.answer_transform: {', '.join(sorted(ANSWER_TRANSFORMS))} or null)"
        )
    return problem_field, answer_field, answer_transform


def load_benchmark(
    path_or_id: str,
    split: str | None = None,
    problem_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
    subset: str | None = None,
    answer_transform: str | None = None,
    key: str = "benchmark",
) -> list[dict]:
    """Rows `{"problem", "answer", "index"}` of a benchmark: a local JSONL/JSON/Parquet file or a hub id.

    `split` and `subset` (the hub config name) apply to hub ids only (default split `test`).
    `problem_field` / `answer_field` null: detected per file (`detect_fields`, logged). `answer_transform`
    names a hook of ANSWER_TRANSFORMS (`gsm8k`, `boxed`, `join`) applied to the raw answer. A row whose
    problem or answer is missing, empty or not a string/number raises DataError naming the file, the
    1-based row and the field; `key` is the config key errors tell the user to set (e.g. benchmark.math500).
    """
    if not isinstance(path_or_id, str) or not path_or_id.strip():
        raise ConfigError(f"{key}.path must be a file path or a hub dataset id, got {path_or_id!r}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ConfigError(f"{key}.limit must be null or an integer >= 0, got {limit!r}")
    if answer_transform is not None and answer_transform not in ANSWER_TRANSFORMS:
        raise ConfigError(f"{key}.answer_transform {answer_transform!r} is not one of {sorted(ANSWER_TRANSFORMS)}")

    if is_local(path_or_id):
        path = Path(path_or_id).expanduser()
        if not (path.is_file() or path.is_dir()):
            raise DataError(f"benchmark file {path} does not exist ({key}.path)")
        if path.is_file() and path.suffix.lower() not in LOCAL_SUFFIXES:
            raise DataError(f"benchmark file {path}: unknown format (expected .jsonl, .json or .parquet)")
        where = str(path)
    else:
        where = f"{path_or_id} ({split or 'test'} split)"
    raw = read_rows(path_or_id, split or "test", subset).numbered

    if raw and isinstance(raw[0][1], dict):
        chosen = detect_fields(raw[0][1], where, key, problem_field, answer_field, answer_transform)
        if chosen != (problem_field, answer_field, answer_transform):
            log.info("%s: %s: problem from %r, answer from %r (answer_transform %s)", key, where, *chosen)
        problem_field, answer_field, answer_transform = chosen
    transform = ANSWER_TRANSFORMS[answer_transform] if answer_transform else None

    rows = []
    for position, (number, row) in enumerate(raw):
        if limit is not None and position >= limit:
            break
        if not isinstance(row, dict):
            raise DataError(f"{where}: row {number}: expected an object with fields, got {type(row).__name__}")
        values = {}
        for name, field in (("problem", problem_field), ("answer", answer_field)):
            if field not in row or row[field] is None:
                raise DataError(f"{where}: row {number}: missing field {field!r}")
            value = row[field]
            if name == "answer" and transform is not None:
                try:
                    value = transform(value)
                except ValueError as e:
                    raise DataError(
                        f"{where}: row {number}: field {field!r} {e} (answer_transform={answer_transform})"
                    ) from e
            text = _scalar(value)
            if text is None:
                raise DataError(
                    f"{where}: row {number}: field {field!r} must be a non-empty string or a number, "
                    f"got {type(value).__name__} {str(value)[:60]!r}"
                )
            values[name] = text
        rows.append({"problem": values["problem"], "answer": values["answer"], "index": position})
    return rows


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark as conf/benchmark/*.yaml describes it (`benchmark.<name>.*`); `load()` reads its rows.

    `path: null` means the engine supplies the problems itself (the held-out synthetic arithmetic set);
    `problem_field` / `answer_field` null: detected from the file (Hugging Face or Qwen2.5-Math harness layout).
    """

    name: str
    path: str | None = None
    split: str | None = None
    subset: str | None = None
    problem_field: str | None = None
    answer_field: str | None = None
    answer_transform: str | None = None
    limit: int | None = None
    key: str | None = None  # the config key of this spec, for messages (default: benchmark.<name>)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"benchmark name must be a non-empty string, got {self.name!r}")
        key = self.config_key
        if self.answer_transform is not None and self.answer_transform not in ANSWER_TRANSFORMS:
            raise ConfigError(
                f"{key}.answer_transform {self.answer_transform!r} is not one of {sorted(ANSWER_TRANSFORMS)}"
            )
        if self.limit is not None and (
            not isinstance(self.limit, int) or isinstance(self.limit, bool) or self.limit < 0
        ):
            raise ConfigError(f"{key}.limit must be null or an integer >= 0, got {self.limit!r}")

    @property
    def config_key(self) -> str:
        return self.key or f"benchmark.{self.name}"

    def missing_file(self) -> str | None:
        """A one-line problem when `path` is a local file that is not there, or a hub id while the hub is offline."""
        if self.path is None or (is_local(self.path) and Path(self.path).expanduser().is_file()):
            return None
        if is_local(self.path):
            return f"{self.config_key}.path={self.path}: no such file"
        if any(
            os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        ):
            return (
                f"{self.config_key}.path={self.path} is a hub id but the hub is offline (HF_HUB_OFFLINE): "
                f"set {self.config_key}.path to a local JSONL/JSON/Parquet copy"
            )
        return None

    def load(self) -> list[dict]:
        if self.path is None:
            raise ConfigError(
                f"benchmark {self.name} has {self.config_key}.path null (its problems are generated): "
                f"set {self.config_key}.path to a JSONL/JSON/Parquet file or a hub id to load it from there"
            )
        return load_benchmark(
            self.path,
            split=self.split,
            problem_field=self.problem_field,
            answer_field=self.answer_field,
            limit=self.limit,
            subset=self.subset,
            answer_transform=self.answer_transform,
            key=self.config_key,
        )


# ----------------------------------------------------------------------------------------------------------
# Prompts


def format_prompt(problem: str, family: str) -> list[dict[str, str]]:
    """The chat `messages` asking `family`'s model to solve `problem` with a final `\\boxed{}` answer.

    - `qwen_math`: Qwen2.5-Math's official CoT evaluation (`qwen25-math-cot` in QwenLM/Qwen2.5-Math's
      evaluation, and the Qwen2.5-Math-Instruct model card): the instruction is the system message, the
      problem alone is the user message.
    - `llama3`: Llama-3.1 chat has no math system prompt of its own, so the instruction follows the problem
      in the user message (the chat template adds Llama's default system header).
    - `plain`: the problem text alone, as one user message (the tiny synthetic-arithmetic models).
    """
    if family == "qwen_math":
        return [{"role": "system", "content": COT_INSTRUCTION}, {"role": "user", "content": problem}]
    if family == "llama3":
        return [{"role": "user", "content": f"{problem}\n{COT_INSTRUCTION}"}]
    if family == "plain":
        return [{"role": "user", "content": problem}]
    if family == "data":
        raise ConfigError("prompt family 'data' renders through the run's data prompt (prefopt.evaluate.render)")
    raise ConfigError(f"prompt family {family!r} is not one of {', '.join(PROMPT_FAMILIES)}")


# ----------------------------------------------------------------------------------------------------------
# Scores


def score(verdicts: Iterable[Any]) -> dict[str, float | int]:
    """Accuracy (correct / total) and the count of each verdict status."""
    statuses = Counter(v.status for v in verdicts)
    total = sum(statuses.values())
    correct = statuses["correct"]
    return {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "wrong": statuses["wrong"],
        "no_answer": statuses["no_answer"],
        "timeout": statuses["timeout"],
        "error": statuses["error"],
    }


def mean_accuracy(scores: Sequence[dict]) -> float:
    """The unweighted mean of several benchmarks' accuracies (the BPO paper's headline number)."""
    return sum(s["accuracy"] for s in scores) / len(scores) if scores else 0.0

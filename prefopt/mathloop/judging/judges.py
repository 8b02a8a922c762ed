"""Pairwise judges (`evaluation/judge=reward_model | openai`, conf/evaluation/judge/): is the policy's answer better?

A judge maps (prompt, policy answer, baseline answer) to a preference in [0, 1] for the policy (1 win, ½ tie,
0 loss) and the row it keeps for the per-prompt file. `prefopt.mathloop.judging.pairwise` runs one over a prompt set
and `prefopt.mathloop.judging.win_rates` turns the preferences into win rates with intervals.

- `RewardModelJudge`: both answers scored by a reward model (`prefopt.mathloop.reward.scorer`); the higher
  score wins, equal scores tie.
- `OpenAIJudge`: an OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`: a vLLM server, the
  OpenAI API, ...) is asked with a replaceable pairwise prompt, in both orders (policy as A, then as B) to
  cancel position bias; the preference is the mean of the two verdicts. Timeouts and retries are settings; an
  endpoint that does not answer is one error naming the URL.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from prefopt.errors import ConfigError
from prefopt.mathloop.judging.win_rates import preference_from_scores
from prefopt.mathloop.reward.scorer import named_scorer

log = logging.getLogger("prefopt")

PAIRWISE_PROMPT = """You are comparing two answers to the same instruction. Judge which answer follows the \
instruction better: helpful, correct, and no longer than it needs to be. Ignore the order in which they appear.

[Instruction]
{instruction}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Reply with exactly one of: [[A]] if answer A is better, [[B]] if answer B is better, [[C]] for a tie."""

VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


@dataclass
class JudgeSettings:
    """What every judge shares: the prompt set, the baseline, the statistics."""

    prompts: str | None = None  # JSONL/Parquet/hub id of prompts; null: the run's held-out generated problems
    prompt_field: str = "prompt"
    split: str = "train"
    limit: int | None = None  # at most this many prompts
    baseline: str | None = None  # JSONL/Parquet of reference answers (e.g. AlpacaEval's); null: the starting policy
    baseline_field: str = "output"  # the answer field of `baseline` (matched to the prompts by row order)
    resamples: int = 1000  # bootstrap draws for the 95% intervals
    seed: int = 0

    def check(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"evaluation.judge.limit must be >= 1 or null, got {self.limit}")
        if self.resamples < 0:
            raise ConfigError(f"evaluation.judge.resamples must be >= 0, got {self.resamples}")


@dataclass
class RewardModelJudge(JudgeSettings):
    """`evaluation/judge=reward_model`: the reward model's scores decide; equal scores tie."""

    name_or_path: str | None = None
    batch_size: int = 16
    max_length: int = 4096
    trust_remote_code: bool = False

    def __post_init__(self):
        self.check()

    def describe(self) -> dict:
        return {"judge": "reward_model", "name_or_path": self.name_or_path}

    def with_reward_model(self, path: str) -> RewardModelJudge:
        """This judge scoring with the reward stage's model at `path` when it names none itself."""
        return self if self.name_or_path else replace(self, name_or_path=path)

    def judge(self, prompts: Sequence[str], policy: Sequence[str], baseline: Sequence[str], device) -> list[dict]:
        scorer = named_scorer(
            self.name_or_path, "evaluation.judge", device, self.batch_size, self.max_length, self.trust_remote_code
        )
        ours = scorer.score(list(prompts), list(policy))
        theirs = scorer.score(list(prompts), list(baseline))
        return [
            {"preference": preference_from_scores(a, b), "policy_score": a, "baseline_score": b}
            for a, b in zip(ours, theirs)
        ]


@dataclass
class ChatClient:
    """A minimal OpenAI-compatible chat-completions client: timeout per request, retries with backoff."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    retries: int = 3  # further attempts after a failed one (connection error, timeout, 429 or 5xx)
    backoff_s: float = 1.0  # wait before retry n: backoff_s * 2**(n-1)
    max_tokens: int = 16
    attempts: int = field(default=0, init=False)  # requests sent, for the record

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def complete(self, content: str) -> str:
        """The endpoint's reply to one user message (temperature 0)."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        problem = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            self.attempts += 1
            try:
                response = httpx.post(self.url, json=body, headers=headers, timeout=self.timeout_s)
            except httpx.TimeoutException:
                problem = f"no answer within evaluation.judge.timeout_s={self.timeout_s}"
                continue
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 429 or response.status_code >= 500:
                problem = f"HTTP {response.status_code}"
                continue
            if response.status_code != 200:
                raise ConfigError(f"judge endpoint {self.url}: HTTP {response.status_code}: {response.text[:200]}")
            try:
                return response.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise ConfigError(
                    f"judge endpoint {self.url}: not an OpenAI chat completion: {response.text[:200]}"
                ) from None
        raise ConfigError(f"judge endpoint {self.url} did not answer after {self.retries + 1} attempts ({problem})")


def parse_verdict(reply: str) -> str | None:
    """'A', 'B' or 'C' (tie) from the judge's reply (its last [[X]]), None when it has none."""
    found = VERDICT.findall(reply or "")
    return found[-1] if found else None


@dataclass
class OpenAIJudge(JudgeSettings):
    """`evaluation/judge=openai`: an OpenAI-compatible chat endpoint judges both orders of each pair."""

    base_url: str | None = None  # e.g. http://localhost:8000/v1 (vLLM) or https://api.openai.com/v1
    model: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"  # the key is read from this variable (none needed locally)
    prompt_template: str | None = None  # a file with {instruction}, {answer_a}, {answer_b}; null: PAIRWISE_PROMPT
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0
    max_tokens: int = 16

    def __post_init__(self):
        if not self.base_url or not self.model:
            raise ConfigError("evaluation.judge.base_url and evaluation.judge.model are required for judge=openai")
        if self.timeout_s <= 0 or self.retries < 0:
            raise ConfigError(
                f"evaluation.judge.timeout_s must be > 0 and retries >= 0, got {self.timeout_s}, {self.retries}"
            )
        self.check()
        self.template = PAIRWISE_PROMPT
        if self.prompt_template:
            path = Path(self.prompt_template).expanduser()
            if not path.is_file():
                raise ConfigError(f"evaluation.judge.prompt_template={self.prompt_template}: no such file")
            self.template = path.read_text()
        missing = [k for k in ("{instruction}", "{answer_a}", "{answer_b}") if k not in self.template]
        if missing:
            raise ConfigError(f"evaluation.judge.prompt_template: the prompt lacks {', '.join(missing)}")

    def describe(self) -> dict:
        return {"judge": "openai", "base_url": self.base_url, "model": self.model}

    def with_reward_model(self, path: str) -> OpenAIJudge:
        return self  # judged by the endpoint, not a reward model

    def client(self) -> ChatClient:
        assert self.base_url is not None and self.model is not None  # required by __post_init__
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return ChatClient(self.base_url, self.model, key, self.timeout_s, self.retries, self.backoff_s, self.max_tokens)

    def ask(self, client: ChatClient, prompt: str, a: str, b: str) -> str | None:
        return parse_verdict(client.complete(self.template.format(instruction=prompt, answer_a=a, answer_b=b)))

    def judge(self, prompts: Sequence[str], policy: Sequence[str], baseline: Sequence[str], device=None) -> list[dict]:
        """Each pair asked twice (policy as A, then as B); preference = mean of the two; unreadable = tie."""
        client, rows = self.client(), []
        as_first = {"A": 1.0, "B": 0.0, "C": 0.5, None: 0.5}
        as_second = {"A": 0.0, "B": 1.0, "C": 0.5, None: 0.5}
        for prompt, ours, theirs in zip(prompts, policy, baseline):
            first = self.ask(client, prompt, ours, theirs)
            second = self.ask(client, prompt, theirs, ours)
            rows.append(
                {
                    "preference": (as_first[first] + as_second[second]) / 2,
                    "verdict_policy_first": first,
                    "verdict_policy_second": second,
                }
            )
        unread = sum((r["verdict_policy_first"] is None) + (r["verdict_policy_second"] is None) for r in rows)
        if unread:
            log.warning(
                "judge %s: %d of %d replies had no [[A]]/[[B]]/[[C]] (counted as ties)",
                self.model,
                unread,
                2 * len(rows),
            )
        return rows

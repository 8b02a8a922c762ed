"""A reward model as a scorer: (prompt, answer) → one scalar, batched, on the policy's device (bf16 on GPU).

Any Hugging Face `AutoModelForSequenceClassification` with a scalar head (`num_labels == 1`: the logit is the
reward). Multi-objective models that also return a `score` field in their output (ArmoRM-Llama3-8B-v0.1 returns
`.score`, its gated preference score, beside 19 per-objective rewards in `.logits`) are scored by that field,
which is the value ArmoRM's model card and SimPO's v0.2 data use. A conversation is rendered with the reward
model's own chat template (user = prompt, assistant = answer), or as prompt + answer when it has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from prefopt.errors import ConfigError


def check_reward_config(name: str, config) -> None:
    """Refuse a model that is not a sequence classifier with a scalar (or `score`) output, naming it."""
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") or a.endswith("ForRewardModel") for a in architectures):
        raise ConfigError(
            f"reward model {name}: not a sequence classifier (architectures {architectures or 'unset'}); "
            f"a reward model needs a *ForSequenceClassification head"
        )


def check_reward_tokenizer(name: str, tokenizer, config) -> None:
    """Refuse a tokenizer with more tokens than the model's embedding table (a mismatched tokenizer), naming it."""
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"reward model {name}: its tokenizer has {len(tokenizer)} tokens but its config says "
            f"vocab_size {vocab}; the tokenizer does not belong to this model"
        )


@dataclass
class RewardScorer:
    """A loaded reward model and its tokenizer; `score(prompts, answers)` gives one float per pair."""

    name: str
    model: Any
    tokenizer: Any
    device: torch.device
    batch_size: int = 16
    max_length: int = 4096

    @classmethod
    def load(
        cls, name_or_path: str, device, batch_size: int = 16, max_length: int = 4096, trust_remote_code: bool = False
    ) -> RewardScorer:
        device = torch.device(device)
        try:
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"reward model {name_or_path}: cannot load its config/tokenizer ({str(exc).splitlines()[0]})"
            ) from None
        check_reward_config(name_or_path, config)
        check_reward_tokenizer(name_or_path, tokenizer, config)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "right"
        return cls(name_or_path, model.to(device).eval(), tokenizer, device, batch_size, max_length)

    def render(self, prompt: str, answer: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
            )
        return prompt + answer

    def scalar(self, output) -> torch.Tensor:
        """The reward of each row: the output's `score` field when it has one, else the single logit."""
        score = getattr(output, "score", None)
        if score is not None:
            return score.reshape(-1)
        if output.logits.shape[-1] != 1:
            raise ConfigError(
                f"reward model {self.name}: {output.logits.shape[-1]} outputs and no `score` field; "
                f"a reward model needs num_labels=1"
            )
        return output.logits[:, 0]

    @torch.no_grad()
    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        texts = [self.render(p, a) for p, a in zip(prompts, answers)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            )
            output = self.model(**{k: v.to(self.device) for k, v in batch.items() if k != "token_type_ids"})
            out.extend(self.scalar(output).float().cpu().tolist())
        return out


def named_scorer(
    name_or_path: str | None, key: str, device, batch_size: int, max_length: int, trust_remote_code: bool
) -> RewardScorer:
    """The scorer of the reward model `name_or_path` that the config node `key` names; one line when it names none."""
    if not name_or_path:
        raise ConfigError(
            f"{key}.name_or_path is null: name a reward model (hub id or directory), or train one with "
            f"mathloop.reward=true"
        )
    return RewardScorer.load(
        name_or_path, device, batch_size=batch_size, max_length=max_length, trust_remote_code=trust_remote_code
    )

"""The reward stage's pieces on hand-worked numbers: the Bradley–Terry loss, the reward read-out, the agreement."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.errors import ConfigError
from prefopt.losses import PairLogps
from prefopt.mathloop.reward import RewardConfig, bradley_terry, checker_agreement


def test_bradley_terry_hand_worked():
    ones = torch.ones(2)
    out = bradley_terry(PairLogps(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), ones, ones))
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(0) = log 2
    assert out.loss.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log(2)], abs=1e-6)
    r = torch.tensor([0.5], requires_grad=True)
    bradley_terry(PairLogps(r, torch.tensor([0.5]), torch.ones(1), torch.ones(1))).loss.sum().backward()
    assert r.grad.item() == pytest.approx(-0.5)  # d/dr_w of -log sigmoid(r_w - r_l) at a zero margin


def test_checker_agreement_hand_worked():
    # pair 0: chosen right, scored higher: agrees; pair 1: checker says rejected is right, scored lower: disagrees;
    # pair 2: both right: not counted; pair 3: equal scores: half
    out = checker_agreement([2.0, 3.0, 1.0, 0.0], [1.0, 1.0, 5.0, 0.0], [True, False, True, True],
                            [False, True, True, False])
    assert out == {"agreement": 0.5, "pairs": 3}


def test_reward_config_refuses_bad_values():
    with pytest.raises(ConfigError, match=r"reward.batch_size \(10\) must be divisible"):
        RewardConfig(batch_size=10, micro_batch_size=4)
    with pytest.raises(ConfigError, match="reward.lr must be > 0"):
        RewardConfig(lr=0)

"""Preference losses: one pure function (or a stateful class) per paper, one yaml per key in conf/loss/.

    from prefopt.losses import PairLogps, get_loss
    out = get_loss("bpo", beta=0.1, alpha=0.3, form="hinge")(policy, reference)

The formulas, names and defaults are those of spec/losses.md.
"""

from prefopt.losses.base import LossOutput, PairLogps
from prefopt.losses.registry import Loss, available_losses, get_loss

LOSS_KEYS: tuple[str, ...] = tuple(available_losses())

__all__ = ["LOSS_KEYS", "Loss", "LossOutput", "PairLogps", "available_losses", "get_loss"]

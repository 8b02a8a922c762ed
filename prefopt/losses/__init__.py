"""Preference losses: one pure function (or a stateful class) per paper, one yaml per key in conf/loss/.

    from prefopt.losses import PairLogps, get_loss
    out = get_loss("bpo", beta=0.1, alpha=0.3, form="hinge")(policy, reference)

The formulas, names and defaults are those of docs/losses.md.
"""

from prefopt.losses.base import LossOutput, PairLogps
from prefopt.losses.registry import Loss, available_losses, get_loss


def __getattr__(name: str):
    # LOSS_KEYS lists conf/loss/*.yaml when asked for, not when the package is imported
    if name == "LOSS_KEYS":
        return tuple(available_losses())
    raise AttributeError(f"module 'prefopt.losses' has no attribute {name!r}")


__all__ = ["LOSS_KEYS", "Loss", "LossOutput", "PairLogps", "available_losses", "get_loss"]

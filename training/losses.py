"""The weight of the strategy loss over training (paper eq. 7-8, SPEC section 1).

    lambda(E) = lambda0 * log(E + 1) / log(E_max)        E = epoch, 1-based
    L         = (1 - lambda) L_LM + lambda L_ST

lambda grows with the epoch: early epochs mostly learn to generate, later ones weigh the
strategy more (0.8 * log 2 / log 10 = 0.24 at epoch 1 of 10, 0.83 at epoch 10).
"""

from __future__ import annotations

import math


def dynamic_lambda(epoch: int, max_epochs: int, lambda0: float = 0.8) -> float:
    """lambda0 * log(epoch + 1) / log(max_epochs), epoch in 1..max_epochs (max_epochs >= 2:
    log(1) = 0 leaves the formula undefined for a single epoch)."""
    if max_epochs < 2:
        raise ValueError(f"max_epochs must be at least 2 for the dynamic lambda, not {max_epochs}")
    if not 1 <= epoch <= max_epochs:
        raise ValueError(f"epoch must be in 1..{max_epochs} (1-based), not {epoch}")
    return lambda0 * math.log(epoch + 1) / math.log(max_epochs)

"""What changes over training: the learning rate per step and the strategy loss's weight per epoch.

The learning rate: linear warm-up, then linear decay to zero (the paper's recipe). For optimizer
step s = 1..total (1-based, the step the rate is used for):

    factor(s) = s / warmup                              s <= warmup
              = (total - s + 1) / (total - warmup)      s >  warmup

so the first step already moves the weights (lr / warmup, where transformers' schedule starts at
0), the peak lr is used at steps `warmup` and `warmup + 1`, and the last step uses
lr / (total - warmup).

The weight of the strategy loss (paper eq. 7-8, SPEC section 1):

    lambda(E) = lambda0 * log(E + 1) / log(E_max)        E = epoch, 1-based
    L         = (1 - lambda) L_LM + lambda L_ST

lambda grows with the epoch: early epochs mostly learn to generate, later ones weigh the
strategy more (0.8 * log 2 / log 10 = 0.24 at epoch 1 of 10, 0.83 at epoch 10).
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The multiplier of the peak learning rate at 1-based optimizer step `step`."""
    if step <= warmup:
        return step / warmup
    return max(0.0, (total - step + 1) / max(total - warmup, 1))


def linear_schedule(optimizer: Optimizer, warmup: int, total: int) -> LambdaLR:
    """A LambdaLR whose k-th `scheduler.step()` sets the rate of optimizer step k + 1.

    LambdaLR calls its function with the number of `scheduler.step()` calls so far (0 before
    the first optimizer step), hence the + 1.
    """
    return LambdaLR(optimizer, lambda i: lr_factor(i + 1, warmup, total))


def dynamic_lambda(epoch: int, max_epochs: int, lambda0: float = 0.8) -> float:
    """lambda0 * log(epoch + 1) / log(max_epochs), epoch in 1..max_epochs (max_epochs >= 2:
    log(1) = 0 leaves the formula undefined for a single epoch)."""
    if max_epochs < 2:
        raise ValueError(f"max_epochs must be at least 2 for the dynamic lambda, not {max_epochs}")
    if not 1 <= epoch <= max_epochs:
        raise ValueError(f"epoch must be in 1..{max_epochs} (1-based), not {epoch}")
    return lambda0 * math.log(epoch + 1) / math.log(max_epochs)

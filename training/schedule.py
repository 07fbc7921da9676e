"""The learning-rate schedule: linear warm-up, then linear decay to zero (the paper's recipe).

For optimizer step s = 1..total (1-based, the step the rate is used for):

    factor(s) = s / warmup                              s <= warmup
              = (total - s + 1) / (total - warmup)      s >  warmup

so the first step already moves the weights (lr / warmup, where transformers' schedule starts at
0), the peak lr is used at steps `warmup` and `warmup + 1`, and the last step uses
lr / (total - warmup).
"""

from __future__ import annotations

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

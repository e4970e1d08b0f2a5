"""The recipes' learning-rate schedules as one multiplier of the base LR per optimizer step.

Kept as a closed form of (step, epoch) for ``torch.optim.lr_scheduler.LambdaLR`` rather than
torch's composite schedulers (``SequentialLR`` of ``LinearLR`` and ``MultiStepLR`` /
``CosineAnnealingLR``), because those do not give the same numbers: the papers' warm-up is a
staircase per epoch, (e + 1)/(w + 1), where ``LinearLR`` rises every step; the chainable
schedulers update the LR recursively, which rounds differently (measured over a 2,500-step
run: ``MultiStepLR`` at base LR 0.3 gives another LR on 630 steps, ``CosineAnnealingLR`` on
2,485 of 2,500 at base LR 0.1), so a run would not reproduce its own numbers; and an
elastic resume (``Trainer._continue_elastic``) re-times the schedule to new steps per epoch,
which a closed form in epochs does in one line. docs/algorithms.md §6.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.config import ScheduleConfig


def lr_factor(step: int, s: ScheduleConfig, steps_per_epoch: int, total: int) -> float:
    """The LR multiplier at optimizer step ``step`` of a ``total``-step run: a warm-up staircase
    over ``s.warmup_epochs``, then multistep (decay by ``s.gamma`` at each milestone epoch),
    cosine (over the whole run, per step) or constant."""
    epoch = step // steps_per_epoch
    if epoch < s.warmup_epochs:
        return (epoch + 1) / (s.warmup_epochs + 1)
    if s.lr_schedule == "multistep":
        bounds = s.milestone_epochs or [int(m * s.epochs) * s.multiplier for m in s.milestones]
        return s.gamma ** sum(epoch >= b for b in bounds)
    if s.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return 1.0

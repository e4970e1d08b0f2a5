"""When masks change and by how much (spec section 6).

Steps count optimizer steps: step s is the state after s completed steps, so the first mask
update happens after ``update_frequency`` steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def total_steps(steps_per_epoch: int, epochs: float, multiplier: float = 1.0) -> int:
    """Length T of training in optimizer steps: steps/epoch x epochs x multiplier (6.1, 6.4).

    ``multiplier`` (ITOP's extended training) may be fractional (GraNet's 2.5x).
    """
    return max(1, int(round(steps_per_epoch * epochs * multiplier)))


@dataclass(frozen=True)
class PruneRateSchedule:
    """The prune ('death') rate r(s) used by a mask update at step s (6.1).

    ``cosine``: r(s) = r_min + (r0 - r_min) (1 + cos(pi s / T)) / 2, the reference's
    CosineAnnealingLR driven once per step; ``constant``: r0 (Sup-tickets);
    ``linear``: r0 (1 - s / T) (sparse momentum), never below 0.
    """

    initial: float = 0.5
    minimum: float = 0.005
    total_steps: int = 1
    kind: str = "cosine"

    def __call__(self, step: int) -> float:
        t = min(step, self.total_steps) / self.total_steps
        if self.kind == "cosine":
            return self.minimum + (self.initial - self.minimum) * (1 + math.cos(math.pi * t)) / 2
        if self.kind == "constant":
            return self.initial
        if self.kind == "linear":
            return max(0.0, self.initial * (1 - t))
        raise ValueError(f"--decay-schedule {self.kind!r}: choose cosine, constant or linear")


@dataclass(frozen=True)
class UpdateSchedule:
    """Mask updates every ``frequency`` steps, from step ``frequency`` on, until
    ``stop_fraction`` of the ``total_steps`` (1.0: to the end, as ITOP; RigL uses 0.75).
    ``frequency`` None means static sparse training (never update)."""

    frequency: int | None
    total_steps: int
    stop_fraction: float = 1.0

    @property
    def last_step(self) -> int:
        """The last step at which an update may happen."""
        return int(self.stop_fraction * self.total_steps)

    def is_update_step(self, step: int) -> bool:
        f = self.frequency
        return f is not None and step > 0 and step % f == 0 and step <= self.last_step

    def update_steps(self) -> list[int]:
        """Every step at which an update will happen (for tests and planning)."""
        if self.frequency is None:
            return []
        return list(range(self.frequency, self.last_step + 1, self.frequency))

"""When masks change and by how much (docs/algorithms.md §6).

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


def schedule_problem(method, update_until: int, run_steps: int, epoch_steps: float,
                     final_density: float) -> str | None:
    """Why a sparse schedule cannot do what its settings say, or None if it can.

    ``method``: an ``itop_dist.methods.Method`` (``is_update_step``; gradual methods also
    ``target_density`` and ``k``); mask updates happen at steps s <= min(update_until, run_steps).
    Checks: at least one mask update happens (methods that update at all); a gradual method's
    pruning window holds an update step and its last prune, the one that reaches
    ``final_density``, falls inside the run. The message names the flags and a value that works.
    """
    last = min(update_until, run_steps)
    updates = [s for s in range(1, last + 1) if method.is_update_step(s)]
    if not hasattr(method, "target_density"):
        if not updates and method.updates_masks:
            return (f"no mask update happens before the updates stop at step {last} (--update_stop "
                    f"{method.config.update_stop:g} of {run_steps} steps): use --update_frequency <= "
                    f"{max(1, last)} or a later --update_stop")
        return None
    pruning = [s for s in updates if method.target_density(s) is not None]
    cfg = method.config
    window = f"[--init-prune-epoch {cfg.init_prune_epoch:g}, --final-prune-epoch {cfg.final_prune_epoch:g}]"
    if not pruning:
        length = max(1, int((cfg.final_prune_epoch - cfg.init_prune_epoch) * epoch_steps))
        return (f"the pruning window {window} ({length} steps) holds no mask update with "
                f"--update_frequency {method.k} before step {last}: use --update_frequency <= {length}")
    reached = method.target_density(pruning[-1])
    if abs(reached - final_density) > 1e-12:
        ends = max(cfg.init_prune_epoch, (last // method.k) * method.k / epoch_steps)
        return (f"the pruning window {window} ends after the last mask update at step {last}, so the "
                f"run would end at density {reached:.4g}, not --final-density {final_density:g}: use "
                f"--final-prune-epoch <= {math.floor(ends * 100) / 100:g} (or more epochs)")
    return None

"""Sup-tickets' maths (Yin et al., "Superposing Many Tickets into One", 2022): the phase split,
the cyclic LR, the re-explore update, superposition (CAA, CIMA), the cut back to the final
density and BN recalibration. Pure functions and one small state class, CPU-testable; the
training loop's side (when each runs, evaluation, saving) is ``launcher/plugins/suptickets.py``.

docs/algorithms.md §10 gives the equations and where this differs from the paper's code.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from itop_dist.config import SparseConfig
from itop_dist.methods import Method, Plan, PruneRegrow, global_magnitude_masks

__all__ = ["ReExplore", "Superposition", "cut_to_density", "cyclic_lr", "phases", "recalibrate_bn",
           "superpose"]


def phases(epochs: int, cycle: int, cycle_rate: float, cyclic_epochs: int | None = None) -> tuple[int, int]:
    """(pre-train epochs P, cyclic epochs C) of an ``epochs``-epoch run (docs/algorithms.md §10.1).

    C = ``cyclic_epochs`` or floor(epochs * cycle_rate), rounded down to whole cycles; C = 0 (no
    cyclic phase) when it is shorter than one cycle. P = epochs - C."""
    c = cyclic_epochs if cyclic_epochs is not None else int(epochs * cycle_rate)
    if c < cycle:
        return epochs, 0
    c -= c % cycle
    return epochs - c, c


def cyclic_lr(t: float, lr_1: float, lr_2: float) -> float:
    """The LR at position ``t`` in [0, 1) of a cycle: a triangle with ``lr_1`` at its ends and
    ``lr_2`` in the middle (docs/algorithms.md §10.3; same units as the LRs given)."""
    if t < 0.5:
        return lr_1 * (1 - 2 * t) + lr_2 * 2 * t
    return lr_1 * (2 * t - 1) + lr_2 * (2 - 2 * t)


class ReExplore(Method):
    """The update at the start of each cycle (``--re_explore``): magnitude prune and gradient
    regrowth of ``rate`` of each layer's active weights, whatever the run's own method.
    ``Sparsifier.update(ReExplore(...))`` runs it (docs/algorithms.md §10.3)."""

    name = "re_explore"
    needs_grads = True

    def __init__(self, config: SparseConfig, total_steps: int, rate: float) -> None:
        super().__init__(config, total_steps)
        self.rate = rate

    def is_update_step(self, step: int) -> bool:
        return False  # only ever run explicitly

    def plan(self, shapes: dict[str, tuple[int, ...]], step: int, update_index: int) -> Plan:
        return PruneRegrow(self.rate, "magnitude", "gradient", seed=self.config.seed, update_index=update_index)


def superpose(previous: dict[str, torch.Tensor], ticket: dict[str, torch.Tensor], factor: float
              ) -> dict[str, torch.Tensor]:
    """S = (1 - factor) previous + factor ticket over the floating tensors of two state dicts
    (same keys and shapes); integer tensors (BN's num_batches_tracked) are taken from the
    ticket. docs/algorithms.md §10.4."""
    return {k: ((1 - factor) * previous[k] + factor * v) if v.is_floating_point() else v.clone()
            for k, v in ticket.items()}


def cut_to_density(state: dict[str, torch.Tensor], masked: list[str], density: float) -> dict[str, torch.Tensor]:
    """Zero all but the floor(sum_l N_l * density) largest |W| among the non-zero entries of the
    ``masked`` tensors of ``state`` (global magnitude); other tensors pass unchanged.
    docs/algorithms.md §10.4."""
    weights = {n: state[n] for n in masked}
    support = {n: w != 0 for n, w in weights.items()}
    keep = int(sum(w.numel() for w in weights.values()) * density)
    masks = global_magnitude_masks(weights, support, keep)
    return {k: (v * masks[k] if k in masks else v) for k, v in state.items()}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inputs: Iterable[torch.Tensor],
                   reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Recompute every BatchNorm's running statistics as a cumulative average over ``inputs``
    (``torch.optim.swa_utils.update_bn``: train mode, no gradients), then replace them by
    their mean over ranks (``reduce_mean``) so that every rank holds the same model. Leaves
    ``model`` in eval mode. Returns the number of samples this rank saw."""
    seen = 0

    def counted():
        nonlocal seen
        for x in inputs:
            seen += x.shape[0]
            yield x

    update_bn(counted(), model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(reduce_mean(m.running_mean))
            m.running_var.copy_(reduce_mean(m.running_var))
    model.eval()
    return seen


class Superposition:
    """The running superposed model S_j (a full state dict on the CPU) and its index j.

    method: ``CAA`` (f_j = 1/(j+1), the running mean of S_0, T_1..T_j) or ``CIMA`` (f_j =
    ``factor``); ``masked``: the state-dict keys of the masked weights, cut back to ``density``
    after every superposition. Raises ValueError for another method."""

    def __init__(self, method: str, factor: float, density: float, masked: list[str]) -> None:
        if method not in ("CAA", "CIMA"):
            raise ValueError(f"--superposing_method {method!r}: choose CAA or CIMA")
        self.method, self.factor, self.density, self.masked = method, factor, density, masked
        self.superposed: dict[str, torch.Tensor] | None = None
        self.index = 0

    def start(self, pretrained: dict[str, torch.Tensor]) -> None:
        """S_0: the model at the end of the pre-train phase."""
        self.set_current(pretrained)
        self.index = 0

    def add(self, ticket: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Superpose ticket T_j and cut to the final density; returns S_j."""
        if self.superposed is None:
            raise RuntimeError("Superposition.add before start(): S_0 is the pre-trained model")
        self.index += 1
        factor = 1.0 / (self.index + 1) if self.method == "CAA" else self.factor
        ticket = {k: v.detach().cpu() for k, v in ticket.items()}
        self.superposed = cut_to_density(superpose(self.superposed, ticket, factor), self.masked, self.density)
        return self.superposed

    def set_current(self, state: dict[str, torch.Tensor]) -> None:
        """Replace S_j (after BN recalibration: the 'previous' of the next superposition)."""
        self.superposed = {k: v.detach().cpu().clone() for k, v in state.items()}

    def state_dict(self) -> dict:
        return {"index": self.index, "superposed": self.superposed}

    def load_state_dict(self, sd: dict) -> None:
        self.index, self.superposed = sd["index"], sd["superposed"]

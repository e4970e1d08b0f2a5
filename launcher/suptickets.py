"""Sup-tickets (Yin et al. 2022): cheap tickets from a cyclic phase, superposed into one network.

Training is split into a pre-train phase (any sparse method, P epochs) and a cyclic phase of
K cycles of ``cycle`` epochs (docs/algorithms.md §10). In the cyclic phase the LR follows a triangle
per cycle (``--cyc_lr``), masks stay fixed (``--no_maskupdates``) except for one re-explore
update at the start of each cycle (``--re_explore``, rate ``--large-death-rate``), and the model
at the end of each cycle is a ticket T_j. The tickets are superposed over the full state
(weights, biases, BN statistics): CAA S_j = (1 - 1/(j+1)) S_{j-1} + 1/(j+1) T_j, or CIMA with a
constant factor; S_j is cut back to the final density by global magnitude, its BN statistics
are recalibrated on the training data (``--update_bn``), identically on every rank, and it is
evaluated and saved. Training continues from T_j with its optimizer state; the result of the
run is the last superposed model.
"""

from __future__ import annotations

import pathlib
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from itop_dist.methods import global_magnitude_masks


def phases(epochs: int, cycle: int, cycle_rate: float, cyclic_epochs: int | None = None) -> tuple[int, int]:
    """(pre-train epochs P, cyclic epochs C) as Sup-tickets splits them (docs/algorithms.md §10.1)."""
    c = cyclic_epochs if cyclic_epochs is not None else int(epochs * cycle_rate)
    if c < cycle:
        return epochs, 0
    c -= c % cycle
    return epochs - c, c


def cyclic_lr(t: float, lr_1: float, lr_2: float) -> float:
    """The triangle at position t in [0, 1) of a cycle: lr_1 at its ends, lr_2 in the middle."""
    if t < 0.5:
        return lr_1 * (1 - 2 * t) + lr_2 * 2 * t
    return lr_1 * (2 * t - 1) + lr_2 * (2 - 2 * t)


def superpose(previous: dict[str, torch.Tensor], ticket: dict[str, torch.Tensor], factor: float
              ) -> dict[str, torch.Tensor]:
    """(1 - factor) previous + factor ticket over floating tensors; counters (BN's
    num_batches_tracked) are taken from the ticket."""
    return {k: ((1 - factor) * previous[k] + factor * v) if v.is_floating_point() else v.clone()
            for k, v in ticket.items()}


def cut_to_density(state: dict[str, torch.Tensor], masked: list[str], density: float) -> dict[str, torch.Tensor]:
    """Zero all but the int(sum N_l * density) largest |W| of the masked tensors (docs/algorithms.md §10.4)."""
    weights = {n: state[n] for n in masked}
    support = {n: w != 0 for n, w in weights.items()}
    keep = int(sum(w.numel() for w in weights.values()) * density)
    masks = global_magnitude_masks(weights, support, keep)
    return {k: (v * masks[k] if k in masks else v) for k, v in state.items()}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Recompute BN running statistics as a cumulative average over ``batches`` (train mode,
    no gradients), then average them over ranks so every rank holds the same model.
    Returns the number of samples seen on this rank."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the whole pass
    model.train()
    seen = 0
    for x, _ in batches:
        model(x)
        seen += x.shape[0]
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.running_mean.copy_(reduce_mean(m.running_mean))
        m.running_var.copy_(reduce_mean(m.running_var))
    model.eval()
    return seen


class SuperTickets:
    """The running superposition S_j and its index; checkpointed with the run."""

    def __init__(self, method: str, factor: float, density: float, masked: list[str],
                 folder: pathlib.Path) -> None:
        if method not in ("CAA", "CIMA"):
            raise ValueError(f"--superposing_method {method!r}: choose CAA or CIMA")
        self.method, self.factor, self.density = method, factor, density
        self.masked, self.folder = masked, folder
        self.superposed: dict[str, torch.Tensor] | None = None
        self.index = 0

    def start(self, pretrained: dict[str, torch.Tensor]) -> None:
        """S_0: the model at the end of the pre-train phase."""
        self.superposed = {k: v.detach().cpu().clone() for k, v in pretrained.items()}
        self.index = 0

    def add(self, ticket: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Superpose ticket T_j and cut to the final density; returns S_j."""
        assert self.superposed is not None, "start() with the pre-trained model first"
        self.index += 1
        factor = 1.0 / (self.index + 1) if self.method == "CAA" else self.factor
        ticket = {k: v.detach().cpu() for k, v in ticket.items()}
        self.superposed = cut_to_density(superpose(self.superposed, ticket, factor), self.masked, self.density)
        return self.superposed

    def set_current(self, state: dict[str, torch.Tensor]) -> None:
        """S_j after BN recalibration: the 'previous' model of the next superposition."""
        self.superposed = {k: v.detach().cpu().clone() for k, v in state.items()}

    def save(self, state: dict[str, torch.Tensor]) -> pathlib.Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"superposed-{self.index}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path

    def state_dict(self) -> dict:
        return {"index": self.index, "superposed": self.superposed}

    def load_state_dict(self, sd: dict) -> None:
        self.index, self.superposed = sd["index"], sd["superposed"]

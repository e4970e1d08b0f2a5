"""Sparse training methods, registered by name.

A method decides the initial masks and, at its update steps, the new masks. It runs on rank 0
only, on full (unsharded) tensors, and is pure: tensors in, masks out. The
:class:`~itop_dist.sparsifier.Sparsifier` gathers its inputs, broadcasts its outputs and applies
them; the training loop never sees which method runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from itop_dist import topology
from itop_dist.schedules import PruneRateSchedule, UpdateSchedule

if TYPE_CHECKING:
    from itop_dist.config import SparseConfig

METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make a method selectable as ``--method name``."""

    def wrap(cls: type[Method]) -> type[Method]:
        METHODS[name] = cls
        cls.name = name
        return cls

    return wrap


def list_methods() -> list[str]:
    return sorted(METHODS)


def mask_generator(seed: int, update: int, layer: int) -> torch.Generator:
    """A CPU generator seeded by (seed, update index, layer index) (spec 12.1): the same draws
    whatever ran before, so a resumed run and every rank agree without saving RNG state."""
    mixed = (seed * 1_000_003 + update) * 1_000_033 + layer
    return torch.Generator().manual_seed(mixed % (2**63))


@dataclass
class UpdateInputs:
    """What a method may read at an update; full tensors keyed by parameter name.

    grads: the globally reduced, unscaled dense gradient (None where not gathered).
    momenta: the optimizer's momentum (None where not gathered).
    """

    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    momenta: dict[str, torch.Tensor | None]
    step: int
    update_index: int


@dataclass
class UpdateResult:
    """New masks, the positions activated by growth (``grown``, which may include weights
    pruned a moment ago) and per-layer counts for logs: ``pruned[name]``, ``regrown[name]``."""

    masks: dict[str, torch.Tensor]
    grown: dict[str, torch.Tensor]
    rate: float
    pruned: dict[str, int] = field(default_factory=dict)
    regrown: dict[str, int] = field(default_factory=dict)


class Method:
    """Base class: the initial masks, the update steps and (in subclasses) the update."""

    name = "method"
    needs_grads = False
    needs_momenta = False

    def __init__(self, config: SparseConfig, total_steps: int) -> None:
        self.config = config
        self.total_steps = total_steps
        self.updates = UpdateSchedule(config.update_frequency, total_steps, config.update_stop)
        self.prune_rate = PruneRateSchedule(
            config.death_rate, config.death_rate_min, total_steps, config.decay_schedule
        )

    def initial_densities(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
        c = self.config
        return topology.layer_densities(c.sparse_init, shapes, c.density, c.erk_power_scale)

    def initial_masks(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        densities = self.initial_densities(shapes)
        return {
            name: topology.random_mask(
                shape, densities[name], mask_generator(self.config.seed, 0, i), self.config.exact_init
            )
            for i, (name, shape) in enumerate(shapes.items())
        }

    def is_update_step(self, step: int) -> bool:
        return self.updates.is_update_step(step)

    def update(self, inputs: UpdateInputs) -> UpdateResult:
        raise NotImplementedError


@register_method("static")
class Static(Method):
    """Static sparse training (``--fix``): the initial masks never change."""

    def is_update_step(self, step: int) -> bool:
        return False


@register_method("DST")
class DynamicSparse(Method):
    """Prune and regrow at a fixed density: SET (random growth), RigL (gradient) or sparse
    momentum (momentum), with the ITOP schedules (spec 3-6)."""

    def __init__(self, config: SparseConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        self.needs_grads = config.growth == "gradient"
        self.needs_momenta = config.growth == "momentum"

    def update(self, inputs: UpdateInputs) -> UpdateResult:
        c = self.config
        rate = self.prune_rate(inputs.step)
        return prune_and_regrow(inputs, rate, c.death, c.growth, c.redistribution, c.threshold, c.seed)


def prune_and_regrow(
    inputs: UpdateInputs,
    rate: float,
    death: str,
    growth: str,
    redistribution: str = "none",
    threshold: float = 1e-3,
    seed: int = 0,
) -> UpdateResult:
    """One prune-and-regrow update over all layers (spec 3, 4, 5).

    Per layer, num_remove = ceil(r_l * nnz_l) weights are pruned by ``death``; the same number
    (``redistribution='none'``) or a share of the total removed (otherwise) is regrown by
    ``growth`` among the positions inactive after pruning, which include the just-pruned ones.
    The total number of non-zeros is unchanged exactly; with ``none`` every layer's is.
    """
    masks, weights = inputs.masks, inputs.weights
    names = list(masks)
    shares = (
        topology.redistribution_weights(redistribution, weights, masks)
        if redistribution != "none" else None
    )
    pruned_masks, removed = {}, {}
    for name in names:
        mask = masks[name]
        nnz = int(mask.sum())
        r = rate
        if shares is not None:
            r = topology.layer_prune_rate(rate, 1 - nnz / mask.numel(), shares[name], len(names))
        pruned = topology.PRUNE_FNS[death](weights[name], mask, math.ceil(r * nnz), threshold=threshold)
        pruned_masks[name] = pruned
        removed[name] = nnz - int(pruned.sum())
    if shares is None:
        grow_counts = removed
    else:
        caps = {n: pruned_masks[n].numel() - int(pruned_masks[n].sum()) for n in names}
        grow_counts = topology.allocate(sum(removed.values()), shares, caps)
    new_masks, grown_masks = {}, {}
    for i, name in enumerate(names):
        grown = topology.GROW_FNS[growth](
            pruned_masks[name],
            grow_counts[name],
            grad=inputs.grads.get(name),
            momentum=inputs.momenta.get(name),
            generator=mask_generator(seed, inputs.update_index, i),
        )
        new_masks[name] = pruned_masks[name] | grown
        grown_masks[name] = grown
    return UpdateResult(new_masks, grown_masks, rate, pruned=removed, regrown=dict(grow_counts))

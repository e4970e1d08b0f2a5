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
    """A CPU generator seeded by (seed, update index, layer index) (docs/algorithms.md §12.1): the same draws
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
    updates_masks = True  # False: the masks never change (static sparse training)

    def __init__(self, config: SparseConfig, total_steps: int, epoch_steps: float | None = None) -> None:
        self.config = config
        self.total_steps = total_steps
        self.epoch_steps = epoch_steps
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

    @property
    def cost_kind(self) -> str:
        """The FLOPs rule of a training step under this method (``itop_dist.flops.step_flops``):
        its growth kind, since gradient/momentum growth needs a dense gradient (§8)."""
        return self.config.growth

    def is_update_step(self, step: int) -> bool:
        return self.updates.is_update_step(step)

    def update(self, inputs: UpdateInputs) -> UpdateResult:
        raise NotImplementedError


@register_method("static")
class Static(Method):
    """Static sparse training (``--fix``): the initial masks never change."""

    updates_masks = False
    cost_kind = "static"  # masks only: never a dense gradient

    def is_update_step(self, step: int) -> bool:
        return False

    def update(self, inputs: UpdateInputs) -> UpdateResult:
        """An explicit update (``Sparsifier.update()``) keeps the masks: nothing is pruned."""
        masks = dict(inputs.masks)
        return UpdateResult(masks, {n: torch.zeros_like(m) for n, m in masks.items()}, 0.0,
                            pruned={n: 0 for n in masks}, regrown={n: 0 for n in masks})


@register_method("DST")
class DynamicSparse(Method):
    """Prune and regrow at a fixed density: SET (random growth), RigL (gradient) or sparse
    momentum (momentum), with the ITOP schedules (docs/algorithms.md §3-§6)."""

    def __init__(self, config: SparseConfig, total_steps: int, epoch_steps: float | None = None) -> None:
        super().__init__(config, total_steps, epoch_steps)
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
    """One prune-and-regrow update over all layers (docs/algorithms.md §3, §4, §5).

    Per layer, num_remove = ceil(r_l * nnz_l) weights are pruned by ``death``; the same number
    (``redistribution='none'``) or a share of the total removed (otherwise) is regrown by
    ``growth`` among the positions inactive after pruning, which include the just-pruned ones.
    The total number of non-zeros is unchanged exactly; with ``none`` every layer's is.

    A dense layer (every mask bit on, e.g. a small layer ERK made dense) has nothing to
    explore: it is neither pruned nor regrown, and redistribution sends it nothing (its share
    is left out). Layer ``i`` draws from ``mask_generator(seed, update, i)`` either way.
    """
    masks, weights = inputs.masks, inputs.weights
    names = list(masks)
    explored = [n for n in names if not bool(masks[n].all())]
    shares = (
        topology.redistribution_weights(redistribution, {n: weights[n] for n in explored},
                                        {n: masks[n] for n in explored})
        if redistribution != "none" else None
    )
    pruned_masks, removed = {}, {}
    for name in explored:
        mask = masks[name]
        nnz = int(mask.sum())
        r = rate
        if shares is not None:
            r = topology.layer_prune_rate(rate, 1 - nnz / mask.numel(), shares[name], len(explored))
        pruned = topology.PRUNE_FNS[death](weights[name], mask, math.ceil(r * nnz), threshold=threshold)
        pruned_masks[name] = pruned
        removed[name] = nnz - int(pruned.sum())
    if shares is None:
        grow_counts = removed
    else:
        caps = {n: pruned_masks[n].numel() - int(pruned_masks[n].sum()) for n in explored}
        grow_counts = topology.allocate(sum(removed.values()), shares, caps)
    new_masks, grown_masks, pruned_counts, grown_counts = {}, {}, {}, {}
    for i, name in enumerate(names):
        if name not in pruned_masks:  # dense: unchanged
            new_masks[name] = masks[name]
            grown_masks[name] = torch.zeros_like(masks[name])
            pruned_counts[name] = grown_counts[name] = 0
            continue
        grown = topology.GROW_FNS[growth](
            pruned_masks[name],
            grow_counts[name],
            grad=inputs.grads.get(name),
            momentum=inputs.momenta.get(name),
            generator=mask_generator(seed, inputs.update_index, i),
        )
        new_masks[name] = pruned_masks[name] | grown
        grown_masks[name] = grown
        pruned_counts[name], grown_counts[name] = removed[name], grow_counts[name]
    return UpdateResult(new_masks, grown_masks, rate, pruned=pruned_counts, regrown=grown_counts)


# ---------------------------------------------------------------------------------------------
# Dense-to-sparse: gradual magnitude pruning (GMP) and GraNet (docs/algorithms.md §9)


def cubic_density(c: int, c0: int, c1: int, d_init: float, d_final: float) -> float:
    """Zhu & Gupta's cubic schedule as a density, at prune iteration ``c`` (docs/algorithms.md §9.1):
    d_f + (d_i - d_f) (1 - (c - c0) / (c1 - c0))^3, from d_i at c0 to exactly d_f at c1."""
    x = min(max((c - c0) / max(c1 - c0, 1), 0.0), 1.0)
    return d_final + (d_init - d_final) * (1.0 - x) ** 3


def global_magnitude_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                           keep: int) -> dict[str, torch.Tensor]:
    """Keep exactly ``keep`` active weights of largest |W| over all layers together (ties by
    position). Never activates a weight; unlike the reference's |W| >= tau (docs/algorithms.md §12.2, pitfall 11) an
    all-zero or already-sparse network cannot turn dense."""
    names = list(masks)
    scores = torch.cat([torch.where(masks[n], weights[n].detach().abs().float(), -1.0).reshape(-1)
                        for n in names])
    keep = min(keep, int(sum(int(m.sum()) for m in masks.values())))
    chosen = topology.select_k(scores, keep)
    sizes = [masks[n].numel() for n in names]
    return {n: c.reshape(masks[n].shape) for n, c in zip(names, torch.split(chosen, sizes))}


def uniform_magnitude_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                            density: float) -> dict[str, torch.Tensor]:
    """Layer-wise gradual pruning (docs/algorithms.md §9.3): every layer keeps int(N_l d) largest |W|; once
    the sparsity reaches 0.8 the classifier (the last masked layer) keeps density 0.2 and the
    other layers share the rest. The totals come from the masks themselves (the reference
    needed ERK's bookkeeping and divided by zero without it, docs/algorithms.md §12.2, pitfall 18)."""
    names = list(masks)
    numel = {n: masks[n].numel() for n in names}
    per_layer = {n: density for n in names}
    if 1 - density >= 0.8 and len(names) > 1:
        fc = names[-1]
        total, p_fc = sum(numel.values()), numel[fc]
        rest = (total * density - 0.2 * p_fc) / (total - p_fc)
        per_layer = {n: (0.2 if n == fc else max(rest, 0.0)) for n in names}
    out = {}
    for n in names:
        if per_layer[n] >= 1.0:  # the layer's target is dense: nothing to prune
            out[n] = masks[n]
            continue
        scores = torch.where(masks[n], weights[n].detach().abs().float(), -1.0)
        out[n] = topology.select_k(scores, min(int(numel[n] * per_layer[n]), int(masks[n].sum())))
    return out


class GradualPruning(Method):
    """Prune from ``density`` to ``final_density`` on the cubic schedule over the window
    [init_prune_epoch, final_prune_epoch] (x the multiplier), at every ``update_frequency``
    steps; global magnitude (``global_``) or layer-wise; with zero-cost neuroregeneration
    (``regrow``: prune by magnitude and regrow by ``growth`` the same count, at every update
    from the window's start on, also after it) for GraNet.

    The last prune of the window reaches ``final_density`` exactly (the reference's window
    stops one prune iteration early, at d_f + (d_i - d_f) / n^3).
    """

    global_ = True
    regrow = True
    dense_start = False

    def __init__(self, config: SparseConfig, total_steps: int, epoch_steps: float | None = None) -> None:
        super().__init__(config, total_steps, epoch_steps)
        if epoch_steps is None:
            raise ValueError(f"--method {config.method} needs the number of steps per epoch")
        k = config.update_frequency or 1
        self.k = k
        self.start_step = config.init_prune_epoch * epoch_steps
        self.c0 = math.floor(self.start_step / k)
        self.c1 = math.floor(config.final_prune_epoch * epoch_steps / k)
        self.needs_grads = self.regrow and config.growth == "gradient"
        self.needs_momenta = self.regrow and config.growth == "momentum"

    def initial_masks(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        if self.dense_start:  # GMP starts from the dense network whatever --sparse-init says
            return {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
        return super().initial_masks(shapes)

    @property
    def cost_kind(self) -> str:
        """GMP prunes by magnitude only (no dense gradient): "static"; GraNet regrows by
        ``growth``."""
        return self.config.growth if self.regrow else "static"

    def target_density(self, step: int) -> float | None:
        """The scheduled density at an update step inside the window, else None."""
        c = step // self.k
        if self.c0 <= c <= self.c1:
            start = 1.0 if self.dense_start else self.config.density
            return cubic_density(c, self.c0, self.c1, start, self.config.final_density)
        return None

    def is_update_step(self, step: int) -> bool:
        if step <= 0 or step % self.k or step < self.start_step:
            return False
        return self.regrow or step // self.k <= self.c1

    def update(self, inputs: UpdateInputs) -> UpdateResult:
        c = self.config
        masks = dict(inputs.masks)
        before = {n: int(m.sum()) for n, m in masks.items()}
        density = self.target_density(inputs.step)
        if density is not None:
            total = sum(m.numel() for m in masks.values())
            masks = (global_magnitude_masks(inputs.weights, masks, round(total * density)) if self.global_
                     else uniform_magnitude_masks(inputs.weights, masks, density))
        pruned = {n: before[n] - int(m.sum()) for n, m in masks.items()}
        rate = self.prune_rate(inputs.step)
        if not self.regrow:
            return UpdateResult(masks, {n: torch.zeros_like(m) for n, m in masks.items()}, rate,
                                pruned=pruned, regrown={n: 0 for n in masks})
        inputs = UpdateInputs(inputs.weights, masks, inputs.grads, inputs.momenta, inputs.step,
                              inputs.update_index)
        result = prune_and_regrow(inputs, rate, "magnitude", c.growth, "none", c.threshold, c.seed)
        result.pruned = {n: pruned[n] + result.pruned[n] for n in masks}
        return result


@register_method("GraNet")
class GraNet(GradualPruning):
    """Global gradual magnitude pruning, then zero-cost neuroregeneration (Liu et al. 2021)."""


@register_method("GraNet_uniform")
class GraNetUniform(GradualPruning):
    """Layer-wise gradual pruning, then zero-cost neuroregeneration."""

    global_ = False


@register_method("GMP")
class GMP(GradualPruning):
    """Gradual magnitude pruning (Zhu & Gupta 2017) from the dense network, global."""

    regrow = False
    dense_start = True


@register_method("GMP_uniform")
class GMPUniform(GradualPruning):
    """Gradual magnitude pruning, layer-wise, from the --sparse-init masks at --density."""

    regrow = False
    global_ = False

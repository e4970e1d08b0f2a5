"""Sparse training methods, registered by name.

A method decides the initial masks and, at its update steps, the new masks. It runs on rank 0
only, on full (unsharded) tensors, and is pure: tensors in, masks out. An update is a
:class:`Plan`: a few cheap survey passes over the layers, then one decision per layer, so that
the :class:`~itop_dist.sparsifier.Sparsifier` can feed it all layers at once (replicated runs)
or stream it one layer at a time (sharded runs, docs/algorithms.md §12.3); it gathers the
inputs, sends the outputs and applies them; the training loop never sees which method runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
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


@dataclass
class Layer:
    """One layer's full tensors at an update, what a :class:`Plan` reads.

    index: the layer's position among all masked layers (the ``layer`` of
    :func:`mask_generator`); weight: any float dtype; mask: bool, the weight's shape; grad /
    momentum: the weight's shape, or None where the method does not need them (always None
    in survey passes)."""

    index: int
    name: str
    weight: torch.Tensor
    mask: torch.Tensor
    grad: torch.Tensor | None = None
    momentum: torch.Tensor | None = None


@dataclass
class Decision:
    """A plan's decision for one layer: the new mask and the grown positions (bool, the
    layer's shape) and how many weights were pruned and regrown."""

    mask: torch.Tensor
    grown: torch.Tensor
    pruned: int
    regrown: int


class Plan:
    """One update of a method, decided one layer at a time (docs/algorithms.md §12.3), so that
    a sharded run streams it: rank 0 never holds more than one layer's full tensors.

    What a layer's decision needs from the whole model is collected first in ``surveys``
    passes over the layers in order (each layer's weight and mask only): ``survey(k, layer)``
    for every layer, then ``finish(k)``; its result is a few numbers per layer at most. Then
    ``decide(layer)`` for every layer, in order. ``surveys`` depends on the method, the step
    and the configuration only, never on the tensors, so every rank knows how many passes to
    take part in. ``rate``: the prune rate of the update, for logs."""

    surveys = 0

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def survey(self, k: int, layer: Layer) -> None:
        raise NotImplementedError

    def finish(self, k: int) -> None:
        raise NotImplementedError

    def decide(self, layer: Layer) -> Decision:
        raise NotImplementedError


def survey_layers(plan, layers: list[Layer]) -> None:
    """Every survey pass of ``plan`` (a :class:`Plan` or :class:`GlobalMagnitude`) over
    ``layers`` held together (the unsharded path)."""
    for k in range(plan.surveys):
        for layer in layers:
            plan.survey(k, layer)
        plan.finish(k)


def run_plan(plan: Plan, inputs: UpdateInputs) -> UpdateResult:
    """``plan`` over the full tensors of ``inputs``, all layers at once: the unsharded path,
    with the same survey and per-layer decisions as the streamed one."""
    layers = [Layer(i, n, inputs.weights[n], m, inputs.grads.get(n), inputs.momenta.get(n))
              for i, (n, m) in enumerate(inputs.masks.items())]
    survey_layers(plan, layers)
    decisions = {layer.name: plan.decide(layer) for layer in layers}
    return UpdateResult({n: d.mask for n, d in decisions.items()}, {n: d.grown for n, d in decisions.items()},
                        plan.rate, pruned={n: d.pruned for n, d in decisions.items()},
                        regrown={n: d.regrown for n, d in decisions.items()})


class Method:
    """Base class: the initial masks, the update steps and (in subclasses) the update's plan."""

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

    def initial_mask(self, index: int, shape: tuple[int, ...], density: float) -> torch.Tensor:
        """Layer ``index``'s initial mask (bool, ``shape``) at ``density`` (from
        :meth:`initial_densities`), drawn from ``mask_generator(seed, 0, index)``."""
        return topology.random_mask(shape, density, mask_generator(self.config.seed, 0, index),
                                    self.config.exact_init)

    def initial_masks(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        densities = self.initial_densities(shapes)
        return {name: self.initial_mask(i, shape, densities[name]) for i, (name, shape) in enumerate(shapes.items())}

    @property
    def cost_kind(self) -> str:
        """The FLOPs rule of a training step under this method (``itop_dist.flops.step_flops``):
        its growth kind, since gradient/momentum growth needs a dense gradient (§8)."""
        return self.config.growth

    def is_update_step(self, step: int) -> bool:
        return self.updates.is_update_step(step)

    def plan(self, shapes: dict[str, tuple[int, ...]], step: int, update_index: int) -> Plan:
        """The update at ``step`` (the ``update_index``-th), for layers of ``shapes`` (in
        layer order); a pure function of these and the configuration."""
        raise NotImplementedError

    def update(self, inputs: UpdateInputs) -> UpdateResult:
        """The update over full tensors, all layers at once (:func:`run_plan` of :meth:`plan`)."""
        shapes = {n: tuple(m.shape) for n, m in inputs.masks.items()}
        return run_plan(self.plan(shapes, inputs.step, inputs.update_index), inputs)


class Keep(Plan):
    """An update that keeps every mask: nothing pruned, nothing grown."""

    def decide(self, layer: Layer) -> Decision:
        return Decision(layer.mask, torch.zeros_like(layer.mask), 0, 0)


@register_method("static")
class Static(Method):
    """Static sparse training (``--fix``): the initial masks never change."""

    updates_masks = False
    cost_kind = "static"  # masks only: never a dense gradient

    def is_update_step(self, step: int) -> bool:
        return False

    def plan(self, shapes: dict[str, tuple[int, ...]], step: int, update_index: int) -> Plan:
        """An explicit update (``Sparsifier.update()``) keeps the masks: nothing is pruned."""
        return Keep(0.0)


@register_method("DST")
class DynamicSparse(Method):
    """Prune and regrow at a fixed density: SET (random growth), RigL (gradient) or sparse
    momentum (momentum), with the ITOP schedules (docs/algorithms.md §3-§6)."""

    def __init__(self, config: SparseConfig, total_steps: int, epoch_steps: float | None = None) -> None:
        super().__init__(config, total_steps, epoch_steps)
        self.needs_grads = config.growth == "gradient"
        self.needs_momenta = config.growth == "momentum"

    def plan(self, shapes: dict[str, tuple[int, ...]], step: int, update_index: int) -> Plan:
        c = self.config
        return PruneRegrow(self.prune_rate(step), c.death, c.growth, c.redistribution, c.threshold, c.seed,
                           update_index)


class PruneRegrow(Plan):
    """One prune-and-regrow update (docs/algorithms.md §3, §4, §5), layer by layer.

    Per layer, num_remove = ceil(r_l * nnz_l) weights are pruned by ``death``; the same number
    (``redistribution='none'``) or a share of the total removed (otherwise) is regrown by
    ``growth`` among the positions inactive after pruning, which include the just-pruned ones.
    The total number of non-zeros is unchanged exactly; with ``none`` every layer's is.

    ``none`` needs no survey. ``magnitude``/``nonzeros`` survey twice: each layer's statistic
    (its share v_l), then each layer's pruned count and free positions at its rate r_l (the
    regrowth caps), from which the budget is allocated before any layer is decided.

    A dense layer (every mask bit on, e.g. a small layer ERK made dense) has nothing to
    explore: it is neither pruned nor regrown, and redistribution sends it nothing (its share
    is left out). Layer ``i`` draws from ``mask_generator(seed, update_index, i)`` either way.
    """

    def __init__(self, rate: float, death: str, growth: str, redistribution: str = "none",
                 threshold: float = 1e-3, seed: int = 0, update_index: int = 0) -> None:
        super().__init__(rate)
        self.death, self.growth, self.redistribution = death, growth, redistribution
        self.threshold, self.seed, self.update_index = threshold, seed, update_index
        self.surveys = 0 if redistribution == "none" else 2
        self._raw: dict[str, float] = {}
        self._removed: dict[str, int] = {}
        self._caps: dict[str, int] = {}
        self._shares: dict[str, float] | None = None
        self._grow: dict[str, int] | None = None

    def survey(self, k: int, layer: Layer) -> None:
        if bool(layer.mask.all()):  # dense: left out of the shares and the budget
            return
        if k == 0:
            self._raw[layer.name] = topology.redistribution_statistic(self.redistribution, layer.weight, layer.mask)
        else:
            kept = int(self._prune(layer).sum())
            self._removed[layer.name] = int(layer.mask.sum()) - kept
            self._caps[layer.name] = layer.mask.numel() - kept

    def finish(self, k: int) -> None:
        if k == 0:
            self._shares = topology.redistribution_shares(self._raw)
        else:
            self._grow = topology.allocate(sum(self._removed.values()), self._shares, self._caps)

    def _prune(self, layer: Layer) -> torch.Tensor:
        mask = layer.mask
        nnz = int(mask.sum())
        r = self.rate
        if self._shares is not None:
            r = topology.layer_prune_rate(self.rate, 1 - nnz / mask.numel(), self._shares[layer.name],
                                          len(self._shares))
        return topology.PRUNE_FNS[self.death](layer.weight, mask, math.ceil(r * nnz), threshold=self.threshold)

    def decide(self, layer: Layer) -> Decision:
        if bool(layer.mask.all()):  # dense: unchanged
            return Decision(layer.mask, torch.zeros_like(layer.mask), 0, 0)
        pruned = self._prune(layer)
        removed = int(layer.mask.sum()) - int(pruned.sum())
        n_grow = removed if self._grow is None else self._grow[layer.name]
        grown = topology.GROW_FNS[self.growth](
            pruned, n_grow, grad=layer.grad, momentum=layer.momentum,
            generator=mask_generator(self.seed, self.update_index, layer.index),
        )
        return Decision(pruned | grown, grown, removed, n_grow)


def prune_and_regrow(
    inputs: UpdateInputs,
    rate: float,
    death: str,
    growth: str,
    redistribution: str = "none",
    threshold: float = 1e-3,
    seed: int = 0,
) -> UpdateResult:
    """One prune-and-regrow update over all layers of ``inputs`` (:class:`PruneRegrow`)."""
    return run_plan(PruneRegrow(rate, death, growth, redistribution, threshold, seed, inputs.update_index), inputs)


# ---------------------------------------------------------------------------------------------
# Dense-to-sparse: gradual magnitude pruning (GMP) and GraNet (docs/algorithms.md §9)


def cubic_density(c: int, c0: int, c1: int, d_init: float, d_final: float) -> float:
    """Zhu & Gupta's cubic schedule as a density, at prune iteration ``c`` (docs/algorithms.md §9.1):
    d_f + (d_i - d_f) (1 - (c - c0) / (c1 - c0))^3, from d_i at c0 to exactly d_f at c1."""
    x = min(max((c - c0) / max(c1 - c0, 1), 0.0), 1.0)
    return d_final + (d_init - d_final) * (1.0 - x) ** 3


class GlobalMagnitude:
    """Keep exactly ``keep`` active weights of largest |W| over all layers together (ties by
    layer order, then flat index), one layer at a time (docs/algorithms.md §12.3): two survey
    passes of a radix select over the float32 bit patterns of |W| (the high 16 bits, then the
    low 15 within the bin of the keep-th largest) give its exact value tau and how many weights
    tied at tau to keep; then :meth:`select` for each layer in order. The result is that of
    ``topology.select_k`` over all layers' scores concatenated, bit for bit. Holds a histogram
    of at most 2^16 int64 between layers. Never activates a weight; unlike the reference's
    |W| >= tau (docs/algorithms.md §12.2, pitfall 11) an all-zero or already-sparse network
    cannot turn dense. Weights must be finite."""

    surveys = 2

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._active = 0
        self._hist: torch.Tensor | None = None
        self._high = self._above = self._tau = self._ties = 0

    def survey(self, k: int, layer: Layer) -> None:
        bits = topology.magnitude_bits(layer.weight)[layer.mask]
        if k == 0:
            self._active += bits.numel()
            hist = topology.radix_histogram(bits)
        elif self.keep:
            hist = topology.radix_histogram(bits, self._high)
        else:
            return
        self._hist = hist if self._hist is None else self._hist + hist

    def finish(self, k: int) -> None:
        if k == 0:
            self.keep = min(self.keep, self._active)
            if self.keep:
                self._high, self._above = topology.radix_pick(self._hist, self.keep)
        elif self.keep:
            low, above = topology.radix_pick(self._hist, self.keep - self._above)
            self._tau = (self._high << topology.RADIX_LOW_BITS) | low
            self._ties = self.keep - self._above - above
        self._hist = None

    def select(self, layer: Layer) -> torch.Tensor:
        """The layer's kept weights (bool, its shape); call for every layer in order."""
        if not self.keep:
            return torch.zeros_like(layer.mask)
        chosen, taken = topology.select_above(layer.weight, layer.mask, self._tau, self._ties)
        self._ties -= taken
        return chosen


def global_magnitude_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                           keep: int) -> dict[str, torch.Tensor]:
    """:class:`GlobalMagnitude` over full tensors held together (bool masks of the weights'
    shapes, by name)."""
    layers = [Layer(i, n, weights[n], m) for i, (n, m) in enumerate(masks.items())]
    chosen = GlobalMagnitude(keep)
    survey_layers(chosen, layers)
    return {layer.name: chosen.select(layer) for layer in layers}


def uniform_layer_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Layer-wise gradual pruning's per-layer targets (docs/algorithms.md §9.3): every layer
    ``density``; once the sparsity reaches 0.8 the classifier (the last masked layer) keeps
    density 0.2 and the other layers share the rest. The totals come from the shapes (the
    reference needed ERK's bookkeeping and divided by zero without it, docs/algorithms.md
    §12.2, pitfall 18)."""
    names = list(shapes)
    numel = {n: math.prod(shapes[n]) for n in names}
    if 1 - density >= 0.8 and len(names) > 1:
        fc = names[-1]
        total, p_fc = sum(numel.values()), numel[fc]
        rest = (total * density - 0.2 * p_fc) / (total - p_fc)
        return {n: (0.2 if n == fc else max(rest, 0.0)) for n in names}
    return {n: density for n in names}


def keep_largest(weight: torch.Tensor, mask: torch.Tensor, density: float) -> torch.Tensor:
    """The int(N d) active weights of largest |W| of one layer (all its active weights when
    it has fewer; ``mask`` itself when ``density`` >= 1); bool, ``mask``'s shape."""
    if density >= 1.0:
        return mask
    scores = torch.where(mask, weight.detach().abs().float(), -1.0)
    return topology.select_k(scores, min(int(mask.numel() * density), int(mask.sum())))


class GradualPlan(Plan):
    """One update of :class:`GradualPruning`: inside the window, global (:class:`GlobalMagnitude`,
    two surveys) or layer-wise (:func:`keep_largest`) magnitude pruning to the scheduled
    density; then, with ``regrow``, :class:`PruneRegrow` by magnitude and ``growth`` per layer."""

    def __init__(self, method: GradualPruning, shapes: dict[str, tuple[int, ...]], step: int,
                 update_index: int) -> None:
        c = method.config
        super().__init__(method.prune_rate(step))
        density = method.target_density(step)
        self._global: GlobalMagnitude | None = None
        self._layer_density: dict[str, float] | None = None
        if density is not None and method.global_:
            self._global = GlobalMagnitude(round(sum(math.prod(s) for s in shapes.values()) * density))
            self.surveys = self._global.surveys
        elif density is not None:
            self._layer_density = uniform_layer_densities(shapes, density)
        self._regrow = (PruneRegrow(self.rate, "magnitude", c.growth, "none", c.threshold, c.seed, update_index)
                        if method.regrow else None)

    def survey(self, k: int, layer: Layer) -> None:
        self._global.survey(k, layer)

    def finish(self, k: int) -> None:
        self._global.finish(k)

    def decide(self, layer: Layer) -> Decision:
        mask = layer.mask
        if self._global is not None:
            mask = self._global.select(layer)
        elif self._layer_density is not None:
            mask = keep_largest(layer.weight, mask, self._layer_density[layer.name])
        pruned = int(layer.mask.sum()) - int(mask.sum())
        if self._regrow is None:
            return Decision(mask, torch.zeros_like(mask), pruned, 0)
        decision = self._regrow.decide(replace(layer, mask=mask))
        decision.pruned += pruned
        return decision


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

    def initial_mask(self, index: int, shape: tuple[int, ...], density: float) -> torch.Tensor:
        if self.dense_start:  # GMP starts from the dense network whatever --sparse-init says
            return torch.ones(shape, dtype=torch.bool)
        return super().initial_mask(index, shape, density)

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

    def plan(self, shapes: dict[str, tuple[int, ...]], step: int, update_index: int) -> Plan:
        return GradualPlan(self, shapes, step, update_index)


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

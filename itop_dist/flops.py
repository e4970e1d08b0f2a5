"""FLOPs accounting (docs/algorithms.md §8): the RigL / ITOP convention, keyed by parameter name.

* FLOPs = 2 x multiply-accumulates of the conv and linear layers, and of the products between
  activations (a transformer's attention), which stay dense at any density; batch norm, layer
  norm, activations, softmax, pooling, biases, residual adds and the loss are ignored.
* Dense forward FLOPs per sample of layer l, F_l, are measured from the real shapes of one
  forward pass (:func:`layer_flops`); f_D = sum F_l. Inference at the per-layer densities
  d_l costs f_S = sum d_l F_l (:func:`sparse_flops`), computed from the actual per-layer
  densities, never from (1 - overall sparsity): ERK puts density where FLOPs are cheap or dear.
* Training per sample per step = forward + backward, the backward twice the forward
  (activation gradient + weight gradient): dense 3 f_D; static and random growth (SET)
  3 f_S; gradient growth (RigL) needs the dense gradient, 2 f_S + f_D, on its update steps;
  momentum growth (sparse momentum) needs it on every step. GMP / GraNet are the same
  rules with f_S following the pruning schedule (GraNet regrows by gradient).
* Run totals accumulate these per-step costs over the run as the densities change
  (:class:`FlopsCounter`) and are reported relative to 3 f_D per sample of the same run.

Units throughout: FLOPs per sample (one input, e.g. one 224x224 image) unless a name says
otherwise; ``total`` values are FLOPs of a whole run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from itop_dist.sparsifier import MASKED_MODULES, maskable_parameters

log = logging.getLogger("itop_dist")

# Growth kinds understood by the cost rules; None means dense training. "static" is also the
# kind for any sparse method that never needs a dense gradient (static masks, GMP pruning).
GROWTH_KINDS = ("static", "random", "gradient", "momentum")

# The key of :func:`layer_flops` for the products between activations (attention's q k^T and
# attn v): no parameter name, so no density ever names it and it counts dense.
ACTIVATION_PRODUCTS = "(activation products)"


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU kernel of ``scaled_dot_product_attention``: PyTorch's counter has
    formulas for the CUDA kernels only (the CPU one would count 0, while the meta device
    decomposes into counted bmm's); it makes the same two products, q k^T and attn v."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


# --------------------------------------------------------------------------------------------
# Forward FLOPs per layer


@torch.no_grad()
def layer_flops(
    model: nn.Module,
    example_input: torch.Tensor | tuple[torch.Tensor, ...],
    batch_size: int | None = None,
) -> dict[str, int]:
    """Dense forward FLOPs per sample of every conv and linear weight, by canonical name, and
    of the products between activations, under :data:`ACTIVATION_PRODUCTS`.

    Runs ``model(example_input)`` once (``*example_input`` for a tuple) under PyTorch's
    ``torch.utils.flop_counter.FlopCounterMode`` and gives each weight the FLOPs counted while
    its module's forward ran: 2 x multiply-accumulates of the convolution or matrix product,
    for a conv 2 * (C_in / groups) * k_h * k_w * C_out * H_out * W_out, for a linear
    2 * in * out times every extra leading dimension per sample (tokens of a (B, T, F) input);
    biases are not counted. A layer called several times is counted each time. The total is
    divided by ``batch_size`` (default: the leading dimension of the first input), which must
    divide it.

    Every product counted outside the masked layers' forwards is an activation-activation
    product, attention's scores q k^T and its weighted sum attn v (2 * N^2 * D per block for
    N tokens of width D, over all heads; Vaswani et al. 2017, §3.2): no mask touches them, so
    they stay dense at any density. They are kept under :data:`ACTIVATION_PRODUCTS` when there
    are any (a CNN has none, and its dict holds its weights only); :func:`sparse_flops` counts
    that entry dense as it does any name without a density.

    Why FlopCounterMode and per-module attribution: its formulas are exactly the papers'
    convention for these layers (measured: ResNet-50 at 224x224 8,178,368,512, vgg-c
    621,946,880, WRN-28-10 10,486,657,536, every layer equal to the shape formula above;
    DeiT-S / ViT-S/16 at 224x224 9,197,764,608, timm's 4.6 GMACs), but its own per-module
    table is keyed by ``ClassName.path`` names, so what runs inside a masked module's forward
    is keyed by the weight's name and the rest is the activation products.

    Only shapes are read, so a model and input on the ``meta`` device work (no memory, no
    compute: ResNet-50 at 224x224 in ~0.2 s); so does a real model on any device. The
    model runs in eval mode (batch norm statistics untouched, batch 1 allowed) and is put
    back in the modes it was in. Every weight ``maskable_parameters`` finds is listed, with
    0 (and a warning) for one that the forward never called through its module, e.g. an
    ``nn.MultiheadAttention`` out_proj, whose weight is used functionally (its product then
    counts among the activation products).
    Raises ``ValueError`` if ``batch_size`` does not divide a layer's FLOPs.
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    batch = inputs[0].shape[0] if batch_size is None else batch_size
    names = {id(p): n for n, p in maskable_parameters(model).items()}
    totals = dict.fromkeys(names.values(), 0)
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    started: list[int] = []  # the counter's total when each running masked forward began

    def begin(module: nn.Module, args: tuple) -> None:
        started.append(counter.get_total_flops())

    def end(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        totals[names[id(module.weight)]] += counter.get_total_flops() - started.pop()

    modes = {m: m.training for m in model.modules()}
    # by module type too: an embedding tied to a linear head shares its weight, not its FLOPs
    masked = [m for m in model.modules() if isinstance(m, MASKED_MODULES) and id(m.weight) in names]
    handles = [h for m in masked for h in (m.register_forward_pre_hook(begin), m.register_forward_hook(end))]
    try:
        model.eval()
        with counter:
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    products = counter.get_total_flops() - sum(totals.values())
    if products:
        totals[ACTIVATION_PRODUCTS] = products
    odd = [n for n, total in totals.items() if total % batch]
    if odd:
        raise ValueError(f"layer_flops: the FLOPs of {odd[:3]} are not a multiple of the batch "
                         f"size {batch}; pass batch_size= if the batch is not the leading dim")
    unseen = [n for n, total in totals.items() if total == 0]
    if unseen:
        log.warning("layer_flops: %d masked weights were not called through their module's "
                    "forward and count 0 FLOPs: %s", len(unseen), unseen[:5])
    return {n: total // batch for n, total in totals.items()}


def sparse_flops(layer_flops: Mapping[str, int], densities: Mapping[str, float]) -> float:
    """Forward (inference) FLOPs per sample at the given per-layer densities: sum d_l F_l.

    Layers without a density (unmasked, e.g. excluded with ``--exclude``) count dense, and so
    do the activation products (:data:`ACTIVATION_PRODUCTS`). A density for a layer
    ``layer_flops`` does not know is an error (names differ: wrapped model, other model)."""
    unknown = sorted(set(densities) - set(layer_flops))
    if unknown:
        raise ValueError(f"sparse_flops: no FLOPs known for {unknown[:3]}; measure layer_flops "
                         f"on the same model (names are canonical parameter names)")
    return float(sum(densities.get(n, 1.0) * f for n, f in layer_flops.items()))


def test_rel(layer_flops: Mapping[str, int], densities: Mapping[str, float]) -> float:
    """Test (inference) FLOPs relative to the dense model: f_S / f_D."""
    return sparse_flops(layer_flops, densities) / sum(layer_flops.values())


test_rel.__test__ = False  # a library function, not a pytest test despite its name


# --------------------------------------------------------------------------------------------
# Training FLOPs


def step_flops(f_dense: float, f_sparse: float, growth: str | None, update_step: bool) -> float:
    """Training FLOPs per sample of one optimizer step, counted exactly for that step.

    growth None: dense, 3 f_D. ``static``/``random``: 3 f_S. ``gradient``: 3 f_S, but
    2 f_S + f_D on an update step (the dense weight gradient RigL ranks growth by; GraNet's
    "(f_D - f_S) on each update step" is the same). ``momentum``: 2 f_S + f_D on every step,
    because the momentum of inactive weights needs their gradient each step; pass
    ``static`` for a run whose masks never change. The mask update itself is ignored.
    """
    if growth is None:
        return 3.0 * f_dense
    if growth not in GROWTH_KINDS:
        raise ValueError(f"growth {growth!r} has no FLOPs rule; use None (dense) or one of "
                         f"{list(GROWTH_KINDS)}")
    if growth == "momentum" or (growth == "gradient" and update_step):
        return 2.0 * f_sparse + f_dense
    return 3.0 * f_sparse


def train_step_flops(
    f_dense: float, f_sparse: float, growth: str | None, update_frequency: int | None
) -> float:
    """Steady-state training FLOPs per sample per step of a method (docs/algorithms.md §8.2).

    growth None: dense. ``update_frequency`` None: masks never change, 3 f_S whatever the
    growth. Gradient growth every ΔT steps: RigL's (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1). This
    formula spreads the one dense-gradient step over ΔT + 1 steps, whereas
    :class:`FlopsCounter` adds (f_D - f_S) on each actual update step, i.e. (f_D - f_S) / ΔT
    per step on average: the two differ by (f_D - f_S) / (ΔT (ΔT + 1)) per step, under
    1e-4 x 3 f_D for ΔT >= 100.
    """
    if growth is not None and update_frequency is None:
        return step_flops(f_dense, f_sparse, "static", update_step=False)
    if growth == "gradient":
        dt = update_frequency
        plain = step_flops(f_dense, f_sparse, growth, update_step=False)
        return (dt * plain + step_flops(f_dense, f_sparse, growth, update_step=True)) / (dt + 1)
    return step_flops(f_dense, f_sparse, growth, update_step=False)


class FlopsCounter:
    """Training FLOPs of a run, accumulated step by step as the densities change.

    ``layer_flops``: per-sample dense forward FLOPs by name (:func:`layer_flops`);
    ``densities``: the per-layer densities training starts with (None: dense). The trainer
    calls :meth:`step` after every optimizer step with the densities that step trained with
    (None when unchanged: f_S is cached and recomputed only when densities are given, so a
    step costs a few float operations). On an update step the masks change *after* the
    step's forward and backward, so pass the new densities on the next call, or with
    :meth:`set_densities` after the update::

        counter = FlopsCounter(flops, sparsifier.layer_densities())
        ...  # after sparsifier.step() returned ``report`` (None on ordinary steps):
        counter.step(None, global_batch, "gradient", update_step=report is not None)
        if report:
            counter.set_densities(report.layer_densities)

    ``samples`` is the step's global batch (all processes and micro-batches), so ``total``
    is the run's cost, not one rank's. Extended training (``--multiplier``) needs nothing:
    its extra steps simply add up.
    """

    def __init__(self, layer_flops: Mapping[str, int],
                 densities: Mapping[str, float] | None = None) -> None:
        self.layer_flops = dict(layer_flops)
        self.f_dense = float(sum(self.layer_flops.values()))
        self.densities: dict[str, float] = {}
        self.f_sparse = self.f_dense
        self.total = 0.0          # training FLOPs of the run so far
        self.dense_total = 0.0    # 3 f_D x samples so far: the dense run's cost
        self.samples = 0
        self.steps = 0
        if densities is not None:
            self.set_densities(densities)

    def set_densities(self, densities: Mapping[str, float]) -> None:
        """New per-layer densities (after a mask update); recomputes f_S."""
        self.f_sparse = sparse_flops(self.layer_flops, densities)
        self.densities = dict(densities)

    def step(self, densities: Mapping[str, float] | None, samples: int, growth: str | None,
             update_step: bool = False) -> float:
        """Count one optimizer step of ``samples`` samples; returns the FLOPs it added.

        densities: those this step trained with, None if unchanged. growth, update_step: see
        :func:`step_flops`."""
        if densities is not None:
            self.set_densities(densities)
        cost = step_flops(self.f_dense, self.f_sparse, growth, update_step) * samples
        self.total += cost
        self.dense_total += 3.0 * self.f_dense * samples
        self.samples += samples
        self.steps += 1
        return cost

    def count_forward(self, samples: int) -> float:
        """Forward-only passes at the current densities (e.g. Sup-tickets' batch-norm
        recalibration), added to the training total (docs/algorithms.md §8.3); returns the FLOPs."""
        cost = self.f_sparse * samples
        self.total += cost
        return cost

    @property
    def train_rel(self) -> float:
        """Training FLOPs so far relative to dense training on the same samples (0 before
        the first step)."""
        return self.total / self.dense_total if self.dense_total else 0.0

    @property
    def test_rel(self) -> float:
        """Inference FLOPs at the current densities relative to dense: f_S / f_D."""
        return self.f_sparse / self.f_dense

    def state_dict(self) -> dict:
        return {"total": self.total, "dense_total": self.dense_total, "samples": self.samples,
                "steps": self.steps, "f_dense": self.f_dense, "densities": dict(self.densities)}

    def load_state_dict(self, sd: dict) -> None:
        """Continue a resumed run's count; refuse one measured on another model or input size."""
        if abs(sd["f_dense"] - self.f_dense) > 1e-9 * self.f_dense:
            raise ValueError(f"FLOPs state was counted for a model of {sd['f_dense']:.4g} dense "
                             f"FLOPs per sample, this one has {self.f_dense:.4g}; resume with "
                             f"the same model and input size")
        if sd["densities"]:
            self.set_densities(sd["densities"])
        self.total = float(sd["total"])
        self.dense_total = float(sd["dense_total"])
        self.samples = int(sd["samples"])
        self.steps = int(sd["steps"])

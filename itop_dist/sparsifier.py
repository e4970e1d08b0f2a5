"""Binds the sparse state to a model and its optimizer: the object a training loop calls.

Usage in any loop (no launcher needed)::

    sparsifier = Sparsifier(model, optimizer, SparseConfig(density=0.05, growth="gradient"),
                            total_steps=epochs * len(loader))
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sparsifier.step()          # re-mask; prune and regrow on update steps
    print(sparsifier.itop_rate)

Rank 0 takes every mask decision; the masks are broadcast and checked on every rank
(:mod:`itop_dist.collectives`), so all ranks train the same sparse network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from itop_dist import collectives
from itop_dist.config import SparseConfig
from itop_dist.methods import METHODS, Method, UpdateInputs
from itop_dist.state import SparseState

log = logging.getLogger("itop_dist")

MASKED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Path components that wrappers insert into parameter names: DDP's ``module`` (only ever the
# first), and torch.compile's, FSDP's and activation checkpointing's private names (anywhere:
# nested wrapping puts them in the middle). A user's own ``module``/``submodule`` stays.
LEADING_WRAPPERS = ("module", "_orig_mod")
INNER_WRAPPERS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def canonical_name(name: str) -> str:
    """Parameter name without DDP / torch.compile / FSDP / checkpoint-wrapper components, so
    masks saved from a wrapped model load into an unwrapped one and back. Only whole dotted
    components are removed (``submodule.weight`` stays as it is)."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in LEADING_WRAPPERS:
        parts = parts[1:]
    return ".".join(p for p in parts if p not in INNER_WRAPPERS)


def maskable_parameters(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Parameter]:
    """Conv and linear weights (docs/algorithms.md §1.1), first and last layer included, by canonical name.

    Biases, normalisation and embedding parameters stay dense. Names containing any of
    ``exclude`` stay dense too (e.g. ``("conv1.weight",)``: ``--exclude conv1.weight``).
    """
    found = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, MASKED_MODULES):
            name = canonical_name(f"{mod_name}.weight" if mod_name else "weight")
            if not any(pattern in name for pattern in exclude):
                found[name] = module.weight
    if not found:
        raise ValueError("the model has no conv or linear weights to sparsify")
    return found


def full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """The full tensor of a (possibly sharded DTensor) parameter, gradient or buffer.
    A collective for a DTensor: every rank must call it."""
    if t is None:
        return None
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place ops change the parameter)."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` that this rank holds of ``like`` (a sharded DTensor parameter);
    ``full`` itself for an ordinary tensor. Masks are kept per shard like this under FSDP."""
    if not isinstance(like, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


@dataclass
class UpdateReport:
    """What one mask update did, for logs. Counts are summed over layers."""

    step: int
    rate: float
    pruned: int
    regrown: int
    density: float
    itop_rate: float
    layer_densities: dict[str, float]

    def __str__(self) -> str:
        return (
            f"step {self.step}: pruned {self.pruned}, regrew {self.regrown} (rate {self.rate:.4f}), "
            f"density {self.density:.4f}. The percentage of the total fired weights is {self.itop_rate:.4f}"
        )


class Sparsifier:
    """Masks, their updates and the ITOP rate for one model and optimizer.

    model: the module being trained (possibly wrapped by DDP/compile); its conv/linear
        weights are masked. optimizer: its per-weight state (momentum, Adam's moments) is
        masked too.
    total_steps: the run's length in optimizer steps (schedules.total_steps), which the
        prune-rate cosine and the update stop are relative to.
    epoch_steps: optimizer steps per epoch x the multiplier; gradual pruning (GraNet, GMP)
        places its window in epochs with it.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: SparseConfig,
        total_steps: int,
        epoch_steps: float | None = None,
        group=None,
    ) -> None:
        self.config = config
        self.optimizer = optimizer
        self.group = group
        self.params = maskable_parameters(model, config.exclude)
        self.method: Method = METHODS[config.method](config, total_steps, epoch_steps)
        self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self.update_until = int(config.update_stop * total_steps)  # no updates after this step
        masks = self.method.initial_masks(self.shapes) if collectives.is_rank0(group) else None
        masks = collectives.broadcast_masks(masks, self.shapes, group)
        self.state = SparseState({n: m.to(self.params[n].device) for n, m in masks.items()})
        self._refresh_multipliers()
        self.apply_masks()

    # --- hooks the training loop calls ---------------------------------------------------
    def step(self) -> UpdateReport | None:
        """Call after every ``optimizer.step()``, before ``zero_grad()``: masks the weights
        (and momentum), counts the step and, on update steps, prunes and regrows.
        Returns what the update did, or None when this was not an update step."""
        self.apply_masks()
        self.state.step += 1
        if self.state.step <= self.update_until and self.method.is_update_step(self.state.step):
            return self.update()
        return None

    @torch.no_grad()
    def apply_masks(self) -> None:
        """W <- W * M for every masked weight and, when ``mask_momentum`` is on, the same for
        every per-weight optimizer state tensor (SGD's momentum, Adam's moments, ...)."""
        for name, p in self.params.items():
            mult = self._mult[name]
            _local(p).mul_(mult)
            if self.config.mask_momentum:
                for buf in self._state_tensors(p):
                    _local(buf).mul_(mult)

    @torch.no_grad()
    def update(self, method: Method | None = None) -> UpdateReport:
        """One mask update: check, gather, decide on rank 0, broadcast, apply, check.

        The first check proves every rank trained the same connectivity since the last update
        (a mask changed on one rank only is caught here, before it can be overwritten).
        ``method``: another method's update instead of the run's own, e.g. Sup-tickets'
        re-explore at the start of each cycle (``itop_dist.suptickets.ReExplore``).
        Raises MaskMismatchError when a rank's masks differ from rank 0's."""
        method = method or self.method
        collectives.check_masks(self.state.masks, self.group)
        on_rank0 = collectives.is_rank0(self.group)
        needs_grads = method.needs_grads
        weights = {n: full_tensor(p) for n, p in self.params.items()}
        grads = {n: full_tensor(p.grad) if needs_grads else None for n, p in self.params.items()}
        momenta = {n: full_tensor(self._momentum_score(p)) if method.needs_momenta else None
                   for n, p in self.params.items()}
        if needs_grads and any(g is None for g in grads.values()):
            raise RuntimeError(
                "gradient growth needs the gradients at the update: call sparsifier.step() after "
                "optimizer.step() and before optimizer.zero_grad()"
            )
        result = None
        if on_rank0:
            inputs = UpdateInputs(weights, dict(self.state.masks), grads, momenta,
                                  self.state.step, self.state.updates + 1)
            result = method.update(inputs)
        new = collectives.broadcast_masks(result.masks if result else None, self.shapes, self.group)
        new = {n: m.to(self.state.masks[n].device) for n, m in new.items()}
        if self.config.regrow_reinit_zero:
            grown = collectives.broadcast_masks(result.grown if result else None, self.shapes, self.group)
            self._zero(grown)
        self.state.set_masks(new)
        self._refresh_multipliers()
        self.apply_masks()
        collectives.check_masks(self.state.masks, self.group)
        pruned = sum(result.pruned.values()) if result else 0
        regrown = sum(result.regrown.values()) if result else 0
        report = UpdateReport(self.state.step, result.rate if result else float("nan"), pruned,
                              regrown, self.density, self.itop_rate, self.state.layer_densities())
        log.info("%s", report)
        return report

    def verify(self) -> None:
        """Raise :class:`MaskMismatchError` on every rank unless its masks and explored union
        equal rank 0's (one collective each)."""
        collectives.check_same(self.state.masks, "masks", self.group)
        collectives.check_same(self.state.fired, "explored unions", self.group)

    # --- numbers -------------------------------------------------------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.state.masks

    @property
    def density(self) -> float:
        return self.state.density

    @property
    def itop_rate(self) -> float:
        """Explored fraction of the masked weights since the start (R_s, docs/algorithms.md §7)."""
        return self.state.itop_rate

    @property
    def at_final_density(self) -> bool:
        """True when the masks are at the run's target density (``final_density``; for methods
        that do not prune gradually, ``density``), up to the per-layer rounding of exact counts
        (at most one weight per layer). Dense-to-sparse methods are at it only once pruning has
        ended, so that no denser model is reported beside the final density."""
        tolerance = len(self.state.masks) / self.state.masked_params
        return abs(self.density - self.config.final_density) <= tolerance

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"state": self.state.state_dict(), "config": self.config.to_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Restore masks, explored union and counters; refuse a different sparse set-up."""
        ours, theirs = self.config.to_dict(), sd.get("config", {})
        for key in ("method", "density", "final_density", "sparse_init", "growth", "death", "exclude"):
            a, b = theirs.get(key), ours.get(key)
            if key == "exclude":
                a, b = tuple(a or ()), tuple(b or ())
            if a != b:
                raise ValueError(
                    f"checkpoint was trained with {key}={a!r} but this run has {key}={b!r}; "
                    f"resume with the same settings or start a new run folder"
                )
        self.state.load_state_dict(sd["state"])
        self._refresh_multipliers()
        self.apply_masks()

    # --- internals -----------------------------------------------------------------------
    def _state_tensors(self, p: torch.Tensor) -> list[torch.Tensor]:
        """Every per-weight state tensor the optimizer keeps for ``p``: those of ``p``'s shape
        (SGD's momentum_buffer; Adam(W)'s exp_avg, exp_avg_sq, max_exp_avg_sq; Adagrad's sum;
        ...), not scalar step counts nor factored statistics of another shape. Under FSDP2
        they are DTensors sharded like ``p``, so ``_local`` of each matches ``_local(p)``."""
        if self.optimizer is None:
            return []
        local_shape = _local(p).shape
        return [t for t in self.optimizer.state.get(p, {}).values()
                if isinstance(t, torch.Tensor) and t.shape == p.shape
                and _local(t).shape == local_shape]

    def _momentum_score(self, p: torch.Tensor) -> torch.Tensor | None:
        """SGD's momentum buffer, or Adam's exp_avg / (sqrt(exp_avg_sq) + 1e-8) (docs/algorithms.md §4.3)."""
        state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
        if "momentum_buffer" in state:
            return state["momentum_buffer"]
        if "exp_avg" in state:
            return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
        raise RuntimeError("momentum growth needs an optimizer with momentum (SGD momentum > 0 or Adam)")

    def _refresh_multipliers(self) -> None:
        mode = self.config.apply_mode
        if mode == "auto":  # a float copy multiplies 2-3x faster than bool on CPU (benchmarks/)
            mode = "float"
        self._mult = {}
        for name, mask in self.state.masks.items():
            shard = local_shard(mask, self.params[name]).to(_local(self.params[name]).device)
            self._mult[name] = shard.to(self.params[name].dtype) if mode == "float" else shard

    def _zero(self, positions: dict[str, torch.Tensor]) -> None:
        """RigL's choice for regrown weights: value 0 and every optimizer state tensor 0
        (momentum, Adam's moments), so a regrown weight starts afresh."""
        for name, p in self.params.items():
            where = local_shard(positions[name], p).to(_local(p).device)
            _local(p).masked_fill_(where, 0)
            for buf in self._state_tensors(p):
                _local(buf).masked_fill_(where, 0)

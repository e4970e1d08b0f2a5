"""Parallelism, applied in one place: the ZeRO stages of ``--sharding`` (Rajbhandari et al.
2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"), torch-native.

==========  =====================================================  ==============================
stage       sharded across ranks                                   how
==========  =====================================================  ==============================
``ddp``     nothing (replicated)                                   Accelerate's DDP wrapper
``zero1``   optimizer state                                        DDP + ``ZeroRedundancyOptimizer``
``zero2``   optimizer state, gradients                             FSDP2, ``reshard_after_forward=False``
``zero3``   optimizer state, gradients, parameters                 FSDP2 (``fsdp`` is its alias)
``hsdp``    as zero3 within a shard group, replicated across them  FSDP2 on a (replicate, shard) mesh
==========  =====================================================  ==============================

The FSDP2 stages apply ``torch.distributed.fsdp.fully_shard`` here, in a fixed order as
torchtitan does: every unit the model's family names (``models.model_fsdp_units``: a residual
block, a conv with its batch norm) first, then the root, which takes the rest (stem,
classifier). Parameters are then DTensors sharded along dim 0 (over the shard group); this
works with NCCL on GPUs and with gloo on CPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from itop_dist import collectives
from itop_dist.sparsifier import canonical_name
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer

STAGES = ("ddp", "zero1", "zero2", "zero3", "hsdp")
FSDP_STAGES = ("zero2", "zero3", "hsdp")  # parameters are DTensors


def shard_mesh(stage: str, device_type: str, world_size: int, shard_group_size: int) -> DeviceMesh | None:
    """The device mesh of an FSDP2 stage: ``hsdp``'s 2-D (replicate, shard) mesh of
    ``world_size // shard_group_size`` x ``shard_group_size`` ranks (consecutive ranks, i.e. one
    node's processes, share a shard group); None (FSDP2's default 1-D mesh over all ranks)
    otherwise. A collective: every rank calls it. Raises ValueError when ``shard_group_size``
    does not divide ``world_size``."""
    if stage != "hsdp":
        return None
    if shard_group_size < 1 or world_size % shard_group_size:
        raise ValueError(f"shard group size {shard_group_size} does not divide the {world_size} processes")
    return init_device_mesh(device_type, (world_size // shard_group_size, shard_group_size),
                            mesh_dim_names=("replicate", "shard"))


def apply_fsdp(model: nn.Module, mixed_precision: str, units: Sequence[nn.Module | list[nn.Module]],
               stage: str = "zero3", mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard ``model`` in place with FSDP2; bf16 compute with fp32 gradient reduction if asked.

    ``units``: submodules of ``model``, each sharded as one unit (a list: modules gathered and
    freed together), in the order they run; the root takes every parameter no unit holds.
    ``stage``: ``zero3``/``hsdp`` free each unit's gathered parameters after its forward (gathered
    again for backward); ``zero2`` keeps them until the backward is done (more memory, one
    all-gather less per unit and step). ``mesh``: :func:`shard_mesh`'s (hsdp) or None.
    Raises ``ValueError`` for a unit that is not a submodule of ``model`` or another stage.
    """
    if stage not in FSDP_STAGES:
        raise ValueError(f"stage {stage!r} does not shard parameters; choose one of {FSDP_STAGES}")
    inside = {id(m) for m in model.modules()}
    for unit in units:
        for module in unit if isinstance(unit, list) else [unit]:
            if id(module) not in inside:
                raise ValueError(f"FSDP unit {type(module).__name__} is not a submodule of the model")
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
        reduce_dtype=torch.float32 if mixed_precision == "bf16" else None,
    )
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=stage != "zero2")
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=stage != "zero2")
    return model


def zero1_optimizer(optimizer: torch.optim.Optimizer) -> ZeroRedundancyOptimizer:
    """``optimizer``'s parameter groups and settings under ZeRO-1: each rank keeps the state
    (momentum, Adam's moments) of its own part of the parameters, steps that part and
    broadcasts it (torch's ``ZeroRedundancyOptimizer`` over the DDP model). Call before
    any step: the state, if any, is not moved."""
    groups = [dict(g) for g in optimizer.param_groups]
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer), **optimizer.defaults)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's per-weight state: ZeRO-1's local one (state of its
    own parameters only), or ``optimizer`` itself."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state on every rank (a collective), on the CPU."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in sd.items()}


class ModelState:
    """The model's full (unsharded) state for checkpoints, the same for replicated and sharded
    runs: parameter names without wrapper prefixes (``module.``), full tensors on the CPU.

    ``state_dict`` is a collective under FSDP (every rank calls it; rank 0 gets the full state,
    the others an empty dict); ``load_state_dict`` takes the full state on every rank and keeps
    each rank's shard. So a checkpoint of any world size or mode loads into any other.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, sd: dict) -> None:
        set_model_state_dict(self.model, sd, options=StateDictOptions(full_state_dict=True))


class OptimizerState:
    """The optimizer's full state keyed by parameter name (``torch.distributed.checkpoint``'s
    layout: ``{"state": {name: {...}}, "param_groups": [{..., "params": [name, ...]}]}``), the
    same for every stage, so a checkpoint of one stage resumes in any other; collectives as
    :class:`ModelState`. ZeRO-1's state is consolidated on rank 0 and put in that layout."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            return self._zero1_state_dict()
        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, sd: dict) -> None:
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            return self._zero1_load(sd)
        set_optimizer_state_dict(self.model, self.optimizer, sd, options=StateDictOptions(full_state_dict=True))

    def _names(self) -> list[str]:
        """Parameter names in the optimizer's own order (its index of each parameter)."""
        name_of = {id(p): canonical_name(n) for n, p in self.model.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def _zero1_state_dict(self) -> dict:
        self.optimizer.consolidate_state_dict(to=0)
        if not collectives.is_rank0():
            return {}
        sd, names = self.optimizer.state_dict(), self._names()
        state = {names[i]: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                 for i, s in sd["state"].items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
                  for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def _zero1_load(self, sd: dict) -> None:
        index = {n: i for i, n in enumerate(self._names())}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                  for g in sd["param_groups"]]
        self.optimizer.load_state_dict({"state": {index[n]: dict(s) for n, s in sd["state"].items()},
                                        "param_groups": groups})

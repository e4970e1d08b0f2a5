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
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from itop_dist import collectives
from itop_dist.sparsifier import canonical_name
from launcher.checkpoint import LazyTensor, Shard, full_tensors
from launcher.config import FSDP_STAGES


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


def _block(t: torch.Tensor) -> torch.Tensor | Shard | None:
    """What this rank writes of ``t`` to a sharded checkpoint: its block of a DTensor (None on
    every replica but the first of an hsdp mesh, and for an empty block), a plain tensor (the
    same on every rank: a buffer, a step count) on rank 0 only."""
    if not isinstance(t, DTensor):
        return t.detach().cpu() if collectives.is_rank0() else None
    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None or any(c and isinstance(p, Replicate) for c, p in zip(coordinate, t.placements)):
        return None
    local = t.to_local()
    if local.numel() == 0:
        return None
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return Shard(local.detach().cpu(), tuple(t.shape), tuple(offset))


def _blocks(tree: dict) -> dict:
    """:func:`_block` of every tensor of a (nested) state dict; what this rank does not write
    is left out."""
    out = {}
    for k, v in tree.items():
        value = _blocks(v) if isinstance(v, dict) else _block(v) if isinstance(v, torch.Tensor) else v
        if value is not None:
            out[k] = value
    return out


def _local_part(value: torch.Tensor | LazyTensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """``value`` (a checkpoint's whole tensor or :class:`LazyTensor`) as ``like`` holds it: this
    rank's block as a DTensor sharded like ``like``, or the whole tensor. Only the block is
    read from a sharded checkpoint. Raises ValueError for another global shape."""
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"{name} has shape {list(value.shape)} in the checkpoint but {list(like.shape)} "
                         f"here; resume with the model it was saved from")
    if not isinstance(like, DTensor):
        return (value.full() if isinstance(value, LazyTensor) else value).to(like.device)
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    if isinstance(value, LazyTensor):
        local = value.region(tuple(offset), tuple(shape))
    else:
        local = value[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    return DTensor.from_local(local.to(like.to_local().device, like.dtype), like.device_mesh, like.placements,
                              shape=like.shape, stride=like.stride())


class ModelState:
    """The model's state for checkpoints, by parameter name without wrapper prefixes
    (``module.``), for every stage: a replicated model's whole tensors (rank 0 writes them), a
    sharded model's blocks (each rank writes its own, :class:`launcher.checkpoint.Shard`;
    no rank gathers the model). ``load_state_dict`` takes either layout and keeps what this
    rank holds, so a checkpoint of any stage and world size loads into any other."""

    def __init__(self, model: nn.Module, sharded: bool = False) -> None:
        self.model, self.sharded = model, sharded

    def state_dict(self) -> dict:
        if self.sharded:
            return _blocks(get_model_state_dict(self.model))
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, sd: dict) -> None:
        current = get_model_state_dict(self.model)
        missing = sorted(set(current) - set(sd))[:3]
        if missing:
            raise ValueError(f"the checkpoint's model lacks {missing}; resume with the model it was saved from")
        set_model_state_dict(self.model, {k: _local_part(sd[k], like, k) for k, like in current.items()})


class OptimizerState:
    """The optimizer's state keyed by parameter name (``torch.distributed.checkpoint``'s
    layout: ``{"state": {name: {...}}, "param_groups": [{..., "params": [name, ...]}]}``), for
    every stage: whole on rank 0 (ddp), or each rank's blocks (the FSDP2 stages: its shard of
    every state tensor; zero1: the whole state of the parameters it owns). Loads from either
    layout into any stage, each rank reading what it holds."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool = False) -> None:
        self.model, self.optimizer, self.sharded = model, optimizer, sharded

    def state_dict(self) -> dict:
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            return self._zero1_state_dict()
        if self.sharded:
            return _blocks(get_optimizer_state_dict(self.model, self.optimizer))
        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, sd: dict) -> None:
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            return self._zero1_load(sd)
        params = {canonical_name(n): p for n, p in self.model.named_parameters()}
        state = {}
        for name, entry in sd["state"].items():
            if name not in params:
                raise ValueError(f"the checkpoint's optimizer has state for {name!r}, which this model lacks; "
                                 f"resume with the model it was saved from")
            p = params[name]
            state[name] = {k: _local_part(v, p, f"{name}/{k}") if tuple(getattr(v, "shape", ())) == tuple(p.shape)
                           else full_tensors(v) for k, v in entry.items()}
        options = StateDictOptions(full_state_dict=not self.sharded)
        set_optimizer_state_dict(self.model, self.optimizer, {"state": state, "param_groups": sd["param_groups"]},
                                 options=options)

    def _names(self) -> list[str]:
        """Parameter names in the optimizer's own order (its index of each parameter)."""
        name_of = {id(p): canonical_name(n) for n, p in self.model.named_parameters()}
        return [name_of[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def _zero1_state_dict(self) -> dict:
        """Each rank's own parameters' whole state (a block at offset 0); the groups on rank 0."""
        names, own = self._names(), self.optimizer.optim.state
        index = {id(p): i for i, p in enumerate(p for g in self.optimizer.param_groups for p in g["params"])}
        state = {names[index[id(p)]]: {k: Shard(v, tuple(v.shape), (0,) * v.dim()) if isinstance(v, torch.Tensor) else v
                                       for k, v in s.items()} for p, s in own.items()}
        if not collectives.is_rank0():
            return {"state": state}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names[start:start + len(g["params"])]}
                  for g, start in zip(self.optimizer.param_groups, _starts(self.optimizer.param_groups))]
        return {"state": state, "param_groups": groups}

    def _zero1_load(self, sd: dict) -> None:
        """ZeRO-1 keeps only its own parameters' state: only those are read."""
        names = self._names()
        index = {n: i for i, n in enumerate(names)}
        own = {index[canonical_name(n)] for n, p in self.model.named_parameters()
               if self.optimizer._param_to_rank[p] == self.optimizer.rank}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                  for g in sd["param_groups"]]
        state = {index[n]: full_tensors(s) for n, s in sd["state"].items() if index[n] in own}
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


def _starts(groups: list[dict]) -> list[int]:
    """The optimizer's index of each group's first parameter."""
    starts, n = [], 0
    for g in groups:
        starts.append(n)
        n += len(g["params"])
    return starts

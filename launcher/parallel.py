"""Parallelism, applied in one place: FSDP2 sharding (``--sharding fsdp``).

Replicated training (``--sharding ddp``) is Accelerate's DDP wrapper, applied by
``accelerator.prepare``. Sharded training applies ``torch.distributed.fsdp.fully_shard`` here,
in a fixed order as torchtitan does: every unit the model's family names
(``models.model_fsdp_units``: a residual block, a conv with its batch norm) first, then the
root, which takes the rest (stem, classifier). Parameters, gradients and optimizer state are
then sharded along dim 0 across all ranks; this works with NCCL on GPUs and with gloo on CPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, mixed_precision: str,
               units: Sequence[nn.Module | list[nn.Module]]) -> nn.Module:
    """Shard ``model`` in place with FSDP2; bf16 compute with fp32 gradient reduction if asked.

    ``units``: submodules of ``model``, each sharded as one unit (a list: modules gathered and
    freed together), in the order they run; the root takes every parameter no unit holds.
    Raises ``ValueError`` for a unit that is not a submodule of ``model``.
    """
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
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


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
    layout), the same for replicated and sharded runs; collectives as :class:`ModelState`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, sd: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, sd, options=StateDictOptions(full_state_dict=True))

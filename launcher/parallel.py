"""Parallelism, applied in one place: FSDP2 sharding (``--sharding fsdp``).

Replicated training (``--sharding ddp``) is Accelerate's DDP wrapper, applied by
``accelerator.prepare``. Sharded training applies ``torch.distributed.fsdp.fully_shard`` here,
in a fixed order as torchtitan does: every block (each child of an ``nn.Sequential`` or
``nn.ModuleList`` that holds parameters, outermost only) first, then the root, which takes the rest (stem,
classifier). Parameters, gradients and optimizer state are then sharded along dim 0 across all
ranks; this works with NCCL on GPUs and with gloo on CPUs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def blocks(model: nn.Module) -> list[nn.Module]:
    """The modules that get their own FSDP unit, in definition order: children of containers
    that hold parameters, outermost only (a ResNet block, not its downsample inside it)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue
        if any(name == b or name.startswith(b + ".") for b in found):
            continue  # inside a block already chosen
        for child_name, child in module.named_children():
            if any(True for _ in child.parameters()):
                found[f"{name}.{child_name}" if name else child_name] = child
    return list(found.values())


def apply_fsdp(model: nn.Module, mixed_precision: str) -> nn.Module:
    """Shard ``model`` in place with FSDP2; bf16 compute with fp32 gradient reduction if asked."""
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
        reduce_dtype=torch.float32 if mixed_precision == "bf16" else None,
    )
    for block in blocks(model):
        fully_shard(block, mp_policy=policy)
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

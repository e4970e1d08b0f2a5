"""Every torch.distributed call of the sparse core, in one place.

Each function is a no-op (or the identity) when torch.distributed is not initialised or the
world has one process, so the single-process path never touches a process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from itop_dist.topology import pack_bits, unpack_bits


class MaskMismatchError(RuntimeError):
    """Raised on every rank when a rank's masks differ from rank 0's."""


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if world_size(group) > 1 else 0


def is_rank0(group: dist.ProcessGroup | None = None) -> bool:
    return rank(group) == 0


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_masks(
    masks: dict[str, torch.Tensor] | None,
    shapes: dict[str, tuple[int, ...]],
    group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor]:
    """Rank 0's masks on every rank, sent as one bit-packed buffer (1 bit per weight).

    ``masks`` is only read on rank 0 (others may pass None); ``shapes`` (the same on every
    rank, in the same order) sizes the buffer. Returns bool CPU tensors.
    """
    if world_size(group) == 1:
        assert masks is not None
        return masks
    sizes = [(torch.Size(s).numel() + 7) // 8 for s in shapes.values()]
    device = _comm_device(group)
    if is_rank0(group):
        assert masks is not None
        buffer = torch.cat([pack_bits(masks[n].cpu()) for n in shapes]).to(device)
    else:
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    chunks = torch.split(buffer.cpu(), sizes)
    return {n: unpack_bits(c, s) for (n, s), c in zip(shapes.items(), chunks)}


def mask_checksums(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """One int64 per layer that changes when any position of the mask changes.

    Sum over active flat indices i of (i * 2654435761 + 1) mod 2^31: position-sensitive, so
    two masks with the same count but different positions differ (int64 never overflows:
    at most 2^31 * numel).
    """
    sums = []
    for m in masks.values():
        idx = torch.nonzero(m.reshape(-1)).reshape(-1).to(torch.int64)
        sums.append(((idx * 2654435761 + 1) % (2**31)).sum())
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


def check_masks(masks: dict[str, torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Compare every rank's masks with rank 0's in one collective; raise on every rank.

    The error names the first differing layer and the ranks that differ.
    """
    if world_size(group) == 1:
        return
    device = _comm_device(group)
    local = mask_checksums(masks).to(device)
    gathered = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu()
    differs = (table != table[0]).any(dim=0)
    if bool(differs.any()):
        first = int(torch.nonzero(differs)[0])
        name = list(masks)[first]
        bad = [r for r in range(table.shape[0]) if table[r, first] != table[0, first]]
        raise MaskMismatchError(
            f"masks differ across ranks: first differing layer {name!r} on rank(s) {bad} "
            f"(vs rank 0); connectivity is no longer identical, stopping"
        )

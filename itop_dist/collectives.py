"""Every torch.distributed call of the sparse core, in one place.

Each function is a no-op (or the identity) when torch.distributed is not initialised or the
world has one process, so the single-process path never touches a process group.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from itop_dist.topology import pack_bits, unpack_bits


class MaskMismatchError(RuntimeError):
    """Raised on every rank when a rank's masks differ from rank 0's."""


class CollectiveTimeout(RuntimeError):
    """A collective of this module waited longer than the process group's timeout
    (``--dist-timeout``) for another rank; the message names the collective."""


def _named(fn):
    """Re-raise a timeout inside collective ``fn`` as CollectiveTimeout naming ``fn``: a rank
    that hangs (another job's settings, a dead peer) ends the job with what was waited for."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:
            text = str(err)
            if isinstance(err, CollectiveTimeout) or not any(w in text.lower() for w in ("timed out", "timeout")):
                raise
            raise CollectiveTimeout(f"{fn.__name__}: rank {rank()} waited past --dist-timeout for the other "
                                    f"ranks ({text.splitlines()[0][:200]})") from err
    return wrapper


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


@_named
def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank (no-op with one process)."""
    if world_size(group) > 1:
        dist.barrier(group)


@_named
def max_over_ranks(value: int, group: dist.ProcessGroup | None = None) -> int:
    """The largest of every rank's ``value`` (an int), on every rank: one all-reduce (MAX) of
    one int64 (``value`` itself with one process)."""
    if world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank if ``flag`` is True on any rank, so that a failure on one rank (a
    full disk, a bad file) stops all ranks together."""
    return bool(max_over_ranks(int(flag), group))


@_named
def broadcast_objects(objects: list, group: dist.ProcessGroup | None = None) -> None:
    """Rank 0's ``objects`` (small picklable values: a path, a message) replace every rank's,
    in place. The pickles travel between this job's own processes; nothing is read from a file."""
    if world_size(group) > 1:
        dist.broadcast_object_list(objects, src=0, group=group, device=_comm_device(group))


@_named
def differing_settings(settings: dict[str, object], group: dist.ProcessGroup | None = None) -> list[str]:
    """Compare every rank's ``settings`` (flat, JSON-able: the resolved configuration and the
    code version) with rank 0's; returns, on EVERY rank, ``"key: rank 0 has A, rank R has B"``
    for each difference (empty when all ranks run the same job). One broadcast and one
    all-gather of small Python objects, at start-up."""
    if world_size(group) == 1:
        return []
    reference = [settings]
    broadcast_objects(reference, group)
    mine = [f"{k}: rank 0 has {reference[0].get(k)!r}, rank {rank(group)} has {settings.get(k)!r}"
            for k in sorted(set(settings) | set(reference[0]), key=str) if settings.get(k) != reference[0].get(k)]
    gathered: list = [None] * world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    return [line for lines in gathered for line in lines]


def _as_indices(numel: int, nnz: int) -> bool:
    """Int32 indices (4 bytes per active weight) beat 1 bit per weight below density 1/32."""
    return 4 * nnz < (numel + 7) // 8


def encoded_size(numel: int, nnz: int) -> int:
    """Bytes :func:`encode_mask` uses for a mask of ``numel`` entries with ``nnz`` ones."""
    return 4 * nnz if _as_indices(numel, nnz) else (numel + 7) // 8


def encode_mask(mask: torch.Tensor) -> torch.Tensor:
    """The smaller of two encodings, as uint8 bytes: bit-packed or int32 flat indices."""
    if _as_indices(mask.numel(), int(mask.sum())):
        idx = torch.nonzero(mask.reshape(-1)).reshape(-1).to(torch.int32)
        return idx.view(torch.uint8)
    return pack_bits(mask)


def decode_mask(data: torch.Tensor, shape: tuple[int, ...], nnz: int) -> torch.Tensor:
    """Inverse of :func:`encode_mask`, given the shape and the number of ones."""
    numel = torch.Size(shape).numel()
    if _as_indices(numel, nnz):
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[data.view(torch.int32).to(torch.int64)] = True
        return mask.reshape(shape)
    return unpack_bits(data, shape)


@_named
def broadcast_masks(
    masks: dict[str, torch.Tensor] | None,
    shapes: dict[str, tuple[int, ...]],
    group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor]:
    """Rank 0's masks on every rank, in two collectives: the per-layer non-zero counts, then
    one byte buffer with each layer bit-packed or as indices, whichever is smaller.

    ``masks`` is only read on rank 0 (others may pass None); ``shapes`` (the same on every
    rank, in the same order) names and sizes the layers. Returns bool CPU tensors.
    """
    if world_size(group) == 1:
        assert masks is not None
        return masks
    device = _comm_device(group)
    src = dist.get_global_rank(group, 0) if group else 0
    if is_rank0(group):
        assert masks is not None
        counts = torch.tensor([int(masks[n].sum()) for n in shapes], dtype=torch.int64)
    else:
        counts = torch.empty(len(shapes), dtype=torch.int64)
    counts = counts.to(device)
    dist.broadcast(counts, src=src, group=group)
    counts = counts.cpu().tolist()
    sizes = [encoded_size(torch.Size(s).numel(), c) for s, c in zip(shapes.values(), counts)]
    if is_rank0(group):
        buffer = torch.cat([encode_mask(masks[n].cpu()) for n in shapes]).to(device)
    else:
        buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=src, group=group)
    chunks = torch.split(buffer.cpu(), sizes)
    return {n: decode_mask(c, s, k) for (n, s), c, k in zip(shapes.items(), chunks, counts)}


def checksums(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One int64 per tensor that changes when any entry changes.

    Bool masks: sum over active flat indices i of (i * 2654435761 + 1) mod 2^31, which is
    position-sensitive (same count, other positions: other sum) and never overflows.
    Other tensors: the float64 dot product with a fixed ramp, reinterpreted as int64 bits, so
    equal tensors give equal sums bit for bit.
    """
    sums = []
    for t in tensors.values():
        flat = t.detach().reshape(-1)
        if t.dtype == torch.bool:
            idx = torch.nonzero(flat).reshape(-1).to(torch.int64)
            sums.append(((idx * 2654435761 + 1) % (2**31)).sum().cpu())
        else:
            ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
            sums.append((flat.double() * ramp).sum().cpu().reshape(1).view(torch.int64)[0])
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


@_named
def check_same(tensors: dict[str, torch.Tensor], what: str = "masks",
               group: dist.ProcessGroup | None = None) -> None:
    """Compare every rank's tensors with rank 0's in one collective; raise on every rank.

    The error names the first differing tensor and the ranks that differ.
    """
    if world_size(group) == 1:
        return
    device = _comm_device(group)
    local = checksums(tensors).to(device)
    gathered = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu()
    differs = (table != table[0]).any(dim=0)
    if bool(differs.any()):
        first = int(torch.nonzero(differs)[0])
        name = list(tensors)[first]
        bad = [r for r in range(table.shape[0]) if table[r, first] != table[0, first]]
        raise MaskMismatchError(
            f"{what} differ across ranks: first differing layer {name!r} on rank(s) {bad} "
            f"(vs rank 0); connectivity is no longer identical, stopping"
        )


def check_masks(masks: dict[str, torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Every rank's masks must equal rank 0's (per-layer checksums, one all_gather)."""
    check_same(masks, "masks", group)

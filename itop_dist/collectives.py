"""Every torch.distributed call of the sparse core, in one place.

Each function is a no-op (or the identity) when torch.distributed is not initialised or the
world has one process, so the single-process path never touches a process group.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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


@dataclass
class Traffic:
    """Bytes this process put on the wire (``sent``) and took off it (``received``) in this
    module's tensor collectives since it started, as the collectives' logical transfers: a
    gather's root receives every other member's buffer, a scatter's and a broadcast's root
    sends one to every other member, an all-gather sends and receives n - 1 buffers, an
    all-reduce 2 (n - 1) / n of its tensor (a ring). Read the difference around a piece of work."""

    sent: int = 0
    received: int = 0

    def add(self, sent: int, received: int) -> None:
        self.sent += int(sent)
        self.received += int(received)


TRAFFIC = Traffic()


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


def counts_bytes(n: int) -> int:
    """Bytes of ``n`` int64 values."""
    return 8 * n


def _count_from_root(nbytes: int, group: dist.ProcessGroup | None) -> None:
    """A broadcast or scatter of ``nbytes`` per member: the root sends one to each other member."""
    if is_rank0(group):
        TRAFFIC.add(nbytes * (world_size(group) - 1), 0)
    else:
        TRAFFIC.add(0, nbytes)


def _count_to_root(nbytes: int, group: dist.ProcessGroup | None) -> None:
    """A gather of ``nbytes`` per member: the root receives one from each other member."""
    if is_rank0(group):
        TRAFFIC.add(0, nbytes * (world_size(group) - 1))
    else:
        TRAFFIC.add(nbytes, 0)


def _count_all_gather(nbytes: int, group: dist.ProcessGroup | None) -> None:
    n = world_size(group)
    TRAFFIC.add(nbytes * (n - 1), nbytes * (n - 1))


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
    _count_from_root(counts_bytes(len(shapes)) + buffer.numel(), group)
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
    _count_all_gather(local.numel() * local.element_size(), group)
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


# --- the sharded sparse state (docs/algorithms.md §12.3) ------------------------------------
# Under FSDP2 each rank keeps only its shard of every mask; the functions below move shards
# between the ranks and rank 0, one layer at a time, and reduce the shards' counts.


def shard_group(mesh, mesh_dim: int) -> dist.ProcessGroup:
    """The process group of the ranks that hold the different shards of a DTensor sharded
    over ``mesh_dim`` of ``mesh`` (a DeviceMesh): the whole mesh for FSDP's 1-D mesh, one row
    of the (replicate, shard) mesh under HSDP (its replicas hold the same shards again)."""
    return mesh.get_group(mesh_dim)


def root_shard_ranks(shard_group: dist.ProcessGroup | None, group: dist.ProcessGroup | None = None
                     ) -> list[int] | None:
    """The members of ``shard_group`` (the shard group of this rank for one weight; None for
    a replicated weight: ``group``'s rank 0 alone), as ranks of ``group``, in ``shard_group``'s
    rank order, when that group is the one of ``group``'s rank 0 and holds this process; None
    otherwise (this rank is in another HSDP replica, or the weight is replicated and this is
    not rank 0). The ranks from which one copy of every block of the weight is gathered."""
    if world_size(group) == 1:
        return [0]
    root = dist.get_global_rank(group, 0) if group is not None else 0
    members = [root] if shard_group is None else [dist.get_global_rank(shard_group, j)
                                                  for j in range(world_size(shard_group))]
    if dist.get_rank() not in members or root not in members:
        return None
    return [dist.get_group_rank(group, g) if group is not None else g for g in members]


@_named
def sum_over_shards(values: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum of every shard group member's ``values`` (an int64 vector, e.g. this rank's
    per-layer mask counts), on every member: one all-reduce (SUM) over ``group`` only, so that
    HSDP's replicas, which hold the same shards, are not counted twice. ``group`` None, or a
    group of one rank: ``values`` itself. Returns an int64 CPU tensor."""
    if group is None or world_size(group) == 1:
        return values.cpu()
    t = values.to(device=_comm_device(group), dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    ring = 2 * (world_size(group) - 1) * counts_bytes(t.numel()) // world_size(group)
    TRAFFIC.add(ring, ring)
    return t.cpu()


@_named
def all_gather_objects(obj, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's ``obj`` (a small picklable value), on every rank, in rank order: one
    all-gather of Python objects, at start-up."""
    if world_size(group) == 1:
        return [obj]
    gathered: list = [None] * world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


@_named
def gather_shards(local: torch.Tensor, numels: list[int], group: dist.ProcessGroup | None = None,
                  everywhere: bool = False) -> list[torch.Tensor] | None:
    """Every rank's ``local`` tensor, flat on the CPU, in rank order: on rank 0 (one gather),
    or on every rank with ``everywhere`` (one all-gather); None on the other ranks.

    ``numels[r]``: the number of entries rank r sends (the same list on every rank); each is
    padded to the largest, so the device buffers hold about one layer. Bool tensors travel as
    uint8 (every backend moves bytes) and come back as bool; other dtypes are kept.
    """
    dtype = local.dtype
    flat = local.detach().reshape(-1)
    if dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if world_size(group) == 1:
        return [flat.cpu().to(dtype)]
    device = _comm_device(group)
    size = max(numels)
    send = torch.zeros(size, dtype=flat.dtype, device=device)
    send[:flat.numel()] = flat.to(device)
    nbytes = send.numel() * send.element_size()
    if everywhere:
        received = [torch.empty_like(send) for _ in numels]
        dist.all_gather(received, send, group=group)
        _count_all_gather(nbytes, group)
    else:
        received = [torch.empty_like(send) for _ in numels] if is_rank0(group) else None
        dist.gather(send, received, dst=dist.get_global_rank(group, 0) if group else 0, group=group)
        _count_to_root(nbytes, group)
        if received is None:
            return None
    return [r[:n].cpu().to(dtype) for r, n in zip(received, numels)]


@_named
def broadcast_int64(values: torch.Tensor | None, shape: tuple[int, ...],
                    group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Rank 0's int64 tensor of ``shape`` on every rank (read on rank 0 only; others may pass
    None): one broadcast. Returns a CPU tensor."""
    if world_size(group) == 1:
        assert values is not None
        return values.cpu()
    device = _comm_device(group)
    t = values.to(device) if is_rank0(group) else torch.empty(shape, dtype=torch.int64, device=device)
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    _count_from_root(counts_bytes(t.numel()), group)
    return t.cpu()


@_named
def scatter_masks(pieces: list[torch.Tensor] | None, shapes: list[tuple[int, ...]], counts: list[int],
                  group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Rank r receives ``pieces[r]`` from rank 0 (one scatter): each piece bit-packed or as
    indices, whichever is smaller (:func:`encode_mask`), padded to the largest.

    ``pieces`` (bool) is read on rank 0 only; ``shapes[r]`` and ``counts[r]`` (its number of
    ones) are known on every rank. Returns this rank's piece as a bool CPU tensor.
    """
    me = rank(group)
    if world_size(group) == 1:
        assert pieces is not None
        return pieces[0].cpu()
    sizes = [encoded_size(torch.Size(s).numel(), c) for s, c in zip(shapes, counts)]
    device = _comm_device(group)
    size = max(max(sizes), 1)
    received = torch.empty(size, dtype=torch.uint8, device=device)
    chunks = None
    if is_rank0(group):
        assert pieces is not None
        chunks = [torch.zeros(size, dtype=torch.uint8, device=device) for _ in pieces]
        for chunk, piece, n in zip(chunks, pieces, sizes):
            chunk[:n] = encode_mask(piece.cpu()).to(device)
    dist.scatter(received, chunks, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    _count_from_root(size, group)
    return decode_mask(received[:sizes[me]].cpu(), shapes[me], counts[me])


@_named
def check_against(local: torch.Tensor, expected: torch.Tensor, names: list[str], whats: list[str],
                  group: dist.ProcessGroup | None = None) -> None:
    """Compare every rank's checksums (``local``: int64, one per tensor it holds) with what it
    should hold (``expected[r]``: rank r's row, the same table on every rank, e.g. computed by
    rank 0 from its decision for each rank's shard), in one all-gather; raise
    :class:`MaskMismatchError` on every rank naming the first differing tensor (``names[i]``,
    of kind ``whats[i]``) and the ranks that hold it wrongly."""
    if world_size(group) == 1:
        table = local.reshape(1, -1).cpu()
    else:
        device = _comm_device(group)
        gathered = [torch.empty_like(local, device=device) for _ in range(world_size(group))]
        dist.all_gather(gathered, local.to(device), group=group)
        _count_all_gather(counts_bytes(local.numel()), group)
        table = torch.stack(gathered).cpu()
    differs = (table != expected).any(dim=0)
    if bool(differs.any()):
        first = int(torch.nonzero(differs)[0])
        bad = [r for r in range(table.shape[0]) if table[r, first] != expected[r, first]]
        raise MaskMismatchError(
            f"{whats[first]} differ across ranks: first differing layer {names[first]!r} on rank(s) {bad} "
            f"(vs rank 0's decision for their shards); connectivity is no longer identical, stopping"
        )

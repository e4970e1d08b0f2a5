"""The sparse state: masks, the explored ('fired') union and the counters, keyed by name.

Pure data: no model, no optimizer, no torch.distributed. Checkpoints hold the masks
bit-packed by rows (1 bit per weight instead of the reference's 32; rows are the blocks FSDP2
shards, so a sharded run writes and reads only its own rows, docs/algorithms.md §12.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from itop_dist.topology import pack_rows, unpack_bits, unpack_rows


@dataclass
class Shard:
    """One rank's block of a larger tensor, for a sharded checkpoint: ``data`` is the block at
    ``offset`` (one index per dimension) of a tensor of ``shape``. A whole tensor kept by one
    rank (ZeRO-1's optimizer state) is a block at offset 0 of its own shape."""

    data: torch.Tensor
    shape: tuple[int, ...]
    offset: tuple[int, ...]


class BlockSource(Protocol):
    """A tensor read on demand (a sharded checkpoint's, ``launcher.checkpoint.LazyTensor``):
    its global ``shape`` and the block of a given shape at an offset."""

    shape: tuple[int, ...]

    def region(self, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor: ...


def read_rows(bits: torch.Tensor | BlockSource, shape: tuple[int, ...], rows: tuple[int, int] | None = None
              ) -> torch.Tensor:
    """Rows ``[start, start + count)`` (all with ``rows`` None) of the bool tensor of ``shape``
    saved as ``bits``: a :func:`pack_rows` tensor (uint8, (R, ceil(C/8))), a source of one read
    lazily (only those rows are read), or a flat :func:`pack_bits` tensor (checkpoints written
    before row packing). Raises ValueError when ``bits`` is not of that shape's packing."""
    start, count = rows if rows is not None else (0, shape[0])
    width = math.ceil(math.prod(shape[1:]) / 8)
    if isinstance(bits, torch.Tensor) and bits.dim() == 1:
        if bits.numel() != math.ceil(math.prod(shape) / 8):
            raise ValueError(f"{bits.numel()} packed bytes cannot hold a mask of shape {list(shape)}")
        return unpack_bits(bits, shape)[start:start + count]
    if tuple(bits.shape) != (shape[0], width):
        raise ValueError(f"packed rows of shape {list(bits.shape)} cannot hold a mask of shape {list(shape)}")
    if count == 0:  # a rank that holds no row of this layer reads nothing
        return torch.zeros((0, *shape[1:]), dtype=torch.bool)
    block = bits[start:start + count] if isinstance(bits, torch.Tensor) else bits.region((start, 0), (count, width))
    return unpack_rows(block, (count, *shape[1:]))


@dataclass
class SparseState:
    """masks[name], fired[name]: bool tensors with the parameter's full shape, or the shape of
    this rank's shard of it when the Sparsifier shards the state (FSDP2); the numbers below
    are then of this shard (``Sparsifier`` reduces them over the shards).

    ``fired`` is the union of every mask used so far (docs/algorithms.md §7): it only grows.
    step: optimizer steps taken; updates: mask updates done.
    """

    masks: dict[str, torch.Tensor]
    fired: dict[str, torch.Tensor] = field(default_factory=dict)
    step: int = 0
    updates: int = 0

    def __post_init__(self) -> None:
        for name, m in self.masks.items():
            if m.dtype != torch.bool:
                raise TypeError(f"mask of {name} must be torch.bool, got {m.dtype}")
        if not self.fired:
            self.fired = {n: m.clone() for n, m in self.masks.items()}

    # --- derived numbers -----------------------------------------------------------------
    def nonzeros(self) -> dict[str, int]:
        return {n: int(m.sum()) for n, m in self.masks.items()}

    def numels(self) -> dict[str, int]:
        return {n: m.numel() for n, m in self.masks.items()}

    def layer_densities(self) -> dict[str, float]:
        return {n: int(m.sum()) / m.numel() for n, m in self.masks.items()}

    @property
    def masked_params(self) -> int:
        """Number of weights under a mask (the ITOP-rate denominator)."""
        return sum(m.numel() for m in self.masks.values())

    @property
    def density(self) -> float:
        """Non-zero masked weights / masked weights."""
        return sum(int(m.sum()) for m in self.masks.values()) / self.masked_params

    @property
    def itop_rate(self) -> float:
        """R_s: explored positions / masked weights, in [0, 1] (docs/algorithms.md §7)."""
        return sum(int(f.sum()) for f in self.fired.values()) / self.masked_params

    def layer_itop_rates(self) -> dict[str, float]:
        return {n: int(f.sum()) / f.numel() for n, f in self.fired.items()}

    # --- changes -------------------------------------------------------------------------
    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Replace masks after an update and add them to the explored union."""
        for name, m in masks.items():
            self.masks[name] = m
            self.fired[name] |= m.to(self.fired[name].device)
        self.updates += 1

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"masks": {name: {"shape", "bits"}}, "fired": ..., "step", "updates"}`` with each
        tensor bit-packed by rows (:func:`pack_rows`; "shape" is the tensor's own)."""
        def packed(tensors: dict[str, torch.Tensor]) -> dict:
            return {n: {"shape": list(t.shape), "bits": pack_rows(t.cpu())} for n, t in tensors.items()}

        return {"masks": packed(self.masks), "fired": packed(self.fired),
                "step": self.step, "updates": self.updates}

    @classmethod
    def from_state_dict(cls, sd: dict, shapes: dict[str, tuple[int, ...]],
                        rows: dict[str, tuple[int, int]] | None = None) -> SparseState:
        """The state :meth:`state_dict` saved (or a sharded run's blocks of it, see
        ``Sparsifier.state_dict``), as CPU tensors: whole, or with ``rows`` only the rows
        ``(start, count)`` of each layer (the ``bits`` may then be read lazily, see
        :func:`read_rows`). Raises ValueError unless its names and shapes are ``shapes`` (the
        model's full parameter shapes)."""
        tensors = {}
        for key in ("masks", "fired"):
            theirs = sd[key]
            if set(theirs) != set(shapes):
                missing = sorted(set(shapes) - set(theirs))[:3]
                extra = sorted(set(theirs) - set(shapes))[:3]
                raise ValueError(
                    f"sparse checkpoint does not match this model: missing {missing}, "
                    f"unexpected {extra}; resume with the model it was saved from"
                )
            for name, entry in theirs.items():
                if list(entry["shape"]) != list(shapes[name]):
                    raise ValueError(
                        f"sparse checkpoint: {name} has shape {entry['shape']} there but "
                        f"{list(shapes[name])} here; resume with the model it was saved from"
                    )
            tensors[key] = {n: read_rows(theirs[n]["bits"], tuple(shapes[n]), rows[n] if rows else None)
                            for n in shapes}
        return cls(tensors["masks"], tensors["fired"], int(sd["step"]), int(sd["updates"]))

    def load_state_dict(self, sd: dict) -> None:
        """Restore from :meth:`state_dict`; names and shapes must match this state's (ValueError)."""
        whole = SparseState.from_state_dict(sd, {n: tuple(m.shape) for n, m in self.masks.items()})
        self.masks = {n: m.to(self.masks[n].device) for n, m in whole.masks.items()}
        self.fired = {n: f.to(self.fired[n].device) for n, f in whole.fired.items()}
        self.step, self.updates = whole.step, whole.updates


def saved_masks(sd: dict) -> dict[str, torch.Tensor]:
    """Every whole mask of a saved sparse state (``sd["state"]["masks"]`` of a checkpoint,
    any layout) as bool CPU tensors of their saved shapes, for tools that have no model.
    Raises ValueError, KeyError or TypeError for a malformed state."""
    return {n: read_rows(e["bits"], tuple(int(s) for s in e["shape"])) for n, e in sd.items()}

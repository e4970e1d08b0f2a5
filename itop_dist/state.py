"""The sparse state: masks, the explored ('fired') union and the counters, keyed by name.

Pure data: no model, no optimizer, no torch.distributed. Checkpoints hold the masks
bit-packed (1 bit per weight instead of the reference's 32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from itop_dist.topology import pack_bits, unpack_bits


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
        def packed(tensors: dict[str, torch.Tensor]) -> dict:
            return {n: {"shape": list(t.shape), "bits": pack_bits(t.cpu())} for n, t in tensors.items()}

        return {"masks": packed(self.masks), "fired": packed(self.fired),
                "step": self.step, "updates": self.updates}

    @classmethod
    def from_state_dict(cls, sd: dict, shapes: dict[str, tuple[int, ...]]) -> SparseState:
        """The state :meth:`state_dict` saved, as CPU tensors; raise ValueError unless its names
        and shapes are ``shapes`` (the model's full parameter shapes)."""
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
            tensors[key] = {n: unpack_bits(theirs[n]["bits"], theirs[n]["shape"]) for n in shapes}
        return cls(tensors["masks"], tensors["fired"], int(sd["step"]), int(sd["updates"]))

    def load_state_dict(self, sd: dict) -> None:
        """Restore from :meth:`state_dict`; names and shapes must match this state's (ValueError)."""
        whole = SparseState.from_state_dict(sd, {n: tuple(m.shape) for n, m in self.masks.items()})
        self.masks = {n: m.to(self.masks[n].device) for n, m in whole.masks.items()}
        self.fired = {n: f.to(self.fired[n].device) for n, f in whole.fired.items()}
        self.step, self.updates = whole.step, whole.updates

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
(:mod:`itop_dist.collectives`), so all ranks train the same sparse network. When the weights
are sharded DTensors (FSDP2: zero2, zero3, hsdp) each rank keeps only its shard of every mask
and of the explored union, and an update streams layer by layer through rank 0
(docs/algorithms.md §12.3).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from itop_dist import collectives
from itop_dist.config import APPLY_MODES, SparseConfig
from itop_dist.methods import METHODS, Layer, Method, UpdateInputs
from itop_dist.state import Shard, SparseState

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


def local_block(p: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offset, shape) of the block of ``p`` that this rank holds: its shard for a sharded
    DTensor, the whole tensor otherwise."""
    if isinstance(p, DTensor):
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return tuple(offset), tuple(shape)
    return (0,) * p.dim(), tuple(p.shape)


def region(offset: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of the block of ``shape`` at ``offset`` in a full tensor."""
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def assemble(pieces: list[torch.Tensor], blocks: list[tuple[tuple[int, ...], tuple[int, ...]]],
             shape: tuple[int, ...]) -> torch.Tensor:
    """The full tensor of ``shape`` from each rank's piece (any shape with the block's number
    of entries) and its block ``(offset, shape)``; blocks held by several ranks (HSDP
    replicas) are written by each, identically. Returns a CPU tensor of the pieces' dtype."""
    full = torch.empty(shape, dtype=pieces[0].dtype)
    for piece, (offset, block) in zip(pieces, blocks):
        full[region(offset, block)] = piece.reshape(block)
    return full


def _shard_mesh_dim(p: torch.Tensor) -> int | None:
    """The mesh dimension a DTensor parameter is sharded over (None: replicated). Raises
    ValueError for a tensor sharded over two mesh dimensions (FSDP with tensor parallelism),
    whose shard group is not one row of the mesh."""
    if not isinstance(p, DTensor):
        return None
    dims = [i for i, placement in enumerate(p.placements) if placement.is_shard()]
    if len(dims) > 1:
        raise ValueError(f"a weight sharded over mesh dimensions {dims} (placements {p.placements}): "
                         f"sparse masks support one sharded dimension (FSDP/HSDP)")
    return dims[0] if dims else None


# apply_mode "auto" by device type (resolve_apply_mode's docstring gives the figures); the
# cuda entry is the unmeasured default, for the GPU check to confirm or change.
AUTO_APPLY_MODES = {"cpu": "float", "cuda": "float"}


def resolve_apply_mode(mode: str, device_type: str) -> str:
    """``"float"``, ``"bool"`` or ``"foreach"``: how masks are multiplied into weights on
    ``device_type`` (``torch.device.type``: ``"cpu"``, ``"cuda"``, ...) for
    ``SparseConfig.apply_mode`` ``mode``; an explicit mode stands as given, ``"auto"`` is
    resolved per device.

    CPU: float, a cached float copy of each mask, multiplied in place one tensor at a time:
    15.7 ms vs 35.0 ms for the bool mask (2.2x) and 16.0 ms for ``foreach`` (no gain without
    kernel launches to save) on ResNet-50 at density 0.2, weights and momenta
    (benchmarks/bench_masks.py, benchmarks/RESULTS.md, 2-core CPU shared with another job,
    2026-12-05). CUDA and any other device: float too, the current default, until the GPU
    check (benchmarks/gpu_check.py) measures the three modes there. Raises ValueError for another
    ``mode`` (itop_dist.config.APPLY_MODES lists them)."""
    if mode not in APPLY_MODES:
        raise ValueError(f"--mask-apply: {mode!r} is unknown; choose one of {list(APPLY_MODES)}")
    if mode != "auto":
        return mode
    return AUTO_APPLY_MODES.get(device_type, "float")


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


@dataclass
class UpdateCost:
    """What the last mask update cost this rank (docs/algorithms.md §12.3).

    seconds: wall time of ``Sparsifier.update()``. held_bytes: the most bytes of full-layer
    tensors this rank held at once for the decision: the gathered inputs (weight, gradient or
    momentum, mask, explored union) and the decided outputs (new mask, grown positions, new
    explored union), counted where they are made and freed; rank 0 only (0 elsewhere).
    Streamed (sharded) it is about one layer's; replicated it is every layer's at once. The
    gathers' receive buffers (one tensor at a time) and the method's own scratch are not in
    it. sent_bytes / received_bytes: what this rank moved in the update's collectives
    (``collectives.Traffic``), the checks before and after included."""

    seconds: float
    held_bytes: int
    sent_bytes: int
    received_bytes: int


class HeldBytes:
    """The bytes of the tensors held now and at most, for :class:`UpdateCost`: ``hold`` when a
    tensor is made, ``free`` when it is let go; a tensor already held (the same object, e.g. a
    mask kept unchanged) is counted once; None is ignored."""

    def __init__(self) -> None:
        self._held: dict[int, int] = {}
        self.now = self.peak = 0

    def hold(self, *tensors: torch.Tensor | None) -> None:
        for t in tensors:
            if t is not None and id(t) not in self._held:
                self._held[id(t)] = t.numel() * t.element_size()
                self.now += self._held[id(t)]
        self.peak = max(self.peak, self.now)

    def free(self, *tensors: torch.Tensor | None) -> None:
        for t in tensors:
            if t is not None:
                self.now -= self._held.pop(id(t), 0)


class Sparsifier:
    """Masks, their updates and the ITOP rate for one model and optimizer.

    model: the module being trained (possibly wrapped by DDP/compile/FSDP2); its conv/linear
        weights are masked. optimizer: its per-weight state (momentum, Adam's moments) is
        masked too.
    total_steps: the run's length in optimizer steps (schedules.total_steps), which the
        prune-rate cosine and the update stop are relative to.
    epoch_steps: optimizer steps per epoch x the multiplier; gradual pruning (GraNet, GMP)
        places its window in epochs with it.

    When a masked weight is a DTensor sharded over a mesh dimension (FSDP2), ``masks`` and
    ``state`` hold this rank's shard of each mask and explored union (bool, the shape of the
    local shard); :meth:`full_masks` and :meth:`full_fired` gather the whole. Otherwise they
    hold the full masks. The numbers (``density``, ``itop_rate``, ...) are exact either way.
    ``update_cost``: what the last update cost (:class:`UpdateCost`; None before the first).
    Constructing it is a collective: every rank must.
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
        self.update_cost: UpdateCost | None = None
        self._layout()
        if self.sharded:
            masks = self._send_initial()
        else:
            masks = self.method.initial_masks(self.shapes) if collectives.is_rank0(group) else None
            masks = collectives.broadcast_masks(masks, self.shapes, group)
        self.state = SparseState({n: m.to(_local(self.params[n]).device) for n, m in masks.items()})
        self._refresh_counts()
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
        every per-weight optimizer state tensor (SGD's momentum, Adam's moments, ...): one
        in-place multiply per tensor, or one ``torch._foreach_mul_`` over all of them
        (``apply_mode`` ``foreach``)."""
        if not self._foreach:  # the training step's path: no lists built
            for name, p in self.params.items():
                mult = self._mult[name]
                _local(p).mul_(mult)
                if self.config.mask_momentum:
                    for buf in self._state_tensors(p):
                        _local(buf).mul_(mult)
            return
        # A fused kernel takes one device and dtype per call (torch.optim groups its foreach
        # steps the same way). State tensors are looked up at every call: they appear at the
        # optimizer's first step and are replaced when its state is loaded.
        groups: dict[tuple, tuple[list, list]] = {}
        for name, p in self.params.items():
            targets = [_local(p)]
            if self.config.mask_momentum:
                targets += [_local(buf) for buf in self._state_tensors(p)]
            for t in targets:
                group = groups.setdefault((t.device, t.dtype), ([], []))
                group[0].append(t)
                group[1].append(self._mult[name])
        for tensors, mults in groups.values():
            torch._foreach_mul_(tensors, mults)

    @torch.no_grad()
    def update(self, method: Method | None = None) -> UpdateReport:
        """One mask update: check, gather, decide on rank 0, send, apply, check.

        The first check proves every rank trained the same connectivity since the last update
        (a mask changed on one rank only is caught here, before it can be overwritten).
        ``method``: another method's update instead of the run's own, e.g. Sup-tickets'
        re-explore at the start of each cycle (``itop_dist.suptickets.ReExplore``).
        A collective: every rank must call it. Raises MaskMismatchError when a rank's masks
        differ from rank 0's (sharded: from rank 0's decision for that rank's shard), and
        RuntimeError when the method needs gradients or momenta that are not there."""
        method = method or self.method
        start, sent, received = time.perf_counter(), collectives.TRAFFIC.sent, collectives.TRAFFIC.received
        self._check(explored=False)
        if method.needs_grads and any(p.grad is None for p in self.params.values()):
            raise RuntimeError(
                "gradient growth needs the gradients at the update: call sparsifier.step() after "
                "optimizer.step() and before optimizer.zero_grad()"
            )
        held = HeldBytes()
        decide = self._decide_sharded if self.sharded else self._decide_replicated
        counts, new, grown = decide(method, held)
        if grown is not None:
            self._zero(grown)
        self.state.set_masks({n: m.to(self.state.masks[n].device) for n, m in new.items()})
        self._refresh_counts()
        self._refresh_multipliers()
        self.apply_masks()
        self._check(explored=False)
        rate, pruned, regrown = counts if counts else (float("nan"), 0, 0)
        report = UpdateReport(self.state.step, rate, pruned, regrown, self.density, self.itop_rate,
                              self.layer_densities())
        self.update_cost = UpdateCost(time.perf_counter() - start, held.peak, collectives.TRAFFIC.sent - sent,
                                      collectives.TRAFFIC.received - received)
        log.info("%s", report)
        return report

    def verify(self) -> None:
        """Raise :class:`MaskMismatchError` on every rank unless its masks and explored union
        equal rank 0's (replicated: one collective each), or, sharded, what rank 0 decided
        for this rank's shards (one collective). A collective: every rank must call it."""
        self._check(explored=True)

    # --- numbers (exact counts over all shards, no collective) ----------------------------
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """This rank's masks by name: bool, the full shape, or the local shard's when the
        weights are sharded (see :meth:`full_masks`)."""
        return self.state.masks

    def nonzeros(self) -> dict[str, int]:
        """Active weights per layer, over the whole (unsharded) mask."""
        return dict(zip(self.shapes, self._counts[: len(self.shapes)].tolist()))

    @property
    def masked_params(self) -> int:
        """Number of weights under a mask (the ITOP-rate denominator), over all shards."""
        return sum(torch.Size(s).numel() for s in self.shapes.values())

    def layer_densities(self) -> dict[str, float]:
        """Active fraction of each layer's whole mask, in [0, 1]."""
        return {n: k / torch.Size(self.shapes[n]).numel() for n, k in self.nonzeros().items()}

    @property
    def density(self) -> float:
        """Non-zero masked weights / masked weights."""
        return sum(self.nonzeros().values()) / self.masked_params

    @property
    def itop_rate(self) -> float:
        """Explored fraction of the masked weights since the start (R_s, docs/algorithms.md §7)."""
        return int(self._counts[len(self.shapes):].sum()) / self.masked_params

    @property
    def at_final_density(self) -> bool:
        """True when the masks are at the run's target density (``final_density``; for methods
        that do not prune gradually, ``density``), up to the per-layer rounding of exact counts
        (at most one weight per layer). Dense-to-sparse methods are at it only once pruning has
        ended, so that no denser model is reported beside the final density."""
        tolerance = len(self.shapes) / self.masked_params
        return abs(self.density - self.config.final_density) <= tolerance

    # --- the whole picture (collectives) --------------------------------------------------
    def full_masks(self) -> dict[str, torch.Tensor]:
        """Every layer's whole mask (bool, the parameter's shape, CPU) on every rank; sharded,
        one all-gather per layer. Unsharded, the state's own tensors (do not modify them).
        A collective: every rank must call it."""
        return self._full(self.state.masks)

    def full_fired(self) -> dict[str, torch.Tensor]:
        """Every layer's whole explored union, like :meth:`full_masks`."""
        return self._full(self.state.fired)

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Masks and explored union bit-packed by rows (``itop_dist.state.SparseState.state_dict``),
        counters and config. Unsharded: the whole state, the same on every rank. Sharded:
        this rank's rows of each layer as :class:`~itop_dist.state.Shard` blocks of the packed
        tensors, kept only by the first rank that holds a block (HSDP's other replicas, and a
        rank holding no row of a layer, keep none), so that no rank gathers anything and a
        checkpoint's blocks cover each tensor exactly once. Not a collective."""
        sd = self.state.state_dict()
        if self.sharded:
            me = collectives.rank(self.group)
            for key in ("masks", "fired"):
                mine = {}
                for name, entry in sd[key].items():
                    block = self._blocks[name][me]
                    if block[1][0] == 0 or self._blocks[name].index(block) != me:
                        continue
                    bits, shape = entry["bits"], self.shapes[name]
                    mine[name] = {"shape": list(shape),
                                  "bits": Shard(bits, (shape[0], bits.shape[1]), (block[0][0], 0))}
                sd[key] = mine
        return {"state": sd, "config": self.config.to_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Restore masks, explored union and counters from a :meth:`state_dict` of any layout,
        whole or assembled from a sharded checkpoint's blocks (whose ``bits`` may be read
        lazily, ``itop_dist.state.BlockSource``: a sharded run reads only its own rows);
        refuse a different sparse set-up (ValueError). A collective when sharded (the ranks
        exchange their blocks' checksums, the reference of the next check): every rank must
        call it."""
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
        if self.sharded:
            me = collectives.rank(self.group)
            rows = {n: (blocks[me][0][0], blocks[me][1][0]) for n, blocks in self._blocks.items()}
            mine = SparseState.from_state_dict(sd["state"], self.shapes, rows)
            for key in ("masks", "fired"):
                setattr(self.state, key, {n: t.to(_local(self.params[n]).device)
                                          for n, t in getattr(mine, key).items()})
            self.state.step, self.state.updates = mine.step, mine.updates
            local = torch.cat([collectives.checksums(self.state.masks), collectives.checksums(self.state.fired)])
            self._expected = torch.stack(collectives.gather_shards(
                local, [local.numel()] * collectives.world_size(self.group), self.group, everywhere=True))
        else:
            self.state.load_state_dict(sd["state"])
        self._refresh_counts()
        self._refresh_multipliers()
        self.apply_masks()

    # --- internals -----------------------------------------------------------------------
    def _layout(self) -> None:
        """Find which weights are sharded and where every rank's block of each lies.

        ``sharded``: some masked weight is a DTensor sharded over a mesh dimension. Then
        ``_blocks[name][r]`` is rank r's (offset, shape) (one all-gather at start-up) and
        ``_groups[name]`` the process group of the ranks holding the other shards of that
        weight (None for a replicated one), over which counts are summed."""
        dims = {n: _shard_mesh_dim(p) for n, p in self.params.items()}
        self.sharded = any(d is not None for d in dims.values())  # the same model on every rank
        self._groups = {n: None if d is None else collectives.shard_group(self.params[n].device_mesh, d)
                        for n, d in dims.items()}
        if self.sharded:
            mine = [local_block(p) for p in self.params.values()]
            for (name, p), (offset, shape) in zip(self.params.items(), mine):
                if any(offset[1:]) or tuple(shape[1:]) != tuple(p.shape[1:]):
                    raise ValueError(f"{name} is sharded along a dimension other than 0 ({p.placements}): "
                                     f"the sparse state is kept by rows, as FSDP2 shards by default")
            table = collectives.all_gather_objects(mine, self.group)
            self._blocks = {n: [blocks[i] for blocks in table] for i, n in enumerate(self.params)}
            self._numels = {n: [torch.Size(shape).numel() for _, shape in b] for n, b in self._blocks.items()}
            self._sources = {n: self._source(n) for n in self.params}

    def _source(self, name: str) -> list[int] | None:
        """The ranks (of ``self.group``, in the order of the weight's shard group) whose blocks
        make up weight ``name`` once, for this rank to take part in gathering it to rank 0:
        rank 0's shard group (under HSDP the first replica; the other replicas hold the same
        blocks again), or rank 0 alone for a replicated weight. None: this rank sends nothing."""
        return collectives.root_shard_ranks(self._groups[name], self.group)

    def _gather(self, name: str, local: torch.Tensor | None) -> torch.Tensor | None:
        """Layer ``name``'s full tensor on rank 0's CPU (None elsewhere), from the blocks of its
        source ranks only (:meth:`_source`: one gather over rank 0's shard group; rank 0's own
        tensor for a replicated weight). ``local``: this rank's block; ranks that are no
        source pass anything (None) and take no part."""
        source = self._sources[name]
        if source is None:
            return None
        if self._groups[name] is None:  # replicated: rank 0 holds it whole
            return local.detach().cpu()
        pieces = collectives.gather_shards(local, [self._numels[name][r] for r in source], self._groups[name])
        return None if pieces is None else assemble(pieces, [self._blocks[name][r] for r in source],
                                                    self.shapes[name])

    def _full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.sharded:
            return {n: t.cpu() for n, t in tensors.items()}
        return {n: assemble(collectives.gather_shards(t, self._numels[n], self.group, everywhere=True),
                            self._blocks[n], self.shapes[n]) for n, t in tensors.items()}

    def _facts(self, name: str, mask: torch.Tensor, fired: torch.Tensor, grown: torch.Tensor | None
               ) -> torch.Tensor:
        """Per rank r (rows), the facts of r's blocks of one layer's full mask, grown positions
        and explored union: [ones of mask, ones of grown (0 if None), checksum of mask,
        checksum of explored union], int64 of shape (ranks, 4)."""
        rows = []
        for offset, shape in self._blocks[name]:
            where = region(offset, shape)
            rows.append(torch.cat([
                torch.tensor([int(mask[where].sum()), int(grown[where].sum()) if grown is not None else 0]),
                collectives.checksums({"mask": mask[where], "fired": fired[where]})]))
        return torch.stack(rows)

    @staticmethod
    def _columns(facts: list[torch.Tensor]) -> torch.Tensor:
        """Every layer's :meth:`_facts` as one table: [ones of masks | ones of grown | checksums
        of masks | checksums of explored unions], int64 of shape (ranks, 4 x layers)."""
        return torch.cat([torch.stack([f[:, j] for f in facts], 1) for j in range(4)], 1)

    def _send(self, name: str, mask: torch.Tensor | None, fired: torch.Tensor | None,
              grown: torch.Tensor | None, with_grown: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Rank 0's decision for layer ``name`` (its full new mask, explored union and grown
        positions; read on rank 0 only) to every rank's blocks, HSDP replicas included: one
        broadcast of the layer's :meth:`_facts`, one scatter of the mask blocks (bit-packed or
        as indices, whichever is smaller) and, with ``with_grown``, one of the grown blocks.
        Returns this rank's mask block, grown block (None without ``with_grown``) and the facts."""
        rank0 = collectives.is_rank0(self.group)
        facts = self._facts(name, mask, fired, grown) if rank0 else None
        facts = collectives.broadcast_int64(facts, (collectives.world_size(self.group), 4), self.group)
        shapes = [shape for _, shape in self._blocks[name]]

        def scatter(full: torch.Tensor | None, col: int) -> torch.Tensor:
            pieces = [full[region(*b)].contiguous() for b in self._blocks[name]] if rank0 else None
            return collectives.scatter_masks(pieces, shapes, facts[:, col].tolist(), self.group)
        return scatter(mask, 0), scatter(grown, 1) if with_grown else None, facts

    def _send_initial(self) -> dict[str, torch.Tensor]:
        """The method's initial masks, drawn by rank 0 one layer at a time and sent as
        :meth:`_send` does (the explored union starts as the mask). Returns this rank's blocks."""
        densities = self.method.initial_densities(self.shapes) if collectives.is_rank0(self.group) else None
        local, facts = {}, []
        for i, (name, shape) in enumerate(self.shapes.items()):
            mask = self.method.initial_mask(i, shape, densities[name]) if densities is not None else None
            local[name], _, f = self._send(name, mask, mask, None, False)
            facts.append(f)
        self._expected = self._columns(facts)[:, 2 * len(self.shapes):]
        return local

    def _decide_replicated(self, method: Method, held: HeldBytes
                           ) -> tuple[tuple[float, int, int] | None, dict[str, torch.Tensor],
                                      dict[str, torch.Tensor] | None]:
        """Every rank holds whole masks: gather full weights (and gradients/momenta), rank 0
        decides on all layers at once, the masks (and grown positions) are broadcast whole.
        Returns ((rate, pruned, regrown) on rank 0, None elsewhere; new masks; grown or None)."""
        weights = {n: full_tensor(p) for n, p in self.params.items()}
        grads = {n: full_tensor(p.grad) if method.needs_grads else None for n, p in self.params.items()}
        momenta = {n: full_tensor(self._momentum_score(p)) if method.needs_momenta else None
                   for n, p in self.params.items()}
        result = counts = None
        if collectives.is_rank0(self.group):
            inputs = UpdateInputs(weights, dict(self.state.masks), grads, momenta,
                                  self.state.step, self.state.updates + 1)
            result = method.update(inputs)
            for d in (weights, grads, momenta, inputs.masks, result.masks, result.grown):
                held.hold(*d.values())
            counts = (result.rate, sum(result.pruned.values()), sum(result.regrown.values()))
        new = collectives.broadcast_masks(result.masks if result else None, self.shapes, self.group)
        grown = None
        if self.config.regrow_reinit_zero:
            grown = collectives.broadcast_masks(result.grown if result else None, self.shapes, self.group)
        return counts, new, grown

    def _decide_sharded(self, method: Method, held: HeldBytes
                        ) -> tuple[tuple[float, int, int] | None, dict[str, torch.Tensor],
                                   dict[str, torch.Tensor] | None]:
        """Every rank holds blocks; the update streams layer by layer through rank 0
        (docs/algorithms.md §12.3). First the plan's survey passes: each layer's weight and mask
        gathered in turn, surveyed and freed. Then per layer: its weight (gradient, momentum),
        mask and explored union gathered to rank 0's CPU, decided, its blocks sent to every rank
        (:meth:`_send`) and freed before the next layer, so rank 0 holds about one layer extra.
        Returns ((rate, pruned, regrown) on rank 0, None elsewhere; this rank's new mask
        blocks; its grown blocks with ``regrow_reinit_zero``, else None)."""
        rank0 = collectives.is_rank0(self.group)
        plan = method.plan(self.shapes, self.state.step, self.state.updates + 1)
        for k in range(plan.surveys):
            for i, (name, p) in enumerate(self.params.items()):
                weight, mask = self._gather(name, _local(p)), self._gather(name, self.state.masks[name])
                if rank0:
                    held.hold(weight, mask)
                    plan.survey(k, Layer(i, name, weight, mask))
                    held.free(weight, mask)
            if rank0:
                plan.finish(k)
        with_grown = self.config.regrow_reinit_zero
        new, grown, facts, pruned, regrown = {}, {} if with_grown else None, [], 0, 0
        for i, (name, p) in enumerate(self.params.items()):
            layer = decision = fired = None
            if self._sources[name] is not None:
                layer = Layer(i, name, self._gather(name, _local(p)), self._gather(name, self.state.masks[name]),
                              self._gather(name, _local(p.grad)) if method.needs_grads else None,
                              self._gather(name, _local(self._momentum_score(p))) if method.needs_momenta else None)
                fired = self._gather(name, self.state.fired[name])
            explored = None
            if rank0:
                held.hold(layer.weight, layer.mask, layer.grad, layer.momentum, fired)
                decision = plan.decide(layer)
                explored = fired | decision.mask
                held.hold(decision.mask, decision.grown, explored)
                pruned, regrown = pruned + decision.pruned, regrown + decision.regrown
            new[name], local_grown, f = self._send(name, decision.mask if decision else None, explored,
                                                   decision.grown if decision else None, with_grown)
            if with_grown:
                grown[name] = local_grown
            facts.append(f)
            if rank0:
                held.free(layer.weight, layer.mask, layer.grad, layer.momentum, fired, decision.mask,
                          decision.grown, explored)
        self._expected = self._columns(facts)[:, 2 * len(self.shapes):]
        return ((plan.rate, pruned, regrown) if rank0 else None), new, grown

    def _check(self, explored: bool) -> None:
        """Raise MaskMismatchError on every rank when a rank's masks (and, with ``explored``,
        explored union) differ. Replicated: each rank's checksums against rank 0's. Sharded:
        each rank's block checksums (masks and explored unions, always both: one collective)
        against those of rank 0's last decision for that rank's blocks, so a block held by
        one rank only is checked too, and HSDP replicas of a block are held to the same."""
        if not self.sharded:
            collectives.check_masks(self.state.masks, self.group)
            if explored:
                collectives.check_same(self.state.fired, "explored unions", self.group)
            return
        names = list(self.shapes)
        local = torch.cat([collectives.checksums(self.state.masks), collectives.checksums(self.state.fired)])
        collectives.check_against(local, self._expected, names * 2,
                                  ["masks"] * len(names) + ["explored unions"] * len(names), self.group)

    def _refresh_counts(self) -> None:
        """Cache the exact per-layer counts of active and explored weights: this rank's
        blocks' counts summed over each weight's shard group (one all-reduce per group; none
        when replicated), so the numbers cost no collective when read."""
        names = list(self.shapes)
        local = torch.tensor([int(self.state.masks[n].sum()) for n in names]
                             + [int(self.state.fired[n].sum()) for n in names], dtype=torch.int64)
        counts = local.clone()
        groups = {id(g): g for g in self._groups.values() if g is not None}  # in layer order
        for key, group in groups.items():
            cols = [i for i, n in enumerate(names) if id(self._groups[n]) == key]
            cols += [len(names) + i for i in cols]
            counts[cols] = collectives.sum_over_shards(local[cols], group)
        self._counts = counts

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
        """The multiplier of each weight's local block: its mask block (the whole mask when
        replicated) as the weight's dtype, or as bool (:func:`resolve_apply_mode` for the
        weight's device)."""
        self._mult, modes = {}, set()
        for name, mask in self.state.masks.items():
            p = self.params[name]
            block = mask.to(_local(p).device)
            mode = resolve_apply_mode(self.config.apply_mode, block.device.type)
            self._mult[name] = block if mode == "bool" else block.to(p.dtype)
            modes.add(mode)
        self._foreach = modes == {"foreach"}

    def _zero(self, positions: dict[str, torch.Tensor]) -> None:
        """RigL's choice for regrown weights: value 0 and every optimizer state tensor 0
        (momentum, Adam's moments), so a regrown weight starts afresh. ``positions``: bool,
        the shape of this rank's state masks."""
        for name, p in self.params.items():
            where = positions[name].to(_local(p).device)
            _local(p).masked_fill_(where, 0)
            for buf in self._state_tensors(p):
                _local(buf).masked_fill_(where, 0)

"""Pure tensor functions that decide which weights exist.

Nothing here touches torch.distributed or global state: every function maps tensors (and an
explicit ``torch.Generator`` where randomness is needed) to tensors, so rank 0 can call them and
tests can check them on the CPU. Masks are ``torch.bool`` tensors with the weight's shape;
``True`` marks an active (non-zero) weight.

Design note: ``docs/algorithms.md`` §2 (initial densities), §3 (prune), §4 (growth) and §5
(redistribution); bare section numbers below refer to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

Shape = Sequence[int]


# --------------------------------------------------------------------------------------------
# Exact k-selection with a deterministic tie-break


def select_k(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Bool mask of exactly ``k`` entries with the largest (or smallest) scores.

    Ties at the k-th value are broken by flat index (lowest index first), i.e. the result is
    that of a stable sort by (score, index), but computed with one ``topk`` instead of a sort.
    ``scores``: any shape, floating dtype; ``k`` in [0, numel]. Returns bool, same shape.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"select_k: k={k} outside [0, {n}]")
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k == n:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = torch.topk(flat, k, largest=largest, sorted=False).values
    tau = kth.max() if not largest else kth.min()
    strictly = flat > tau if largest else flat < tau
    ties = flat == tau
    # Take ties in index order until exactly k are chosen.
    missing = k - int(strictly.sum())
    ties &= torch.cumsum(ties, 0) <= missing
    return (strictly | ties).reshape(scores.shape)


# --------------------------------------------------------------------------------------------
# The same selection over many layers, one layer at a time (docs/algorithms.md §12.3): a radix
# select on the float32 bit patterns of |W|, which for non-negative floats order as the floats.

RADIX_LOW_BITS = 15  # pass 1 counts the high 16 of the 31 value bits, pass 2 the low 15


def magnitude_bits(weight: torch.Tensor) -> torch.Tensor:
    """|W| as float32, reinterpreted as int32 bit patterns (same shape): for finite weights
    a > b as floats exactly when their patterns are (the sign bit of |W| is 0, and -0.0 is +0.0)."""
    return weight.detach().abs().float().contiguous().view(torch.int32)


def radix_histogram(bits: torch.Tensor, high: int | None = None) -> torch.Tensor:
    """One pass of the radix select over one layer's active bit patterns (``bits``: int32,
    :func:`magnitude_bits` of the active weights, any shape). ``high`` None: the count of each
    high part (bits >> 15), int64 of 2^16; otherwise the count of each low part (bits & 0x7fff)
    among the patterns whose high part is ``high``, int64 of 2^15."""
    flat = bits.reshape(-1)
    if high is None:
        return torch.bincount(flat >> RADIX_LOW_BITS, minlength=1 << 16)
    low = flat[(flat >> RADIX_LOW_BITS) == high] & ((1 << RADIX_LOW_BITS) - 1)
    return torch.bincount(low, minlength=1 << RADIX_LOW_BITS)


def radix_pick(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(b, above): the bin of ``hist`` (counts summed over all layers) that holds the ``k``-th
    largest entry (1 <= k <= hist.sum()), and the number of entries in the bins above it.
    Raises ValueError for a k out of range."""
    from_top = hist.flip(0).cumsum(0)
    if not 1 <= k <= int(from_top[-1]):
        raise ValueError(f"radix_pick: k={k} outside [1, {int(from_top[-1])}]")
    j = int(torch.searchsorted(from_top, k))  # the first bin from the top reaching k
    b = hist.numel() - 1 - j
    return b, int(from_top[j]) - int(hist[b])


def select_above(weight: torch.Tensor, mask: torch.Tensor, tau: int, ties: int) -> tuple[torch.Tensor, int]:
    """One layer's share of a global top-k by |W|: its active weights whose bit pattern
    (:func:`magnitude_bits`) is above ``tau``, and of those at ``tau`` the first ``ties`` by
    flat index. Returns (bool mask of ``mask``'s shape, the number of ties taken), so that the
    next layer takes the ties that are left (ties by layer order, then flat index)."""
    bits = magnitude_bits(weight)
    at = mask & (bits == tau)
    at &= torch.cumsum(at.reshape(-1), 0).reshape(at.shape) <= ties
    return (mask & (bits > tau)) | at, int(at.sum())


# --------------------------------------------------------------------------------------------
# Initial layer densities (section 2)


def _raw_ratio(shape: Shape, kernel_dims: bool, power: float) -> float:
    """(sum of dims) / (product of dims), optionally without the kernel dims (ER)."""
    dims = list(shape) if kernel_dims else list(shape[:2])
    return (sum(dims) / math.prod(dims)) ** power


def uniform_densities(shapes: Mapping[str, Shape], density: float) -> dict[str, float]:
    """Every masked tensor gets the same density (section 2.1)."""
    return {name: density for name in shapes}


def erk_densities(
    shapes: Mapping[str, Shape],
    density: float,
    power_scale: float = 1.0,
    kernel_dims: bool = True,
) -> dict[str, float]:
    """Erdős–Rényi(-Kernel) layer densities with the iterative capping of section 2.2.

    density_l = eps * raw_l, raw_l = ((sum of dims) / (product of dims)) ** power_scale, with
    eps solved so that sum(density_l * N_l) = density * sum(N_l). Layers whose density would
    exceed 1 are made dense, all identically-scored layers together, and eps is re-solved.
    ``kernel_dims=False`` gives ER (the same without k_h, k_w).
    """
    numel = {name: math.prod(s) for name, s in shapes.items()}
    raw = {name: _raw_ratio(s, kernel_dims, power_scale) for name, s in shapes.items()}
    dense: set[str] = set()
    while True:
        rhs = sum(density * numel[n] for n in shapes if n not in dense) - sum(
            (1.0 - density) * numel[n] for n in dense
        )
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if divisor == 0:  # every layer is dense
            break
        eps = rhs / divisor
        r_max = max(raw[n] for n in shapes if n not in dense)
        if eps * r_max > 1.0:
            dense |= {n for n in shapes if n not in dense and raw[n] == r_max}
        else:
            break
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def er_itop_densities(shapes: Mapping[str, Shape], density: float) -> dict[str, float]:
    """ITOP ImageNet's uncapped ER with its multiplicative epsilon search (section 2.3).

    Kept for parity runs only: layers above density 1 are clipped to 1 and their budget is
    lost, so the realised total lands below ``density`` (0.1959 for 0.2 on ResNet-50).
    """
    total = density * sum(math.prod(s) for s in shapes.values())
    sum_dims = sum(sum(s) for s in shapes.values())
    eps, factor = 10.0, 0.5
    current = eps * sum_dims
    while True:
        previous = current
        eps = eps * (1 - factor) if current > total else eps * (1 + factor)
        factor *= 0.95
        current = eps * sum_dims
        if abs(previous - total) <= 5:
            break
    return {n: min(1.0, eps * sum(s) / math.prod(s)) for n, s in shapes.items()}


DENSITY_RULES = {
    "uniform": lambda shapes, d, power: uniform_densities(shapes, d),
    "ERK": lambda shapes, d, power: erk_densities(shapes, d, power, kernel_dims=True),
    "ER": lambda shapes, d, power: erk_densities(shapes, d, power, kernel_dims=False),
    "er_itop": lambda shapes, d, power: er_itop_densities(shapes, d),
}


def layer_densities(
    rule: str, shapes: Mapping[str, Shape], density: float, erk_power_scale: float = 1.0
) -> dict[str, float]:
    """Per-layer densities by rule name (``uniform``, ``ERK``, ``ER``, ``er_itop``)."""
    if rule not in DENSITY_RULES:
        raise ValueError(f"--sparse-init {rule!r} is unknown; choose one of {sorted(DENSITY_RULES)}")
    return DENSITY_RULES[rule](shapes, density, erk_power_scale)


def exact_count(density: float, numel: int) -> int:
    """Non-zeros of an exactly initialised layer: round(density * numel)."""
    return round(density * numel)


def random_mask(
    shape: Shape, density: float, generator: torch.Generator, exact: bool = True
) -> torch.Tensor:
    """A random bool mask of the given density.

    ``exact=True``: exactly round(density * numel) positions, uniformly without replacement
    (top-k of uniform scores). ``exact=False``: the reference's independent Bernoulli draw.
    """
    scores = torch.rand(tuple(shape), generator=generator)
    if not exact:
        return scores < density
    return select_k(scores, exact_count(density, scores.numel()))


# --------------------------------------------------------------------------------------------
# Prune ("death"), section 3. Each returns the new (smaller) bool mask.


def prune_magnitude(weight: torch.Tensor, mask: torch.Tensor, n_remove: int, **_) -> torch.Tensor:
    """Remove exactly ``n_remove`` active weights of smallest |W| (index variant, 3.1b).

    Ties are broken by flat index, so the result is deterministic on every device.
    """
    scores = torch.where(mask, weight.detach().abs().float(), math.inf)
    return mask & ~select_k(scores, n_remove, largest=False)


def prune_magnitude_threshold(
    weight: torch.Tensor, mask: torch.Tensor, n_remove: int, **_
) -> torch.Tensor:
    """The CIFAR core's threshold variant (3.1a), for parity runs.

    Keeps |W| > tau, tau = the (zeros + n_remove)-th smallest |W|: removes every weight tied at
    tau and every active exact zero, so it may remove more than ``n_remove``.
    """
    w = weight.detach().abs().float().reshape(-1)
    if n_remove == 0:
        return weight.detach() != 0
    k = int(w.numel() - mask.sum()) + n_remove
    tau = torch.kthvalue(w, min(k, w.numel())).values
    return (weight.detach().abs() > tau) & mask


def prune_set(weight: torch.Tensor, mask: torch.Tensor, n_remove: int, **_) -> torch.Tensor:
    """Canonical SET (Mocanu 2018): the smallest positive and the negative closest to zero.

    Removes ceil(n/2) of the smallest non-negative active weights and the rest from the
    negatives nearest zero, exactly ``n_remove`` in all (if one side runs out, the other
    side gives the difference), so layer counts stay exact.
    """
    w = weight.detach().float()
    nonneg, neg = mask & (w >= 0), mask & (w < 0)
    k_pos = min(math.ceil(n_remove / 2), int(nonneg.sum()))
    k_neg = min(n_remove - k_pos, int(neg.sum()))
    k_pos = n_remove - k_neg
    drop_pos = select_k(torch.where(nonneg, w, math.inf), k_pos, largest=False)
    drop_neg = select_k(torch.where(neg, w, -math.inf), k_neg, largest=True)
    return mask & ~drop_pos & ~drop_neg


def prune_threshold(
    weight: torch.Tensor, mask: torch.Tensor, n_remove: int, threshold: float = 1e-3, **_
) -> torch.Tensor:
    """Keep active weights with |W| > ``threshold``; ``n_remove`` is ignored (section 3.3)."""
    return mask & (weight.detach().abs() > threshold)


PRUNE_FNS = {
    "magnitude": prune_magnitude,
    "magnitude_threshold": prune_magnitude_threshold,
    "SET": prune_set,
    "threshold": prune_threshold,
}


# --------------------------------------------------------------------------------------------
# Growth, section 4. Each returns the bool mask of the positions to activate: exactly
# ``n_grow`` positions, all inactive in ``mask`` (growth never picks an active weight).


def grow_random(
    mask: torch.Tensor, n_grow: int, generator: torch.Generator, **_
) -> torch.Tensor:
    """SET: ``n_grow`` inactive positions uniformly without replacement."""
    scores = torch.rand(mask.shape, generator=generator)
    return select_k(torch.where(mask.cpu(), -1.0, scores), n_grow).to(mask.device)


def grow_by_score(mask: torch.Tensor, n_grow: int, score: torch.Tensor) -> torch.Tensor:
    """The ``n_grow`` inactive positions with the largest ``score`` (ties by index)."""
    if score is None:
        raise ValueError("this growth mode needs a score tensor (gradient or momentum); got None")
    return select_k(torch.where(mask, -1.0, score.detach().abs().float()), n_grow)


def grow_gradient(mask: torch.Tensor, n_grow: int, grad: torch.Tensor, **_) -> torch.Tensor:
    """RigL: inactive positions with the largest |dense gradient|."""
    return grow_by_score(mask, n_grow, grad)


def grow_momentum(mask: torch.Tensor, n_grow: int, momentum: torch.Tensor, **_) -> torch.Tensor:
    """Sparse momentum: inactive positions with the largest |momentum| (SGD buffer or Adam's
    exp_avg / (sqrt(exp_avg_sq) + 1e-8), computed by the caller)."""
    return grow_by_score(mask, n_grow, momentum)


GROW_FNS = {"random": grow_random, "gradient": grow_gradient, "momentum": grow_momentum}


# --------------------------------------------------------------------------------------------
# Redistribution, section 5 (without the reference's count drift).


def redistribution_statistic(mode: str, weight: torch.Tensor, mask: torch.Tensor) -> float:
    """One layer's raw statistic for its share of the regrowth budget (section 5 table): the mean
    |W| over its active weights (``magnitude``; 0.0 for a layer with none) or its number of active
    weights (``nonzeros``). ``weight``: the layer's full weight; ``mask``: bool, its shape.
    Raises ValueError for another ``mode``."""
    if mode == "magnitude":
        return float(weight.detach().abs()[mask].float().mean()) if mask.any() else 0.0
    if mode == "nonzeros":
        return float(mask.sum())
    raise ValueError(f"--redistribution {mode!r}: no per-layer statistic")


def redistribution_shares(raw: Mapping[str, float]) -> dict[str, float]:
    """Normalised per-layer share v_l of the regrowth budget from each layer's
    :func:`redistribution_statistic` (section 5); a NaN statistic (a layer of NaN weights) gets
    share 0 and is left out of the total."""
    total = sum(v for v in raw.values() if not math.isnan(v)) or 1.0
    return {n: (0.0 if math.isnan(v) else v / total) for n, v in raw.items()}


def layer_prune_rate(rate: float, sparsity: float, share: float, n_layers: int) -> float:
    """Section 5.1: a nearly dense layer (sparsity < 0.2) with an above-average share keeps
    more weights: r_l = min(sparsity, rate)."""
    if sparsity < 0.2 and share > 1.0 / n_layers:
        return min(sparsity, rate)
    return rate


def allocate(total: int, shares: Mapping[str, float], caps: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` integer units over layers proportionally to ``shares``, never above
    ``caps``; surplus of capped layers goes to the others (water-filling), and the integer
    rounding uses largest remainders, so the result sums to exactly min(total, sum(caps)).
    """
    total = min(total, sum(caps.values()))
    alloc = {n: 0 for n in shares}
    open_ = {n for n in shares if caps[n] > 0}
    remaining = total
    while remaining > 0 and open_:
        weight = sum(shares[n] for n in open_)
        want = {
            n: remaining * (shares[n] / weight if weight > 0 else 1.0 / len(open_)) for n in open_
        }
        floors = {n: min(int(want[n]), caps[n] - alloc[n]) for n in open_}
        leftovers = remaining - sum(floors.values())
        # Largest remainders first, by name for determinism.
        order = sorted(open_, key=lambda n: (-(want[n] - int(want[n])), n))
        for n in order:
            if leftovers == 0:
                break
            if floors[n] < caps[n] - alloc[n]:
                floors[n] += 1
                leftovers -= 1
        for n, f in floors.items():
            alloc[n] += f
        remaining = total - sum(alloc.values())
        open_ = {n for n in open_ if alloc[n] < caps[n]}
    return alloc


# --------------------------------------------------------------------------------------------
# Compact forms for transfer and checkpoints


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor of shape (R, ...) -> uint8 tensor of shape (R, ceil(C/8)), each row (the C
    entries of one index of dim 0) packed on its own, little-endian bit order. Rows are what
    FSDP2 shards (dim 0), so a rank's block of the packed tensor is the packing of its block of
    the mask: checkpoints of sharded runs are read back by rows at any world size."""
    rows, cols = mask.shape[0], math.prod(mask.shape[1:])  # explicit: a block may have no rows
    flat = mask.reshape(rows, cols).to(torch.uint8)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(rows, pad)], dim=1)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(rows, (cols + pad) // 8, 8) * weights).sum(2, dtype=torch.uint8)


def unpack_rows(packed: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: uint8 (R, ceil(C/8)) -> bool tensor of ``shape`` (R, ...)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, : math.prod(shape[1:])].to(torch.bool).reshape(tuple(shape))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ceil(numel/8) bytes (little-endian bit order): the whole
    tensor as one row of :func:`pack_rows`."""
    return pack_rows(mask.reshape(1, -1)).reshape(-1)


def unpack_bits(packed: torch.Tensor, shape: Shape) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 bytes -> bool tensor of ``shape``."""
    return unpack_rows(packed.reshape(1, -1), (1, math.prod(shape))).reshape(tuple(shape))

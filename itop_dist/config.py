"""Settings of the sparse core: one dataclass, validated on construction.

Field names follow the papers' flags (``--density``, ``--sparse_init``, ``--death``,
``--death-rate``, ``--growth``, ``--redistribution``, ``--update_frequency``); errors name the
flag so that the command-line user knows what to change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from itop_dist.methods import METHODS
from itop_dist.topology import DENSITY_RULES, GROW_FNS, PRUNE_FNS

REDISTRIBUTIONS = ("none", "magnitude", "nonzeros")
DECAY_SCHEDULES = ("cosine", "constant", "linear")
APPLY_MODES = ("auto", "float", "bool", "foreach")


@dataclass
class SparseConfig:
    """How the sparse network is initialised and evolved.

    method: registered method name (``DST`` = SET/RigL/sparse momentum by ``growth``;
        ``static`` = fixed masks, the papers' ``--fix``; ``GraNet``, ``GraNet_uniform``,
        ``GMP``, ``GMP_uniform`` prune gradually from ``density`` to ``final_density``).
    final_density: where gradual pruning ends (None: ``density``, i.e. no pruning).
    init_prune_epoch / final_prune_epoch: the gradual pruning window, in epochs (scaled by
        the multiplier, as GraNet does).
    density: fraction of masked weights that are non-zero, in (0, 1].
    sparse_init: layer-density rule, ``ERK`` (default), ``ER``, ``uniform`` or ``er_itop``.
    exact_init: exactly round(d_l N_l) weights per layer (True) or a Bernoulli draw (parity).
    death / growth / redistribution: prune, regrow and budget rules (docs/algorithms.md §3, §4, §5); growth
        defaults to ``gradient`` for GraNet and ``random`` (SET) otherwise.
    death_rate: initial prune fraction r0; decayed to ``death_rate_min`` by ``decay_schedule``.
    update_frequency: optimizer steps between mask updates; None = static (``--fix``).
    update_stop: fraction of training after which masks stop changing (1.0 = never stop).
    regrow_reinit_zero: set value and momentum of every regrown weight to 0 (RigL), instead of
        the reference's "a weight pruned and regrown in one update keeps its value".
    mask_momentum: zero the SGD momentum of inactive weights after every step (the CIFAR
        cores); None = True except for momentum growth, which needs the momentum of inactive
        weights (sparse momentum, docs/algorithms.md §4.3).
    apply_mode: how masks are multiplied in: ``float`` keeps a float copy of each mask
        (fastest on CPU, measured in benchmarks/), ``bool`` multiplies by the bool mask,
        ``foreach`` multiplies every masked tensor by its float copy in one
        ``torch._foreach_mul_`` (one kernel launch per group on a GPU instead of one per
        tensor), ``auto`` picks the measured fastest for the device
        (``sparsifier.resolve_apply_mode``).
    exclude: substrings of parameter names that stay dense and unmasked (e.g. the first conv).
    seed: seed of the mask generator; kept apart from the data and augmentation RNGs.
    """

    method: str = "DST"
    density: float = 0.05
    final_density: float | None = None
    init_prune_epoch: float = 0.0
    final_prune_epoch: float = 110.0
    sparse_init: str = "ERK"
    erk_power_scale: float = 1.0
    exact_init: bool = True
    death: str = "magnitude"
    death_rate: float = 0.5
    death_rate_min: float = 0.005
    decay_schedule: str = "cosine"
    growth: str | None = None
    redistribution: str = "none"
    update_frequency: int | None = 100
    update_stop: float = 1.0
    threshold: float = 1e-3
    regrow_reinit_zero: bool = False
    mask_momentum: bool | None = None
    apply_mode: str = "auto"
    exclude: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.redistribution == "nonzero":  # the reference's registry key (docs/algorithms.md §12.2, pitfall 8)
            self.redistribution = "nonzeros"
        if self.growth is None:  # GraNet's regrowth is by gradient; ITOP's main.py default is SET
            self.growth = "gradient" if self.method.startswith("GraNet") else "random"
        if self.final_density is None:
            self.final_density = self.density
        if self.mask_momentum is None:
            self.mask_momentum = self.growth != "momentum"
        self.exclude = tuple(self.exclude)
        checks = [
            (self.method in METHODS, "--method",
             f"{self.method!r} is unknown; choose one of {sorted(METHODS)}"),
            (0.0 < self.density <= 1.0, "--density", f"{self.density} must be in (0, 1]"),
            (0.0 < self.final_density <= self.density, "--final-density",
             f"{self.final_density} must be in (0, --density/--init-density = {self.density}]"),
            (0 <= self.init_prune_epoch < self.final_prune_epoch or self.final_density == self.density,
             "--final-prune-epoch", f"{self.final_prune_epoch} must be after --init-prune-epoch "
             f"{self.init_prune_epoch}"),
            (self.sparse_init in DENSITY_RULES, "--sparse_init",
             f"{self.sparse_init!r} is unknown; choose one of {sorted(DENSITY_RULES)}"),
            (self.erk_power_scale > 0, "--erk-power-scale", "must be > 0"),
            (self.death in PRUNE_FNS, "--death",
             f"{self.death!r} is unknown; choose one of {sorted(PRUNE_FNS)}"),
            (0.0 <= self.death_rate <= 1.0, "--death-rate", f"{self.death_rate} must be in [0, 1]"),
            (0.0 <= self.death_rate_min <= self.death_rate or self.death_rate == 0,
             "--death-rate-min", f"{self.death_rate_min} must be in [0, --death-rate]"),
            (self.decay_schedule in DECAY_SCHEDULES, "--decay-schedule",
             f"{self.decay_schedule!r} is unknown; choose one of {list(DECAY_SCHEDULES)}"),
            (self.growth in GROW_FNS, "--growth",
             f"{self.growth!r} is unknown; choose one of {sorted(GROW_FNS)}"),
            (self.redistribution in REDISTRIBUTIONS, "--redistribution",
             f"{self.redistribution!r} is unknown; choose one of {list(REDISTRIBUTIONS)}"),
            (self.update_frequency is None or self.update_frequency >= 1, "--update_frequency",
             f"{self.update_frequency} must be >= 1 (use --fix for static sparse training)"),
            (0.0 < self.update_stop <= 1.0, "--update-stop", f"{self.update_stop} must be in (0, 1]"),
            (self.apply_mode in APPLY_MODES, "--mask-apply",
             f"{self.apply_mode!r} is unknown; choose one of {list(APPLY_MODES)}"),
        ]
        for ok, flag, why in checks:
            if not ok:
                raise ValueError(f"{flag}: {why}")

    def to_dict(self) -> dict:
        return asdict(self)

"""One typed configuration tree for a training run, from a YAML/TOML file plus CLI flags.

Precedence: dataclass defaults < ``--preset NAME`` (configs/presets/) < ``--config FILE`` <
flags given on the command line. The flags are derived from the dataclass fields by tyro
(``--<field>``, or the papers' name in :data:`FLAG_NAMES`); the papers' ``main.py`` flags keep
their names and meanings, and every flag is accepted with underscores and with dashes
(``--update_frequency`` = ``--update-frequency``). The resolved tree is written to the run
folder as ``config.yaml``, which ``--config`` reads back as the same tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import sys
import pathlib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import tyro
import yaml
from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec, StructConstructorSpec, StructFieldSpec

import models
from models.imagenet import INITS
from data_pipelines import DataConfig, list_datasets
from data_pipelines.config import DECODE_DEVICES, LOADERS
from itop_dist import SparseConfig
from itop_dist.config import APPLY_MODES, DECAY_SCHEDULES, REDISTRIBUTIONS
from itop_dist.methods import METHODS
from itop_dist.topology import DENSITY_RULES, GROW_FNS, PRUNE_FNS

Init = Literal[INITS]  # ImageNet ResNet-50's initialisations


@dataclass
class ModelConfig:
    """name: registry name (``--model``), or ``timm/NAME`` for any timm model; init:
    ``fanin``/``classic`` for ImageNet ResNet-50 (``-c``); kwargs: a timm model's keyword
    arguments as ``key=value`` texts (``--model-kwargs img_size=8 patch_size=2``, parsed as
    timm's train.py does); channels_last: None = on for conv models on CUDA; compile:
    ``torch.compile`` the model (inductor) before DDP wraps it (ddp, zero1; refused with the
    FSDP2 stages)."""

    name: str = "digits-mlp"  # a registered model (models.list_models()) in any case, or timm/NAME
    init: Init | None = None
    kwargs: tuple[str, ...] = ()  # a timm model's keyword arguments, key=value (timm's train.py --model-kwargs)
    channels_last: bool | None = None
    # torch.compile the model (inductor) in place, before DDP wraps it: parameter names,
    # checkpoints and masks stay the eager model's, so it may change on --resume; refused with
    # the FSDP2 stages (zero2, zero3, hsdp), whose hooks make it run uncompiled.
    compile: bool = False
    # Start from these weights (a model.safetensors, an itop-export folder or a checkpoint
    # folder); with --sparse the run's own init decides the masks.
    initial_checkpoint: str | None = None

    def __post_init__(self) -> None:
        _check(self.init is None or self.init in INITS, "--init",
               f"{self.init!r}: choose {' or '.join(INITS)} (ImageNet ResNet-50's initialisation)")
        self.kwargs = tuple(self.kwargs)
        _check(not self.kwargs or models.timm_models.is_timm(self.name), "--model-kwargs",
               "only timm models take keyword arguments; use --model timm/NAME or drop --model-kwargs")
        models.parse_model_kwargs(self.kwargs)  # ValueError naming an item that is not key=value


@dataclass
class OptimConfig:
    """SGD with momentum (ITOP CIFAR recipe: Nesterov, L2 5e-4), Adam, or AdamW (weight decay
    decoupled from the gradient: the ViT/DeiT recipes).

    accumulate: micro-batches per optimizer step (gradient accumulation). The global batch is
    processes x --batch-size x accumulate; the LR is never scaled for you.
    bn_weight_decay: False exempts every normalisation-layer parameter from weight decay (the
    ImageNet recipe; the reference's name rule 'bn' misses the downsample BNs, this does not).
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    accumulate: int = 1
    bn_weight_decay: bool = True

    def __post_init__(self) -> None:
        _check(self.accumulate >= 1, "--grad-accum-steps", f"{self.accumulate} must be >= 1")
        _check(self.name in ("sgd", "adam", "adamw"), "--optimizer", f"{self.name!r}: choose sgd, adam or adamw")
        _check(self.lr > 0, "--lr", f"{self.lr} must be > 0")
        _check(0 <= self.label_smoothing < 1, "--label-smoothing", "must be in [0, 1)")
        _check(self.weight_decay >= 0, "--l2", "must be >= 0")


@dataclass
class ScheduleConfig:
    """Length of training and the LR schedule.

    epochs x multiplier epochs are trained (ITOP's extended training; fractional allowed).
    lr_schedule ``multistep``: x gamma at each milestone (fractions of the epochs; the papers'
    1/2 and 3/4), applied at epoch boundaries; ``cosine``: per step to 0; ``constant``.
    milestone_epochs: the decays at these epochs instead (Sup-tickets ImageNet's --first_m,
    --second_m, --third_m).
    warmup_epochs: lr (e + 1) / (W + 1) in epoch e < W (ImageNet recipe).
    max_steps: stop after this many optimizer steps (smoke tests, benchmarks).
    eval_every: evaluate every N steps as well as at each epoch end (None: epoch ends only).
    decay_frequency: accepted for the papers' commands; unused there and here (docs/algorithms.md §6.5).
    """

    epochs: float = 250
    multiplier: float = 1.0
    lr_schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.75)
    milestone_epochs: tuple[int, ...] | None = None
    gamma: float = 0.1
    warmup_epochs: int = 0
    max_steps: int | None = None
    eval_every: int | None = None
    decay_frequency: int | None = None

    def __post_init__(self) -> None:
        self.milestones = tuple(self.milestones)
        _check(self.epochs > 0, "--epochs", f"{self.epochs} must be > 0")
        _check(self.multiplier > 0, "--multiplier", f"{self.multiplier} must be > 0")
        _check(self.lr_schedule in ("multistep", "cosine", "constant"), "--lr-schedule",
               f"{self.lr_schedule!r}: choose multistep, cosine or constant")
        _check(all(0 < m < 1 for m in self.milestones), "--milestones", "fractions in (0, 1)")
        _check(self.max_steps is None or self.max_steps >= 1, "--max-steps", "must be >= 1")
        _check(self.eval_every is None or self.eval_every >= 1, "--eval-every", "must be >= 1")
        _check(self.warmup_epochs >= 0, "--warmup", "must be >= 0")


@dataclass
class CheckpointConfig:
    """every_steps: also save every N steps (always at each epoch end and at the end).
    keep_last: how many recent checkpoints to keep (the best one is kept besides).
    resume: ``auto`` (latest in the run folder, if any) or a checkpoint folder."""

    every_steps: int | None = None
    keep_last: int = 2
    resume: str | None = None

    def __post_init__(self) -> None:
        _check(self.keep_last >= 1, "--keep-last", "must be >= 1")
        _check(self.every_steps is None or self.every_steps >= 1, "--save-every", "must be >= 1")


@dataclass
class LogConfig:
    """output_dir: the run folder (default runs/<model>-<data>-<method>-d<density>-s<seed>).
    wandb: log to Weights & Biases too (``--no-wandb`` turns it off); wandb_mode ``auto`` is
    online when logged in, offline (files under the run folder) otherwise."""

    output_dir: str | None = None
    log_every: int = 50
    progress: bool = True
    wandb: bool = True
    wandb_project: str = "itop_dist"
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    plots: bool = True

    def __post_init__(self) -> None:
        _check(self.log_every >= 1, "--log-interval", "must be >= 1")
        _check(self.wandb_mode in ("auto", "online", "offline"), "--wandb-mode",
               f"{self.wandb_mode!r}: choose auto, online or offline")


@dataclass
class TicketsConfig:
    """Sup-tickets (``--pre_train --cyclic_train``; docs/algorithms.md §10, launcher/plugins/suptickets.py).

    cycle: epochs per cycle; cycle_rate: fraction of the epochs for the cyclic phase (rounded
    down to whole cycles), or cyclic_epochs directly (ImageNet's --cyclic_epochs).
    cyc_lr: triangular LR lr_1 -> lr_2 -> lr_1 in each cycle (else the LR stays where the
    pre-train phase left it). re_explore: one prune-and-regrow at large_death_rate at the
    start of each cycle. no_mask_updates: no other mask updates in the cyclic phase.
    update_bn: recalibrate BN statistics of each superposed model on the training data.
    superposing: CAA (running equal-weight average) or CIMA (constant factor cima_factor).
    """

    enabled: bool = False
    cycle: int = 4
    cycle_rate: float = 0.1
    cyclic_epochs: int | None = None
    cyc_lr: bool = False
    lr_1: float = 0.05
    lr_2: float = 0.0001
    re_explore: bool = False
    large_death_rate: float = 0.8
    no_mask_updates: bool = False
    update_bn: bool = False
    superposing: Literal["CAA", "CIMA"] = "CAA"
    cima_factor: float = 0.5
    label: str | None = None
    pretrain_epochs: int | None = None

    def __post_init__(self) -> None:
        _check(self.cycle >= 1, "--cycle", "must be >= 1")
        _check(0 <= self.cycle_rate < 1, "--cycle_rate", "must be in [0, 1)")
        _check(self.superposing in ("CAA", "CIMA"), "--superposing_method",
               f"{self.superposing!r}: choose CAA or CIMA")
        _check(0 < self.cima_factor <= 1, "--CIMA_factor", "must be in (0, 1]")
        _check(0 < self.large_death_rate <= 1, "--large-death-rate", "must be in (0, 1]")


@dataclass
class TrainConfig:
    """The whole run. ``sparse`` False trains the dense model (the papers' default)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparse: bool = False
    sparsity: SparseConfig = field(default_factory=SparseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tickets: TicketsConfig = field(default_factory=TicketsConfig)
    seed: int = 17
    mixed_precision: Literal["launcher", "no", "bf16", "fp16", "auto"] = "launcher"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The ZeRO stage (launcher/parallel.py's table); "launcher": the Accelerate config's FSDP
    # settings (zero3, or zero2 with fsdp_reshard_after_forward false), else ddp. fsdp = zero3.
    sharding: Literal["launcher", "ddp", "zero1", "zero2", "zero3", "hsdp", "fsdp"] = "launcher"
    # hsdp: processes per shard group (replicas = processes / this); default the processes per node.
    shard_group_size: int | None = None
    dist_timeout: float = 10.0  # minutes a collective may wait for the other ranks
    # configs/presets/<preset>.yaml, applied beneath --config and the flags (recorded, so that the
    # run's config.yaml says where its values came from).
    preset: str | None = None

    def __post_init__(self) -> None:
        self.sparsity.seed = self.seed  # masks are drawn from --seed, identically on every rank
        _check(self.mixed_precision in ("launcher", "no", "bf16", "fp16", "auto"), "--mixed-precision",
               f"{self.mixed_precision!r}: choose launcher (accelerate launch's --mixed_precision or "
               f"config file; default), no, bf16, fp16 or auto (bf16 where the GPU has it)")
        _check(self.device in ("auto", "cpu", "cuda"), "--device", "choose auto, cpu or cuda")
        _check(self.dist_timeout > 0, "--dist-timeout", f"{self.dist_timeout:g} must be > 0 (minutes)")
        _check(self.device != "cuda" or torch.cuda.is_available(), "--device",
               "cuda: no GPU is visible here (torch.cuda.is_available() is False); use --device cpu "
               "or auto")
        if self.sharding == "fsdp":  # the earlier name of zero3, kept for the papers' scripts
            self.sharding = "zero3"
        _check(self.sharding in ("launcher", *STAGES), "--sharding",
               f"{self.sharding!r}: choose {', '.join(STAGES)} (fsdp = zero3) or launcher")
        _check(not (self.sharding in FSDP_STAGES and self.mixed_precision == "fp16"), "--mixed-precision",
               f"fp16 with --sharding {self.sharding} is not supported (FSDP2 has no loss scaler); use bf16")
        _check(self.shard_group_size is None or self.sharding == "hsdp", "--shard-group-size",
               f"{self.shard_group_size} needs --sharding hsdp")
        _check(self.shard_group_size is None or self.shard_group_size >= 1, "--shard-group-size",
               f"{self.shard_group_size} must be >= 1 (processes per shard group)")
        _check(not (self.sparse and self.sparsity.growth == "momentum" and self.optim.name == "sgd"
                    and self.optim.momentum == 0), "--growth",
               "momentum growth regrows by the optimizer's momentum, and --momentum 0 keeps none; "
               "set --momentum > 0 (0.9 in the sparse momentum paper) or use --optimizer adam")
        _check(not (self.sharding == "zero1" and self.sparse and self.sparsity.growth == "momentum"),
               "--growth", "momentum growth with --sharding zero1: rank 0 decides from every weight's "
               "momentum, which ZeRO-1 spreads over the ranks; use --sharding ddp or zero3")
        _check(not self.tickets.enabled or self.sparse, "--cyclic_train", "Sup-tickets needs --sparse")
        t = self.tickets
        _check(t.pretrain_epochs is None or t.cyclic_epochs is None
               or t.pretrain_epochs + t.cyclic_epochs == self.schedule.epochs * self.schedule.multiplier,
               "--pretrain_epoch", f"{t.pretrain_epochs} + --cyclic_epochs {t.cyclic_epochs} must equal "
               f"--epochs {self.schedule.epochs:g}")
        if self.data.name != "synthetic":
            fits = models.model_datasets(self.model.name)  # raises for an unknown --model; () for timm
            _check(not fits or self.data.name in fits, "--data",
                   f"model {self.model.name} does not fit {self.data.name}; it fits {', '.join(fits)}")

    @property
    def run_dir(self) -> pathlib.Path:
        """``--output-dir``, or ``runs/<readable parts>-<identity hash>``: one folder per run, so
        two runs that differ in any setting of their identity never share a folder."""
        if self.log.output_dir:
            return pathlib.Path(self.log.output_dir)
        s = self.sparsity
        if self.sparse:
            method = s.method if s.method != "DST" else f"{s.growth}"
            density = f"-d{s.density:g}" + (f"-f{s.final_density:g}" if s.final_density != s.density else "")
        else:
            method, density = "dense", ""
        model = self.model.name.replace("/", "-")  # timm/NAME: one folder, not runs/timm/
        return pathlib.Path("runs") / (f"{model}-{self.data.name}-{method}{density}-s{self.seed}-"
                                       f"{identity_hash(self.to_dict())}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that may change when a run is resumed; every other setting is the run's identity.
# Epochs may be extended; cadences of logs, evaluations and checkpoints, where the data lies and
# how it is decoded, and the machine (device, processes, sharding, and so the per-process batch
# and accumulation: the elastic rule of launcher/trainer.py) may change; so may the name of the
# preset, whose values are settings of their own. --compile may change too: compiled kernels
# round differently from eager ones, but the model, its masks and the recipe are the same, so a
# run resumed with or without it is the same experiment (as with channels_last and the machine).
RESUMABLE = ("schedule.epochs", "schedule.max_steps", "schedule.eval_every", "checkpoint.", "log.", "dist_timeout",
             "data.data_dir", "data.download", "data.num_workers", "data.loader", "data.batch_size",
             "data.test_batch_size", "data.check_data", "optim.accumulate", "device", "sharding",
             "shard_group_size", "model.channels_last", "model.compile", "model.initial_checkpoint", "tickets.label",
             "preset")


def default_channels_last(device_type: str, input_shape: tuple[int, ...]) -> bool:
    """``--channels-last``'s default (``model.channels_last`` None): on for image models (input
    (C, H, W)) on CUDA, where cuDNN's NHWC convolution kernels are the fast ones with bf16/fp16;
    off on CPUs and for flat inputs. The trainer and ``itop-eval`` decide with this one rule."""
    return device_type == "cuda" and len(input_shape) == 3


def flat_config(tree: dict, prefix: str = "") -> dict:
    """A nested configuration dict as one level of dotted keys (tuples as lists)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def identity(config: dict) -> dict:
    """The run's identity: its whole resolved configuration (``TrainConfig.to_dict()``, flat,
    dotted keys) minus :data:`RESUMABLE`."""
    return {k: v for k, v in flat_config(config).items()
            if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE)}


def identity_hash(config: dict) -> str:
    """8 hex digits of the SHA-256 of the identity (canonical JSON): the run folder's suffix."""
    blob = json.dumps(identity(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def identity_diff(saved: dict, config: dict) -> list[str]:
    """``key: saved -> now`` for every identity setting that differs (sorted)."""
    a, b = identity(saved), identity(config)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _check(ok: bool, flag: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{flag}: {why}")


# ---------------------------------------------------------------------------------------------
# Building the tree from nested dicts


class BadValue(ValueError):
    """A value of the wrong type at config key ``key`` (dotted); ``parse_config`` names the
    flag or the file it came from."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"config: {key} {why}")
        self.key, self.why = key, why


def from_dict(cls: type, values: dict, where: str = "") -> typing.Any:
    """Instantiate dataclass ``cls`` from a nested dict, every value checked against its field's
    type first (sections must be mappings; bools are not numbers; numbers are finite; list
    elements typed). Raises BadValue (a ValueError) for a wrong type, ValueError otherwise."""
    if not isinstance(values, dict):
        raise BadValue(where.rstrip(".") or "the top level",
                       f"must be a section (a mapping of keys), got {_shown(values)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names, key=str)
    if unknown:
        raise ValueError(f"config: unknown key {where}{unknown[0]!r}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(hint, value, f"{where}{key}")
    return cls(**kwargs)


def _shown(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r:.40}"


def _coerce(hint, value, key: str):
    """``value`` as field type ``hint``: lists (or one scalar) to typed tuples, ints to floats;
    BadValue naming the key and the expected type otherwise."""
    base = _base(hint)
    if value is None:
        if base is not hint:
            return None
        raise BadValue(key, f"must be {_expected(base)}, got null")
    if typing.get_origin(base) is tuple:
        kind = typing.get_args(base)[0]
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(kind, v, f"{key}[{i}]") for i, v in enumerate(items))
    if base is bool and not isinstance(value, bool):
        raise BadValue(key, f"must be true or false, got {_shown(value)}")
    if base in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or (base is int and not isinstance(value, int))):
        raise BadValue(key, f"must be {_expected(base)}, got {_shown(value)}")
    if base is float:
        if not math.isfinite(value):
            raise BadValue(key, f"must be a finite number, got {value!r}")
        return float(value)
    if (base is str or typing.get_origin(base) is Literal) and not isinstance(value, str):
        raise BadValue(key, f"must be a string, got {_shown(value)}")
    if isinstance(value, str):
        return _canonical_choice(value, choices(key, base))
    return value


def _base(hint):
    """The type of an optional field (``float`` for ``float | None``); ``hint`` otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _canonical_choice(value: str, options: tuple[str, ...]) -> str:
    """``value`` spelled as the one choice it equals ignoring case (``gradient`` for
    ``Gradient``); unchanged otherwise, so that the field's own check names the choices."""
    same = [c for c in options if c.lower() == value.lower()]
    return same[0] if len(same) == 1 else value


def _expected(base) -> str:
    if typing.get_origin(base) is Literal:
        return "a string"
    if typing.get_origin(base) is tuple:
        return f"a list of {_expected(typing.get_args(base)[0])}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        base, getattr(base, "__name__", str(base)))


def load_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a nested dict (its top level
    must be a mapping of sections). Raises ConfigError naming the file."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: {path} does not exist; pass a YAML or TOML file")
    try:
        text = p.read_text(encoding="utf-8")
        tree = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not a text file (not UTF-8); pass a YAML or TOML "
                          f"file") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"--config: {path} is not valid {p.suffix[1:].upper() or 'YAML'}: "
                          f"{str(err).splitlines()[0]}") from None
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError(f"--config: {path}: the top level must be a mapping of sections "
                          f"(model:, data:, sparsity:, ...), got {_shown(tree)}")
    return tree


def set_path(tree: dict, dotted: str, value) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


# ---------------------------------------------------------------------------------------------
# The command line: one flag per field of the tree, derived by tyro

# Flags that are not --<field name>: the papers' names, and the fields that several sections
# share (name, channels_last). (flag, *aliases); an empty tuple: no flag of its own.
FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "model.name": ("--model",),
    "model.init": ("--init", "-c"),
    "model.kwargs": ("--model-kwargs",),
    "data.name": ("--data",),
    "data.data_dir": ("--data-dir", "--datadir"),
    "data.batch_size": ("--batch-size", "-b"),
    "data.num_workers": ("--num-workers", "-j", "--workers"),
    "data.channels_last": ("--loader-channels-last",),
    "sparsity.density": ("--density", "--init-density"),
    "sparsity.death": ("--death", "--prune"),
    "sparsity.death_rate": ("--death-rate", "--prune-rate"),
    "sparsity.apply_mode": ("--mask-apply",),
    "sparsity.seed": (),  # --seed: masks are drawn from the run's seed
    "optim.name": ("--optimizer",),
    "optim.weight_decay": ("--weight-decay", "--l2", "--wd"),
    "optim.accumulate": ("--grad-accum-steps", "--gradient-accumulation-steps"),
    "schedule.warmup_epochs": ("--warmup",),
    "checkpoint.every_steps": ("--save-every",),
    "log.output_dir": ("--output-dir", "--save-dir"),
    "log.log_every": ("--log-interval", "--log-every", "-p", "--print-freq"),
    "tickets.enabled": ("--pre_train", "--cyclic_train"),
    "tickets.pretrain_epochs": ("--pretrain_epoch",),
    "tickets.no_mask_updates": ("--no_maskupdates",),
    "tickets.update_bn": ("--update_bn", "--bn_update"),
    "tickets.superposing": ("--superposing_method",),
    "tickets.cima_factor": ("--CIMA_factor",),
    "tickets.label": ("--indicate_method",),
}

# Flags that take every value up to the next flag (timm's nargs="*": --model-kwargs a=1 b=2).
MULTI_VALUE = ("model.kwargs",)

# Bools that take a value (``--nesterov false``), as the papers' scripts pass them; every other
# bool is a switch (``--download``, ``--no-download``).
TRUE_FALSE = ("model.channels_last", "data.channels_last", "sparsity.exact_init", "sparsity.mask_momentum",
              "optim.nesterov", "optim.bn_weight_decay")

# The papers' flags that stand for another flag and its value.
# The ZeRO stages of --sharding (launcher/parallel.py applies them).
STAGES = ("ddp", "zero1", "zero2", "zero3", "hsdp")
FSDP_STAGES = ("zero2", "zero3", "hsdp")  # parameters are DTensors

SHORTHANDS = {"--fix": ("--method", "static"), "--fp16": ("--mixed-precision", "fp16"), "--dense": ("--no-sparse",)}

PRESETS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "presets"

# The values of settings typed ``str`` whose module keeps them in a tuple or a registry (the
# launcher's own settings are Literal types). Model names are matched by the model registry.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": tuple(list_datasets()), "data.loader": LOADERS, "data.decode_device": DECODE_DEVICES,
    "sparsity.method": tuple(METHODS), "sparsity.sparse_init": tuple(DENSITY_RULES),
    "sparsity.death": tuple(PRUNE_FNS), "sparsity.growth": tuple(GROW_FNS),
    "sparsity.redistribution": REDISTRIBUTIONS, "sparsity.decay_schedule": DECAY_SCHEDULES,
    "sparsity.apply_mode": APPLY_MODES, "preset": tuple(sorted(p.stem for p in PRESETS.glob("*.yaml"))),
}


def choices(key: str, hint=None) -> tuple[str, ...]:
    """The values setting ``key`` (dotted) takes, matched ignoring case: its Literal type's, or
    :data:`CHOICES`; () for a free value."""
    base = _base(hint)
    if typing.get_origin(base) is Literal:
        return typing.get_args(base)
    return CHOICES.get(key, ())


@dataclass(frozen=True)
class Flag:
    """One setting on the command line. path: its dotted config key (``config`` for --config);
    names: the flag, then its aliases; hint: the field's type; switch: a bool without a value
    (``--download`` sets it, ``--no-download`` clears it)."""

    path: str
    names: tuple[str, ...]
    hint: typing.Any
    switch: bool

    @property
    def flag(self) -> str:
        """The spelling tyro parses: the flag with dashes."""
        return "--" + self.names[0][2:].replace("_", "-")

    def tokens(self, value) -> list[str]:
        if self.path in MULTI_VALUE:
            return [self.flag, *value]
        if self.switch:
            return [self.flag if value else f"--no-{self.flag[2:]}"]
        return [self.flag, value]


def _leaves(cls, prefix: str = ""):
    """(dotted path, type) of every setting of config dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, hints[f.name]


@functools.cache
def cli_flags() -> dict[str, Flag]:
    """Every flag by the dotted path it sets: ``--<field>`` unless :data:`FLAG_NAMES` names it,
    plus ``--config``."""
    flags = {"config": Flag("config", ("--config",), str | None, False)}
    for path, hint in _leaves(TrainConfig):
        names = FLAG_NAMES.get(path, (f"--{path.rsplit('.', 1)[-1]}",))
        if names:
            flags[path] = Flag(path, names, hint, hint is bool and path not in TRUE_FALSE)
    return flags


def _spellings(flag: str) -> list[str]:
    """Both spellings of a long flag: with dashes and with underscores (the papers use both)."""
    if not flag.startswith("--"):
        return [flag]
    body = flag[2:]
    return sorted({f"--{body}", f"--{body.replace('-', '_')}", f"--{body.replace('_', '-')}"})


@functools.cache
def accepted_flags() -> dict[str, tuple[Flag, bool | None]]:
    """Every spelling itop-train accepts -> (its flag, the value a switch spelling sets; None for
    a flag followed by its value). Raises AssertionError if two flags share a spelling."""
    out: dict[str, tuple[Flag, bool | None]] = {}
    for flag in cli_flags().values():
        for name in flag.names:
            spelled = [(s, True if flag.switch else None) for s in _spellings(name)]
            if flag.switch:
                spelled += [(s, False) for s in _spellings(f"--no-{name[2:]}")]
            for spelling, value in spelled:
                assert out.get(spelling, (flag,))[0] is flag, f"{spelling} names two settings"
                out[spelling] = (flag, value)
    return out


def papers_spellings(argv: list[str]) -> list[tuple[Flag, str | bool, str]]:
    """The command line as (flag, value, as written) in order, every spelling resolved to its
    flag. The papers' command lines need more than a spelling: ``--first_m A --second_m B
    --third_m C`` -> ``--milestone-epochs A,B,C``; the launcher's own flags dropped; a bare path
    is ``--data-dir`` (the papers pass the data folder as a positional argument); ``--arch``/``-a``
    is the ImageNet scripts' ``--model``, so without ``--data`` (or ``--preset``) it means
    ``--preset imagenet`` (configs/presets/imagenet.yaml: their main.py's defaults,
    docs/algorithms.md §6.6); Sup-tickets ImageNet's ``--density`` beside ``--init-density`` is
    the density of the superposed model, which must be ``--final-density``.

    Raises ConfigError for an unknown flag (naming the nearest known one), a flag without its
    value, or a second argument without a flag."""
    accepted, flags = accepted_flags(), cli_flags()
    args = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--") else [arg])]
    pairs: list[tuple[Flag, str | bool, str]] = []
    marks, positional, arch, i = {}, None, False, 0
    while i < len(args):
        arg = args[i]
        if arg in ("--first_m", "--second_m", "--third_m") and i + 1 < len(args):
            marks[arg] = args[i + 1]
            i += 2
        elif arg in LAUNCHER_ONLY:
            i += 2
        elif arg in SHORTHANDS:
            args[i:i + 1] = SHORTHANDS[arg]
        elif len(arg) > 2 and arg[1] != "-" and accepted.get(arg[:2], (None, True))[1] is None:
            args[i:i + 1] = [arg[:2], arg[2:]]  # a short flag with its value attached: -j20
        elif arg in accepted or arg in ("--arch", "-a"):
            arch |= arg in ("--arch", "-a")
            flag, value = accepted["--model" if arg in ("--arch", "-a") else arg]
            if flag.path in MULTI_VALUE:
                values = list(itertools.takewhile(lambda a: not a.startswith("-"), args[i + 1:]))
                value, i = values, i + len(values)
            elif value is None:
                if i + 1 == len(args):
                    raise ConfigError(f"{arg}: expected a value ({_metavar(flag)})")
                value, i = args[i + 1], i + 1
            pairs.append((flag, value, arg))
            i += 1
        elif arg.startswith("-") and not _is_number(arg):
            near = difflib.get_close_matches(arg.replace("_", "-"), [s for s in accepted if "_" not in s], n=1)
            raise ConfigError(f"{arg}: no such flag" + (f"; did you mean {near[0]}?" if near else "")
                              + " (itop-train --help lists them)")
        elif positional is None:
            positional, i = arg, i + 1
        else:
            raise ConfigError(f"unrecognized argument {arg!r}: the data folder {positional!r} is the only "
                              f"argument without a flag")
    given = {flag.path for flag, _, _ in pairs}
    if marks:
        pairs.append((flags["schedule.milestone_epochs"],
                      ",".join(marks[k] for k in ("--first_m", "--second_m", "--third_m") if k in marks), "--first_m"))
    if positional is not None and "data.data_dir" not in given:
        pairs.append((flags["data.data_dir"], positional, "DATA_DIR"))
    if arch and not {"data.name", "preset"} & given:
        pairs.append((flags["preset"], "imagenet", "--arch"))
    written = [w.replace("_", "-") for _, _, w in pairs]
    if "--init-density" in written and "--density" in written:
        density = pairs[written.index("--density")][1]
        final = [v for f, v, _ in pairs if f.path == "sparsity.final_density"]
        if not final or float(final[-1]) != float(density):
            raise ConfigError(f"--density {density} beside --init-density is the superposed model's "
                              f"density and must equal --final-density ({final[-1] if final else None})")
        del pairs[written.index("--density")]
    return pairs


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _metavar(flag: Flag) -> str:
    base = _base(flag.hint)
    options = choices(flag.path, base)
    if options:
        return "{" + ",".join(options) + "}"
    if typing.get_origin(base) is tuple:
        return _metavar(dataclasses.replace(flag, hint=typing.get_args(base)[0])) + ",..."
    return {bool: "{true,false}", int: "INT", float: "FLOAT"}.get(base, "STR")


def _shown_default(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


# tyro builds the parser from the dataclasses through this rule: each field gets its flag's
# name, without its section's prefix; a value is kept as its text (converted and checked by
# _from_text, so that a bad one is one line naming the flag); a section is built as a dict.
_TYRO = ConstructorRegistry()
_SECTIONS = {TrainConfig: "", **{typing.get_type_hints(TrainConfig)[f.name]: f"{f.name}."
                                 for f in dataclasses.fields(TrainConfig)
                                 if dataclasses.is_dataclass(typing.get_type_hints(TrainConfig)[f.name])}}
_BUILDING: set[type] = set()


@_TYRO.struct_rule
def _section_rule(info):
    if info.type not in _SECTIONS or info.type in _BUILDING:
        return None
    _BUILDING.add(info.type)
    try:  # tyro's own dataclass rule: defaults and the fields' comments as help
        spec = ConstructorRegistry.get_struct_spec(info)
    finally:
        _BUILDING.discard(info.type)
    flags, fields = cli_flags(), []
    extra = [StructFieldSpec("config", str | None, None, "YAML or TOML file with the config tree; flags "
                             "after it override it")] if info.type is TrainConfig else []
    for f in (*extra, *spec.fields):
        flag = flags.get(_SECTIONS[info.type] + f.name)
        if flag is None:  # a section, or a setting another flag sets (sparsity.seed: --seed)
            fields.append(f if dataclasses.is_dataclass(f.type) else
                          dataclasses.replace(f, type=Annotated[f.type, tyro.conf.Suppress]))
            continue
        helptext = f.helptext() if callable(f.helptext) else f.helptext
        aliases = f"(also {', '.join(flag.names[1:])})" if flag.names[1:] else ""
        helptext = " ".join(filter(None, [helptext, aliases]))
        marks = [tyro.conf.arg(name=flag.flag[2:], help=helptext or None, prefix_name=False)]
        if flag.path in MULTI_VALUE:
            marks.insert(0, PrimitiveConstructorSpec(
                nargs="*", metavar="KEY=VALUE", instance_from_str=list,
                is_instance=lambda value: True, str_from_instance=list))
        elif not flag.switch:  # (a bool that takes a value is no flag: FlagConversionOff)
            marks.insert(0, tyro.conf.FlagConversionOff)
            marks.insert(0, PrimitiveConstructorSpec(
                nargs=1, metavar=_metavar(flag), instance_from_str=lambda args: args[0],
                is_instance=lambda value: True, str_from_instance=lambda value: [_shown_default(value)]))
        fields.append(dataclasses.replace(f, type=Annotated[(f.type, *marks)]))
    return StructConstructorSpec(instantiate=lambda **kwargs: kwargs, fields=tuple(fields))


def _parse_flags(pairs: list[tuple[Flag, str | bool, str]]) -> dict[str, typing.Any]:
    """{dotted path: value} of the flags given, parsed by tyro (the last of a repeated flag
    wins) and converted to their fields' types; ConfigError naming the flag for a bad value."""
    tree = _tyro_cli([token for flag, value, _ in pairs for token in flag.tokens(value)])
    given = {}
    for flag, _, _ in pairs:
        node = tree
        for key in flag.path.split("."):
            node = node[key]
        given[flag.path] = node if flag.switch else _from_text(flag, node)
    return given


def _tyro_cli(args: list[str]) -> dict:
    return tyro.cli(TrainConfig, args=args, prog="itop-train", registry=_TYRO, description=(
        "Train a sparse (or dense) network: itop_dist's one training path. Each setting comes from "
        "its flag, else the --config file, else the --preset, else its default. Flags take dashes or "
        "underscores (--update-frequency = --update_frequency); choices match in any case."))


def _from_text(flag: Flag, text: str):
    """A flag's text as its field's type: lists comma- (or space-) separated, bools true/false."""
    base = _base(flag.hint)
    if flag.path in MULTI_VALUE:
        return tuple(text)
    if typing.get_origin(base) is tuple:
        kind = typing.get_args(base)[0]
        return tuple(_scalar(kind, t, flag) for t in text.replace(",", " ").split())
    return _scalar(base, text, flag)


_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _scalar(kind, text: str, flag: Flag):
    try:
        if kind is bool:
            return _BOOLS[text.lower()]
        if kind in (int, float):
            return kind(text)
    except (KeyError, ValueError):
        raise ConfigError(f"{flag.names[0]}: must be {_expected(kind)}, got {text!r}") from None
    return text


def load_preset(name: str) -> dict:
    """configs/presets/<name>.yaml as a nested dict; ConfigError naming the presets there."""
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"--preset: {name!r} is unknown; choose one of {', '.join(CHOICES['preset'])}")
    return load_file(str(path))


def _merged(low: dict, high: dict) -> dict:
    """``high`` over ``low``, section by section."""
    out = dict(low)
    for key, value in high.items():
        out[key] = _merged(low[key], value) if isinstance(value, dict) and isinstance(low.get(key), dict) else value
    return out


class ConfigError(ValueError):
    """A bad flag, file or combination: one line naming what is wrong and how to fix it."""


def print_error(prog: str, message: str) -> int:
    """Print ``<prog>: error: <message>`` on stderr and return exit status 2.

    The line is one ``write`` call with its newline (``print`` makes two; an unbuffered stderr,
    as under ``accelerate launch``, sends each out on its own), so the refusals of several
    ranks sharing one stderr never run into each other."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    return 2


# Flags of the papers' launch lines that belong to the launcher, not the run: accepted, ignored.
LAUNCHER_ONLY = ("--master_port", "--master-port", "--local_rank", "--local-rank")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """defaults < --preset < --config file < command-line flags; raises ConfigError on bad input.
    ``-h``/``--help`` prints every flag, grouped by section, and exits with status 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        _tyro_cli(["--help"])  # prints, then SystemExit(0)
    given = _parse_flags(papers_spellings(argv))
    file = given.pop("config", None)
    tree = load_file(file) if file else {}
    if file:  # the file's own types first, so that its errors name the file and the key
        _named(lambda: from_dict(TrainConfig, tree), given, file, types_only=True)
    sparse_in_file = "sparse" in tree
    section = tree["sparsity"] if isinstance(tree.get("sparsity"), dict) else {}
    file_mask_seed, file_sparsity = section.get("seed"), list(section)  # before the flags fill it
    preset = given.get("preset", tree.get("preset"))
    if preset is not None:
        tree = _merged(load_preset(_canonical_choice(preset, CHOICES["preset"])), tree)
    for path, value in given.items():
        set_path(tree, path, value)
    cfg = _named(lambda: from_dict(TrainConfig, tree), given, file)
    if file_mask_seed is not None and file_mask_seed != cfg.seed:  # __post_init__ would overwrite it
        raise ConfigError(f"--config {file}: sparsity.seed {file_mask_seed} differs from seed {cfg.seed}; "
                          f"masks are drawn from the run's seed: set seed: {file_mask_seed} (or --seed) "
                          f"and remove sparsity.seed")
    # After the values are checked: a wrong value is the first thing to fix.
    _refuse_ignored_sparse_flags(given, sparse_in_file, file_sparsity)
    return cfg


def _flag_of(path: str) -> str:
    flag = cli_flags().get(path)
    return flag.names[0] if flag else path


def _named(build, given: dict, file: str | None, types_only: bool = False):
    """Run ``build``; a BadValue names the flag it came from, or the file and key; any other
    ValueError/TypeError of the configuration becomes a ConfigError (one line)."""
    try:
        return build()
    except BadValue as err:
        root = err.key.split("[")[0]
        if root in given:
            raise ConfigError(f"{_flag_of(root)}: {err.why}") from None
        raise ConfigError(f"--config {file}: {err.key} {err.why}" if file else str(err)) from None
    except (ValueError, TypeError) as err:
        if types_only:
            return None  # combinations are checked once the flags are applied
        raise ConfigError(str(err).splitlines()[0]) from None


def _refuse_ignored_sparse_flags(given: dict, sparse_in_file: bool, file_sparsity: list[str]) -> None:
    """Sparse settings without ``--sparse`` would silently train the dense model: refuse, unless
    the dense model is asked for explicitly (``--dense``, or ``sparse: false`` in the file, as the
    papers' dense commands pass their sparse flags too)."""
    if "sparse" in given or sparse_in_file:
        return
    ignored = [_flag_of(p) for p in given if p.startswith("sparsity.")]
    ignored += [f"sparsity.{k} (config file)" for k in file_sparsity]
    if ignored:
        raise ConfigError(f"{', '.join(dict.fromkeys(ignored))} given without --sparse would train the "
                          f"dense model; add --sparse for a sparse run, or --dense to train the dense "
                          f"model and ignore them")


def save_config(cfg: TrainConfig, folder: pathlib.Path) -> pathlib.Path:
    """Write the resolved tree as ``config.yaml`` in the run folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))
    return path


def _plain(value):
    """Tuples to lists, so the YAML reads like the files users write."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

"""One typed configuration tree for a training run, from a YAML/TOML file plus CLI flags.

Precedence: dataclass defaults < ``--config FILE`` < flags given on the command line. The
papers' ``main.py`` flags keep their names and meanings; every flag is accepted with
underscores and with dashes (``--update_frequency`` = ``--update-frequency``). The resolved
tree is written to the run folder as ``config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import pathlib
import tomllib
import types
import typing
from dataclasses import dataclass, field

import torch
import yaml

import models
from models.imagenet import INITS
from data_pipelines import DataConfig
from itop_dist import SparseConfig


@dataclass
class ModelConfig:
    """name: registry name (``--model``); init: ``fanin``/``classic`` for ImageNet ResNet-50
    (``-c``); channels_last: None = on for conv models on CUDA."""

    name: str = "digits-mlp"
    init: str | None = None
    channels_last: bool | None = None
    # --initial-checkpoint: start from these weights (a model.safetensors, an itop-export folder
    # or a checkpoint folder); with --sparse the run's own init decides the masks.
    initial_checkpoint: str | None = None

    def __post_init__(self) -> None:
        _check(self.init is None or self.init in INITS, "--init",
               f"{self.init!r}: choose {' or '.join(INITS)} (ImageNet ResNet-50's initialisation)")


@dataclass
class OptimConfig:
    """SGD with momentum (ITOP CIFAR recipe: Nesterov, L2 5e-4) or Adam.

    accumulate: micro-batches per optimizer step (gradient accumulation). The global batch is
    processes x --batch-size x accumulate; the LR is never scaled for you.
    bn_weight_decay: False exempts every normalisation-layer parameter from weight decay (the
    ImageNet recipe; the reference's name rule 'bn' misses the downsample BNs, this does not).
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    accumulate: int = 1
    bn_weight_decay: bool = True

    def __post_init__(self) -> None:
        _check(self.accumulate >= 1, "--grad-accum-steps", f"{self.accumulate} must be >= 1")
        _check(self.name in ("sgd", "adam"), "--optimizer", f"{self.name!r}: choose sgd or adam")
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
    lr_schedule: str = "multistep"
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
    wandb_mode: str = "auto"
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
    superposing: str = "CAA"
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
    mixed_precision: str = "launcher"
    device: str = "auto"
    sharding: str = "ddp"
    dist_timeout: float = 10.0  # minutes a collective may wait for the other ranks

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
        _check(self.sharding in ("ddp", "fsdp"), "--sharding", f"{self.sharding!r}: choose ddp or fsdp")
        _check(not (self.sharding == "fsdp" and self.mixed_precision == "fp16"), "--mixed-precision",
               "fp16 with --sharding fsdp is not supported; use bf16")
        _check(not self.tickets.enabled or self.sparse, "--cyclic_train", "Sup-tickets needs --sparse")
        t = self.tickets
        _check(t.pretrain_epochs is None or t.cyclic_epochs is None
               or t.pretrain_epochs + t.cyclic_epochs == self.schedule.epochs * self.schedule.multiplier,
               "--pretrain_epoch", f"{t.pretrain_epochs} + --cyclic_epochs {t.cyclic_epochs} must equal "
               f"--epochs {self.schedule.epochs:g}")
        if self.data.name != "synthetic":
            fits = models.model_datasets(self.model.name)  # raises for an unknown --model
            _check(self.data.name in fits, "--data",
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
        return pathlib.Path("runs") / (f"{self.model.name}-{self.data.name}-{method}{density}-s{self.seed}-"
                                       f"{identity_hash(self.to_dict())}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that may change when a run is resumed; every other setting is the run's identity.
# Epochs may be extended; cadences of logs, evaluations and checkpoints, where the data lies and
# how it is decoded, and the machine (device, processes, sharding, and so the per-process batch
# and accumulation: the elastic rule of launcher/trainer.py) may change.
RESUMABLE = ("schedule.epochs", "schedule.max_steps", "schedule.eval_every", "checkpoint.", "log.", "dist_timeout",
             "data.data_dir", "data.download", "data.num_workers", "data.loader", "data.batch_size",
             "data.test_batch_size", "data.check_data", "optim.accumulate", "device", "sharding", "model.channels_last",
             "model.initial_checkpoint", "tickets.label")


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
    args = typing.get_args(hint)
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in args if a is not type(None)) if union else hint
    if value is None:
        if union and type(None) in args:
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
    if base is str and not isinstance(value, str):
        raise BadValue(key, f"must be a string, got {_shown(value)}")
    return value


def _expected(base) -> str:
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
# The command line: the papers' flags, both spellings

def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _tuple_of(kind):
    return lambda text: tuple(kind(t) for t in text.replace(",", " ").split())


# (flags, config path, type or a constant for store_const flags, help)
FLAGS: list[tuple[tuple[str, ...], str, typing.Any, str]] = [
    (("--model", "--arch", "-a"), "model.name", str, "model name (itop-inspect --help lists datasets)"),
    (("-c", "--init"), "model.init", str, "ImageNet ResNet-50 init: fanin or classic"),
    (("--channels-last",), "model.channels_last", _bool, "true/false (default: on CUDA conv nets)"),
    (("--initial-checkpoint",), "model.initial_checkpoint", str,
     "start from these weights: model.safetensors, an itop-export or checkpoint folder"),
    (("--data",), "data.name", str, "digits, mnist, cifar10, cifar100, synthetic"),
    (("--data-dir", "--datadir"), "data.data_dir", str, "dataset root (torchvision format)"),
    (("--download",), "data.download", True, "let torchvision download the dataset"),
    (("--batch-size", "-b"), "data.batch_size", int, "batch size PER PROCESS"),
    (("--test-batch-size",), "data.test_batch_size", int, "evaluation batch size per process"),
    (("--num-workers", "-j", "--workers"), "data.num_workers", int, "loader worker processes"),
    (("--valid-split",), "data.valid_split", float, "fraction of the training set for validation"),
    (("--no-augment",), "data.augment", False, "no training augmentation"),
    (("--loader",), "data.loader", str, "ImageNet loader: auto, dali or torchvision"),
    (("--image-size",), "data.image_size", int, "ImageNet crop size (224)"),
    (("--decode-device",), "data.decode_device", str, "ImageNet JPEG decoding: auto, cpu or gpu"),
    (("--fp16-output",), "data.fp16_output", True, "ImageNet batches in fp16"),
    (("--loader-channels-last",), "data.channels_last", _bool, "ImageNet batches in channels_last (HWC) memory"),
    (("--check-data",), "data.check_data", True, "read every training file's header before training"),
    (("--synthetic-shape",), "data.synthetic_shape", _tuple_of(int), "synthetic data: input shape, e.g. 3,32,32"),
    (("--synthetic-classes",), "data.synthetic_classes", int, "synthetic data: number of classes"),
    (("--synthetic-size",), "data.synthetic_size", int, "synthetic data: training samples"),
    (("--sparse",), "sparse", True, "train a sparse network (dense without it)"),
    (("--dense",), "sparse", False, "train the dense model; sparse flags given beside it are ignored"),
    (("--method",), "sparsity.method", str,
     "DST (SET/RigL by --growth), static, GraNet, GraNet_uniform, GMP, GMP_uniform"),
    (("--fix",), "sparsity.method", "static", "static sparse training: never update masks"),
    (("--density", "--init-density"), "sparsity.density", float,
     "fraction of non-zero weights (at the start, for gradual pruning)"),
    (("--final-density",), "sparsity.final_density", float, "where GraNet/GMP pruning ends"),
    (("--init-prune-epoch",), "sparsity.init_prune_epoch", float, "gradual pruning starts"),
    (("--final-prune-epoch",), "sparsity.final_prune_epoch", float, "gradual pruning ends"),
    (("--sparse-init",), "sparsity.sparse_init", str, "ERK, ER, uniform, er_itop"),
    (("--erk-power-scale",), "sparsity.erk_power_scale", float, "ERK exponent"),
    (("--exact-init",), "sparsity.exact_init", _bool,
     "true: exactly round(d_l N_l) weights per layer; false: a Bernoulli draw as the papers' code"),
    (("--exclude",), "sparsity.exclude", _tuple_of(str),
     "parameter names (substrings, comma-separated) that stay dense, e.g. conv1.weight"),
    (("--death", "--prune"), "sparsity.death", str, "magnitude, SET, threshold, magnitude_threshold"),
    (("--death-rate", "--prune-rate"), "sparsity.death_rate", float, "initial prune fraction"),
    (("--death-rate-min",), "sparsity.death_rate_min", float, "where the death-rate decay ends"),
    (("--threshold",), "sparsity.threshold", float, "|W| below which --death threshold prunes"),
    (("--decay-schedule",), "sparsity.decay_schedule", str, "cosine, constant, linear"),
    (("--mask-momentum",), "sparsity.mask_momentum", _bool,
     "zero the momentum of inactive weights every step (default: off for --growth momentum)"),
    (("--mask-apply",), "sparsity.apply_mode", str, "how masks multiply in: auto, float or bool"),
    (("--growth",), "sparsity.growth", str, "random (SET), gradient (RigL), momentum"),
    (("--redistribution",), "sparsity.redistribution", str, "none, magnitude, nonzeros"),
    (("--update-frequency",), "sparsity.update_frequency", int, "steps between mask updates"),
    (("--update-stop",), "sparsity.update_stop", float, "fraction of training after which masks freeze"),
    (("--regrow-reinit-zero",), "sparsity.regrow_reinit_zero", True, "regrown weights start at 0"),
    (("--lr",), "optim.lr", float, "learning rate"),
    (("--momentum",), "optim.momentum", float, "SGD momentum"),
    (("--nesterov",), "optim.nesterov", _bool, "true/false"),
    (("--l2", "--weight-decay", "--wd"), "optim.weight_decay", float, "weight decay"),
    (("--optimizer",), "optim.name", str, "sgd or adam"),
    (("--label-smoothing",), "optim.label_smoothing", float, "label smoothing epsilon"),
    (("--bn-weight-decay",), "optim.bn_weight_decay", _bool, "weight decay on BN parameters (true/false)"),
    (("--grad-accum-steps", "--gradient-accumulation-steps"), "optim.accumulate", int,
     "micro-batches per optimizer step"),
    (("--epochs",), "schedule.epochs", float, "epochs (before --multiplier)"),
    (("--multiplier",), "schedule.multiplier", float, "extended training: epochs x multiplier"),
    (("--lr-schedule",), "schedule.lr_schedule", str, "multistep, cosine, constant"),
    (("--milestones",), "schedule.milestones", _tuple_of(float), "multistep milestones as fractions"),
    (("--gamma",), "schedule.gamma", float, "multistep: LR factor at each milestone (0.1)"),
    (("--warmup",), "schedule.warmup_epochs", int, "warm-up epochs"),
    (("--milestone-epochs",), "schedule.milestone_epochs", _tuple_of(int), "multistep decays at these epochs"),
    (("--max-steps",), "schedule.max_steps", int, "stop after N optimizer steps"),
    (("--eval-every",), "schedule.eval_every", int, "also evaluate every N steps"),
    (("--decay-frequency",), "schedule.decay_frequency", int, "accepted; unused (as in the papers)"),
    (("--save-every",), "checkpoint.every_steps", int, "also checkpoint every N steps"),
    (("--keep-last",), "checkpoint.keep_last", int, "checkpoints kept (plus the best)"),
    (("--resume",), "checkpoint.resume", str, "auto, or a checkpoint folder"),
    (("--output-dir", "--save-dir"), "log.output_dir", str, "the run folder"),
    (("--log-interval", "--log-every", "-p", "--print-freq"), "log.log_every", int, "steps between train logs"),
    (("--no-progress",), "log.progress", False, "no progress bar"),
    (("--no-wandb",), "log.wandb", False, "do not log to Weights & Biases"),
    (("--wandb-project",), "log.wandb_project", str, "W&B project name"),
    (("--wandb-mode",), "log.wandb_mode", str, "auto (online if logged in), online, offline"),
    (("--no-plots",), "log.plots", False, "no PNG plots at the end of the run"),
    (("--seed",), "seed", int, "random seed (the same on every rank)"),
    (("--pre_train", "--cyclic_train"), "tickets.enabled", True, "Sup-tickets: pre-train, then cycles"),
    (("--cycle",), "tickets.cycle", int, "epochs per Sup-tickets cycle"),
    (("--cycle_rate",), "tickets.cycle_rate", float, "fraction of epochs in the cyclic phase"),
    (("--cyclic_epochs",), "tickets.cyclic_epochs", int, "epochs of the cyclic phase (ImageNet)"),
    (("--pretrain_epoch",), "tickets.pretrain_epochs", int, "epochs before the cyclic phase (ImageNet)"),
    (("--cyc_lr",), "tickets.cyc_lr", True, "triangular LR in each cycle"),
    (("--lr_1",), "tickets.lr_1", float, "cyclic LR at the ends of a cycle"),
    (("--lr_2",), "tickets.lr_2", float, "cyclic LR in the middle of a cycle"),
    (("--re_explore",), "tickets.re_explore", True, "prune and regrow at the start of each cycle"),
    (("--large-death-rate",), "tickets.large_death_rate", float, "rate of the re-explore update"),
    (("--no_maskupdates",), "tickets.no_mask_updates", True, "no mask updates in the cyclic phase"),
    (("--update_bn", "--bn_update"), "tickets.update_bn", True, "recalibrate BN of superposed models"),
    (("--superposing_method",), "tickets.superposing", str, "CAA or CIMA"),
    (("--CIMA_factor",), "tickets.cima_factor", float, "CIMA's superposition factor"),
    (("--indicate_method",), "tickets.label", str, "a label for the run (Sup-tickets' scripts)"),
    (("--mixed-precision",), "mixed_precision", str,
     "launcher (accelerate launch's choice, else no), no, bf16, fp16, auto"),
    (("--fp16",), "mixed_precision", "fp16", "same as --mixed-precision fp16"),
    (("--device",), "device", str, "auto, cpu or cuda"),
    (("--dist-timeout",), "dist_timeout", float, "minutes a collective waits for the other ranks (10)"),
    (("--sharding",), "sharding", str, "ddp (replicated) or fsdp (FSDP2, sharded)"),
]


def _spellings(flag: str) -> list[str]:
    """Both spellings of a long flag: with dashes and with underscores (the papers use both)."""
    if not flag.startswith("--"):
        return [flag]
    body = flag[2:]
    return sorted({f"--{body}", f"--{body.replace('-', '_')}", f"--{body.replace('_', '-')}"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="itop-train", argument_default=argparse.SUPPRESS,
        description="Train a sparse (or dense) network: itop_dist's one training path.")
    parser.add_argument("--config", help="YAML or TOML file with the config tree")
    for flags, path, kind, help_text in FLAGS:
        names = [s for f in flags for s in _spellings(f)]
        if callable(kind) and not isinstance(kind, bool):
            parser.add_argument(*names, dest=path, type=kind, help=help_text)
        else:
            parser.add_argument(*names, dest=path, action="store_const", const=kind, help=help_text)
    return parser


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


def papers_spellings(argv: list[str]) -> list[str]:
    """The seed commands' spellings that are not one flag each, rewritten:
    ``--first_m A --second_m B --third_m C`` -> ``--milestone-epochs A,B,C``; the launcher's own
    flags dropped; Sup-tickets ImageNet's ``--density`` beside ``--init-density`` is the
    density of the superposed model, which must be ``--final-density``; a bare path is
    ``--data-dir`` (the papers pass the data folder as a positional argument); ``--arch`` is
    the ImageNet scripts' flag, so without ``--data`` it means ``--data imagenet``."""
    out, marks, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--first_m", "--second_m", "--third_m") and i + 1 < len(argv):
            marks[arg] = argv[i + 1]
            i += 2
            continue
        if arg in LAUNCHER_ONLY:
            i += 2
            continue
        out.append(arg)
        i += 1
    if marks:
        out += ["--milestone-epochs", ",".join(marks[k] for k in ("--first_m", "--second_m", "--third_m") if k in marks)]
    flags = [a.replace("_", "-") for a in out]
    if ("--arch" in flags or "-a" in flags) and "--data" not in flags:
        # ImageNet main.py's defaults (docs/algorithms.md §6.6), before the command's own flags.
        out = ["--data", "imagenet", "--nesterov", "false", "--l2", "0.0001",
               "--bn-weight-decay", "false", "--mixed-precision", "auto"] + out
        flags = [a.replace("_", "-") for a in out]
    if "--init-density" in flags and "--density" in flags:
        i = flags.index("--density")
        density = out[i + 1]
        final = out[flags.index("--final-density") + 1] if "--final-density" in flags else None
        if final is None or float(final) != float(density):
            raise ConfigError(f"--density {density} beside --init-density is the superposed model's "
                              f"density and must equal --final-density ({final})")
        del out[i:i + 2]
    return out


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """defaults < --config file < command-line flags; raises ConfigError on bad input."""
    parser = build_parser()
    parser.add_argument("data_dir_positional", nargs="?", help="the data folder (as the papers pass it)")
    parser.error = lambda message: (_ for _ in ()).throw(ConfigError(message))  # no SystemExit
    given = vars(parser.parse_args(papers_spellings(sys.argv[1:] if argv is None else list(argv))))
    if "data_dir_positional" in given:
        given.setdefault("data.data_dir", given.pop("data_dir_positional"))
        given.pop("data_dir_positional", None)
    file = given.pop("config", None)
    tree = load_file(file) if file else {}
    file_tree = tree if isinstance(tree, dict) else {}
    if file:  # the file's own types first, so that its errors name the file and the key
        _named(lambda: from_dict(TrainConfig, tree), given, file, types_only=True)
    sparse_in_file = "sparse" in file_tree
    section = file_tree["sparsity"] if isinstance(file_tree.get("sparsity"), dict) else {}
    file_mask_seed, file_sparsity = section.get("seed"), list(section)  # before the flags fill it
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


def _named(build, given: dict, file: str | None, types_only: bool = False):
    """Run ``build``; a BadValue names the flag it came from, or the file and key; any other
    ValueError/TypeError of the configuration becomes a ConfigError (one line)."""
    try:
        return build()
    except BadValue as err:
        flags = {path: flags[0] for flags, path, _, _ in FLAGS}
        root = err.key.split("[")[0]
        if root in given:
            raise ConfigError(f"{flags.get(root, root)}: {err.why}") from None
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
    flags = {path: flags[0] for flags, path, _, _ in FLAGS}
    ignored = [flags.get(p, p) for p in given if p.startswith("sparsity.")]
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

"""``itop-eval``: evaluate a checkpoint without training.

    itop-eval runs/digits-mlp-digits-DST-d0.05-s17/checkpoints/step-00002200
    itop-eval runs/digits-mlp-digits-DST-d0.05-s17            # its newest checkpoint
    itop-eval CHECKPOINT --data-dir DATA --batch-size 200 --layers --json

Any checkpoint of ``itop-train`` (replicated or sharded, any number of processes: they all
hold the full model in ``model.safetensors``) is verified against its manifest, its model is
rebuilt from the configuration in ``meta.json`` exactly as the trainer built it
(``models.create_model``), the weights are loaded, the masks of ``sparse_state`` are checked
(a weight where the mask is off must be exactly zero, otherwise the checkpoint is refused) and
applied, and the test split (and the validation split, if the run had one) is evaluated in
eval mode, in fp32, on one process. Prints accuracy and loss, the density from the masks
(overall and, with ``--layers``, per layer) and the inference FLOPs relative to the dense
model (``itop_dist.flops``: sum d_l F_l / sum F_l). ``--json`` prints one JSON object instead
(per-layer densities always included). Nothing is unpickled.

Bad input (not a checkpoint, a damaged one, weights that disagree with the masks, a data folder
that is missing) ends with one line ``itop-eval: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from dataclasses import dataclass

import torch
from safetensors import SafetensorError

import models
from data_pipelines import DATASETS, build_loaders
from itop_dist import maskable_parameters
from itop_dist.flops import layer_flops, sparse_flops
from itop_dist.state import saved_masks
from launcher.checkpoint import MANIFEST, Checkpointer, CheckpointError, read_state, verify
from launcher.config import TrainConfig, default_channels_last, from_dict, print_error

GROWTH_NAMES = {"random": "SET", "gradient": "RigL", "momentum": "sparse momentum"}


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint: its folder, ``meta.json``, the run's configuration, the full
    model state (masks applied) and the masks (None for a dense run)."""

    path: pathlib.Path
    meta: dict
    cfg: TrainConfig
    state: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] | None

    @property
    def method(self) -> str:
        return method_label(self.cfg)


def method_label(cfg: TrainConfig) -> str:
    """``dense``, ``SET``/``RigL``/``sparse momentum`` (DST by growth), ``static``, ``GraNet``, ...
    with ``Sup-tickets`` in front for Sup-tickets runs."""
    if not cfg.sparse:
        return "dense"
    method = cfg.sparsity.method
    label = GROWTH_NAMES.get(cfg.sparsity.growth, cfg.sparsity.growth) if method == "DST" else method
    return f"Sup-tickets ({label})" if cfg.tickets.enabled else label


def find_checkpoint(path: pathlib.Path) -> pathlib.Path:
    """``path`` itself if it is a checkpoint folder; for a run folder, its newest complete
    checkpoint. Raises CheckpointError with one line otherwise."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoints/step-N folder or a run folder")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass a checkpoints/step-N folder or a run folder")
    if (path / MANIFEST).is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = Checkpointer(path, keep_last=1).complete()
        if not found:
            raise CheckpointError(f"{path} is a run folder without a complete checkpoint "
                                  f"(nothing in {path / 'checkpoints'} has a {MANIFEST})")
        return found[-1]
    hint = " (it is incomplete: a checkpoint being written, or an interrupted save)" if (
        path.name.startswith(".tmp-step-") or (path / "meta.json").exists()) else ""
    raise CheckpointError(f"{path} is not a checkpoint: it has no {MANIFEST}{hint}; pass a "
                          f"checkpoints/step-N folder of itop-train or a run folder")


def load_checkpoint(path: pathlib.Path) -> LoadedCheckpoint:
    """Verify and read a checkpoint (or a run folder's newest one). The model state is
    returned with the masks applied, after checking that every weight the mask turns off is
    exactly zero already. Raises CheckpointError with one line."""
    path = find_checkpoint(pathlib.Path(path))
    manifest = verify(path)
    meta = read_json(path / "meta.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path / 'meta.json'} holds no run configuration; use a checkpoint "
                              f"written by itop-train")
    try:
        cfg = from_dict(TrainConfig, meta["config"])
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path / 'meta.json'}: the run configuration does not load "
                              f"({one_line(err)})") from None
    state = read_state(path, "model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path / 'model.json'} does not describe a flat model state dict")
    masks = None
    if cfg.sparse:
        if "sparse_state" not in manifest.get("pieces", []):
            raise CheckpointError(f"{path} is of a --sparse run but holds no sparse_state")
        sparse = read_state(path, "sparse_state")
        try:
            masks = saved_masks(sparse["state"]["masks"])
        except (KeyError, TypeError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{path / 'sparse_state.json'} does not hold valid masks "
                                  f"({type(err).__name__}: {one_line(err)})") from None
        state = apply_masks(state, masks, path / "model.safetensors")
    return LoadedCheckpoint(path, meta, cfg, state, masks)


def apply_masks(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                where: pathlib.Path) -> dict[str, torch.Tensor]:
    """``state`` with every masked weight multiplied by its mask; refuses (CheckpointError)
    a mask without its weight, of another shape, or a weight that is not exactly zero where
    its mask is off (the checkpoint would not be the sparse network it claims to be)."""
    out = dict(state)
    for name, mask in masks.items():
        weight = state.get(name)
        if weight is None:
            raise CheckpointError(f"{where} has no tensor {name!r}, which the masks cover")
        if tuple(weight.shape) != tuple(mask.shape):
            raise CheckpointError(f"{where}: {name} has shape {list(weight.shape)} but its mask "
                                  f"{list(mask.shape)}")
        stray = int((weight[~mask] != 0).sum())
        if stray:
            raise CheckpointError(f"{where}: {name} has {stray} non-zero weights where its mask is "
                                  f"off; the weights and masks of this checkpoint disagree")
        out[name] = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype))
    return out


def read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({one_line(err)})") from None


def one_line(err: BaseException) -> str:
    """The first line of an error, worded for reading a checkpoint (not resuming one)."""
    text = (str(err).splitlines() or [type(err).__name__])[0]
    return (text.replace("resume from another checkpoint", "use another checkpoint")
            .replace("resume from a checkpoint of this version", "use a checkpoint of this version"))


def model_dataset(cfg: TrainConfig) -> str:
    """The data set whose variant of ``--model`` the trainer built (synthetic: the first the
    model fits, as the trainer does)."""
    if cfg.data.name != "synthetic":
        return cfg.data.name
    return next(iter(models.model_datasets(cfg.model.name)), cfg.data.name)  # timm: fits any


def build_model(cfg: TrainConfig, num_classes: int, input_shape: tuple[int, ...]) -> torch.nn.Module:
    """The run's model for data of ``input_shape`` ``(C, H, W)`` (a timm model's channels and
    image size), built as ``Trainer.__init__`` builds it (weights not loaded)."""
    kwargs = {"init": cfg.model.init} if cfg.model.init else {}
    return models.create_model(cfg.model.name, model_dataset(cfg), num_classes=num_classes,
                               input_shape=input_shape, **models.parse_model_kwargs(cfg.model.kwargs), **kwargs)


def default_shape(cfg: TrainConfig) -> tuple[tuple[int, ...], int]:
    """(input shape per sample, class count) of the run's data without loading it."""
    d = cfg.data
    if d.name == "synthetic":
        return tuple(d.synthetic_shape), d.synthetic_classes
    info = DATASETS[d.name]
    if d.name == "imagenet":
        return (3, d.image_size, d.image_size), info.num_classes
    return info.input_shape, info.num_classes


def first_mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """The first reason ``model.load_state_dict(state, strict=True)`` would fail, or None."""
    ours = model.state_dict()
    for name, tensor in ours.items():
        if name not in state:
            return f"{name} is missing"
        if tuple(state[name].shape) != tuple(tensor.shape):
            return f"{name} has shape {list(state[name].shape)} there but {list(tensor.shape)} in the model"
    for name in state:
        if name not in ours:
            return f"{name} is not a tensor of the model"
    return None


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    why = first_mismatch(model, state)
    if why is not None:
        raise CheckpointError(f"{what} does not fit the model: {why}")
    model.load_state_dict(state, strict=True)


def sparsity_numbers(model: torch.nn.Module, masks: dict[str, torch.Tensor] | None,
                     input_shape: tuple[int, ...]) -> dict:
    """Density from the masks (overall and per layer) and inference FLOPs per sample.

    Density is non-zero masked weights / masked weights, as the trainer's ``sparsity/density``;
    FLOPs are measured with one forward pass (``itop_dist.flops.layer_flops``), with layers
    the masks do not cover counted dense."""
    cost = layer_flops(model, torch.zeros(1, *input_shape))
    if masks is None:  # a dense run: every maskable weight at density 1
        masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in maskable_parameters(model).items()}
    layers = {n: int(m.sum()) / m.numel() for n, m in masks.items()}
    nonzero = sum(int(m.sum()) for m in masks.values())
    numel = sum(m.numel() for m in masks.values())
    f_dense = float(sum(cost.values()))
    f_sparse = sparse_flops(cost, layers)
    return {"density": nonzero / numel, "nonzero": nonzero, "masked_weights": numel,
            "layers": layers,
            "flops": {"test_rel": f_sparse / f_dense, "sparse_per_sample": f_sparse,
                      "dense_per_sample": f_dense}}


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, loader, device: torch.device,
                   channels_last: bool = False) -> dict:
    """Loss and accuracy over the whole split, summed as the trainer's ``_eval_split`` sums
    them (float32 totals, loss of fp32 logits), so a one-process run gives the same numbers."""
    model.eval()
    totals = torch.zeros(3, device=device)
    loader.set_epoch(0)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
        totals[0] += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += y.numel()
    loss, correct, count = totals.tolist()
    return {"acc": correct / count, "loss": loss / count, "samples": int(count)}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; use --device cpu")
    return torch.device(name)


def evaluate(loaded: LoadedCheckpoint, data: str | None = None, data_dir: str | None = None,
             batch_size: int | None = None, device: str = "auto") -> dict:
    """Everything ``itop-eval`` prints, as a JSON-ready dict (see the module docstring)."""
    cfg = loaded.cfg
    changes = {k: v for k, v in (("name", data), ("data_dir", data_dir), ("test_batch_size", batch_size))
               if v is not None}
    data_cfg = dataclasses.replace(cfg.data, **changes)
    loaders = build_loaders(data_cfg, seed=cfg.seed, rank=0, world_size=1)
    model = build_model(cfg, loaders.num_classes, tuple(loaders.input_shape))
    load_into(model, loaded.state, str(loaded.path / "model.safetensors"))
    numbers = sparsity_numbers(model, loaded.masks, tuple(loaders.input_shape))
    dev = resolve_device(device)
    channels_last = cfg.model.channels_last
    if channels_last is None:
        channels_last = default_channels_last(dev.type, tuple(loaders.input_shape))
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    test = evaluate_split(model, loaders.test, dev, channels_last)
    val = evaluate_split(model, loaders.val, dev, channels_last) if loaders.val is not None else None
    return {
        "checkpoint": str(loaded.path), "step": loaded.meta.get("step"), "epoch": loaded.meta.get("epoch"),
        "model": cfg.model.name, "data": data_cfg.name, "method": loaded.method, "sparse": cfg.sparse,
        "num_classes": loaders.num_classes, "input_shape": list(loaders.input_shape),
        "test": test, "val": val,
        "val_note": None if val is not None else "no validation split (the run selected on the test set)",
        **numbers,
        "device": str(dev), "precision": "fp32",
        "meta_val_acc": loaded.meta.get("val_acc"),
    }


def describe(result: dict, layers: bool) -> str:
    lines = [f"checkpoint {result['checkpoint']} (step {result['step']}, epoch {result['epoch']}): "
             f"{result['model']} on {result['data']}, {result['method']}"]
    for split in ("test", "val"):
        r = result[split]
        if r is not None:
            lines.append(f"{split} acc {r['acc']:.4f} loss {r['loss']:.4f} ({r['samples']} samples)")
    if result["val"] is None:
        lines.append(f"val: {result['val_note']}")
    lines.append(f"density {result['density']:.4f} ({result['nonzero']} of {result['masked_weights']} "
                 f"masked weights non-zero)")
    f = result["flops"]
    lines.append(f"inference FLOPs {f['test_rel']:.4f} of dense ({f['sparse_per_sample']:.4g} of "
                 f"{f['dense_per_sample']:.4g} per sample)")
    if layers:
        width = max(len(n) for n in result["layers"])
        lines += [f"  {n:<{width}}  density {d:.4f}" for n, d in result["layers"].items()]
    return "\n".join(lines)


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="evaluate on this data set instead of the run's")
    parser.add_argument("--data-dir", "--data_dir", dest="data_dir", help="the data folder (default: the run's)")
    parser.add_argument("--batch-size", "--batch_size", "-b", dest="batch_size", type=int,
                        help="evaluation batch size (default: the run's --test-batch-size)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


ERRORS = (CheckpointError, ValueError, OSError, SafetensorError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="itop-eval", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=pathlib.Path, help="a checkpoints/step-N folder, or a run folder (its newest)")
    add_data_flags(parser)
    parser.add_argument("--layers", action="store_true", help="per-layer densities too")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
        loaded = load_checkpoint(args.checkpoint)
        result = evaluate(loaded, args.data, args.data_dir, args.batch_size, args.device)
    except ERRORS as err:
        return print_error("itop-eval", one_line(err))
    print(json.dumps(result) if args.json else describe(result, args.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``itop-export``: a checkpoint as a plain model, its masks and a model card.

    itop-export runs/digits-mlp-digits-DST-d0.05-s17/checkpoints/step-00002200 --output digits-set
    itop-export RUN_FOLDER --output DIR --no-eval        # accuracy from meta.json, no data needed

Writes, into ``--output DIR`` (refused if it exists and is not empty, unless ``--force``):

* ``model.safetensors``: the plain state dict of the model, masked-off weights exactly zero;
  ``models.create_model(card["model"], card["model_dataset"], num_classes=card["num_classes"])
  .load_state_dict(safetensors.torch.load_file("model.safetensors"))`` loads it (strict).
* ``masks.safetensors``: one bool tensor per masked weight name (empty for a dense run).
* ``card.json``: method, density (overall and per layer, from the masks), inference FLOPs
  relative to dense, the accuracy and where it comes from (``itop-eval``'s evaluation of the
  test split, or with ``--no-eval`` the checkpoint's ``meta.json`` ``val_acc``), and the run's
  whole configuration.

``--initial-checkpoint`` of ``itop-train`` starts a run from such weights
(:func:`load_initial_weights`). Bad input ends with one line ``itop-export: error: ...`` and
exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import models
from launcher.checkpoint import MANIFEST, CheckpointError, read_state, verify
from launcher.config import print_error
from launcher.evaluate import (ERRORS, add_data_flags, build_model, default_shape, evaluate,
                               first_mismatch, load_checkpoint, load_into, model_dataset,
                               one_line, sparsity_numbers)

FORMAT = "itop_dist-export-1"


def export(checkpoint: pathlib.Path, output: pathlib.Path, force: bool = False, run_eval: bool = True,
           data: str | None = None, data_dir: str | None = None, batch_size: int | None = None,
           device: str = "auto") -> dict:
    """Write the export folder (see the module docstring); returns the card."""
    output = pathlib.Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file; choose a folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ValueError(f"--output {output} exists and is not empty; choose another folder or add --force")
    loaded = load_checkpoint(checkpoint)
    if output.resolve() == loaded.path.resolve() or loaded.path.resolve() in output.resolve().parents:
        raise ValueError(f"--output {output} is inside the checkpoint {loaded.path}; choose another folder")
    cfg = loaded.cfg
    if run_eval:
        result = evaluate(loaded, data, data_dir, batch_size, device)
        num_classes, input_shape = result["num_classes"], tuple(result["input_shape"])
        numbers = {k: result[k] for k in ("density", "nonzero", "masked_weights", "layers", "flops")}
        accuracy = {"test_acc": result["test"]["acc"], "test_loss": result["test"]["loss"],
                    "test_samples": result["test"]["samples"],
                    "val_acc": result["val"]["acc"] if result["val"] else None,
                    "source": f"itop-eval: this checkpoint evaluated on the test split of "
                              f"{result['data']} (fp32, one process)"}
        model = build_model(cfg, num_classes, input_shape)
        load_into(model, loaded.state, str(loaded.path / "model.safetensors"))
    else:
        input_shape, num_classes = default_shape(cfg)
        model = build_model(cfg, num_classes, input_shape)
        why = first_mismatch(model, loaded.state)
        if why is not None:
            raise CheckpointError(f"{loaded.path / 'model.safetensors'} does not fit {cfg.model.name} "
                                  f"with the {num_classes} classes of {cfg.data.name} ({why}); run "
                                  f"without --no-eval, so that the data gives the class count")
        model.load_state_dict(loaded.state, strict=True)
        numbers = sparsity_numbers(model, loaded.masks, input_shape)
        accuracy = {"val_acc": loaded.meta.get("val_acc"),
                    "source": "meta.json val_acc of the checkpoint, not re-evaluated (the run's "
                              "last evaluation on its validation split; on data without one, "
                              "such as digits and cifar100, the test split)"}
    card = {
        "format": FORMAT,
        "checkpoint": str(loaded.path.resolve()), "step": loaded.meta.get("step"),
        "epoch": loaded.meta.get("epoch"),
        "model": cfg.model.name, "model_dataset": model_dataset(cfg), "data": cfg.data.name,
        "num_classes": num_classes, "input_shape": list(input_shape),
        "method": loaded.method, "sparse": cfg.sparse,
        "density": numbers["density"], "nonzero": numbers["nonzero"],
        "masked_weights": numbers["masked_weights"], "layers": numbers["layers"],
        "flops": {**numbers["flops"], "convention": "2 x multiply-adds of conv and linear layers "
                                                    "and of attention's products (dense) per sample "
                                                    "(itop_dist.flops); test_rel = "
                                                    "inference FLOPs at these densities / dense"},
        "accuracy": accuracy,
        "files": {"model.safetensors": "plain state dict (load_state_dict, strict); masked-off "
                                       "weights are exactly zero",
                  "masks.safetensors": "bool mask per masked weight name (empty for a dense run)"},
        "load": (f"models.create_model({cfg.model.name!r}, {model_dataset(cfg)!r}, "
                 f"num_classes={num_classes}{', init=' + repr(cfg.model.init) if cfg.model.init else ''}"
                 f"{f', input_shape={tuple(input_shape)}' if models.timm_models.is_timm(cfg.model.name) else ''}"
                 f"{''.join(f', {k}={v!r}' for k, v in models.parse_model_kwargs(cfg.model.kwargs).items())})"
                 f".load_state_dict(safetensors.torch.load_file('model.safetensors'))"),
        "config": loaded.meta["config"],
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    masks = {n: m.contiguous() for n, m in (loaded.masks or {}).items()}
    output.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "model": cfg.model.name, "step": str(loaded.meta.get("step"))}
    save_file(state, str(output / "model.safetensors"), metadata=meta)
    save_file(masks, str(output / "masks.safetensors"), metadata=meta)
    tmp = output / ".card.json.tmp"
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, output / "card.json")
    return card


# ---------------------------------------------------------------------------------------------
# --initial-checkpoint of itop-train


def initial_weights_file(path: str | os.PathLike) -> tuple[pathlib.Path, bool]:
    """(the model.safetensors file to start from, whether it comes from a checkpoint folder)
    for a model.safetensors file, an itop-export folder or a checkpoint folder; for a sharded
    checkpoint folder, its first ``model-shard-*`` file (the model is read from all of them)."""
    p = pathlib.Path(path)
    if p.is_file():
        return p, False
    if p.is_dir() and (p / "model.safetensors").is_file():
        return p / "model.safetensors", (p / MANIFEST).is_file()
    shards = sorted(p.glob("model-shard-*.json")) if p.is_dir() and (p / MANIFEST).is_file() else []
    if shards:
        return shards[0].with_suffix(".safetensors"), True
    raise CheckpointError(f"--initial-checkpoint: {p} is neither a model.safetensors file nor a folder holding "
                          f"one (an itop-export folder or a checkpoints/step-N folder)")


def load_initial_weights(model: torch.nn.Module, path: str, sparse: bool = False) -> str:
    """Load ``--initial-checkpoint`` into the freshly built (unwrapped) ``model``; returns the
    line to print. Raises CheckpointError naming the first tensor that does not fit.

    A checkpoint folder is verified against its manifest first. A ``masks.safetensors`` beside
    the weights is not read: with ``--sparse`` the run's own initialisation decides the masks
    (GMP/GraNet then prune from the loaded weights)."""
    file, is_checkpoint = initial_weights_file(path)
    if is_checkpoint:
        try:
            verify(file.parent)
        except CheckpointError as err:
            raise CheckpointError(f"--initial-checkpoint: {one_line(err)}") from None
    sharded = file.name.startswith("model-shard-")
    try:
        state = read_state(file.parent, "model") if sharded else load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"--initial-checkpoint: {file} is not a safetensors file ({one_line(err)})") from None
    except CheckpointError as err:
        raise CheckpointError(f"--initial-checkpoint: {one_line(err)}") from None
    if sharded:
        file = file.parent  # every rank's blocks, assembled
    why = first_mismatch(model, state)
    if why is not None:
        raise CheckpointError(f"--initial-checkpoint: {file} does not fit this --model: {why}")
    model.load_state_dict(state, strict=True)
    line = f"initial weights: {file} ({len(state)} tensors)"
    if sparse and not sharded and (file.parent / "masks.safetensors").is_file():
        line += "; its masks.safetensors is not used: the run's --sparse-init decides the masks"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="itop-export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=pathlib.Path, help="a checkpoints/step-N folder, or a run folder (its newest)")
    parser.add_argument("--output", "-o", type=pathlib.Path, required=True, help="the folder to write")
    parser.add_argument("--force", action="store_true", help="write into an existing non-empty folder")
    parser.add_argument("--no-eval", "--no_eval", dest="run_eval", action="store_false",
                        help="no data needed: the card takes meta.json's val_acc")
    add_data_flags(parser)
    args = parser.parse_args(argv)
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
        card = export(args.checkpoint, args.output, args.force, args.run_eval, args.data,
                      args.data_dir, args.batch_size, args.device)
    except ERRORS as err:
        return print_error("itop-export", one_line(err))
    acc = card["accuracy"]
    shown = (f"test acc {acc['test_acc']:.4f}" if "test_acc" in acc
             else f"val acc {acc['val_acc']:.4f} (meta.json)" if acc.get("val_acc") is not None
             else "accuracy unknown")
    print(f"exported {card['checkpoint']} to {args.output}: {card['model']} {card['method']}, "
          f"density {card['density']:.4f}, inference FLOPs {card['flops']['test_rel']:.4f} of dense, {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

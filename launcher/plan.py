"""``itop-inspect``: what a sparse initialisation will do to a model, before any training.

    itop-inspect --model vgg-c --density 0.05 --sparse-init ERK
    itop-inspect --model resnet50 --data imagenet --density 0.2 --json
    itop-inspect --model resnet50 --data imagenet --density 0.1 --growth gradient
    itop-inspect --model timm/vit_base_patch16_224 --data imagenet --density 0.1
    itop-inspect --model timm/vit_tiny_patch16_224 --model-kwargs patch_size=2 --data digits

Prints one row per masked tensor (name, shape, density, non-zeros, dense and sparse forward
FLOPs per sample) and the totals. The counts are those the trainer's exact initialisation
realises: round(density_l * numel_l) per layer. FLOPs follow docs/algorithms.md §8 (2 x
multiply-accumulates of conv and linear layers, and attention's products between activations,
which stay dense, per sample at the dataset's input size);
``--growth``/``--update-frequency`` add the training cost of that method relative to dense.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import models
from data_pipelines import DATASETS
from itop_dist import SparseConfig, maskable_parameters
from itop_dist.flops import ACTIVATION_PRODUCTS, layer_flops, sparse_flops, train_step_flops
from itop_dist.topology import DENSITY_RULES, GROW_FNS, exact_count, layer_densities

# What --growth alone or --update-frequency alone stands for (the papers' CIFAR defaults).
DEFAULT_GROWTH, DEFAULT_UPDATE_FREQUENCY = "random", 100


def inspect_model(model_name: str, data: str, density: float, sparse_init: str,
                  erk_power_scale: float = 1.0, growth: str | None = None,
                  update_frequency: int | None = None, model_kwargs: dict | None = None) -> dict:
    """The per-layer plan as a JSON-ready dict (see the module docstring).

    ``flops`` holds FLOPs per sample (one input of ``data_pipelines.DATASETS[data].input_shape``):
    ``dense`` f_D, ``sparse`` f_S at the realised layer densities, ``test_rel`` f_S / f_D and,
    when ``growth`` or ``update_frequency`` is given, ``train_rel``: the steady-state training
    FLOPs per step of that method over dense training's 3 f_D; ``activation_products`` (a
    transformer's): the FLOPs of attention's products between activations, in both f_D and f_S
    (never masked).
    ``model_kwargs`` go to a ``timm/NAME`` model's constructor."""
    train = growth is not None or update_frequency is not None
    growth = DEFAULT_GROWTH if growth is None else growth
    update_frequency = DEFAULT_UPDATE_FREQUENCY if update_frequency is None else update_frequency
    SparseConfig(density=density, sparse_init=sparse_init, erk_power_scale=erk_power_scale,
                 growth=growth, update_frequency=update_frequency)
    with torch.device("meta"):  # shapes only: no memory, no init time, and a forward in ~0.1 s
        info = DATASETS[data]
        model = models.create_model(model_name, data, num_classes=info.num_classes,
                                    input_shape=info.input_shape, **(model_kwargs or {}))
        example = torch.empty(1, *info.input_shape)
    params = maskable_parameters(model)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    densities = layer_densities(sparse_init, shapes, density, erk_power_scale)
    flops = layer_flops(model, example)
    layers = []
    for name, shape in shapes.items():
        numel = torch.Size(shape).numel()
        nnz = exact_count(densities[name], numel)
        layers.append({"name": name, "shape": list(shape), "density": nnz / numel,
                       "nonzeros": nnz, "numel": numel, "flops": flops[name]})
    masked = sum(layer["numel"] for layer in layers)
    f_dense = sum(flops.values())
    f_sparse = sparse_flops(flops, {layer["name"]: layer["density"] for layer in layers})
    totals = {"dense": f_dense, "sparse": f_sparse, "test_rel": f_sparse / f_dense}
    if ACTIVATION_PRODUCTS in flops:
        totals["activation_products"] = flops[ACTIVATION_PRODUCTS]
    if train:
        per_step = train_step_flops(f_dense, f_sparse, growth, update_frequency)
        totals["train_rel"] = per_step / (3 * f_dense)
    return {
        "model": model_name, "data": data, "sparse_init": sparse_init, "requested_density": density,
        "layers": layers,
        "total_density": sum(layer["nonzeros"] for layer in layers) / masked,
        "masked_params": masked,
        "total_params": sum(p.numel() for p in model.parameters()),
        "flops": totals,
        **({"growth": growth, "update_frequency": update_frequency} if train else {}),
    }


def si(x: float) -> str:
    """A FLOPs count for people: 236.03M, 8.18G."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_table(plan: dict) -> str:
    width = max(len("attention q.k, attn.v"), *(len(layer["name"]) for layer in plan["layers"]))
    lines = [f"{'layer':<{width}}  {'shape':<20} {'density':>8} {'nonzeros':>11} {'numel':>11}"
             f" {'FLOPs':>9} {'sparse':>9}"]
    for layer in plan["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        lines.append(f"{layer['name']:<{width}}  {shape:<20} {layer['density']:>8.4f} "
                     f"{layer['nonzeros']:>11,} {layer['numel']:>11,} {si(layer['flops']):>9} "
                     f"{si(layer['density'] * layer['flops']):>9}")
    nnz = round(plan["total_density"] * plan["masked_params"])
    flops = plan["flops"]
    if "activation_products" in flops:
        lines.append(f"{'attention q.k, attn.v':<{width}}  {'':<20} {1:>8.4f} {'':>11} {'':>11} "
                     f"{si(flops['activation_products']):>9} {si(flops['activation_products']):>9}")
    lines.append(f"{'total (masked)':<{width}}  {'':<20} {plan['total_density']:>8.4f} "
                 f"{nnz:>11,} {plan['masked_params']:>11,} {si(flops['dense']):>9} "
                 f"{si(flops['sparse']):>9}")
    lines.append(f"{plan['model']} on {plan['data']}: {plan['total_params']:,} parameters, "
                 f"{plan['masked_params']:,} masked, {plan['sparse_init']} at density "
                 f"{plan['requested_density']}")
    size = "x".join(map(str, DATASETS[plan["data"]].input_shape))
    lines.append(f"FLOPs per {size} sample (2 x multiply-adds, conv, linear and attention): dense "
                 f"{si(flops['dense'])}, sparse {si(flops['sparse'])} = "
                 f"{flops['test_rel']:.3f}x dense")
    if "train_rel" in flops:
        lines.append(f"training FLOPs per step, {plan['growth']} growth every "
                     f"{plan['update_frequency']} steps: {flops['train_rel']:.3f}x dense")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="itop-inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-kwargs", "--model_kwargs", dest="model_kwargs", nargs="*", default=(),
                        metavar="KEY=VALUE",
                        help="a timm model's keyword arguments (timm's train.py's --model-kwargs)")
    parser.add_argument("--data", default="cifar10", choices=sorted(DATASETS))
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--sparse-init", "--sparse_init", dest="sparse_init", default="ERK",
                        choices=sorted(DENSITY_RULES))
    parser.add_argument("--erk-power-scale", "--erk_power_scale", dest="erk_power_scale",
                        type=float, default=1.0)
    parser.add_argument("--growth", choices=sorted(GROW_FNS), default=None,
                        help=f"add the training FLOPs of this growth (with --update-frequency, "
                             f"default {DEFAULT_UPDATE_FREQUENCY})")
    parser.add_argument("--update-frequency", "--update_frequency", dest="update_frequency",
                        type=int, default=None,
                        help=f"add the training FLOPs with mask updates every N steps (with "
                             f"--growth, default {DEFAULT_GROWTH})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        plan = inspect_model(args.model, args.data, args.density, args.sparse_init,
                             args.erk_power_scale, args.growth, args.update_frequency,
                             models.parse_model_kwargs(args.model_kwargs))
    except ValueError as err:
        print(f"itop-inspect: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=1) if args.json else format_table(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

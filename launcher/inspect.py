"""``itop-inspect``: what a sparse initialisation will do to a model, before any training.

    itop-inspect --model vgg-c --density 0.05 --sparse-init ERK
    itop-inspect --model resnet50 --data imagenet --density 0.2 --json

Prints one row per masked tensor (name, shape, density, non-zeros) and the totals. The counts
are those the trainer's exact initialisation realises: round(density_l * numel_l) per layer.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import models
from itop_dist import SparseConfig, maskable_parameters
from itop_dist.topology import DENSITY_RULES, exact_count, layer_densities


def inspect_model(model_name: str, data: str, density: float, sparse_init: str,
                  erk_power_scale: float = 1.0) -> dict:
    """The per-layer plan as a JSON-ready dict (see the module docstring)."""
    SparseConfig(density=density, sparse_init=sparse_init, erk_power_scale=erk_power_scale)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = models.create_model(model_name, data)
    params = maskable_parameters(model)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    densities = layer_densities(sparse_init, shapes, density, erk_power_scale)
    layers = []
    for name, shape in shapes.items():
        numel = torch.Size(shape).numel()
        nnz = exact_count(densities[name], numel)
        layers.append({"name": name, "shape": list(shape), "density": nnz / numel,
                       "nonzeros": nnz, "numel": numel})
    masked = sum(layer["numel"] for layer in layers)
    return {
        "model": model_name, "data": data, "sparse_init": sparse_init, "requested_density": density,
        "layers": layers,
        "total_density": sum(layer["nonzeros"] for layer in layers) / masked,
        "masked_params": masked,
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def format_table(plan: dict) -> str:
    width = max(len(layer["name"]) for layer in plan["layers"])
    lines = [f"{'layer':<{width}}  {'shape':<20} {'density':>8} {'nonzeros':>11} {'numel':>11}"]
    for layer in plan["layers"]:
        shape = "x".join(map(str, layer["shape"]))
        lines.append(f"{layer['name']:<{width}}  {shape:<20} {layer['density']:>8.4f} "
                     f"{layer['nonzeros']:>11,} {layer['numel']:>11,}")
    nnz = round(plan["total_density"] * plan["masked_params"])
    lines.append(f"{'total (masked)':<{width}}  {'':<20} {plan['total_density']:>8.4f} "
                 f"{nnz:>11,} {plan['masked_params']:>11,}")
    lines.append(f"{plan['model']} on {plan['data']}: {plan['total_params']:,} parameters, "
                 f"{plan['masked_params']:,} masked, {plan['sparse_init']} at density "
                 f"{plan['requested_density']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="itop-inspect", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default="cifar10", choices=sorted(models.DATASETS))
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--sparse-init", "--sparse_init", dest="sparse_init", default="ERK",
                        choices=sorted(DENSITY_RULES))
    parser.add_argument("--erk-power-scale", "--erk_power_scale", dest="erk_power_scale",
                        type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        plan = inspect_model(args.model, args.data, args.density, args.sparse_init,
                             args.erk_power_scale)
    except ValueError as err:
        print(f"itop-inspect: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=1) if args.json else format_table(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

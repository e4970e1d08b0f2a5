"""itop_dist: the sparse core of the itop_dist trainer.

Masks, their initial densities (uniform/ER/ERK), prune and regrow, schedules, the ITOP
rate and FLOPs accounting (``itop_dist.flops``), usable from any training loop::

    from itop_dist import Sparsifier, SparseConfig
    sparsifier = Sparsifier(model, optimizer, SparseConfig(density=0.05), total_steps=T)
    ...  # after every optimizer.step():
    sparsifier.step()

This package never imports the trainer (``launcher``), ``models`` or ``data_pipelines``.
"""

from itop_dist.collectives import MaskMismatchError
from itop_dist.config import SparseConfig
from itop_dist.flops import FlopsCounter, layer_flops, sparse_flops, train_step_flops
from itop_dist.methods import METHODS, Method, list_methods, register_method
from itop_dist.schedules import PruneRateSchedule, UpdateSchedule, total_steps
from itop_dist.sparsifier import Sparsifier, UpdateReport, maskable_parameters
from itop_dist.state import SparseState
from itop_dist.topology import layer_densities

__all__ = [
    "FlopsCounter",
    "METHODS",
    "MaskMismatchError",
    "Method",
    "PruneRateSchedule",
    "SparseConfig",
    "SparseState",
    "Sparsifier",
    "UpdateReport",
    "UpdateSchedule",
    "layer_densities",
    "layer_flops",
    "list_methods",
    "maskable_parameters",
    "register_method",
    "sparse_flops",
    "total_steps",
    "train_step_flops",
]

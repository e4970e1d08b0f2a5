"""The training loop's named events and the plug-ins that act on them (composer's Event and
Algorithm, ``composer/core/event.py``).

The loop in ``launcher/trainer.py`` fires a few events at its real points and never names a
phase or method; a plug-in (a phase such as Sup-tickets, or a user's own) overrides
``on_event`` and, where it reshapes the run, ``sparse_config`` or ``lr_factor``. A new plug-in
is a new file in ``launcher/plugins/`` with a ``@register_plugin`` factory, imported from
``launcher/plugins/__init__.py``; nothing else changes.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Callable

from itop_dist import SparseConfig

if TYPE_CHECKING:
    from launcher.config import TrainConfig
    from launcher.trainer import Trainer

__all__ = ["Event", "PLUGINS", "Plugin", "build_plugins", "register_plugin"]


class Event(enum.Enum):
    """Where the loop fires, in the order of one step and of the run."""

    INIT = "init"  # built, resumed and announced; before the first step
    AFTER_BACKWARD = "after_backward"  # the step's gradients are synchronised; before optimizer.step()
    AFTER_OPTIMIZER_STEP = "after_optimizer_step"  # weights and masks updated; before the LR step
    EPOCH_END = "epoch_end"  # the epoch is evaluated; before its checkpoint is written
    FIT_END = "fit_end"  # training is over; ``run.summary`` is built and may be added to


class Plugin:
    """A phase or algorithm plugged into the loop. Every hook defaults to doing nothing.

    ``state_key``: the checkpoint piece holding ``state_dict()`` (None: nothing to save);
    ``flags``: the settings that turn the plug-in on, named when a checkpoint and the run
    disagree about it."""

    state_key: str | None = None
    flags: str = ""

    def sparse_config(self, sparsity: SparseConfig) -> SparseConfig:
        """The sparse settings the run's Sparsifier is built with (called once, at build)."""
        return sparsity

    def lr_factor(self, step: int, recipe: Callable[[int], float]) -> float:
        """The LR multiplier at optimizer step ``step``; ``recipe(step)`` is the recipe's own."""
        return recipe(step)

    def on_event(self, event: Event, run: Trainer) -> None:
        """Act at ``event``; ``run`` is the trainer (its model, sparsifier, state, tracker)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass


# name -> factory(config, run) returning the plug-in, or None when the config leaves it off.
# The factory runs once the data is built (``run.epochs``, ``run.steps_per_epoch``,
# ``run.total_steps`` and ``run.run_dir`` are set) and before the optimizer and Sparsifier.
PluginFactory = Callable[["TrainConfig", "Trainer"], Plugin | None]
PLUGINS: dict[str, PluginFactory] = {}


def register_plugin(name: str) -> Callable[[PluginFactory], PluginFactory]:
    """Decorator: run ``factory`` for every run; plug-ins act in registration order."""

    def wrap(factory: PluginFactory) -> PluginFactory:
        PLUGINS[name] = factory
        return factory

    return wrap


def build_plugins(cfg: TrainConfig, run: Trainer) -> list[Plugin]:
    """The plug-ins this run's configuration turns on, in registration order."""
    return [p for p in (factory(cfg, run) for factory in PLUGINS.values()) if p is not None]

"""Sup-tickets as a plug-in of the loop (``--pre_train --cyclic_train``; Yin et al. 2022).

A pre-train phase (any sparse method, P epochs), then K cycles of ``--cycle`` epochs: the LR
follows a triangle per cycle (``--cyc_lr``), masks change only by one re-explore update at the
start of each cycle (``--re_explore``, ``--no_maskupdates``), and the model at the end of each
cycle is a ticket, superposed into S_j, cut to the final density, BN-recalibrated, evaluated
and saved under ``supertickets/``. The run's result is the last superposed model. The maths is
``itop_dist/suptickets.py``; docs/algorithms.md §10.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import save_file

from itop_dist import SparseConfig
from itop_dist.suptickets import ReExplore, Superposition, cyclic_lr, phases, recalibrate_bn
from launcher.config import ConfigError, TicketsConfig, TrainConfig
from launcher.events import Event, Plugin, register_plugin
from launcher.lr_schedule import lr_factor

if TYPE_CHECKING:
    from launcher.trainer import Trainer


class SupTickets(Plugin):
    """The cyclic phase after ``pretrain_epochs`` of an ``epochs``-epoch run."""

    flags = "Sup-tickets: --pre_train --cyclic_train"

    def __init__(self, cfg: TrainConfig, epochs: int, steps_per_epoch: int, cyclic_epochs: int) -> None:
        self.t: TicketsConfig = cfg.tickets
        self.cfg, self.epochs, self.steps_per_epoch = cfg, epochs, steps_per_epoch
        self.pretrain_epochs = epochs - cyclic_epochs
        # S_j exists only with a cyclic phase; fewer cyclic epochs than a cycle train no ticket.
        self.superposition = (Superposition(self.t.superposing, self.t.cima_factor,
                                            cfg.sparsity.final_density, []) if cyclic_epochs else None)
        self.state_key = "supertickets" if cyclic_epochs else None
        self.last_superposed: dict | None = None
        # The recipe's schedule squeezed into the pre-train epochs, built once for every LR step.
        self.pretrain_schedule = dataclasses.replace(cfg.schedule, epochs=self.pretrain_epochs, multiplier=1.0)

    def sparse_config(self, sparsity: SparseConfig) -> SparseConfig:
        if self.t.no_mask_updates:  # masks change only by re-explore in the cycles
            return dataclasses.replace(sparsity, update_stop=self.pretrain_epochs / self.epochs)
        return sparsity

    def lr_factor(self, step: int, recipe: Callable[[int], float]) -> float:
        """The recipe's schedule over the pre-train epochs, then the cyclic triangle (or the LR
        the pre-train phase ended with)."""
        spe, t, pre = self.steps_per_epoch, self.t, self.pretrain_schedule
        start = self.pretrain_epochs * spe
        if step < start:
            return lr_factor(step, pre, spe, start)
        if not t.cyc_lr:
            return lr_factor(start - 1, pre, spe, start)
        local = step - start
        position = ((local // spe) % t.cycle + (local % spe) / spe) / t.cycle
        return cyclic_lr(position, t.lr_1, t.lr_2) / self.cfg.optim.lr

    def on_event(self, event: Event, run: Trainer) -> None:
        if self.superposition is None:
            return
        if event is Event.INIT:  # the masked tensors are the Sparsifier's, built after this plug-in
            self.superposition.masked = list(run.sparsifier.masks)
        elif event is Event.EPOCH_END:
            self._epoch_end(run)
        elif event is Event.FIT_END and self.last_superposed is not None:
            # The run's result is the last superposed model; the ticket's own accuracy beside it.
            s = run.summary
            s.update({"result": f"superposed model {self.superposition.index} (Sup-tickets)",
                      "superposed_test_acc": self.last_superposed["supertickets/acc"],
                      "superposed_density": self.last_superposed["supertickets/density"],
                      "last_ticket_test_acc": s["final_test_acc"]})

    def _epoch_end(self, run: Trainer) -> None:
        """Keep S_0, superpose a finished cycle's ticket, re-explore at the start of the next
        cycle (with this epoch's last gradient)."""
        t, done, pre = self.t, run.state.epoch, self.pretrain_epochs
        if done == pre:
            self.superposition.start(run.full_state())
        if done > pre and (done - pre) % t.cycle == 0:
            self._superpose(run)
        if t.re_explore and pre <= done < self.epochs and (done - pre) % t.cycle == 0:
            sp = run.sparsifier
            run.record_mask_update(sp.update(ReExplore(sp.config, run.total_steps, t.large_death_rate)))

    def _superpose(self, run: Trainer) -> None:
        """Superpose this ticket, cut to the final density, recalibrate BN, evaluate, save."""
        acc, sup = run.accelerator, self.superposition
        state = sup.add(run.full_state())
        with torch.random.fork_rng(devices=[]):  # building the copy must not move the run's RNG
            model = run.new_model()
        model.load_state_dict(state)
        model.to(acc.device)
        if self.t.update_bn:
            run.loaders.train.set_epoch(run.state.epoch)
            inputs = (run.to_device(x, y)[0] for x, y in run.loaders.train)
            seen = recalibrate_bn(model, inputs, lambda v: acc.reduce(v, reduction="mean"))
            run.flops.count_forward(seen * acc.num_processes)
            sup.set_current(model.state_dict())
        loss, accuracy = run.evaluate_model(run.loaders.test, model)
        masked = [state[n] for n in sup.masked]
        record = {"supertickets/acc": accuracy, "supertickets/loss": loss,
                  "supertickets/density": sum(int((w != 0).sum()) for w in masked) / sum(w.numel() for w in masked),
                  "supertickets/ticket": sup.index}
        run.tracker.log(record, run.state.step, run.state.epoch)
        self.last_superposed = record
        if acc.is_main_process:
            folder = run.run_dir / "supertickets"
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      str(folder / f"superposed-{sup.index}.safetensors"))
        run.print(f"superposed model {sup.index}: test acc {accuracy:.4f}, "
                  f"density {record['supertickets/density']:.4f}")

    def state_dict(self) -> dict:
        return self.superposition.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.superposition.load_state_dict(sd)


@register_plugin("suptickets")
def build(cfg: TrainConfig, run: Trainer) -> SupTickets | None:
    t = cfg.tickets
    if not t.enabled:
        return None
    pretrain, cyclic = phases(run.epochs, t.cycle, t.cycle_rate, t.cyclic_epochs)
    if cyclic and t.pretrain_epochs not in (None, pretrain):
        raise ConfigError(f"--pretrain_epoch {t.pretrain_epochs}: the cycles leave {pretrain} "
                          f"pre-train epochs; adjust --cyclic_epochs/--cycle")
    return SupTickets(cfg, run.epochs, run.steps_per_epoch, cyclic)

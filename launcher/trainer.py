"""The training loop: one path from a CPU quick start to many GPUs.

``Trainer`` builds the run in a fixed order (its docstring), then the loop reads top to
bottom: forward, backward, optimizer step, the Sparsifier (re-mask; prune and regrow on update
steps), LR step, log, evaluate, checkpoint. At its few real points it fires the named events
of ``launcher/events.py``; phases such as Sup-tickets are plug-ins (``launcher/plugins/``) and
the loop never names one.
"""

from __future__ import annotations

import contextlib
import functools
import datetime
import hashlib
import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from tqdm import tqdm

import models
from data_pipelines import ShardedLoader, build_loaders, check_loaders
from itop_dist import FlopsCounter, Sparsifier, collectives, layer_flops, maskable_parameters, total_steps
from itop_dist.schedules import schedule_problem
from itop_dist.sparsifier import UpdateReport, full_tensor
from launcher.checkpoint import Checkpointer, CheckpointError, RNGState, RunLock
from launcher.config import FSDP_STAGES, ConfigError, TrainConfig, default_channels_last, flat_config, save_config
from launcher import plots
from launcher.evaluate import build_model, model_dataset
from launcher.events import Event, build_plugins
from launcher.lr_schedule import lr_factor
from launcher.parallel import (ModelState, OptimizerState, apply_fsdp, full_state_dict,
                               local_optimizer, shard_mesh, zero1_optimizer)
import launcher.plugins  # noqa: F401  (registers the built-in plug-ins)
from launcher.preemption import Preemption
from launcher.tracking import Tracker, wandb_available


SHOWN = ("sparsity/density", "itop/rate", "flops/train_rel", "flops/test_rel")
SUMMARY_NAMES = {"sparsity/density": "final_density", "itop/rate": "final_itop_rate",
                 "flops/train_cumulative": "train_flops", "flops/train_rel": "train_flops_rel",
                 "flops/test_rel": "test_flops_rel"}


def code_version() -> str:
    """SHA-256 (12 hex digits) of this project's Python sources: ranks started from different
    checkouts differ here."""
    root = pathlib.Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in ("itop_dist", "launcher", "models", "data_pipelines"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:12]


class DivergedError(ValueError):
    """The loss became non-finite: one line naming the step and a hint (exit status 2)."""


@dataclass
class TrainState:
    """Where the run is; saved as ``train_state.json`` in every checkpoint.

    ``step`` counts optimizer steps taken and only grows (metrics and W&B are keyed by it).
    The schedules (LR, mask updates, the run's length) run on ``step + step_shift``: the shift
    changes only when a run resumes with another global batch, so that the schedules continue
    where they were by epoch (see :meth:`Trainer._continue_elastic`).
    """

    step: int = 0            # optimizer steps taken
    epoch: int = 0           # current epoch
    batch_in_epoch: int = 0  # data position inside the epoch: micro-batches of each rank
    micro_batch_global: int = 0  # samples of one micro-batch over all ranks (processes x batch)
    accumulate: int = 1      # micro-batches per optimizer step
    step_shift: int = 0      # schedule position - step (non-zero after an elastic resume)
    best_acc: float = -1.0   # best validation accuracy AT THE TARGET DENSITY (-1: none yet)
    best_step: int = -1
    best_density: float = -1.0
    wandb_id: str | None = None  # a resumed or requeued run continues the same W&B run

    @property
    def schedule_step(self) -> int:
        return self.step + self.step_shift

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, sd: dict) -> None:
        vars(self).update(sd)


class _Window:
    """Training loss and accuracy summed on the device between two log lines (one host sync
    per log line); ``started``/``start_step`` date the run's start for the eta."""

    def __init__(self, device: torch.device, start_step: int) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device)
        self.started, self.start_step = time.perf_counter(), start_step
        self.reset()

    def add(self, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        self.loss += loss
        self.correct += correct
        self.seen, self.steps = self.seen + count, self.steps + 1

    def reset(self) -> None:
        self.loss.zero_(), self.correct.zero_()
        self.seen, self.steps, self.tick = 0, 0, time.perf_counter()


class Trainer:
    """One training run: built in a fixed order, then ``fit()`` and ``close()``.

    Build order (each a short method): accelerator and process group, the same-job check and
    seed, data, model, parallelism (FSDP2 here; DDP in ``accelerator.prepare``), plug-ins,
    optimizer and LR schedule, sparsity (the Sparsifier masks the optimizer's state too, so it
    comes after the optimizer), FLOPs counter and state, checkpointer, tracker; then the run
    folder is locked, the checkpoint (if any) loaded and ``Event.INIT`` fired.

    Raises ConfigError for settings that cannot run, CheckpointError for a folder or
    checkpoint that cannot be used; the run folder is left as it was in both cases.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg, self.run_dir = cfg, cfg.run_dir
        self.accelerator = _build_accelerator(cfg)
        _check_same_job(cfg)
        set_seed(cfg.seed)  # the same on every rank: identical initial weights and masks
        self.loaders = self._build_data()
        model = self._build_model()
        # FLOPs per sample of every conv/linear layer and of attention's products, measured
        # from one real forward pass.
        layer_cost = layer_flops(model, torch.zeros(1, *self.loaders.input_shape))
        model = self._parallelize(model)
        self._build_run_length()
        self.plugins = build_plugins(cfg, self)
        self._build_optimizer_and_schedule(model)
        self.sparsifier = self._build_sparsity()
        self.flops = FlopsCounter(
            layer_cost, self.sparsifier.layer_densities() if self.sparsifier else None)
        self.state = TrainState(micro_batch_global=self.loaders.train.batch_size * self.accelerator.num_processes,
                                accumulate=cfg.optim.accumulate)
        self.checkpointer = self._build_checkpointer()
        self.tracker = Tracker(self.accelerator, self.run_dir, cfg.log.wandb, cfg.log.wandb_project,
                               cfg.log.wandb_mode)
        self._start()

    # --- build, in order -----------------------------------------------------------------
    def _build_data(self):
        cfg, acc = self.cfg, self.accelerator
        loaders = build_loaders(cfg.data, seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes)
        # File headers of the evaluation split (and training split with --check-data): a bad
        # file stops the run now, not after an epoch. ImageNet-style data only.
        check_loaders(loaders, train=cfg.data.check_data)
        return loaders

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        model = self.new_model()
        if cfg.model.initial_checkpoint:  # start from exported weights (launcher/export.py)
            from launcher.export import load_initial_weights
            self.print(load_initial_weights(model, cfg.model.initial_checkpoint, cfg.sparse))
        self.channels_last = cfg.model.channels_last
        if self.channels_last is None:
            self.channels_last = default_channels_last(self.accelerator.device.type, self.loaders.input_shape)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def new_model(self) -> torch.nn.Module:
        """A fresh model of the run's architecture, with the class count of the data actually
        found (an ImageNet subset, say); also used for Sup-tickets' superposed models."""
        return build_model(self.cfg, self.loaders.num_classes, tuple(self.loaders.input_shape))

    def _parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """The ZeRO stage's wrapping (launcher/parallel.py): FSDP2 here for zero2/zero3/hsdp;
        replicated models (ddp, zero1) are wrapped in DDP by ``prepare``, compiled first with
        ``--compile``."""
        acc, cfg = self.accelerator, self.cfg
        self.stage = self._sharding_stage()
        self.sharded = self.stage in FSDP_STAGES
        if cfg.model.compile and self.sharded:
            # Measured (torch 2.14, 2 gloo processes, zero3): dynamo meets FSDP2's hooks inside
            # the compiled model, breaks the graph in their loop and runs the whole model eagerly.
            raise ConfigError(f"--compile with --sharding {self.stage}: torch.compile cannot trace FSDP2's "
                              f"hooks and would run the model uncompiled; use --sharding ddp or zero1 "
                              f"with --compile, or drop --compile")
        if cfg.model.compile:
            # Before DDP wraps it (as timm compiles), so DDP's hooks stay outside the compiled code.
            # In place (nn.Module.compile): the model keeps its type and parameter names (no
            # _orig_mod). The Sparsifier multiplies masks into the parameters in place between
            # steps, outside the graph, whose inputs they are: an update changes values only and
            # never recompiles (tests/test_device_paths.py).
            model.compile()
        if self.stage != "ddp" and acc.num_processes < 2:
            raise ConfigError(f"--sharding {self.stage} needs at least 2 processes (this is 1): launch with "
                              "accelerate launch --multi_gpu --num_processes N, N >= 2, or use --sharding ddp")
        if not self.sharded:
            return model
        group = cfg.shard_group_size or int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        if self.stage == "hsdp" and acc.num_processes % group:
            raise ConfigError(f"--shard-group-size {group}: does not divide the {acc.num_processes} processes; "
                              f"choose a divisor (the processes per node is the usual choice)")
        mesh = shard_mesh(self.stage, acc.device.type, acc.num_processes, group)
        # Parameters must be sharded before the optimizer and the masks see them.
        units = models.model_fsdp_units(cfg.model.name, model_dataset(cfg))(model)
        return apply_fsdp(model.to(acc.device), acc.mixed_precision, units, self.stage, mesh)

    def _sharding_stage(self) -> str:
        """``--sharding``, or the stage the Accelerate config asks for: FSDP is zero3, or zero2
        with ``fsdp_reshard_after_forward: false``. On CPUs Accelerate drops FSDP (MULTI_CPU) but
        its launcher still sets ACCELERATE_USE_FSDP. A flag that contradicts the config is
        refused (hsdp refines an FSDP config: full sharding within each shard group)."""
        acc, asked = self.accelerator, self.cfg.sharding
        launcher = None
        if acc.distributed_type == DistributedType.FSDP or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
            launcher = "zero2" if reshard == "false" else "zero3"
        if asked == "launcher":
            return launcher or "ddp"
        if launcher is not None and asked != launcher and not (asked == "hsdp" and launcher == "zero3"):
            raise ConfigError(f"--sharding {asked}: the Accelerate config asks for FSDP ({launcher}); "
                              f"drop --sharding, or launch with a config without distributed_type FSDP")
        return asked

    def _build_run_length(self) -> None:
        """Steps per epoch, epochs (x the multiplier) and optimizer steps of the whole run."""
        cfg = self.cfg
        self.steps_per_epoch = len(self.loaders.train) // cfg.optim.accumulate
        if self.steps_per_epoch == 0:
            raise ConfigError(f"--grad-accum-steps {cfg.optim.accumulate}: more than the "
                              f"{len(self.loaders.train)} batches per epoch of each process")
        self.total_steps = total_steps(self.steps_per_epoch, cfg.schedule.epochs, cfg.schedule.multiplier)
        self.epochs = round(cfg.schedule.epochs * cfg.schedule.multiplier)
        if cfg.schedule.warmup_epochs >= self.epochs:
            raise ConfigError(f"--warmup {cfg.schedule.warmup_epochs}: the warm-up is not shorter than the "
                              f"run ({self.epochs} epochs); use --warmup <= {max(0, self.epochs - 1)}")

    def _build_optimizer_and_schedule(self, model: torch.nn.Module) -> None:
        """The optimizer and the LR schedule (the recipe's, as the plug-ins reshape it);
        ``accelerator.prepare`` wraps them (and a replicated model in DDP)."""
        acc, cfg = self.accelerator, self.cfg
        optimizer = _build_optimizer(model, cfg)
        self.raw_optimizer = optimizer = zero1_optimizer(optimizer) if self.stage == "zero1" else optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_schedule())
        if self.sharded:  # FSDP2 owns the model and optimizer state; Accelerate the rest
            self.model, self.optimizer = model, optimizer
            self.scheduler = acc.prepare(scheduler)
        else:
            # The optimizer has no state yet to move (ZeRO-1's state_dict would be a collective).
            self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler,
                                                                     device_placement=[None, False, None])

    def _lr_schedule(self) -> Callable[[int], float]:
        """The LR factor of a step: the recipe's, reshaped by each plug-in in turn (Sup-tickets'
        cycles), composed once here rather than on every scheduler step."""
        def recipe(s: int) -> float:
            return lr_factor(s, self.cfg.schedule, self.steps_per_epoch, self.total_steps)
        for plugin in self.plugins:  # a partial, like a bound method, saves an empty lr_lambdas entry
            recipe = functools.partial(plugin.lr_factor, recipe=recipe)
        return recipe

    def _build_sparsity(self) -> Sparsifier | None:
        """The Sparsifier on the wrapped parameters, with the plug-ins' sparse settings."""
        cfg = self.cfg
        if not cfg.sparse:
            return None
        sparsity = cfg.sparsity
        for plugin in self.plugins:
            sparsity = plugin.sparse_config(sparsity)
        _check_exclude(self.model, sparsity.exclude)
        sparsifier = Sparsifier(self.model, local_optimizer(self.raw_optimizer), sparsity, self.total_steps,
                                epoch_steps=self.steps_per_epoch * cfg.schedule.multiplier)
        self._check_sparse_schedule(sparsifier, sparsity)
        return sparsifier

    def _build_checkpointer(self) -> Checkpointer:
        acc = self.accelerator
        ck = Checkpointer(self.run_dir, self.cfg.checkpoint.keep_last, acc.process_index, acc.num_processes)
        # Sharded stages write each rank's blocks: no rank gathers the model or optimizer state.
        ck.register("model", ModelState(self.model, self.sharded), sharded=self.sharded)
        ck.register("optimizer", OptimizerState(self.model, self.raw_optimizer, self.sharded),
                    sharded=self.stage != "ddp")
        ck.register("scheduler", self.scheduler, plain=True)
        ck.register("train_state", self.state, plain=True)
        if self.sparsifier is not None:
            ck.register("sparse_state", self.sparsifier, "--sparse", sharded=self.sparsifier.sharded)
        ck.register("flops", self.flops, plain=True)
        for plugin in self.plugins:
            if plugin.state_key is not None:
                ck.register(plugin.state_key, plugin, plugin.flags)
        if acc.scaler is not None:
            ck.register("scaler", acc.scaler, "--mixed-precision fp16", plain=True)
        ck.register("rng_state", RNGState(), per_rank=True)
        return ck

    def _start(self) -> None:
        """Nothing in the run folder is written before the run is accepted: lock, check and
        load the checkpoint first (a refusal leaves the folder as it was); then the config,
        the tracker, the header and ``Event.INIT``."""
        cfg = self.cfg
        self.lock = RunLock(self.run_dir)
        self._resume()
        if self.accelerator.is_main_process:
            save_config(cfg, self.run_dir)
        self.preemption = Preemption()
        self.state.wandb_id = self.tracker.start(cfg.to_dict(), self.state.wandb_id)
        if self.sparsifier is not None and self.state.step == 0:
            self.tracker.log_layers(self.sparsifier.layer_densities(), step=0)
        self._header()
        self.fire(Event.INIT)

    def fire(self, event: Event) -> None:
        """Run every plug-in's hook for ``event``, in registration order."""
        for plugin in self.plugins:
            plugin.on_event(event, self)

    def _check_sparse_schedule(self, sp: Sparsifier, sparsity) -> None:
        """Refuse settings the sparse method cannot carry out (ConfigError naming the flags and
        a value that works): no mask update at all, a pruning window that holds no update or
        ends after the run, a density at which some layer gets no weight."""
        problem = schedule_problem(sp.method, sp.update_until, self.total_steps,
                                   self.steps_per_epoch * self.cfg.schedule.multiplier, sparsity.final_density)
        if problem:
            raise ConfigError(problem)
        empty = [n for n, k in sp.nonzeros().items() if k == 0]
        if empty:
            density = sparsity.density
            while density < 1 and not all(m.any() for m in sp.method.__class__(
                    dataclasses.replace(sparsity, density=density), self.total_steps,
                    self.steps_per_epoch).initial_masks(sp.shapes).values()):
                density = min(1.0, density * 2)
            raise ConfigError(f"--density {sparsity.density:g} leaves {len(empty)} layer(s) without any "
                              f"weight ({empty[0]} first; --sparse-init {sparsity.sparse_init}): the network "
                              f"cannot learn; use --density >= {density:g}")

    def full_state(self) -> dict[str, torch.Tensor]:
        """The training model's full (unsharded, unwrapped) state dict, on every rank."""
        if self.sharded:
            return full_state_dict(self.model)
        return self.accelerator.unwrap_model(self.model).state_dict()

    def _resume(self) -> None:
        """Take the run folder's lock, find and verify the checkpoint (rank 0), load it on
        every rank, then move newer abandoned checkpoints aside and rewind metrics.jsonl.

        A new run in a folder that holds checkpoints, a damaged or foreign checkpoint, a folder
        in use: CheckpointError on every rank, with the folder as it was."""
        acc = self.accelerator
        created = not self.run_dir.exists()
        decision: list = [None, None]  # [checkpoint path or None, refusal message or None]
        if acc.is_main_process:
            try:
                note = self.lock.acquire()
                if note:
                    self.print(note)
                path = self.checkpointer.resolve(self.cfg.checkpoint.resume)
                decision[0] = str(path) if path else None
            except CheckpointError as err:
                decision[1] = str(err)
        collectives.broadcast_objects(decision)
        try:
            if decision[1] is not None:
                raise CheckpointError(decision[1])
            if decision[0] is None:
                return
            path = pathlib.Path(decision[0])
            Checkpointer.check_compatible(Checkpointer.read_meta(path), self.cfg.to_dict(), path)
            self.checkpointer.load(path)
        except BaseException:
            if acc.is_main_process:
                self.lock.release()
                if created and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
                    self.run_dir.rmdir()
            raise
        self._continue_elastic()
        if acc.is_main_process:
            aside = self.checkpointer.abandon_after(path)
            if aside is not None:
                self.print(f"moved the checkpoints after {path.name} aside to {aside} "
                            f"(--resume auto continues from {path.name} on)")
            dropped = self.tracker.rewind(self.state.step)
            if dropped:
                self.print(f"metrics.jsonl: {dropped} records after step {self.state.step} moved to "
                            f"metrics-rewound.jsonl (those steps are trained again)")
        self.print(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch})")

    def _continue_elastic(self) -> None:
        """After loading: if the global batch changed (processes, --batch-size or
        --grad-accum-steps), continue at the same epoch and sample position with the new steps
        per epoch: the data resumes at the first global batch not yet started (no sample twice),
        the LR and mask-update schedules at the same fraction of the run by epoch."""
        st, acc = self.state, self.accelerator
        micro = self.loaders.train.batch_size * acc.num_processes
        k = self.cfg.optim.accumulate
        if (st.micro_batch_global, st.accumulate) == (micro, k):
            return
        old_global, samples = st.micro_batch_global * st.accumulate, st.batch_in_epoch * st.micro_batch_global
        old_position = st.schedule_step
        steps_done = math.ceil(samples / (micro * k))  # steps of the new size already covered
        if steps_done >= self.steps_per_epoch:
            st.epoch, steps_done = st.epoch + 1, 0
        st.batch_in_epoch = steps_done * k
        st.micro_batch_global, st.accumulate = micro, k
        st.step_shift = st.epoch * self.steps_per_epoch + steps_done - st.step
        if self.sparsifier is not None:
            self.sparsifier.state.step += st.schedule_step - old_position
        scheduler = getattr(self.scheduler, "scheduler", self.scheduler)
        scheduler.last_epoch = st.schedule_step
        for group, base, fn in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * fn(st.schedule_step)
        scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.print(f"the global batch changed from {old_global} to {micro * k} "
                    f"({acc.num_processes} processes x {self.loaders.train.batch_size} x {k}): "
                    f"continuing epoch {st.epoch} at sample {steps_done * micro * k} with "
                    f"{self.steps_per_epoch} steps per epoch")

    def _header(self) -> None:
        """What the run is, printed once at the start (rank 0); the same values go to the W&B
        config's ``run`` section."""
        cfg, acc, st = self.cfg, self.accelerator, self.state
        info = {"run_dir": str(self.run_dir), "device": str(acc.device), "world_size": acc.num_processes,
                "distributed_type": acc.distributed_type.value, "precision": acc.mixed_precision,
                "sharding": self.stage, "model": cfg.model.name,
                "params_total": sum(p.numel() for p in self.model.parameters()),
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "global_batch": st.micro_batch_global * st.accumulate,
                "method": self.tracker.method_line(cfg.to_dict()),
                "selected_on": "val" if self.loaders.val is not None else "test (no validation split)"}
        params = f"{info['params_total']:,} parameters"
        if self.sparsifier is not None:
            sp = self.sparsifier
            info["params_masked"] = sp.masked_params
            info["params_nonzero_at_target"] = (  # the masks themselves once at the target
                sum(sp.nonzeros().values()) if sp.at_final_density
                else round(sp.masked_params * sp.config.final_density))
            info["target_density"] = sp.config.final_density
            params += (f", {info['params_masked']:,} masked, {info['params_nonzero_at_target']:,} "
                       f"non-zero masked at density {sp.config.final_density:g}")
        self.tracker.update_config({"run": info})
        stop = f", stopping at step {cfg.schedule.max_steps} (--max-steps)" if cfg.schedule.max_steps else ""
        lines = [
            f"run: {self.run_dir}" + (f" (resumed at step {st.step})" if st.step else ""),
            f"device: {acc.device}, world size {acc.num_processes} ({info['distributed_type']}), "
            f"precision {acc.mixed_precision}, sharding {info['sharding']}",
            f"model: {cfg.model.name}, {params}",
            f"steps: {self.steps_per_epoch} per epoch, {self.total_steps} in all "
            f"({self.epochs} epoch{'s' if self.epochs != 1 else ''}, global batch {info['global_batch']}){stop}",
            f"method: {info['method']}",
        ]
        if self.loaders.val is None:
            lines.append("no validation split: the best model is selected on the test set")
        self.print("\n".join(lines))

    def print(self, text: str) -> None:
        if self.accelerator.is_main_process:
            with tqdm.external_write_mode():  # above a bar; flushed, for SLURM logs
                print(text, flush=True)

    def fit(self) -> dict:
        """Train to the end (or ``--max-steps``); returns the summary also written last."""
        cfg, st = self.cfg, self.state
        # The run's length is on the schedule's scale (st.schedule_step; == st.step unless an
        # elastic resume changed the steps per epoch).
        self.last_step = last_step = min(self.total_steps, cfg.schedule.max_steps or self.total_steps)
        bar = self._progress_bar()
        window = _Window(self.accelerator.device, st.schedule_step)
        k = cfg.optim.accumulate
        per_epoch = self.steps_per_epoch * k  # micro-batches used per epoch (the rest dropped)
        self.model.train()
        while st.schedule_step < last_step:
            self.loaders.train.set_epoch(st.epoch, start_batch=st.batch_in_epoch)
            micro = iter(self.loaders.train)
            while st.schedule_step < last_step and st.batch_in_epoch < per_epoch:
                window.add(*self._train_step([next(micro) for _ in range(k)]))
                st.batch_in_epoch += k
                bar.update(1)
                if st.step % cfg.log.log_every == 0 or st.schedule_step == last_step:
                    self._log_window(window, bar)
                epoch_done = st.batch_in_epoch >= per_epoch
                if epoch_done:
                    st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                stop = st.schedule_step >= last_step
                self._evaluate_and_save(epoch_done, stop)
                if not stop and self.preemption.should_stop(st.step):
                    return self._preempted(bar)
                if epoch_done:
                    break
        bar.close()
        self._verify_replicas()
        return self._summary()

    def _progress_bar(self) -> tqdm:
        # disable=None: tqdm turns itself off when its stream (stderr) is not a terminal (SLURM
        # logs, pipes); then the log lines every --log-interval steps are the progress.
        return tqdm(total=self.last_step, initial=self.state.schedule_step,
                    disable=None if self.accelerator.is_main_process and self.cfg.log.progress else True,
                    dynamic_ncols=True, desc=self.run_dir.name)

    def _log_window(self, window: _Window, bar: tqdm) -> None:
        """Log the steps since the last log line (one host sync), check the loss is finite and
        that every rank still trains rank 0's connectivity."""
        st = self.state
        record = self._train_record(window.loss / window.steps, window.correct, window.seen,
                                    time.perf_counter() - window.tick)
        self._check_finite("training loss", record["train/loss"])
        if self.sparsifier is not None:  # a rank's connectivity drifting: caught now
            self.sparsifier.verify()
        bar.set_postfix({k.split("/")[1]: round(v, 4) for k, v in record.items()
                         if k in ("train/loss", "train/acc", "sparsity/density", "itop/rate")})
        eta = ((time.perf_counter() - window.started) / (st.schedule_step - window.start_step)
               * (self.last_step - st.schedule_step))
        self.print(self.tracker.log_line(st.step, self.last_step - st.step_shift, st.epoch, record, eta))
        window.reset()

    def _evaluate_and_save(self, epoch_done: bool, stop: bool) -> None:
        """Evaluate at an epoch's end, the run's end and every --eval-every steps; checkpoint
        at those (the best is kept) and every --save-every steps."""
        every = self.cfg.schedule.eval_every
        if epoch_done or stop or (every and self.state.step % every == 0):
            is_best = self._evaluate()
            if epoch_done:
                self.fire(Event.EPOCH_END)
            if epoch_done or stop or is_best or self._save_due():
                self._save(is_best)
        elif self._save_due():
            self._save(False)

    def _preempted(self, bar) -> dict:
        """A stop signal: checkpoint this step on every rank, close the W&B run (a requeue
        signals every process of the job, W&B's own too), then requeue the SLURM job."""
        bar.close()
        self._save(False)
        self.tracker.finish()
        requeued = self.preemption.requeue(self.accelerator.is_main_process)
        record = {"preempted": True, "requeued": requeued, "signal": self.preemption.signal,
                  "signal_name": self.preemption.signal_name}
        self.tracker.log(record, self.state.step, self.state.epoch)  # metrics.jsonl: W&B is closed
        self.print(f"stop signal {record['signal_name']}: checkpoint at step {self.state.step} written"
                    + ("; job requeued" if requeued else "; resume with --resume auto"))
        return {**record, "step": self.state.step}

    def _train_step(self, micro_batches: list) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step over k micro-batches (gradient accumulation; k = 1 usually).

        Gradients are synchronised across ranks on the last micro-batch only, so the sparse
        hook after ``optimizer.step()`` sees the gradient of all k micro-batches on all ranks,
        unscaled (fp16). Returns the mean loss, the correct count and the sample count.
        """
        acc, k = self.accelerator, len(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=acc.device)
        correct = torch.zeros((), device=acc.device)
        count = 0
        for i, (x, y) in enumerate(micro_batches):
            x, y = self.to_device(x, y)
            with self._grad_sync(last=i == k - 1):
                logits = self.model(x)
                loss = torch.nn.functional.cross_entropy(
                    logits, y, label_smoothing=self.cfg.optim.label_smoothing)
                acc.backward(loss / k)
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            count += y.numel()
        self.fire(Event.AFTER_BACKWARD)
        # re-mask, prune and regrow on update steps; nothing after an fp16 step skipped for inf/NaN
        report = optimizer_and_sparse_step(self.optimizer, self.sparsifier)
        self.state.step += 1
        # This step's cost (a RigL update step needed the dense gradient), then new densities.
        cost_kind = self.sparsifier.method.cost_kind if self.sparsifier is not None else None
        self.flops.step(None, count * acc.num_processes, cost_kind, update_step=report is not None)
        if report is not None:
            self.record_mask_update(report)
        self.fire(Event.AFTER_OPTIMIZER_STEP)
        self.scheduler.step()
        return loss_sum / k, correct, count

    def _grad_sync(self, last: bool):
        """All-reduce (DDP) or reduce-scatter (FSDP) gradients only on the last micro-batch."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    # ------------------------------------------------------------------------------------
    def to_device(self, x: torch.Tensor, y: torch.Tensor):
        x = x.to(self.accelerator.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.accelerator.device, non_blocking=True)

    def _save_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every) and self.state.step % every == 0

    def _sparse_numbers(self) -> dict:
        """Density, ITOP rate and FLOPs relative to the dense model, for every record."""
        numbers = {"sparsity/density": 1.0} if self.sparsifier is None else {
            "sparsity/density": self.sparsifier.density, "itop/rate": self.sparsifier.itop_rate}
        return {**numbers, "flops/train_cumulative": self.flops.total,
                "flops/train_rel": self.flops.train_rel, "flops/test_rel": self.flops.test_rel}

    def _train_record(self, mean_loss, correct_sum, seen: int, seconds: float) -> dict:
        """Mean loss of the window (averaged over ranks), accuracy, LR, sparsity, speed."""
        totals = self.accelerator.reduce(torch.stack([mean_loss, correct_sum.float(),
                                                      torch.tensor(float(seen), device=mean_loss.device)]),
                                         reduction="sum")
        loss, correct, count = totals.tolist()  # one host sync per log step
        record = {
            "train/loss": loss / self.accelerator.num_processes,
            "train/acc": correct / max(count, 1),
            "train/lr": self.scheduler.get_last_lr()[0],
            **self._sparse_numbers(),
            "perf/images_per_s": count / max(seconds, 1e-9),
        }
        self.tracker.log(record, self.state.step, self.state.epoch)
        return record

    def record_mask_update(self, report) -> None:
        """New masks: FLOPs at the new densities from now on; log the update (rank 0 prints)."""
        self.flops.set_densities(report.layer_densities)
        self.tracker.log({"mask/pruned": report.pruned, "mask/regrown": report.regrown,
                          "mask/rate": report.rate, "sparsity/density": report.density,
                          "itop/rate": report.itop_rate}, self.state.step, self.state.epoch)
        self.tracker.log_layers(report.layer_densities, self.state.step)
        self.print(str(report))  # "... The percentage of the total fired weights is R", as ITOP

    @torch.no_grad()
    def evaluate_model(self, loader: ShardedLoader, model: torch.nn.Module | None = None) -> tuple[float, float]:
        """(loss, accuracy) of ``model`` (the trained one by default) over the whole split,
        summed across ranks (no sample twice)."""
        model = model or self.model
        model.eval()
        totals = torch.zeros(3, device=self.accelerator.device)
        loader.set_epoch(0)
        for x, y in loader:
            x, y = self.to_device(x, y)
            logits = model(x)
            totals[0] += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += y.numel()
        self.model.train()  # the trained model goes back to training either way
        loss, correct, count = self.accelerator.reduce(totals, reduction="sum").tolist()
        return loss / count, correct / count

    def _check_finite(self, what: str, loss: float) -> None:
        """A non-finite loss ends the run (DivergedError: one line) before anything is saved
        from it, so that no checkpoint, least of all the best, holds a diverged model."""
        if not math.isfinite(loss):
            last = self.checkpointer.complete()
            raise DivergedError(
                f"the {what} is {loss} at step {self.state.step} (epoch {self.state.epoch}): the run "
                f"diverged; lower --lr (now {self.cfg.optim.lr:g}) or add --warmup, and resume from "
                + (f"{last[-1]} with --resume PATH" if last else "the start (no checkpoint yet)"))

    def _evaluate(self) -> bool:
        """Evaluate val (or test when there is no validation split) and test; True if best."""
        test_loss, test_acc = self.evaluate_model(self.loaders.test)
        if self.loaders.val is not None:
            val_loss, val_acc = self.evaluate_model(self.loaders.val)
        else:
            val_loss, val_acc = test_loss, test_acc
        record = {"val/loss": val_loss, "val/acc": val_acc, "test/loss": test_loss,
                  "test/acc": test_acc, **self._sparse_numbers()}
        self._check_finite("evaluation loss", test_loss if math.isfinite(val_loss) else val_loss)
        if not self.sharded:  # replicated weights must be equal on every rank (sharded: at the end)
            collectives.check_same({n: p.detach() for n, p in self.model.named_parameters()}, "weights")
        self.tracker.log(record, self.state.step, self.state.epoch)
        val = f"val acc {val_acc:.4f} " if self.loaders.val is not None else ""  # else val IS test
        self.print(f"step {self.state.step} epoch {self.state.epoch}: {val}"
                    f"test acc {test_acc:.4f} " + " ".join(
                        f"{k} {record[k]:.4f}" for k in SHOWN if k in record))
        self.last_eval = record
        # "Best" is chosen only among evaluations at the target density: a dense-to-sparse run
        # is more accurate while still denser, and that model is not the one the run promises.
        at_target = self.sparsifier is None or self.sparsifier.at_final_density
        if at_target and val_acc > self.state.best_acc:
            st = self.state
            st.best_acc, st.best_step, st.best_density = val_acc, st.step, record["sparsity/density"]
            return True
        return False

    def _save(self, is_best: bool) -> None:
        meta = {"step": self.state.step, "epoch": self.state.epoch,
                "val_acc": getattr(self, "last_eval", {}).get("val/acc"),
                "config": self.cfg.to_dict()}
        self.checkpointer.save(self.state.step, meta, is_best)

    def _verify_replicas(self) -> None:
        """Every rank must end with rank 0's masks, explored union and weights (raises)."""
        if self.sparsifier is not None:
            self.sparsifier.verify()
        weights = {n: full_tensor(p) for n, p in self.model.named_parameters()}
        collectives.check_same(weights, "weights")

    def _summary(self) -> dict:
        last = getattr(self, "last_eval", None) or {}
        found = self.state.best_step >= 0
        summary = {
            "summary": True, "step": self.state.step, "epoch": self.state.epoch,
            "final_val_acc": last.get("val/acc"), "final_test_acc": last.get("test/acc"),
            # Among evaluations at the target density only (None: the run never reached it).
            "best_val_acc": self.state.best_acc if found else None,
            "best_step": self.state.best_step if found else None,
            "best_density": self.state.best_density if found else None,
            "selected_on": "val" if self.loaders.val is not None else "test (no validation split)",
            "world_size": self.accelerator.num_processes, "sharding": self.stage,
            "ranks_identical": True,  # _verify_replicas raised otherwise
            **{SUMMARY_NAMES[k]: v for k, v in self._sparse_numbers().items()},
        }
        self.summary = summary
        self.fire(Event.FIT_END)  # plug-ins add their results
        self.tracker.summary(summary, self.state.step, self.state.epoch)  # W&B: run summary, not history
        self.print("summary: " + json.dumps(summary))
        if self.cfg.log.plots and self.accelerator.is_main_process:
            plots.write_plots(self.run_dir / "metrics.jsonl", self.run_dir)
        return summary

    def close(self) -> None:
        if self.accelerator.is_main_process:
            self.lock.release()
        self.preemption.close()
        self.tracker.finish()
        self.accelerator.end_training()


def optimizer_and_sparse_step(optimizer: torch.optim.Optimizer, sparsifier: Sparsifier | None) -> UpdateReport | None:
    """``optimizer.step()``, then ``sparsifier.step()`` (re-mask; prune and regrow on update
    steps) unless the optimizer skipped the step. Returns the mask update's report, None when
    there was none.

    An fp16 loss scaler (Accelerate's AcceleratedOptimizer holding a ``torch.amp.GradScaler``)
    skips a step whose gradients hold inf/NaN; that step changed no weight, so it neither
    advances the Sparsifier's step count (the mask schedule) nor updates masks from those
    gradients. Device-agnostic: the verdict is the AcceleratedOptimizer's
    (``step_was_skipped``: the scaler's scale fell in the step), so a ``GradScaler("cpu")``
    drives it in the tests as a CUDA one does in fp16 runs; a bare optimizer (FSDP2 stages,
    which refuse fp16) never skips."""
    optimizer.step()
    if sparsifier is None or (isinstance(optimizer, AcceleratedOptimizer) and optimizer.step_was_skipped):
        return None
    return sparsifier.step()


def _build_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator (devices, precision, trackers) and with it the process group."""
    precision = _resolve_precision(cfg)
    if precision == "fp16" and (cfg.device == "cpu" or not torch.cuda.is_available()):
        raise ConfigError("--mixed-precision fp16 (or the launcher's fp16): fp16 needs a CUDA GPU, "
                          "this run is on cpu; use bf16 or no")
    return Accelerator(
        cpu=cfg.device == "cpu",
        mixed_precision=precision,
        step_scheduler_with_optimizer=False,  # the schedule is defined per optimizer step
        log_with="wandb" if cfg.log.wandb and wandb_available() else None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=cfg.dist_timeout))],
    )


def _check_same_job(cfg: TrainConfig) -> None:
    """Every rank must run the same job: another --seed would train on overlapping shards,
    another --update_frequency would hang at the first mask update (ConfigError)."""
    differ = collectives.differing_settings({**flat_config(cfg.to_dict()), "code version": code_version()})
    if differ:
        raise ConfigError(f"the processes of this job were started with different settings "
                          f"({'; '.join(differ[:3])}); start every rank with the same command")


def _check_exclude(model: torch.nn.Module, exclude: tuple[str, ...]) -> None:
    """Refuse an ``--exclude`` pattern that matches no maskable weight (a typo would otherwise
    silently sparsify the layer meant to stay dense) or that leaves nothing to sparsify."""
    names = list(maskable_parameters(model))
    unused = [p for p in exclude if not any(p in n for n in names)]
    if unused:
        raise ConfigError(f"--exclude {unused[0]} matches no conv or linear weight of this model; its "
                          f"weights are {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}")
    if exclude and all(any(p in n for p in exclude) for n in names):
        raise ConfigError(f"--exclude {','.join(exclude)} leaves no weight to sparsify; exclude fewer "
                          f"layers, or train the dense model with --dense")


NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm)


def _build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD, Adam (L2 added to the gradient) or AdamW (decoupled weight decay, Loshchilov & Hutter
    2019); with ``bn_weight_decay`` off, normalisation parameters get no decay."""
    o = cfg.optim
    norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters()}
    groups = [{"params": [p for p in model.parameters() if o.bn_weight_decay or id(p) not in norm]},
              {"params": [p for p in model.parameters() if not o.bn_weight_decay and id(p) in norm],
               "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        # torch's AdamW is exactly this Adam; built as Adam because ZeRO-1's optimizer re-creates
        # the class from its defaults, which AdamW's own constructor refuses (decoupled_weight_decay).
        return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay, decoupled_weight_decay=True)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum,
                           nesterov=o.nesterov and o.momentum > 0, weight_decay=o.weight_decay)


def _resolve_precision(cfg: TrainConfig) -> str:
    """``launcher`` (the default): what ``accelerate launch`` was told (its
    ``--mixed_precision`` or config file, passed as ACCELERATE_MIXED_PRECISION), else ``no``;
    ``auto``: bf16 on GPUs that support it, full precision elsewhere."""
    if cfg.mixed_precision == "launcher":
        return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    gpu = cfg.device != "cpu" and torch.cuda.is_available()
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"

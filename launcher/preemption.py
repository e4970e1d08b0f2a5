"""Preemption and time limits: checkpoint at the next step boundary, then requeue.

SLURM sends the job a warning signal before its time limit (``#SBATCH --signal=USR1@300``)
and SIGTERM when it preempts or cancels it. Either one makes every rank stop at the same step
boundary and write a checkpoint; after the warning, rank 0 also asks SLURM to requeue the job
(``scontrol requeue``; the script has ``#SBATCH --requeue``), while after SIGTERM SLURM itself
requeues a preempted job and a cancelled one stays cancelled. The requeued job resumes from that
checkpoint (``--resume auto``) and continues the same W&B run. Nothing is trained twice and at
most the step in flight is lost.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import torch
import torch.distributed as dist

log = logging.getLogger("itop_dist.train")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Records a stop signal; every rank agrees on the step at which to stop.

    Ranks may receive the signal a moment apart, so the decision is an all-reduce (max) of the
    flag, taken every ``check_every`` steps (one tiny collective; with one process, every step).
    """

    def __init__(self, device: torch.device, check_every: int = 10) -> None:
        self.device, self.check_every = device, check_every
        self.received: int | None = None
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def should_stop(self, step: int) -> bool:
        if not self.distributed:
            return self.received is not None
        if step % self.check_every:
            return False
        flag = torch.tensor([0 if self.received is None else 1], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def requeue(self, is_main: bool) -> bool:
        """Ask SLURM to requeue this job (rank 0, inside a SLURM job, after the time-limit
        warning SIGUSR1); True if asked. After SIGTERM the job is not requeued here: a user's
        ``scancel`` must end it, and SLURM requeues jobs it preempts (``--requeue``) itself."""
        job = os.environ.get("SLURM_JOB_ID")
        if not (is_main and job and self.received == signal.SIGUSR1):
            return False
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
            return False
        return True

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

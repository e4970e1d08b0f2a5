"""Stop signals: checkpoint at the next step boundary, exit cleanly, and requeue after the warning.

SLURM sends the job a warning signal before its time limit (``#SBATCH --signal=USR1@300``)
and SIGTERM when it preempts or cancels it; Ctrl-C sends SIGINT. Any of them, received by any
rank, makes every rank stop at the same step boundary and write a checkpoint, then exit with
status 0. After the warning (SIGUSR1) rank 0 also asks SLURM to requeue the job
(``scontrol requeue``; the script has ``#SBATCH --requeue``); after SIGTERM SLURM itself
requeues a preempted job and a cancelled one stays cancelled; after SIGINT nothing is
requeued. The requeued job resumes from that checkpoint (``--resume auto``) and continues the
same W&B run. Nothing is trained twice and at most the step in flight is lost. A second SIGINT
kills the process at once (no checkpoint), as a second Ctrl-C should.

The ranks agree on which signal they act on: the all-reduced maximum of ``RANKING``, in which a
stop that must not requeue (SIGTERM, SIGINT) outranks the requeue request (SIGUSR1).

``listen()`` (called first thing by ``launcher.train``) records stop signals from the start of
the process, so one that arrives while the trainer is still being built (data, model, resume)
is acted on at the first check instead of killing the process or being lost. Under
``accelerate launch``/``torchrun`` it also asks for SIGTERM when the launcher dies (a SIGUSR1
sent to the launcher kills it): its workers then checkpoint instead of training on, orphaned.
The launcher forwards SIGTERM and SIGINT itself but exits 1 and SIGKILLs workers that take
longer than 30 s: send stop signals to the workers, ``pkill -USR1 -P <launcher pid>``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from itop_dist import collectives

log = logging.getLogger("itop_dist.train")

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM)
# Which signal wins when ranks (or one rank) got different ones: higher ranks first.
RANKING = {signal.SIGUSR1: 1, signal.SIGINT: 2, signal.SIGTERM: 3}
_BY_RANK = {r: s for s, r in RANKING.items()}


def _stronger(a: int | None, b: int | None) -> int | None:
    return max((s for s in (a, b) if s is not None), key=lambda s: RANKING[s], default=None)


_early: dict[str, int | None] = {"received": None}


def _record(received: int | None, signum: int) -> int | None:
    """The strongest of ``received`` and ``signum``; after a Ctrl-C the next one kills."""
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return _stronger(received, signum)


def _early_handle(signum: int, frame) -> None:
    _early["received"] = _record(_early["received"], signum)


def _handled(received: int | None) -> tuple[int, ...]:
    """The stop signals to catch: all, but SIGINT no more once received (the next one kills)."""
    return tuple(s for s in STOP_SIGNALS if s != signal.SIGINT or received != signal.SIGINT)


def _stop_with_the_launcher() -> None:
    """A worker of ``accelerate launch``/``torchrun`` gets SIGTERM when its launcher dies (say
    of a SIGUSR1 sent to it, which it does not handle), instead of training on, orphaned, to the
    end: it checkpoints like on SIGTERM. Linux only (``PR_SET_PDEATHSIG``)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    # Reparented between the two calls: the launcher was gone before the request. (Not
    # ``getppid() == 1``: in a container the launcher itself may be PID 1.)
    if os.getppid() != launcher:
        os.kill(os.getpid(), signal.SIGTERM)


def listen() -> dict:
    """Record stop signals from now on (before the trainer exists); the next ``Preemption``
    takes them over. Under a launcher, also stop when the launcher dies. Returns the handlers
    replaced, for ``restore``."""
    previous = {s: signal.signal(s, _early_handle) for s in _handled(_early["received"])}
    _stop_with_the_launcher()
    return previous


def restore(previous: dict) -> None:
    """Put back the handlers ``listen`` replaced (a caller in the same process goes on)."""
    _early["received"] = None
    for s, handler in previous.items():
        signal.signal(s, handler)


class Preemption:
    """Records stop signals; every rank agrees on the step at which to stop and on the signal.

    Ranks may receive a signal a moment apart, or only some of them receive it, so the decision
    is an all-reduce (max) of each rank's strongest signal (``RANKING``; 0: none), taken every
    ``check_every`` steps (one tiny collective; with one process, every step). ``signal`` is
    then the agreed signal, the same on every rank.
    """

    def __init__(self, check_every: int = 10) -> None:
        self.check_every = check_every
        self.received: int | None = None  # this rank's strongest stop signal
        self.signal: int | None = None    # the one all ranks agreed to act on
        self.distributed = collectives.world_size() > 1
        if signal.getsignal(signal.SIGUSR1) is _early_handle:  # launcher.train's listen(): take over
            self.received, _early["received"] = _early["received"], None
        self._previous = {s: signal.signal(s, self._handle) for s in _handled(self.received)}

    def _handle(self, signum: int, frame) -> None:
        self.received = _record(self.received, signum)

    def should_stop(self, step: int) -> bool:
        """True on every rank at the same step once any rank got a stop signal; sets ``signal``."""
        received = self.received
        if self.distributed:
            if step % self.check_every:
                return False
            received = _BY_RANK.get(collectives.max_over_ranks(RANKING.get(received, 0)))
        if received is None:
            return False
        self.signal = int(received)
        return True

    @property
    def signal_name(self) -> str | None:
        """The agreed signal's name (``SIGUSR1``), None before one was agreed."""
        return None if self.signal is None else signal.Signals(self.signal).name

    def requeue(self, is_main: bool) -> bool:
        """Ask SLURM to requeue this job (rank 0, inside a SLURM job, when the agreed signal is
        the time-limit warning SIGUSR1); True if asked. After SIGTERM the job is not requeued
        here: a user's ``scancel`` must end it, and SLURM requeues jobs it preempts
        (``--requeue``) itself; after SIGINT (Ctrl-C) the user wants it stopped."""
        job = os.environ.get("SLURM_JOB_ID")
        if not (is_main and job and self.signal == signal.SIGUSR1):
            return False
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("scontrol requeue %s failed: %s", job, result.stderr.strip())
            return False
        return True

    def close(self) -> None:
        """Put back the handlers found (``listen``'s, under ``launcher.train``: a stop signal
        during the last teardown is then ignored, as the process is stopping anyway)."""
        for s, handler in self._previous.items():
            if s != signal.SIGINT or signal.getsignal(s) == self._handle:  # after a Ctrl-C, the next kills
                signal.signal(s, handler)

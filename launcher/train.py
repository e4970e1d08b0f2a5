"""Entry point: ``itop-train``, ``python -m launcher.train`` or ``accelerate launch -m launcher.train``.

    itop-train --sparse --data digits --model digits-mlp --density 0.05 --epochs 30
    accelerate launch -m launcher.train --config configs/cifar10_vgg-c_rigl_itop.yaml

Parses the configuration, builds the trainer, trains, and always closes it. Bad input
(``ConfigError``, ``CheckpointError``, ``DataError``: flags, files, data folders, checkpoints
of another run) ends with one line on stderr and exit status 2, before any training; any
other exception is a bug and keeps its traceback. A stop signal (SIGUSR1, SIGTERM, SIGINT)
ends in a checkpoint and exit status 0 (``launcher/preemption.py``).

A process of a multi-process run leaves with ``os._exit`` once it is done (after the atexit
handlers, with stdout and stderr flushed), without the interpreter's finalization: gloo's
worker threads may still be releasing the last collective's tensors then, and a thread that
needs the GIL while the interpreter finalizes is ended by ``pthread_exit``, which aborts the
process (``terminate called without an active exception``, exit status 1 from the launcher).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import NoReturn

from launcher.checkpoint import CheckpointError
from launcher.config import ConfigError, parse_config, print_error


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as err:
        return print_error("itop-train", str(err))
    from launcher.preemption import listen, restore  # after parsing: --help stays fast

    previous = listen()  # a stop signal while the trainer is being built: acted on at the first step
    try:
        code, many = _train(cfg)
    except BaseException:
        restore(previous)
        raise
    if many:
        _leave(code)  # does not return
    restore(previous)
    return code


def _train(cfg) -> tuple[int, bool]:
    """Build, train, close: (exit status, whether this process was one of several)."""
    from data_pipelines import DataError
    from launcher.trainer import DivergedError, Trainer
    from models import ModelError

    try:
        trainer = Trainer(cfg)
    except (ConfigError, CheckpointError, DataError, ModelError) as err:  # bad input; anything else is a bug
        return print_error("itop-train", str(err)), _process_group()
    logging.basicConfig(level=logging.WARNING)

    code, many = 0, _process_group()
    try:
        trainer.fit()
    except (CheckpointError, DivergedError, DataError) as err:  # disk full, diverged, a bad file
        code = print_error("itop-train", str(err))
    finally:
        trainer.close()
    return code, many


def _process_group() -> bool:
    """Whether this process is one of several in a process group."""
    from itop_dist import collectives

    return collectives.world_size() > 1


def _leave(code: int) -> NoReturn:
    """Exit with ``code`` at once, skipping the interpreter's finalization (see the module's
    docstring) but not what a normal exit does before it: wait for the non-daemon threads,
    run the atexit handlers (W&B, logging), flush stdout and stderr."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a broken pipe
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

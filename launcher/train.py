"""Entry point: ``itop-train``, ``python -m launcher.train`` or ``accelerate launch -m launcher.train``.

    itop-train --sparse --data digits --model digits-mlp --density 0.05 --epochs 30
    accelerate launch -m launcher.train --config configs/cifar10_vgg-c_rigl_itop.yaml

Parses the configuration, builds the trainer, trains, and always closes it. Bad input
(flags, files, data folders, checkpoints of another run) ends with one line on stderr and
exit status 2, before any training.
"""

from __future__ import annotations

import logging
import sys

from launcher.checkpoint import CheckpointError
from launcher.config import parse_config, print_error


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        from launcher.trainer import Trainer  # after parsing: --help stays fast

        trainer = Trainer(cfg)
    except ValueError as err:
        return print_error("itop-train", str(err))
    logging.basicConfig(level=logging.WARNING)
    from data_pipelines import DataError
    from launcher.trainer import DivergedError

    try:
        trainer.fit()
    except (CheckpointError, DivergedError, DataError) as err:  # disk full, diverged, a bad file
        return print_error("itop-train", str(err))
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

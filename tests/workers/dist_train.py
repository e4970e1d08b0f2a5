"""Run the real trainer on this rank, then write what this rank ends with to <out>/rank<R>.pt.

Used by tests/test_distributed.py under ``accelerate launch``. Arguments are itop-train flags;
``--corrupt-at STEP`` flips one mask bit on rank 1 just before that step's sparse hook (in its
local shard of the second layer when the state is sharded), as a stand-in for a silent
divergence, and the error each rank then raises goes to rank<R>.err. The masks and explored
union written are the full ones (gathered when sharded); ``sparse_state_bytes`` is what this
rank holds of them, ``sparse_state_full_bytes`` what the full state takes; ``update_cost`` is
the Sparsifier's record of its last mask update (``itop_dist.sparsifier.UpdateCost``, a dict).
"""

import dataclasses
import pathlib
import sys

import torch
from torch.distributed.tensor import DTensor

from itop_dist.sparsifier import canonical_name, full_tensor
from launcher.config import parse_config
from launcher.trainer import Trainer


def main(argv: list[str]) -> int:
    corrupt_at = None
    if "--corrupt-at" in argv:
        i = argv.index("--corrupt-at")
        corrupt_at = int(argv[i + 1])
        del argv[i:i + 2]
    cfg = parse_config(argv)
    out = pathlib.Path(cfg.log.output_dir)
    trainer = Trainer(cfg)
    rank = trainer.accelerator.process_index
    sp = trainer.sparsifier
    if corrupt_at is not None and rank == 1:
        real_step = sp.step

        def corrupted_step():
            if sp.state.step + 1 == corrupt_at:
                name = list(sp.masks)[1]
                sp.masks[name].view(-1)[0] = ~sp.masks[name].view(-1)[0]
            return real_step()

        sp.step = corrupted_step
    try:
        summary = trainer.fit()
    except Exception as err:  # noqa: BLE001 - the test reads the message
        (out / f"rank{rank}.err").write_text(f"{type(err).__name__}: {err}")
        trainer.close()
        return 1
    shards = {n: (p.to_local().numel(), p.numel()) for n, p in trainer.model.named_parameters()
              if isinstance(p, DTensor)}
    masks, fired = (sp.full_masks(), sp.full_fired()) if sp else ({}, {})  # collectives: every rank
    torch.save({
        "summary": summary,
        "masks": masks,
        "fired": fired,
        "sparse_state_bytes": sum(t.nbytes for t in [*sp.state.masks.values(), *sp.state.fired.values()])
        if sp else 0,
        "sparse_state_full_bytes": sum(t.nbytes for t in [*masks.values(), *fired.values()]),
        "weights": {canonical_name(n): full_tensor(p).detach().cpu()
                    for n, p in trainer.model.named_parameters()},
        "shards": shards,
        "updates": sp.state.updates if sp else 0,
        "update_cost": dataclasses.asdict(sp.update_cost) if sp and sp.update_cost else None,
        "superposed": {k: v for p in trainer.plugins if getattr(p, "superposition", None)
                       for k, v in (p.superposition.superposed or {}).items()},
    }, out / f"rank{rank}.pt")
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

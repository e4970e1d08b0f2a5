"""Atomic checkpoints through Accelerate's state saving, kept last-N plus best.

Layout of the run folder::

    checkpoints/step-000120/   one complete checkpoint (Accelerate's files + meta.json)
    checkpoints/best -> the name of the best one, in best.json

A checkpoint is written into ``.tmp-step-N`` and renamed to ``step-N`` only when every rank has
finished writing, so a crash during a save leaves the previous checkpoints intact; folders
without ``meta.json`` are never resumed from.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

from accelerate import Accelerator

META = "meta.json"
# The settings a checkpoint can only be resumed with (the rest may change, e.g. --max-steps).
IDENTITY_KEYS = ("model.name", "data.name", "sparse", "sparsity.method", "sparsity.density",
                 "sparsity.final_density",
                 "sparsity.sparse_init", "sparsity.growth", "sparsity.death")


def _lookup(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree


class Checkpointer:
    """Saves and finds checkpoints of one run folder; every rank calls save/load."""

    def __init__(self, accelerator: Accelerator, run_dir: pathlib.Path, keep_last: int) -> None:
        self.accelerator = accelerator
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last

    def complete(self) -> list[pathlib.Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step-*") if (p / META).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def best(self) -> pathlib.Path | None:
        marker = self.root / "best.json"
        if not marker.is_file():
            return None
        return self.root / json.loads(marker.read_text())["name"]

    def save(self, step: int, meta: dict, is_best: bool) -> pathlib.Path:
        """Write checkpoint ``step-N`` atomically, then prune old ones (keeping the best)."""
        acc = self.accelerator
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            _write_atomic(tmp / META, json.dumps(meta, indent=1))
            if final.exists():  # a re-run of the same step (resumed after a crash)
                shutil.rmtree(final)
            os.replace(tmp, final)
            if is_best:
                _write_atomic(self.root / "best.json", json.dumps({"name": final.name, **meta}))
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        best = self.best()
        keep = set(self.complete()[-self.keep_last:]) | ({best} if best else set())
        for path in self.complete():
            if path not in keep:
                shutil.rmtree(path)

    def resolve(self, resume: str | None) -> pathlib.Path | None:
        """The checkpoint to resume from: ``auto`` = latest complete one (None if none),
        else the given folder, which must be a complete checkpoint."""
        if resume is None:
            return None
        if resume == "auto":
            done = self.complete()
            return done[-1] if done else None
        path = pathlib.Path(resume)
        if not (path / META).is_file():
            raise ValueError(f"--resume: {resume} is not a complete checkpoint folder "
                             f"(no {META}); pass a checkpoints/step-N folder or --resume auto")
        return path

    @staticmethod
    def read_meta(path: pathlib.Path) -> dict:
        return json.loads((path / META).read_text())

    @staticmethod
    def check_compatible(meta: dict, config: dict, path: pathlib.Path) -> None:
        """Refuse to resume a checkpoint of a different model, data set or sparse set-up."""
        saved = meta.get("config", {})
        for key in IDENTITY_KEYS:
            theirs, ours = _lookup(saved, key), _lookup(config, key)
            if theirs != ours:
                raise ValueError(
                    f"--resume: {path} was trained with {key}={theirs!r}, this run has "
                    f"{key}={ours!r}; use the same settings or a new --output-dir"
                )


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

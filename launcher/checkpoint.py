"""Checkpoints that are safe to load, verified, never lost, and readable at any world size.

Layout of one checkpoint (every rank calls :meth:`Checkpointer.save` and :meth:`load`)::

    checkpoints/step-00000120/
        model.safetensors                the full (unsharded) model state, wrapper prefixes removed
        optimizer.safetensors + .json    the full optimizer state, keyed by parameter name
        scheduler.json                   LR schedule position
        train_state.json                 step, epoch, data position, best, W&B id
        sparse_state.safetensors + .json masks and explored union (bit-packed by rows), counters
        flops.json                       FLOPs counted so far
        supertickets.safetensors + .json Sup-tickets' superposed model (Sup-tickets runs only)
        scaler.json                      fp16 loss scale (fp16 runs only)
        rng_state-<rank>.safetensors + .json   each rank's torch/python/numpy RNG
        model-shard-<rank>.*, optimizer-shard-<rank>.*, sparse_state-shard-<rank>.*
                                         instead of model.*, optimizer.*, sparse_state.* in
                                         sharded runs: each rank's blocks, no rank gathers
        meta.json                        step, epoch, accuracy, the run's configuration
        manifest.json                    size and SHA-256 of every file above, written last

Each piece is a ``state_dict`` split into its tensors (safetensors) and the rest (JSON), so
loading a checkpoint parses data and never runs code from it (no pickle anywhere: files written
by other tools, e.g. Accelerate's ``*.pkl``/``*.bin``, are never read). Replicated runs write
the full state (rank 0); sharded runs (the ZeRO stages) write each rank's blocks of the model,
optimizer state and sparse state as :class:`Shard` entries (global shape and offset in the
JSON, the block in safetensors), so no rank ever holds the whole model. Either layout loads into any stage and
world size: a sharded loader reads only the slices of its own block from each file
(:class:`LazyTensor`), a replicated one assembles whole tensors.

Safety: a checkpoint is written into ``.tmp-step-N``, its manifest last, and renamed to
``step-N`` only when every rank has written its part; a complete checkpoint is never deleted
before its replacement is complete, and a step already saved is not saved again. At resume the
manifest is verified: ``--resume auto`` skips a damaged checkpoint with one warning and takes
the newest good one; ``--resume PATH`` to a damaged one stops, naming the file. Only folders
named ``step-<digits>`` are ever read, rotated or moved.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import pathlib
import random
import re
import shutil
import socket
import time
from typing import Any, NoReturn, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from itop_dist import collectives
from itop_dist.state import Shard
from launcher.config import identity_diff

log = logging.getLogger("itop_dist.train")

MANIFEST = "manifest.json"
META = "meta.json"
FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint or run folder that cannot be used as asked: one line naming the file or
    setting and what to do (the launcher prints it and exits with status 2)."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, sd: dict) -> None: ...


# ---------------------------------------------------------------------------------------------
# A state dict as tensors (safetensors) plus structure (JSON): loading runs no code.


def split_state(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """``(skeleton, tensors)``: ``tree`` (nested dicts with str keys, lists, tuples, tensors,
    :class:`Shard`, numbers, str, None) with every tensor replaced by ``{"__tensor__": key}``
    and every Shard by ``{"__shard__": key, "shape": [...], "offset": [...]}``; ``tensors`` maps
    those keys (the path, ``/``-joined) to contiguous CPU copies. Raises TypeError for anything
    else (a bug: every saved object must be plain data)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value, path):
        if isinstance(value, Shard):
            tensors[path] = value.data.detach().to("cpu", copy=True).contiguous()
            return {"__shard__": path, "shape": list(value.shape), "offset": list(value.offset)}
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": path}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"checkpoint state at {path or '/'}: keys must be str, got "
                                f"{sorted({type(k).__name__ for k in value})}")
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"checkpoint state at {path or '/'}: {type(value).__name__} is not plain data")

    return walk(tree, prefix), tensors


def join_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_state` (tuples come back as lists)."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        return {k: join_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_state(v, tensors) for v in skeleton]
    return skeleton


class LazyTensor:
    """A tensor of a sharded checkpoint, read on demand from the ranks' files: ``region`` reads
    only the slices of each block that overlap the asked block (safetensors' lazy slicing),
    ``full`` the whole tensor. ``shape``: the tensor's global shape."""

    def __init__(self, shape: tuple[int, ...], blocks: list[tuple[pathlib.Path, str, tuple[int, ...], tuple[int, ...]]],
                 where: pathlib.Path) -> None:
        self.shape, self.blocks, self.where = tuple(shape), blocks, where  # blocks: (file, key, offset, shape)

    def full(self) -> torch.Tensor:
        return self.region((0,) * len(self.shape), self.shape)

    def region(self, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The block of ``shape`` at ``offset``. Raises CheckpointError naming the folder when the
        blocks (each of the shape its file stores) do not cover it exactly once (a missing or
        overlapping block: a damaged checkpoint), or a file is not safetensors. Checked before
        anything is allocated, so what is allocated is at most what the files hold."""
        parts = []  # (file, key, b_offset, lo, hi) of every block that overlaps the asked one
        for file, key, b_offset, b_shape in self.blocks:
            lo = [max(a, b) for a, b in zip(offset, b_offset)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offset, shape, b_offset, b_shape)]
            if shape and any(h <= l for l, h in zip(lo, hi)):
                continue
            parts.append((file, key, b_offset, lo, hi))
        volume = sum(math.prod(h - l for l, h in zip(lo, hi)) for *_, lo, hi in parts)
        disjoint = all(any(h1 <= l2 or h2 <= l1 for l1, h1, l2, h2 in zip(a[3], a[4], b[3], b[4]))
                       for i, a in enumerate(parts) for b in parts[i + 1:])
        if not parts or volume != math.prod(shape) or not disjoint:
            self._damaged(offset, shape)
        out = None
        for file, key, b_offset, lo, hi in parts:
            with _open_safetensors(file) as f:  # reads the overlap only
                piece = (f.get_slice(key)[tuple(slice(l - b, h - b) for l, h, b in zip(lo, hi, b_offset))]
                         if shape else f.get_tensor(key))
            if out is None:
                out = torch.empty(shape, dtype=piece.dtype)
            out[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offset))] = piece
        return out

    def _damaged(self, offset: tuple[int, ...], shape: tuple[int, ...]) -> NoReturn:
        raise CheckpointError(f"{self.where}: the blocks of a tensor of shape {list(self.shape)} do not "
                              f"cover its part at {list(offset)} of shape {list(shape)} exactly once; "
                              f"resume from another checkpoint")


def _open_safetensors(file: pathlib.Path):
    """``safe_open`` of ``file`` (PyTorch tensors); CheckpointError naming it when it is not a
    readable safetensors file."""
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err}); resume from "
                              f"another checkpoint") from err


def full_tensors(tree: Any) -> Any:
    """``tree`` with every :class:`LazyTensor` read whole (for replicated runs and tools)."""
    if isinstance(tree, LazyTensor):
        return tree.full()
    if isinstance(tree, dict):
        return {k: full_tensors(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [full_tensors(v) for v in tree]
    return tree


def _merge(a: Any, b: Any, where: pathlib.Path) -> Any:
    """Two ranks' skeletons of one sharded piece as one: dicts are united, the blocks of one
    tensor collected; anything else must be equal."""
    if _is_blocks(a) and _is_blocks(b):
        if a["shape"] != b["shape"]:
            raise CheckpointError(f"{where}: ranks disagree on the shape of a tensor ({a['shape']} vs "
                                  f"{b['shape']}); resume from another checkpoint")
        return {**a, "blocks": a["blocks"] + b["blocks"]}
    if isinstance(a, dict) and isinstance(b, dict) and not _is_blocks(a) and not _is_blocks(b):
        return {k: _merge(a[k], b[k], where) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}
    if a != b:
        raise CheckpointError(f"{where}: ranks wrote different values for one setting; resume from "
                              f"another checkpoint")
    return a


def _is_blocks(x: Any) -> bool:
    return isinstance(x, dict) and "__blocks__" in x


def read_sharded_state(folder: pathlib.Path, name: str) -> Any:
    """The state of piece ``name`` written by every rank as ``name-shard-<rank>``: one tree
    whose tensors are :class:`LazyTensor` (nothing but the JSON is read here). Raises
    CheckpointError naming the file if a part is missing or malformed."""
    files = sorted(folder.glob(f"{name}-shard-*.json"))
    if not files:
        raise CheckpointError(f"{folder / name}.json is missing; resume from another checkpoint")

    def blocks_of(skeleton: Any, tensor_file: pathlib.Path) -> Any:
        if isinstance(skeleton, dict) and "__shard__" in skeleton:
            try:
                offset, shape = [int(x) for x in skeleton["offset"]], [int(x) for x in skeleton["shape"]]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{tensor_file.with_suffix('.json')}: a malformed block; resume from "
                                      f"another checkpoint") from None
            with _open_safetensors(tensor_file) as f:
                if skeleton["__shard__"] not in f.keys():
                    raise CheckpointError(f"{tensor_file}: has no tensor {skeleton['__shard__']!r}; resume "
                                          f"from another checkpoint")
                b_shape = tuple(f.get_slice(skeleton["__shard__"]).get_shape())
            return {"__blocks__": True, "shape": shape, "blocks": [(tensor_file, skeleton["__shard__"], tuple(offset), b_shape)]}
        if isinstance(skeleton, dict) and set(skeleton) == {"__tensor__"}:
            return {"__blocks__": True, "shape": None, "blocks": [(tensor_file, skeleton["__tensor__"], None, None)]}
        if isinstance(skeleton, dict):
            return {k: blocks_of(v, tensor_file) for k, v in skeleton.items()}
        if isinstance(skeleton, list):
            return [blocks_of(v, tensor_file) for v in skeleton]
        return skeleton

    merged: Any = None
    for file in files:
        part = blocks_of(_read_json(file), file.with_suffix(".safetensors"))
        merged = part if merged is None else _merge(merged, part, folder / name)

    def lazy(tree: Any) -> Any:
        if _is_blocks(tree):
            if tree["shape"] is None:  # a whole tensor rank 0 wrote (a buffer, a scalar)
                (file, key, _, _), = tree["blocks"][:1]
                with safe_open(str(file), framework="pt") as f:
                    return f.get_tensor(key)
            return LazyTensor(tuple(tree["shape"]), tree["blocks"], folder / f"{name}-shard-*")
        if isinstance(tree, dict):
            return {k: lazy(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [lazy(v) for v in tree]
        return tree

    try:
        return lazy(merged)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{folder / name}-shard-*: not valid safetensors ({_first_line(err)}); "
                              f"resume from another checkpoint") from None


def write_state(folder: pathlib.Path, name: str, state: dict) -> list[str]:
    """Write ``state`` as ``name.json`` (+ ``name.safetensors`` if it holds tensors); returns
    the file names written."""
    skeleton, tensors = split_state(state)
    written = []
    if tensors:
        path = folder / f"{name}.safetensors"
        try:
            save_file(tensors, str(path))
        except SafetensorError as err:  # its I/O errors, as the OSError they are ("os error 28")
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        written.append(f"{name}.safetensors")
    _write_atomic(folder / f"{name}.json", json.dumps(skeleton))
    written.append(f"{name}.json")
    return written


def read_state(folder: pathlib.Path, name: str, lazy: bool = False) -> dict:
    """Read what :func:`write_state` wrote, or the blocks every rank wrote of a sharded piece
    (``name-shard-<rank>``): as :class:`LazyTensor` if ``lazy``, else whole tensors. Raises
    CheckpointError naming the file if it is missing or not what it should be (never executes
    anything from it)."""
    path = folder / f"{name}.json"
    if not path.exists() and any(folder.glob(f"{name}-shard-*.json")):
        state = read_sharded_state(folder, name)
        return state if lazy else full_tensors(state)
    skeleton = _read_json(path)
    tensor_path = folder / f"{name}.safetensors"
    tensors: dict[str, torch.Tensor] = {}
    if tensor_path.exists():
        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{tensor_path} is not a valid safetensors file ({_first_line(err)}); "
                                  f"resume from another checkpoint") from None
    try:
        return join_state(skeleton, tensors)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{tensor_path} lacks tensor {err} that {path} names; resume from "
                              f"another checkpoint") from None


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; resume from another checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({_first_line(err)}); resume from another "
                              f"checkpoint") from None


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


# ---------------------------------------------------------------------------------------------
# Each rank's random number generators (torch CPU and CUDA, Python, numpy) as plain data.


class RNGState:
    """torch (CPU and every CUDA device), Python ``random`` and numpy global generators."""

    def state_dict(self) -> dict:
        py_version, py_state, py_gauss = random.getstate()
        np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": [py_version, list(py_state), py_gauss],
                "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos),
                          int(np_has_gauss), float(np_gauss)]}

    def load_state_dict(self, sd: dict) -> None:
        torch.set_rng_state(sd["torch"])
        if sd["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(sd["cuda"][:torch.cuda.device_count()])
        version, state, gauss = sd["python"]
        random.setstate((version, tuple(state), gauss))
        kind, keys, pos, has_gauss, cached = sd["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------


def step_of(path: pathlib.Path) -> int | None:
    """The step of a ``step-<digits>`` folder name, None for any other name."""
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: pathlib.Path) -> dict:
    """Check a checkpoint folder against its manifest (every file's size and SHA-256);
    returns the manifest. Raises CheckpointError naming the first bad file."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass a checkpoints/step-N folder or --resume auto")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        legacy = any(path.glob("*.pkl")) or (path / "optimizer.bin").exists()
        why = ("it was written by an older itop_dist in Accelerate's pickle format, which is not "
               "loaded because unpickling can run code" if legacy else "it is incomplete")
        raise CheckpointError(f"{path} has no {MANIFEST}: {why}; resume from a checkpoint of this version")
    manifest = _read_json(manifest_path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != FORMAT if isinstance(manifest, dict) else True:
        raise CheckpointError(f"{manifest_path}: unknown checkpoint format; resume from a checkpoint "
                              f"of this version")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{manifest_path} lists no files; resume from another checkpoint")
    for name, entry in files.items():
        file = path / name
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"{manifest_path} names {name!r}, outside the checkpoint folder")
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; resume from another checkpoint")
        size = file.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"{file} has {size} bytes, the manifest says {entry.get('size')} "
                                  f"(truncated or replaced); resume from another checkpoint")
        if sha256(file) != entry.get("sha256"):
            raise CheckpointError(f"{file} does not match its SHA-256 in the manifest (damaged); "
                                  f"resume from another checkpoint")
    return manifest


class Checkpointer:
    """Saves, verifies, finds and loads the checkpoints of one run folder.

    Register every piece of the run's state with :meth:`register` (the same names, in any order,
    on every rank); ``setting`` names the flag that makes a piece exist, for the message when a
    checkpoint and a run disagree. ``per_rank`` pieces are written by every rank (RNG);
    ``sharded`` ones by every rank too, each its blocks (:class:`Shard`), and loaded from all
    ranks' files as :class:`LazyTensor`; the others by rank 0 from a state every rank computed
    (a replicated model's state).
    """

    def __init__(self, run_dir: pathlib.Path, keep_last: int, rank: int = 0, world_size: int = 1) -> None:
        self.root = run_dir / "checkpoints"
        self.keep_last = keep_last
        self.rank, self.world_size = rank, world_size
        self.pieces: dict[str, tuple[Stateful, str, bool]] = {}
        self.plain: set[str] = set()
        self.sharded: set[str] = set()

    def register(self, name: str, obj: Stateful, setting: str = "", per_rank: bool = False,
                 plain: bool = False, sharded: bool = False) -> None:
        """``plain``: a small state of numbers and strings whose keys and types are checked
        against the object's own ``state_dict()`` before loading (a crafted or damaged file
        stops the resume instead of surfacing as a wrong type later). ``sharded``: each rank
        writes its own blocks; ``load_state_dict`` gets :class:`LazyTensor` leaves from a
        sharded checkpoint and whole tensors from a replicated one."""
        self.pieces[name] = (obj, setting, per_rank)
        if plain:
            self.plain.add(name)
        if sharded:
            self.sharded.add(name)

    # --- finding ---------------------------------------------------------------------------
    def step_dirs(self) -> list[pathlib.Path]:
        """Every ``step-<digits>`` folder, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)

    def complete(self) -> list[pathlib.Path]:
        """Checkpoints with a manifest (not yet verified), oldest first."""
        return [p for p in self.step_dirs() if (p / MANIFEST).is_file()]

    def best(self) -> pathlib.Path | None:
        """The best checkpoint named by ``best.json``; None (with a warning) if that file is
        unreadable or names no complete checkpoint."""
        marker = self.root / "best.json"
        if not marker.exists():
            return None
        try:
            name = json.loads(marker.read_text())["name"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
            print(f"itop-train: warning: {marker} is unreadable ({_first_line(err)}); no checkpoint "
                  f"is marked best until the next evaluation", flush=True)
            return None
        path = self.root / str(name)
        return path if step_of(path) is not None and (path / MANIFEST).is_file() else None

    def resolve(self, resume: str | None) -> pathlib.Path | None:
        """The verified checkpoint to resume from (read-only; call on rank 0).

        ``None``: a new run, refused if the folder already holds checkpoints. ``auto``: the
        newest checkpoint that verifies (a damaged one is skipped with one warning naming it);
        None if there is none at all; refused if every one is damaged. A path: that checkpoint,
        which must verify. Raises CheckpointError."""
        if resume is None:
            found = self.step_dirs()
            if found:
                raise CheckpointError(
                    f"{self.root} already holds checkpoints (newest {found[-1].name}) of an earlier run; "
                    f"continue it with --resume auto, or choose a new --output-dir")
            return None
        if resume != "auto":
            path = pathlib.Path(resume)
            verify(path)
            return path
        found = self.step_dirs()
        for path in reversed(found):
            try:
                verify(path)
                return path
            except CheckpointError as err:
                print(f"itop-train: warning: skipping damaged checkpoint: {err}", flush=True)
        if found:
            raise CheckpointError(f"--resume auto: none of the {len(found)} checkpoints in {self.root} "
                                  f"verifies (newest {found[-1].name}); see the warnings above, or "
                                  f"choose a new --output-dir")
        return None

    # --- saving ----------------------------------------------------------------------------
    def save(self, step: int, meta: dict, is_best: bool) -> pathlib.Path:
        """Write checkpoint ``step-N`` atomically (a collective), then rotate old ones.

        A step that is already saved completely is not written again (a stop signal at a save
        step). Raises CheckpointError on every rank if any rank could not write (disk full), with
        the previous checkpoints untouched."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        exists = collectives.any_rank(self.rank == 0 and (final / MANIFEST).is_file())
        error: Exception | None = None
        states = {}
        if not exists:
            # Every rank computes every state (gathering full sharded state is a collective).
            states = {name: obj.state_dict() for name, (obj, _, per_rank) in self.pieces.items()}
        try:
            if not exists and self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as err:
            error = err
        collectives.barrier()
        files: list[str] = []
        try:
            if not exists and error is None:
                for name, (_, _, per_rank) in self.pieces.items():
                    if per_rank:
                        files += write_state(tmp, f"{name}-{self.rank}", states[name])
                    elif name in self.sharded:
                        files += write_state(tmp, f"{name}-shard-{self.rank}", states[name])
                    elif self.rank == 0:
                        files += write_state(tmp, name, states[name])
        except OSError as err:
            error = err
        del states
        error = _agree_on_error(error)
        if error is None and self.rank == 0:
            try:
                if exists:
                    log.info("checkpoint %s exists already; not written again", final)
                else:
                    _write_atomic(tmp / META, json.dumps(meta, indent=1))
                    names = sorted(p.name for p in tmp.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
                    manifest = {"format": FORMAT, "step": step, "world_size": self.world_size,
                                "pieces": sorted(self.pieces),
                                "files": {n: {"size": (tmp / n).stat().st_size, "sha256": sha256(tmp / n)}
                                          for n in names}}
                    _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
                    _fsync_dir(tmp)
                    os.replace(tmp, final)
                    _fsync_dir(self.root)
                if is_best:
                    _write_atomic(self.root / "best.json", json.dumps({"name": final.name, **meta}))
                self._rotate()
            except OSError as err:
                error = err
        error = _agree_on_error(error)
        if error is not None:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.complete()
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointError(f"checkpoint {final.name} not written: {error}; {kept}. "
                                  f"Free space (or fix the folder) and resume with --resume auto")
        return final

    def _rotate(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and the best; only ``step-N``."""
        best = self.best()
        done = self.complete()
        keep = set(done[-self.keep_last:]) | ({best} if best else set())
        for path in done:
            if path not in keep:
                shutil.rmtree(path)

    # --- loading ---------------------------------------------------------------------------
    def load(self, path: pathlib.Path) -> dict:
        """Load every registered piece from verified checkpoint ``path``; returns meta.json.

        Pieces the checkpoint holds but this run does not, or the reverse, are refused naming
        the setting. Every rank first reads its files, the ranks agree that all could, then the
        states are applied (some of which are collectives). Raises CheckpointError on every rank."""
        states: dict[str, dict] = {}
        error: Exception | None = None
        try:
            manifest = _read_json(path / MANIFEST)
            saved, ours = set(manifest.get("pieces", [])), set(self.pieces)
            for name in sorted(saved ^ ours):
                setting = self.pieces[name][1] if name in self.pieces else _SETTINGS.get(name, name)
                has, lacks = ("holds", "this run has it off") if name in saved else ("lacks", "this run needs it")
                raise CheckpointError(f"--resume: {path} {has} the {name} state ({setting}) but {lacks}; "
                                      f"resume with the settings it was saved with, or choose a new --output-dir")
            for name, (_, _, per_rank) in self.pieces.items():
                file = f"{name}-{self.rank}" if per_rank else name
                if per_rank and not (path / f"{file}.json").exists():
                    continue  # more ranks than the run that saved it: this rank keeps its own RNG
                states[name] = read_state(path, file, lazy=name in self.sharded)
                if name in self.plain:
                    _check_like(states[name], self.pieces[name][0].state_dict(), path / f"{file}.json")
            meta = _read_json(path / META)
        except CheckpointError as err:
            error = err
        error = _agree_on_error(error)
        if error is not None:
            raise error if isinstance(error, CheckpointError) else CheckpointError(str(error))
        for name, state in states.items():
            try:
                self.pieces[name][0].load_state_dict(state)
            except CheckpointError:
                raise
            except ValueError as err:  # a state of another model or set-up, named by the piece
                raise CheckpointError(f"--resume: {path}: {_first_line(err)}") from None
            except (KeyError, TypeError, IndexError, RuntimeError) as err:
                raise CheckpointError(f"--resume: {path / name}.* does not hold a valid {name} state "
                                      f"({type(err).__name__}: {_first_line(err)}); resume from another "
                                      f"checkpoint") from None
        return meta

    def abandon_after(self, path: pathlib.Path) -> pathlib.Path | None:
        """Resuming ``path``: move the newer checkpoints aside (to ``abandoned-<time>/``) so that
        the next ``--resume auto`` cannot jump forward to them; returns that folder (rank 0)."""
        step = step_of(path)
        newer = [p for p in self.step_dirs() if step is not None and step_of(p) > step
                 and p.resolve() != path.resolve()]
        if not newer:
            return None
        aside = self.root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-from-{path.name}"
        aside.mkdir(parents=True)
        for p in newer:
            os.replace(p, aside / p.name)
        best = self.root / "best.json"
        if best.exists() and self.best() is None:  # it named a checkpoint just moved aside
            os.replace(best, aside / "best.json")
        return aside

    @staticmethod
    def read_meta(path: pathlib.Path) -> dict:
        return _read_json(path / META)

    @staticmethod
    def check_compatible(meta: dict, config: dict, path: pathlib.Path) -> None:
        """Refuse to continue a checkpoint of another run: any setting of the run's identity
        (``launcher.config.identity``: all but epochs, cadences, data location and the machine)
        that differs is named."""
        saved = meta.get("config") if isinstance(meta, dict) else None
        if not isinstance(saved, dict):
            raise CheckpointError(f"--resume: {path / META} holds no run configuration; resume from "
                                  f"another checkpoint")
        diff = identity_diff(saved, config)
        if diff:
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise CheckpointError(
                f"--resume: {path} belongs to another run: {'; '.join(diff[:3])}{more}; resume with "
                f"its settings, or leave out --resume and choose a new --output-dir (the default "
                f"folder is named after the settings)")


# The flag behind each optional piece, for checkpoints that hold one this run does not register.
_SETTINGS = {"sparse_state": "--sparse", "supertickets": "Sup-tickets: --pre_train --cyclic_train",
             "scaler": "--mixed-precision fp16"}


def _check_like(loaded, reference, file: pathlib.Path, where: str = "") -> None:
    """Raise CheckpointError unless ``loaded`` has the keys and value types of ``reference``
    (ints may stand for floats; a None in the reference admits any plain value)."""
    def fail(why: str):
        raise CheckpointError(f"{file}: {where or 'the top level'} {why}; resume from another checkpoint")

    if reference is None:
        if not (loaded is None or isinstance(loaded, (bool, int, float, str))):
            fail(f"should be a plain value, found {type(loaded).__name__}")
    elif isinstance(reference, dict):
        if not isinstance(loaded, dict):
            fail(f"should be an object, found {type(loaded).__name__}")
        if set(loaded) != set(reference):
            fail(f"has keys {sorted(loaded)}, expected {sorted(reference)}")
        for key in reference:
            _check_like(loaded[key], reference[key], file, f"{where}.{key}" if where else key)
    elif isinstance(reference, (list, tuple)):
        if not isinstance(loaded, list) or len(loaded) != len(reference):
            fail(f"should be a list of {len(reference)}, found {loaded!r:.40}")
        for i, (a, b) in enumerate(zip(loaded, reference)):
            _check_like(a, b, file, f"{where}[{i}]")
    elif isinstance(reference, bool) or isinstance(loaded, bool):
        if type(loaded) is not type(reference):
            fail(f"should be {type(reference).__name__}, found {type(loaded).__name__}")
    elif isinstance(reference, float):
        if not isinstance(loaded, (int, float)):
            fail(f"should be a number, found {type(loaded).__name__}")
    elif type(loaded) is not type(reference):
        fail(f"should be {type(reference).__name__}, found {type(loaded).__name__}")


def _agree_on_error(error: Exception | None) -> Exception | None:
    """Every rank learns whether any rank failed (so none waits forever at the next collective)."""
    if collectives.any_rank(error is not None) and error is None:
        return OSError(errno.EIO, "another rank failed (see its message)")
    return error


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# One run per folder at a time.


class RunLock:
    """``<run folder>/.lock`` holding the owner's PID, host and SLURM job id (rank 0 only).

    A lock of a live process on this host, or of another host, is refused; a stale lock (its
    process is gone, or it is the same SLURM job requeued) is taken over and said so."""

    def __init__(self, run_dir: pathlib.Path) -> None:
        self.path = run_dir / ".lock"
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a stale lock was taken over. Raises CheckpointError."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "job": os.environ.get("SLURM_JOB_ID")}
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise CheckpointError(f"--output-dir {folder} is a file, not a folder; choose another --output-dir")
        note = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = self._owner()
            if not self._stale(owner, me):
                raise CheckpointError(
                    f"{self.path.parent} is in use by another run (PID {owner.get('pid')} on "
                    f"{owner.get('host')}); wait for it, or delete {self.path} if that run is gone") from None
            note = (f"taking over the stale lock {self.path} of PID {owner.get('pid')} on "
                    f"{owner.get('host')} (that process is gone)")
            _write_atomic(self.path, json.dumps(me))
        except OSError as err:  # read-only, no permission, a parent that is a file
            raise CheckpointError(f"--output-dir {folder}: cannot write there ({err.strerror}); choose "
                                  f"a writable --output-dir") from None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
        self.held = True
        return note

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}

    @staticmethod
    def _stale(owner: dict, me: dict) -> bool:
        if not owner:
            return True  # unreadable: written by a process killed mid-write
        if owner.get("job") and owner.get("job") == me["job"]:
            return True  # the same SLURM job, requeued: its earlier run is over
        if owner.get("host") != me["host"]:
            return False  # cannot tell whether a process on another machine is alive
        try:
            os.kill(int(owner.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, TypeError, OverflowError):
            return False
        return False  # alive

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

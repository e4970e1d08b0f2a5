"""ImageNet loaders (data_pipelines.imagenet: torchvision and DALI backends) on a generated JPEG tree.

The tree has ImageNet's layout (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``), images of
varied sizes, a grayscale and a CMYK JPEG among them. Every image is one solid colour, unique
to it, so a sample can be recognised after any crop, resize and flip: the mean colour of an
output image names the file it came from. The DALI tests run its CPU pipeline
(``device_id=None``) and are skipped where DALI is not installed.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from data_pipelines import DataConfig, DataError, build_loaders, check_loaders
from data_pipelines import imagenet as inet
from data_pipelines.imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNetLoader, scan_split
from data_pipelines.imagenet import build as inet_build
from data_pipelines.imagenet import torchvision_backend
from data_pipelines.sharding import derive_seed

HAVE_DALI = inet.dali_available()[0]
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed (pip install -e '.[dali]')")
LOADERS = [pytest.param("dali", marks=needs_dali), "torchvision"]

CLASSES = ("n01440764", "n01443537", "n01484850")
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = (5, 4, 4)  # 13: two ranks get uneven shards (6 and 7)
LEVELS = (16, 80, 144, 208)  # colour grid: 64 colours at least 64 apart in some channel
GRAY = (80, 80, 80)


@dataclass
class Tree:
    root: pathlib.Path
    colours: dict[str, tuple[int, int, int]]  # "split/wnid/name" -> its RGB colour
    special: dict[str, str]  # "L" / "CMYK" -> "split/wnid/name"


def write_tree(root: pathlib.Path) -> Tree:
    """3 classes x 8 train and 5/4/4 val solid-colour JPEGs, 40-120 px a side, quality 95.

    train/<first class>/00.JPEG is a grayscale ('L') JPEG, train/<second class>/00.JPEG a
    CMYK one; every image's colour is unique (gray ones only for the grayscale image).
    """
    gen = torch.Generator().manual_seed(0)
    grid = [(r, g, b) for b in LEVELS for g in LEVELS for r in LEVELS if not r == g == b]
    colours, special, n = {}, {}, 0
    for split, counts in (("train", (TRAIN_PER_CLASS,) * len(CLASSES)), ("val", VAL_PER_CLASS)):
        for c, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for k in range(counts[c]):
                w, h = (int(v) for v in torch.randint(40, 121, (2,), generator=gen))
                mode = {(0, 0): "L", (1, 0): "CMYK"}.get((c, k), "RGB") if split == "train" else "RGB"
                colour = GRAY if mode == "L" else grid[n]
                n += mode != "L"
                img = Image.new("RGB", (w, h), colour)
                if mode != "RGB":
                    img = img.convert(mode)
                    special[mode] = f"{split}/{wnid}/{k:02d}.JPEG"
                img.save(folder / f"{k:02d}.JPEG", quality=95)
                colours[f"{split}/{wnid}/{k:02d}.JPEG"] = colour
    return Tree(root, colours, special)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    return write_tree(tmp_path_factory.mktemp("imagenet"))


def _cfg(root: pathlib.Path, loader: str, **kw) -> DataConfig:
    kw = {"batch_size": 5, "test_batch_size": 4, "image_size": 32, **kw}
    return DataConfig(name="imagenet", data_dir=str(root), loader=loader, **kw)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalised (B, 3, S, S) back to 0..255 pixel values (float)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.float() * std + mean) * 255


def _identify(x: torch.Tensor, loader: ImageNetLoader, tree: Tree) -> list[int]:
    """Sample index (into loader.folder.files) of each image of batch x, by its colour."""
    split = loader.folder.root.name
    table = torch.tensor([tree.colours[f"{split}/{f}"] for f in loader.folder.files], dtype=torch.float32)
    means = _pixels(x).mean(dim=(2, 3))  # (B, 3)
    dist = (means[:, None, :] - table[None]).abs().amax(dim=2)  # (B, N)
    best = dist.min(dim=1)
    assert (best.values < 12).all(), f"colours off by {best.values.max():.1f}"
    return best.indices.tolist()


def _run(loader: ImageNetLoader, tree: Tree, epoch: int = 0, start: int = 0) -> tuple[list[int], list[int]]:
    """(sample ids, labels) of one iteration, checking each batch's format on the way."""
    loader.set_epoch(epoch, start_batch=start)
    ids, labels = [], []
    for x, y in loader:
        s = loader.image_size
        assert x.shape[1:] == (3, s, s) and x.shape[0] == y.shape[0] >= 1
        assert x.dtype == (torch.float16 if loader.fp16_output else torch.float32)
        assert x.device.type == "cpu" and y.dtype == torch.int64 and y.ndim == 1
        assert x.is_contiguous(memory_format=torch.channels_last) == loader.channels_last
        px = _pixels(x)
        assert px.min() > -3 and px.max() < 258, (px.min(), px.max())  # the 0..255 range, normalised
        found = _identify(x, loader, tree)
        assert y.tolist() == loader.folder.labels[found].tolist()
        ids += found
        labels += y.tolist()
    return ids, labels


# ---------------------------------------------------------------------------------------------
# The pipelines


@needs_dali
def test_dali_cpu_pipeline_shapes_dtypes_ranges_and_labels(tree: Tree) -> None:
    loaders = build_loaders(_cfg(tree.root, "dali"), seed=17)
    train, test = loaders.train, loaders.test
    assert type(train).__name__ == "DaliLoader" and not train.gpu
    assert loaders.val is None and loaders.num_classes == 3 and loaders.input_shape == (3, 32, 32)
    assert train.num_samples == 24 and len(train) == 4  # 24 // 5, the last 4 samples dropped
    assert test.num_samples == 13 and len(test) == 4  # 4 + 4 + 4 + 1
    ids, labels = _run(train, tree, epoch=0)
    assert ids == train.indices(0).tolist() and len(set(ids)) == 20
    assert labels == [i // TRAIN_PER_CLASS for i in ids]  # class = sorted wnid order
    ids, labels = _run(test, tree)
    assert ids == list(range(13)) and labels == [0] * 5 + [1] * 4 + [2] * 4
    # Every training image once, unaugmented: the grayscale and the CMYK JPEG decode to their
    # own colours, as 3 channels (_identify checks each image's colour).
    from data_pipelines.imagenet.dali_backend import DaliLoader

    every = DaliLoader(train.folder, 8, train=False, image_size=32)
    ids, _ = _run(every, tree)
    assert ids == list(range(24))
    for mode in ("L", "CMYK"):
        assert tree.special[mode].split("/", 1)[1] in train.folder.files


@needs_dali
def test_dali_fp16_and_channels_last_output(tree: Tree) -> None:
    loaders = build_loaders(_cfg(tree.root, "dali", fp16_output=True, channels_last=True), seed=1)
    for loader in (loaders.train, loaders.test):
        ids, _ = _run(loader, tree)  # checks float16 and channels_last strides
        assert ids == loader.indices(0).tolist()


@pytest.mark.parametrize("loader", LOADERS)
def test_two_ranks_see_every_sample_exactly_once_per_epoch(tree: Tree, loader: str) -> None:
    ranks = [build_loaders(_cfg(tree.root, loader), seed=17, rank=r, world_size=2) for r in range(2)]
    assert [len(r.train) for r in ranks] == [2, 2]  # 24 // 2 = 12 per rank -> 2 batches of 5
    orders = []
    for epoch in (0, 1):
        seen = []
        for r in ranks:
            ids, _ = _run(r.train, tree, epoch=epoch)
            assert ids == r.train.indices(epoch).tolist()  # DALI's shard = this rank's chunk
            seen += ids
        assert len(seen) == len(set(seen)) == 20  # each of 24 at most once; 2 per rank dropped
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled every epoch
    # Evaluation: 13 samples, strided shards of 7 and 6, every one counted once.
    val = [_run(r.test, tree)[0] for r in ranks]
    assert val == [list(range(0, 13, 2)), list(range(1, 13, 2))]
    assert [len(r.test) for r in ranks] == [2, 2]


@pytest.mark.parametrize("loader", LOADERS)
def test_resume_mid_epoch_yields_the_remaining_batches(tree: Tree, loader: str) -> None:
    train = build_loaders(_cfg(tree.root, loader), seed=5).train
    full, _ = _run(train, tree, epoch=2)
    rest, _ = _run(train, tree, epoch=2, start=3)
    assert rest == full[15:] and len(rest) == 5
    assert _run(train, tree, epoch=2, start=4)[0] == []
    again, _ = _run(train, tree, epoch=2)  # start_batch applies to one iteration only
    assert again == full


def test_torchvision_resume_is_bitwise_identical(tree: Tree) -> None:
    train = build_loaders(_cfg(tree.root, "torchvision"), seed=5).train
    train.set_epoch(1)
    full = list(train)
    train.set_epoch(1, start_batch=2)
    for (xa, ya), (xb, yb) in zip(full[2:], train, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@needs_dali
def test_torchvision_fallback_matches_dali_shapes_and_normalisation(tree: Tree) -> None:
    made = {name: build_loaders(_cfg(tree.root, name), seed=3) for name in ("dali", "torchvision")}
    for split in ("train", "test"):
        batches = {name: list(getattr(made[name], split)) for name in made}
        assert len(batches["dali"]) == len(batches["torchvision"])
        for (xd, yd), (xt, yt) in zip(batches["dali"], batches["torchvision"]):
            assert xd.shape == xt.shape and xd.dtype == xt.dtype and torch.equal(yd, yt)
            # Solid colours: the same per-image normalised values whatever the crop.
            assert (xd.mean(dim=(2, 3)) - xt.mean(dim=(2, 3))).abs().max() < 0.05
    tv = made["torchvision"]
    assert type(tv.train).__name__ == "TorchvisionLoader"
    assert (len(tv.train), tv.train.num_samples, len(tv.test), tv.test.num_samples) == (4, 24, 4, 13)


def test_torchvision_loader_with_workers_fp16_channels_last(tree: Tree) -> None:
    loaders = build_loaders(_cfg(tree.root, "torchvision", num_workers=2, fp16_output=True,
                                 channels_last=True), seed=3)
    ids, _ = _run(loaders.train, tree, epoch=1)
    assert ids == loaders.train.indices(1).tolist()


# ---------------------------------------------------------------------------------------------
# Choosing the loader, flags


def test_loader_choice_and_flag_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DataConfig(name="imagenet").loader == "auto" and DataConfig().image_size == 224
    with pytest.raises(ValueError, match=re.escape("--loader: 'pil': choose auto, dali, torchvision")):
        DataConfig(name="imagenet", loader="pil")
    with pytest.raises(ValueError, match="--image-size"):
        DataConfig(name="imagenet", image_size=4)
    with pytest.raises(ValueError, match="--decode-device"):
        DataConfig(name="imagenet", decode_device="tpu")
    assert inet.resolve_loader("torchvision") == "torchvision"
    assert inet.resolve_loader("auto") == ("dali" if HAVE_DALI else "torchvision")
    monkeypatch.setattr(inet_build, "dali_available", lambda: (False, "ImportError: No module named 'nvidia'"))
    assert inet.resolve_loader("auto") == "torchvision"
    with pytest.raises(ValueError, match=re.escape("--loader dali: NVIDIA DALI cannot be imported")):
        inet.resolve_loader("dali")
    assert inet.val_resize(224) == 256 and inet.val_resize(32) == 37


def test_build_errors_name_the_flag(tree: Tree) -> None:
    with pytest.raises(ValueError, match=re.escape("--batch-size: 13 per process x 2 processes")):
        build_loaders(_cfg(tree.root, "torchvision", batch_size=13), seed=0, world_size=2)
    with pytest.raises(ValueError, match="--valid-split"):
        build_loaders(_cfg(tree.root, "torchvision", valid_split=0.1), seed=0)


# ---------------------------------------------------------------------------------------------
# Bad trees: one-line errors naming the file or folder


def _one_line(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert match in message, message
    return message


@pytest.fixture
def copy(tree: Tree, tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "tree"
    shutil.copytree(tree.root, root)
    return root


@pytest.mark.parametrize("case", ["no root", "no val", "flat val", "empty class", "not an image",
                                  "sub-folder", "unknown val class", "no classes"])
def test_layout_errors_name_the_folder_or_file(copy: pathlib.Path, case: str) -> None:
    wnid = CLASSES[1]
    if case == "no root":
        expect = str(copy / "nowhere")
        copy = copy / "nowhere"
    elif case == "no val":
        shutil.rmtree(copy / "val")
        expect = str(copy / "val")
    elif case == "flat val":
        (copy / "val" / wnid / "00.JPEG").rename(copy / "val" / "ILSVRC2012_val_00000001.JPEG")
        expect = str(copy / "val" / "ILSVRC2012_val_00000001.JPEG")
    elif case == "empty class":
        for f in (copy / "train" / wnid).iterdir():
            f.unlink()
        expect = str(copy / "train" / wnid)
    elif case == "not an image":
        (copy / "train" / wnid / "notes.txt").write_text("not an image")
        expect = str(copy / "train" / wnid / "notes.txt")
    elif case == "sub-folder":
        (copy / "val" / wnid / "more").mkdir()
        expect = str(copy / "val" / wnid / "more")
    elif case == "unknown val class":
        (copy / "val" / wnid).rename(copy / "val" / "n09999999")
        expect = str(copy / "val" / "n09999999")
    else:
        shutil.rmtree(copy / "train")
        (copy / "train").mkdir()
        expect = str(copy / "train")
    message = _one_line(expect, build_loaders, _cfg(copy, "torchvision"), seed=0)
    assert message.startswith(f"--data-dir {copy}")


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", ["text", "truncated", "empty"])
def test_undecodable_files_name_the_file(copy: pathlib.Path, loader: str, kind: str) -> None:
    bad = copy / "val" / CLASSES[2] / "02.JPEG"
    if kind == "text":
        bad.write_text("this is not a JPEG")
    elif kind == "truncated":
        bad.write_bytes(bad.read_bytes()[:300])
    else:
        bad.write_bytes(b"")
    test = build_loaders(_cfg(copy, loader), seed=0).test  # listing does not open files
    _one_line(f"cannot decode {bad}", _run_plain, test)


def _run_plain(loader: ImageNetLoader) -> None:
    loader.set_epoch(0)
    for _ in loader:
        pass


def test_scan_lists_sorted_classes_and_relative_files(tree: Tree) -> None:
    train = scan_split(tree.root, "train")
    assert train.classes == CLASSES and len(train) == 24
    assert train.files[:2] == (f"{CLASSES[0]}/00.JPEG", f"{CLASSES[0]}/01.JPEG")
    assert train.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    val = scan_split(tree.root, "val", classes=train.classes)
    assert val.labels.tolist() == [0] * 5 + [1] * 4 + [2] * 4


def test_random_resized_crop_box_stays_inside_and_follows_the_ranges() -> None:
    import random

    rng = random.Random(0)
    for h, w in [(40, 120), (120, 40), (300, 400), (8, 8)]:
        for _ in range(200):
            top, left, ch, cw = inet.random_resized_crop_box(h, w, rng)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch >= 1 and cw >= 1


# ---------------------------------------------------------------------------------------------
# Training with the DALI loader under 2-process accelerate launch

REPO = pathlib.Path(__file__).resolve().parents[1]
ACCELERATE = pathlib.Path(sys.executable).parent / "accelerate"
WORKER = REPO / "tests" / "workers" / "dist_train.py"


@needs_dali
@pytest.mark.slow
@pytest.mark.dist
def test_two_process_sparse_training_with_the_dali_loader(tree: Tree, tmp_path: pathlib.Path) -> None:
    from test_distributed import assert_identical, free_port, ranks

    # 24 images / 2 ranks / batch 4: 3 steps per epoch; a mask update at step 2.
    args = (f"--sparse --data imagenet --data-dir {tree.root} --loader dali --image-size 32 "
            f"--model resnet18 --epochs 2 --batch-size 4 --test-batch-size 4 --lr 0.01 "
            f"--lr-schedule constant --update_frequency 2 --density 0.2 --growth gradient "
            f"--no-progress --no-wandb --no-plots --output-dir {tmp_path}")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
           str(free_port()), str(WORKER), *shlex.split(args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = ranks(tmp_path)
    assert_identical(r0, r1)
    assert r0["summary"]["step"] == 6 and r0["updates"] == 3 and r0["summary"]["world_size"] == 2
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert '"test/acc"' in metrics


# ---------------------------------------------------------------------------------------------
# The recipes


RECIPES = ["imagenet_resnet50_dense", "imagenet_resnet50_rigl_itop_d0.2", "imagenet_resnet50_rigl_itop_d0.2_2x",
           "imagenet_resnet50_rigl_itop_d0.1", "imagenet_resnet50_rigl_itop_d0.1_2x"]


@pytest.mark.parametrize("path", [REPO / "configs" / f"{r}.yaml" for r in RECIPES], ids=RECIPES)
def test_imagenet_recipes_hold_the_reference_hyperparameters(path: pathlib.Path) -> None:
    from launcher.config import parse_config

    text = path.read_text()
    assert text.startswith("# ") and "# Seed README (ITOP, ImageNet)" in text
    cfg = parse_config(["--config", str(path), "--data-dir", "IMAGENET"])
    assert (cfg.model.name, cfg.model.init, cfg.data.name, cfg.data.batch_size) == ("resnet50", "fanin", "imagenet", 64)
    assert cfg.model.channels_last and cfg.data.channels_last and cfg.mixed_precision == "auto"
    o, s = cfg.optim, cfg.schedule
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.1, 0.9, False, 1e-4)
    assert o.label_smoothing == 0.1 and o.bn_weight_decay is False
    assert (s.epochs, s.lr_schedule, s.milestones, s.warmup_epochs) == (100, "multistep", (0.3, 0.6, 0.9), 5)
    assert cfg.seed == 17
    assert s.multiplier == (2 if path.stem.endswith("_2x") else 1)
    if "dense" in path.stem:
        assert not cfg.sparse
    else:
        sp = cfg.sparsity
        assert cfg.sparse and sp.density == (0.2 if "d0.2" in path.stem else 0.1)
        assert (sp.sparse_init, sp.growth, sp.death, sp.death_rate, sp.update_frequency) == (
            "ERK", "gradient", "magnitude", 0.5, 4000)
        assert f"--density {sp.density} " in text and f"--multiplier {int(s.multiplier)} " in text


# ---------------------------------------------------------------------------------------------
# Elastic resume: set_epoch(epoch, start_sample=global samples consumed), any world size / batch


def _train_ranks(tree: Tree, loader: str, world_size: int, batch_size: int, seed: int = 7) -> list[ImageNetLoader]:
    folder = scan_split(tree.root, "train")
    if loader == "dali":
        from data_pipelines.imagenet.dali_backend import DaliLoader as cls
    else:
        cls = inet.TorchvisionLoader
    return [cls(folder, batch_size, train=True, image_size=32, seed=seed, rank=r, world_size=world_size)
            for r in range(world_size)]


def _ids_from(loader: ImageNetLoader, tree: Tree, epoch: int, start_sample: int) -> tuple[list[int], list]:
    """(sample ids, batches) of one iteration from global sample ``start_sample``."""
    loader.set_epoch(epoch, start_sample=start_sample)
    batches = list(loader)
    assert all(x.shape[0] == y.shape[0] == loader.batch_size for x, y in batches)
    ids = [i for x, y in batches for i in _identify(x, loader, tree)]
    assert [lab for _, y in batches for lab in y.tolist()] == loader.folder.labels[ids].tolist()
    return ids, batches


def _permutation(tree: Tree, epoch: int) -> list[int]:
    """The training order of ``epoch`` (seed 7): one rank with batches of one sees all of it."""
    return _train_ranks(tree, "torchvision", 1, 1)[0].indices(epoch).tolist()


def test_imagenet_shards_are_strided_and_keep_imagenets_permutation() -> None:
    def loader(n: int, b: int, rank: int, world: int, train: bool = True) -> ImageNetLoader:
        files = tuple(f"n0/{i:02d}.JPEG" for i in range(n))
        folder = inet.ImageFolder(pathlib.Path("nowhere"), ("n0",), files, torch.zeros(n, dtype=torch.int64))
        return ImageNetLoader(folder, b, train=train, seed=7, rank=rank, world_size=world)

    perm = loader(24, 1, 0, 1).indices(2)
    # ImageNet's own shuffle stream (10), so that runs resumed mid-epoch keep their order.
    assert perm.tolist() == torch.randperm(24, generator=torch.Generator().manual_seed(derive_seed(7, 10, 2))).tolist()
    # 24 samples, 2 ranks x 5: 2 steps of 10 -> positions 0..19, rank r takes r, r + 2, ...
    assert loader(24, 5, 1, 2).indices(2).tolist() == perm[1:20:2].tolist()
    # From global sample 8 under 3 ranks x 3: (24 - 8) // 9 = 1 step, positions 8..16.
    assert loader(24, 3, 2, 3).indices(2, start_sample=8).tolist() == perm[10:17:3].tolist()
    # Evaluation: strided as well (the rule of every loader), in order, nothing dropped.
    assert loader(13, 4, 1, 2, train=False).indices(0).tolist() == list(range(1, 13, 2))


ELASTIC = [((2, 4), (3, 3), 1, 1, 7),  # s = 8: (24 - 8) // 9 = 1 batch per rank, 7 dropped
           ((2, 4), (1, 5), 1, 3, 1),  # 2 -> 1 process: 16 // 5 = 3, 1 dropped
           ((1, 4), (2, 3), 2, 2, 4)]  # 1 -> 2 processes: s = 8, 16 // 6 = 2, 4 dropped
ELASTIC_IDS = ["2x4->3x3", "2x4->1x5", "1x4->2x3"]


@pytest.mark.parametrize(("before", "after", "k", "left", "dropped"), ELASTIC, ids=ELASTIC_IDS)
def test_torchvision_elastic_resume_uses_every_sample_at_most_once(tree: Tree, before, after, k, left,
                                                                   dropped) -> None:
    epoch = 1
    (w, b), (w2, b2) = before, after
    perm = _permutation(tree, epoch)
    first = []
    for loader in _train_ranks(tree, "torchvision", w, b):
        loader.set_epoch(epoch)
        for x, _ in list(loader)[:k]:  # the interrupted run's first k global steps
            first += _identify(x, loader, tree)
    s = k * b * w
    assert sorted(first) == sorted(perm[:s])
    rest = []
    for r, loader in enumerate(_train_ranks(tree, "torchvision", w2, b2)):
        loader.set_epoch(epoch, start_sample=s)
        assert loader.batches_left() == left and len(loader) == (24 // w2) // b2
        ids, _ = _ids_from(loader, tree, epoch, s)
        assert ids == perm[s + r: s + left * b2 * w2: w2]
        rest += ids
    union = first + rest
    assert len(union) == len(set(union)) == 24 - dropped
    assert set(union) == set(perm[:24 - dropped])


def test_torchvision_same_setup_start_sample_is_bitwise_start_batch(tree: Tree) -> None:
    for loader in _train_ranks(tree, "torchvision", 2, 4):
        loader.set_epoch(1)
        full = list(loader)
        assert len(full) == 3
        _, rest = _ids_from(loader, tree, 1, 2 * 4 * 2)  # start_sample = k B W with k = 2
        assert len(rest) == 1 and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                      for (xa, ya), (xb, yb) in zip(full[2:], rest, strict=True))
        assert loader.batches_left() == 3  # reset after the iteration


def test_imagenet_start_sample_is_validated(tree: Tree) -> None:
    train = _train_ranks(tree, "torchvision", 2, 4)[0]
    message = _one_line("must be an integer in [0, 24]", train.set_epoch, 0, start_sample=25)
    assert message.startswith("start_sample 25 ")
    _one_line("start_sample -1 ", train.set_epoch, 0, start_sample=-1)
    _one_line("not both", train.set_epoch, 0, 1, start_sample=8)
    train.set_epoch(0, start_sample=24)
    assert train.batches_left() == 0 and list(train) == []
    test = build_loaders(_cfg(tree.root, "torchvision"), seed=0).test
    _one_line("only training loaders", test.set_epoch, 0, start_sample=4)


@needs_dali
@pytest.mark.parametrize(("before", "after", "k", "left", "dropped"), [ELASTIC[0], ELASTIC[2]],
                         ids=[ELASTIC_IDS[0], ELASTIC_IDS[2]])
def test_dali_elastic_resume_uses_every_sample_at_most_once(tree: Tree, before, after, k, left, dropped) -> None:
    epoch = 1
    (w, b), (w2, b2) = before, after
    perm = _permutation(tree, epoch)
    first = []
    for r, loader in enumerate(_train_ranks(tree, "dali", w, b)):
        full, _ = _ids_from(loader, tree, epoch, 0)
        assert full == perm[r: len(loader) * b * w: w]  # DALI reads the strided shard
        first += full[:k * b]
    s = k * b * w
    rest = []
    for r, loader in enumerate(_train_ranks(tree, "dali", w2, b2)):
        loader.set_epoch(epoch, start_sample=s)
        assert loader.batches_left() == left
        ids, _ = _ids_from(loader, tree, epoch, s)
        assert ids == perm[s + r: s + left * b2 * w2: w2]
        rest += ids
    union = first + rest
    assert len(union) == len(set(union)) == 24 - dropped
    assert set(union) == set(perm[:24 - dropped])
    # Same setup: start_sample = k B W reads exactly the uninterrupted epoch's remaining samples.
    for r, loader in enumerate(_train_ranks(tree, "dali", w, b)):
        assert _ids_from(loader, tree, epoch, s)[0] == perm[s + r: len(loader) * b * w: w]


# ---------------------------------------------------------------------------------------------
# Data errors: DataError naming the file, in any loader, split or worker; the pre-flight


def _break(path: pathlib.Path, kind: str) -> None:
    """Turn the image at ``path`` into a bad file of ``kind``."""
    if kind == "text":
        path.write_text("this is not a JPEG")
    elif kind == "truncated":  # cut inside the compressed data: the header still parses
        data = path.read_bytes()
        scan = data.index(b"\xff\xda")
        path.write_bytes(data[:scan + (len(data) - scan) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "dangling symlink":
        path.unlink()
        path.symlink_to(path.parent / "gone.JPEG")
    else:
        raise AssertionError(kind)


def _data_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


BAD_KINDS = ["text", "truncated", "empty", "dangling symlink"]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_files_raise_data_error_naming_the_file(copy: pathlib.Path, loader: str, kind: str,
                                                    split: str) -> None:
    bad = copy / split / CLASSES[1] / "02.JPEG"
    _break(bad, kind)
    # batch 4: 24 training images in 6 full batches, none dropped; listing opens no file
    loaders = build_loaders(_cfg(copy, loader, batch_size=4), seed=0)
    target = loaders.train if split == "train" else loaders.test
    message = _data_error(f"--data-dir: cannot decode {bad}: ", _run_plain, target)
    if kind == "dangling symlink":
        assert f"a broken symbolic link (to {bad.parent / 'gone.JPEG'})" in message
    # The pre-flight finds it from the headers, before any batch: val/ always, train/ on demand.
    if split == "val":
        _data_error(f"cannot decode {bad}: ", check_loaders, loaders)
    else:
        assert check_loaders(loaders) == 13
        _data_error(f"cannot decode {bad}: ", check_loaders, loaders, train=True)


@pytest.mark.parametrize("kind", ["truncated", "decode"])
def test_failures_in_dataloader_workers_are_data_errors(copy: pathlib.Path, kind: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    bad = copy / "train" / CLASSES[0] / "03.JPEG"
    if kind == "truncated":
        _break(bad, "truncated")
        expect = f"--data-dir: cannot decode {bad}: not a decodable image (image file is truncated"
    else:  # any other failure on a sample, in a (forked) worker process
        real = torchvision_backend._DecodeCrop._sample

        def boom(self, path, epoch, i):
            if path == bad:
                raise RuntimeError("out of cheese\nsecond line")
            return real(self, path, epoch, i)

        monkeypatch.setattr(torchvision_backend._DecodeCrop, "_sample", boom)
        expect = f"--data-dir: cannot decode {bad}: RuntimeError: out of cheese; remove or replace the file"
    train = build_loaders(_cfg(copy, "torchvision", batch_size=4, num_workers=2), seed=0).train
    _data_error(expect, _run_plain, train)


def test_preflight_checks_headers_of_every_rank(tree: Tree, copy: pathlib.Path) -> None:
    ranks = [build_loaders(_cfg(tree.root, "torchvision"), seed=0, rank=r, world_size=2) for r in range(2)]
    # Every rank checks all 13 evaluation files; with --check-data its half of the 24 training ones.
    assert [check_loaders(r) for r in ranks] == [13, 13]
    assert [check_loaders(r, train=True) for r in ranks] == [13 + 12, 13 + 12]
    assert check_loaders(build_loaders(DataConfig(name="digits"), seed=0), train=True) == 0  # in memory
    # A bad training file stops only the rank whose share holds it (files r, r + 2, ...).
    bad = copy / "train" / CLASSES[0] / "01.JPEG"  # index 1: rank 1's
    _break(bad, "truncated")
    ranks = [build_loaders(_cfg(copy, "torchvision"), seed=0, rank=r, world_size=2) for r in range(2)]
    assert check_loaders(ranks[0], train=True) == 25
    _data_error(f"cannot decode {bad}: truncated JPEG (no end-of-image marker", check_loaders, ranks[1], train=True)


def test_check_file_reads_headers_only(tmp_path: pathlib.Path) -> None:
    img = Image.effect_noise((64, 48), 40).convert("RGB")
    good, png, gif = tmp_path / "good.JPEG", tmp_path / "png.JPEG", tmp_path / "gif.JPEG"
    img.save(good, "JPEG", quality=90)
    img.save(png, "PNG")
    img.save(gif, "GIF")
    data = good.read_bytes()
    cases = {
        "trailing bytes.JPEG": (data + b"\0" * 5000, None),  # after the end-of-image marker: fine
        "no EOI.JPEG": (data[:-2], "truncated JPEG (no end-of-image marker after its image data)"),
        "header only.JPEG": (data[:300], "truncated JPEG (it ends inside its header)"),
        "zero size.JPEG": (data.replace(b"\xff\xc0\x00\x11\x08\x00\x30", b"\xff\xc0\x00\x11\x08\x00\x00", 1),
                           "corrupt JPEG header (image size 64 x 0)"),
        "no IEND.JPEG": (png.read_bytes()[:-12], "truncated PNG (no IEND chunk at its end)"),
        "text.JPEG": (b"GIF? no, text", "not a decodable image (cannot identify image file)"),
    }
    for name, (content, why) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert inet.check_file(tmp_path / name) == why, name
    assert inet.check_file(good) is None and inet.check_file(png, dali=True) is None
    assert inet.check_file(gif) is None  # torchvision's loader reads it through PIL
    assert inet.check_file(gif, dali=True) == ("a GIF image, which NVIDIA DALI cannot decode (convert it to "
                                               "JPEG, or use --loader torchvision, which reads it)")
    assert inet.check_file(tmp_path / "missing.JPEG") == "unreadable: No such file or directory"


def test_preflight_timing_on_2000_files(tmp_path: pathlib.Path) -> None:
    """The pre-flight over 2 000 files of 30 KB takes well under a second (measured: 0.1-0.3 s
    on a busy 2-core CPU, from the page cache)."""
    import time

    data = (tmp_path / "x.JPEG")
    Image.effect_noise((160, 120), 60).convert("RGB").save(data, "JPEG", quality=90)
    blob = data.read_bytes()
    for c in range(20):
        (tmp_path / "val" / f"n{c:08d}").mkdir(parents=True)
        for k in range(100):
            (tmp_path / "val" / f"n{c:08d}" / f"{k:03d}.JPEG").write_bytes(blob)
    folder = scan_split(tmp_path, "val")
    start = time.perf_counter()
    assert inet.check_files(folder, dali=True) == 2000
    assert time.perf_counter() - start < 5  # generous: the machine may be shared


# ---------------------------------------------------------------------------------------------
# Both loaders decode every image a folder can hold to the same pixels (DALI's rules)


def _pgm16(path: pathlib.Path, values) -> None:
    """A 16-bit binary PGM (PIL reads it as mode I)."""
    import numpy as np

    a = np.asarray(values, dtype=">u2")
    path.write_bytes(b"P5\n%d %d\n65535\n" % (a.shape[1], a.shape[0]) + a.tobytes())


def _mode_files(folder: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    """Noise images of every PIL mode in the formats that hold them, all named .JPEG:
    name -> (path, the mode PIL reads back)."""
    import numpy as np

    rng = np.random.default_rng(0)
    h, w = 17, 24
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    u16 = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
    cmyk = Image.frombytes("CMYK", (w, h), rng.integers(0, 256, (h, w, 4), dtype=np.uint8).tobytes())
    ycc = Image.frombytes("YCbCr", (w, h), rng.integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes())
    made = {
        "1 png": (rgb.convert("1"), "PNG", "1"),
        "L png": (rgb.convert("L"), "PNG", "L"),
        "L jpeg": (rgb.convert("L"), "JPEG", "L"),
        "I;16 png": (u16, "PNG", "I;16"),
        "I;16 tiff": (u16, "TIFF", "I;16"),
        "F tiff": (Image.fromarray(rng.uniform(-0.2, 1.2, (h, w)).astype(np.float32)), "TIFF", "F"),
        "P png": (rgb.convert("P"), "PNG", "P"),
        "P tiff": (rgb.convert("P"), "TIFF", "P"),
        "LA png": (rgb.convert("LA"), "PNG", "LA"),
        "RGBA png": (Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)), "PNG", "RGBA"),
        "RGBA tiff": (Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)), "TIFF", "RGBA"),
        "CMYK jpeg": (cmyk, "JPEG", "CMYK"),
        "CMYK tiff": (cmyk, "TIFF", "CMYK"),
        "YCbCr tiff": (ycc, "TIFF", "YCbCr"),
        "YCbCr jpeg": (ycc, "JPEG", "RGB"),  # JPEG's own colour space: decoded to RGB
        "RGB jpeg": (rgb, "JPEG", "RGB"),
    }
    out = {}
    for name, (img, fmt, mode) in made.items():
        path = folder / f"{name.replace(' ', '_').replace(';', '')}.JPEG"
        img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out[name] = (path, mode)
    out["I pgm"] = (folder / "I_pgm.JPEG", "I")
    _pgm16(out["I pgm"][0], rng.integers(0, 65536, (h, w)))
    return out


@needs_dali
def test_every_pil_mode_decodes_to_dalis_pixels(tmp_path: pathlib.Path) -> None:
    from data_pipelines.imagenet.dali_backend import decode_with_dali

    files = _mode_files(tmp_path)
    got = decode_with_dali([p for p, _ in files.values()])
    for (name, (path, mode)), dali in zip(files.items(), got, strict=True):
        with Image.open(path) as img:
            assert img.mode == mode, name
        tv = inet.decode_file(path)
        assert tv.dtype == dali.dtype == torch.uint8 and tv.shape == dali.shape == (3, 17, 24), name
        assert torch.equal(tv, dali), f"{name}: {int((tv.int() - dali.int()).abs().max())} apart"
        assert inet.check_file(path, dali=True) is None, name


def test_sixteen_bit_and_float_values_follow_dalis_rule(tmp_path: pathlib.Path) -> None:
    import numpy as np

    v = np.array([[0, 128, 129, 255, 256, 40000, 65406, 65407, 65535]], dtype=np.uint16)
    expect = [0, 0, 1, 1, 1, 156, 254, 255, 255]  # round(v / 257): 40 000 -> 156, not white
    Image.fromarray(v).save(tmp_path / "u16.JPEG", "PNG")
    _pgm16(tmp_path / "pgm.JPEG", v)
    for name in ("u16.JPEG", "pgm.JPEG"):
        x = inet.decode_file(tmp_path / name)
        assert x.shape == (3, 1, 9) and x[0, 0].tolist() == expect and torch.equal(x[0], x[2])
    f = np.array([[-1.0, 0.0, 0.5 / 255, 0.5, 127.5 / 255, 1.0, 2.0]], dtype=np.float32)
    Image.fromarray(f).save(tmp_path / "f.JPEG", "TIFF")
    assert inet.decode_file(tmp_path / "f.JPEG")[0, 0].tolist() == [0, 0, 1, 128, 128, 255, 255]
    cmyk = Image.frombytes("CMYK", (2, 1), bytes([0, 0, 0, 128, 200, 100, 50, 10]))
    cmyk.save(tmp_path / "cmyk.JPEG", "TIFF")
    # (255 - K) * (255 - C) // 255, truncated: K 128 -> 127; (245 * 55) // 255 = 52, ...
    assert inet.decode_file(tmp_path / "cmyk.JPEG").permute(1, 2, 0).tolist() == [[[127, 127, 127], [52, 148, 196]]]


@pytest.mark.parametrize("loader", LOADERS)
def test_sixteen_bit_png_reads_as_156_through_both_loaders(copy: pathlib.Path, loader: str) -> None:
    import numpy as np

    path = copy / "val" / CLASSES[1] / "01.JPEG"
    Image.fromarray(np.full((50, 70), 40000, dtype=np.uint16)).save(path, "PNG")
    test = build_loaders(_cfg(copy, loader), seed=0).test
    i = test.folder.files.index(f"{CLASSES[1]}/01.JPEG")
    test.set_epoch(0)
    x = torch.cat([x for x, _ in test])[i]
    px = _pixels(x[None])[0]
    assert (px - 156).abs().max() < 0.5, px.mean(dim=(1, 2))


# ---------------------------------------------------------------------------------------------
# Files only PIL decodes: named by the DALI loader too


@needs_dali
@pytest.mark.parametrize("kind", ["GIF", "32-bit TIFF", "1-bit TIFF", "PNG without IEND"])
def test_files_dali_cannot_decode_are_named(copy: pathlib.Path, kind: str) -> None:
    import numpy as np

    bad = copy / "val" / CLASSES[2] / "02.JPEG"
    img = Image.open(bad).convert("RGB")
    if kind == "GIF":
        img.save(bad, "GIF")
    elif kind == "32-bit TIFF":
        Image.fromarray(np.asarray(img.convert("L")).astype(np.int32) * 257).save(bad, "TIFF")
    elif kind == "1-bit TIFF":
        img.convert("1").save(bad, "TIFF")
    else:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        bad.write_bytes(buf.getvalue()[:-12])
    dali = build_loaders(_cfg(copy, "dali"), seed=0).test
    message = _data_error(f"--data-dir: cannot decode {bad}: ", _run_plain, dali)
    assert "NVIDIA DALI cannot decode" in message
    tv = build_loaders(_cfg(copy, "torchvision"), seed=0)
    if kind == "PNG without IEND":  # a broken PNG: the pre-flight refuses it for both loaders
        _data_error(f"cannot decode {bad}: truncated PNG (no IEND chunk at its end)", check_loaders, tv)
    else:  # PIL reads it: the torchvision loader and its pre-flight accept it; DALI's refuse it
        assert check_loaders(tv) == 13
        _data_error(f"cannot decode {bad}: a ", check_loaders, build_loaders(_cfg(copy, "dali"), seed=0))
    _run_plain(tv.test)


# ---------------------------------------------------------------------------------------------
# Any evaluation split size on any number of processes


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(("n", "world", "counts"), [(1, 2, [1, 0]), (1, 3, [1, 0, 0]), (4, 3, [2, 1, 1]),
                                                    (2, 2, [1, 1])])
def test_evaluation_split_smaller_than_the_processes(tree: Tree, loader: str, n: int, world: int,
                                                     counts: list[int]) -> None:
    full = scan_split(tree.root, "val", classes=CLASSES)
    # The first n validation images, each its own label, so that y names the sample.
    folder = inet.ImageFolder(full.root, CLASSES, full.files[:n], torch.arange(n))
    if loader == "dali":
        from data_pipelines.imagenet.dali_backend import DaliLoader as cls
    else:
        cls = inet.TorchvisionLoader
    seen = []
    for r in range(world):
        test = cls(folder, 4, train=False, image_size=32, rank=r, world_size=world)
        assert len(test) == (1 if counts[r] else 0)
        test.set_epoch(0)
        ys = [i for _, y in test for i in y.tolist()]
        assert len(ys) == counts[r] and ys == list(range(r, n, world))  # strided, in order
        seen += ys
    assert sorted(seen) == list(range(n))  # each image once


# ---------------------------------------------------------------------------------------------
# --data-dir that is not a folder


def test_data_dir_that_is_a_file_is_named(tmp_path: pathlib.Path, copy: pathlib.Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for name in ("imagenet", "cifar10", "mnist"):
        cfg = DataConfig(name=name, data_dir=str(afile))
        _data_error(f"--data-dir {afile}: {afile} is a file, not a folder", build_loaders, cfg, seed=0)
    shutil.rmtree(copy / "val")
    (copy / "val").write_text("x")
    _data_error(f"--data-dir {copy}: {copy / 'val'} is a file, not a folder", build_loaders,
                _cfg(copy, "torchvision"), seed=0)
    (copy / "val").unlink()
    shutil.copytree(copy / "train", copy / "val")
    real = os.scandir

    def denied(path):
        if pathlib.Path(path) == copy / "val" / CLASSES[1]:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", denied)
    _data_error(f"--data-dir {copy}: cannot list {copy / 'val' / CLASSES[1]}: Permission denied",
                build_loaders, _cfg(copy, "torchvision"), seed=0)


def test_check_data_flag() -> None:
    from launcher.config import identity, parse_config

    cfg = parse_config(["--data", "imagenet", "--data-dir", "X", "--model", "resnet50", "--check-data"])
    assert cfg.data.check_data is True
    assert parse_config(["--data", "imagenet", "--data-dir", "X", "--model", "resnet50"]).data.check_data is False
    assert "data.check_data" not in identity(cfg.to_dict())  # resumable: run folders keep their names


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_torchvision_gpu_branch_copies_uint8_and_normalises_on_the_device(tree, monkeypatch, channels_last):
    """A GPU loader's batches leave the workers as uint8 and are normalised after the copy to
    the accelerator (``torch.accelerator``'s device); with the CPU standing in for it, they
    equal a CPU loader's bit for bit, in the asked memory format."""
    seen = []
    real = torchvision_backend.normalise

    def on_device(x, fp16=False, channels_last=False):
        seen.append(x.dtype)
        return real(x, fp16, channels_last)

    folder = scan_split(tree.root, "train")
    cpu = inet.TorchvisionLoader(folder, 5, train=True, image_size=32, seed=3, channels_last=channels_last)
    expected = list(cpu)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cpu"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torchvision_backend, "normalise", on_device)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)  # no driver to pin with
    gpu = inet.TorchvisionLoader(folder, 5, train=True, image_size=32, seed=3, channels_last=channels_last, gpu=True)
    got = list(gpu)
    assert seen == [torch.uint8] * len(expected) == [torch.uint8] * 4  # 24 images, batches of 5, last dropped
    for (xa, ya), (xb, yb) in zip(expected, got):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xb.dtype == torch.float32 and xb.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_batches_go_to_the_gpu_when_cuda_is_there_unless_the_run_is_on_the_cpu(monkeypatch):
    from accelerate.state import PartialState
    monkeypatch.setattr(PartialState, "_shared_state", {})  # no Accelerator in this process
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [inet_build.use_gpu(d) for d in ("auto", "gpu", "cpu")] == [True, True, False]
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --cpu, or --device cpu
    assert inet_build.use_gpu("auto") is False
    with pytest.raises(ValueError, match="--decode-device gpu: CUDA is not available"):
        inet_build.use_gpu("gpu")

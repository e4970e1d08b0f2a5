"""Tests for data_pipelines: real torchvision loading of tiny fake files, batching, sharding, resume.

The fake MNIST/CIFAR sets are written in torchvision's real on-disk formats, so torchvision's own
dataset classes read them. CIFAR's classes verify every file against an md5 table (class
attributes ``train_list``/``test_list``/``meta``); the tests put the md5s of the fake files into
that table (``monkeypatch``) and leave the loading code itself untouched. MNIST's raw idx files
carry no md5 check. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_pipelines import (
    DATASETS,
    BatchLoader,
    CropFlip,
    DataConfig,
    DatasetInfo,
    DatasetSpec,
    Loaders,
    Normalize,
    build_loaders,
    list_datasets,
    register_dataset,
)
from data_pipelines.sharding import derive_seed
from conftest import FakeSet, random_set

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.50708, 0.48655, 0.44092), (0.26733, 0.25644, 0.27615)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def _cfg(name: str, fake: FakeSet | None = None, **kw: object) -> DataConfig:
    return DataConfig(name=name, data_dir=str(fake.root) if fake else "data", **kw)  # type: ignore[arg-type]


def _normalised(raw: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """The REF preprocessing by hand: ToTensor (/255) then Normalize((x - mean) / std)."""
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return (raw.float() / 255 - m) / s


def _raw(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Invert ``_normalised`` back to uint8 pixel values."""
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return ((x * s + m) * 255).round().to(torch.uint8)


def _collect(loader: BatchLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=re.escape(match)) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Registry and flags


def test_registry_lists_builtins_and_plugs_in_new_datasets() -> None:
    assert {"digits", "mnist", "cifar10", "cifar100", "synthetic"} <= set(list_datasets())

    @register_dataset("test-tiny")
    def tiny(cfg: DataConfig) -> DatasetSpec:
        x = torch.arange(40, dtype=torch.float32).view(10, 1, 2, 2)
        y = torch.arange(10) % 2
        return DatasetSpec(x, y, x[:4], y[:4], info=DatasetInfo(2, (1, 2, 2)),
                           mean=(0.0,), std=(1.0,))

    loaders = build_loaders(DataConfig(name="test-tiny", batch_size=5), seed=0)
    assert (loaders.num_classes, loaders.input_shape, len(loaders.train), loaders.val) == (2, (1, 2, 2), 2, None)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("test-tiny")(tiny)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"name": "imagenet-tiny"}, "--data"),
        ({"batch_size": 0}, "--batch-size"),
        ({"test_batch_size": 0}, "--test-batch-size"),
        ({"num_workers": -1}, "--num-workers"),
        ({"valid_split": 1.0}, "--valid-split"),
        ({"valid_split": -0.1}, "--valid-split"),
        ({"synthetic_shape": (3, 0)}, "--synthetic-shape"),
        ({"synthetic_classes": 0}, "--synthetic-classes"),
        ({"synthetic_size": 0}, "--synthetic-size"),
    ],
)
def test_bad_flags_raise_naming_the_flag(kwargs: dict, flag: str) -> None:
    _one_line_error(flag, DataConfig, **kwargs)


def test_datasets_table() -> None:
    assert DATASETS == {
        "mnist": DatasetInfo(10, (1, 28, 28)),
        "cifar10": DatasetInfo(10, (3, 32, 32)),
        "cifar100": DatasetInfo(100, (3, 32, 32)),
        "imagenet": DatasetInfo(1000, (3, 224, 224)),
        "digits": DatasetInfo(10, (1, 8, 8)),
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        DATASETS["mnist"].num_classes = 3  # type: ignore[misc]


def test_unknown_dataset_error_lists_known_ones() -> None:
    message = _one_line_error("--data", DataConfig, name="cifar11")
    assert "cifar10" in message and "digits" in message


def test_build_loaders_rejects_splits_batches_and_ranks_that_cannot_work() -> None:
    small = dict(name="synthetic", synthetic_shape=(2,), synthetic_size=5)
    _one_line_error("--valid-split", build_loaders, DataConfig(**small, valid_split=0.9, batch_size=1), seed=0)
    _one_line_error("--batch-size", build_loaders, DataConfig(**small, batch_size=3), seed=0, world_size=2)
    _one_line_error("rank 2", build_loaders, DataConfig(**small), seed=0, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------
# torchvision datasets in their real on-disk formats


def test_cifar10_loads_splits_and_normalises_like_ref(fake_cifar10: FakeSet) -> None:
    fake = fake_cifar10
    loaders = build_loaders(_cfg("cifar10", fake, batch_size=8, test_batch_size=7, augment=False), seed=3)
    assert isinstance(loaders, Loaders)
    assert (loaders.num_classes, loaders.input_shape) == (10, (3, 32, 32))
    assert loaders.val is not None
    # REF: the first 90 % train, the last 10 % validation (45 000 / 5 000 on the real set).
    assert (loaders.train.num_samples, loaders.val.num_samples, loaders.test.num_samples) == (90, 10, 30)
    assert len(loaders.train) == 90 // 8

    x, y = next(iter(loaders.train))
    assert (x.shape, x.dtype, y.shape, y.dtype) == ((8, 3, 32, 32), torch.float32, (8,), torch.int64)
    train_x, train_y = _collect(loaders.train)
    order = loaders.train.indices(0)
    assert int(order.max()) < 90 and len(set(order.tolist())) == len(order) == 88
    torch.testing.assert_close(train_x, _normalised(fake.train_x[order], CIFAR10_MEAN, CIFAR10_STD))
    assert torch.equal(train_y, fake.train_y[order])

    for loader, raw_x, raw_y in ((loaders.val, fake.train_x[90:], fake.train_y[90:]),
                                 (loaders.test, fake.test_x, fake.test_y)):
        got_x, got_y = _collect(loader)
        torch.testing.assert_close(got_x, _normalised(raw_x, CIFAR10_MEAN, CIFAR10_STD))
        assert torch.equal(got_y, raw_y)


def test_cifar100_reads_fine_labels_and_has_no_validation_split(fake_cifar100: FakeSet) -> None:
    loaders = build_loaders(_cfg("cifar100", fake_cifar100, batch_size=10, augment=False), seed=0)
    assert loaders.val is None and loaders.num_classes == 100
    assert (loaders.train.num_samples, loaders.test.num_samples) == (60, 20)
    test_x, test_y = _collect(loaders.test)
    torch.testing.assert_close(test_x, _normalised(fake_cifar100.test_x, CIFAR100_MEAN, CIFAR100_STD))
    assert torch.equal(test_y, fake_cifar100.test_y) and int(test_y.max()) < 100


@pytest.mark.parametrize(("dataset", "mode", "mean", "std"), [
    ("cifar10", "reflect", CIFAR10_MEAN, CIFAR10_STD),
    ("cifar100", "constant", CIFAR100_MEAN, CIFAR100_STD),
])
def test_cifar_augmentation_is_a_crop_of_the_padded_image_maybe_flipped(
    dataset: str, mode: str, mean: tuple, std: tuple, request: pytest.FixtureRequest
) -> None:
    fake: FakeSet = request.getfixturevalue(f"fake_{dataset}")
    plain = build_loaders(_cfg(dataset, fake, batch_size=16, augment=False), seed=5).train
    augmented = build_loaders(_cfg(dataset, fake, batch_size=16), seed=5).train
    aug_x, aug_y = _collect(augmented)
    plain_x, plain_y = _collect(plain)
    assert torch.equal(aug_y, plain_y)  # augmentation does not change the shuffle
    assert not torch.equal(aug_x, plain_x)

    raw = fake.train_x[augmented.indices(0)]
    torch.testing.assert_close(plain_x, _normalised(raw, mean, std))
    # Every 32x32 crop of the padded image (REF: pad 4, RandomCrop 32): (N, C, 9, 9, 32, 32).
    padded = F.pad(raw.float(), (4, 4, 4, 4), mode=mode)
    crops = padded.unfold(2, 32, 1).unfold(3, 32, 1)
    got = _raw(aug_x, mean, std).float()[:, :, None, None]
    same = (crops == got).flatten(4).all(4).all(1)  # (N, 9, 9): which offsets match
    same_flipped = (crops.flip(-1) == got).flatten(4).all(4).all(1)
    matches = same.flatten(1).sum(1) + same_flipped.flatten(1).sum(1)
    assert torch.equal(matches, torch.ones_like(matches)), "each sample is exactly one crop/flip"
    assert 0 < int(same_flipped.flatten(1).any(1).sum()) < len(raw), "about half are flipped"
    assert not bool((same | same_flipped)[:, 4, 4].all()), "some crops are off-centre"


def test_mnist_loads_idx_files_with_ref_split_and_no_augmentation(fake_mnist: FakeSet) -> None:
    loaders = build_loaders(_cfg("mnist", fake_mnist, batch_size=5), seed=0)  # augment=True: ignored
    assert loaders.val is not None
    assert (loaders.train.num_samples, loaders.val.num_samples, loaders.test.num_samples) == (45, 5, 20)
    assert (loaders.num_classes, loaders.input_shape) == (10, (1, 28, 28))
    train_x, train_y = _collect(loaders.train)
    order = loaders.train.indices(0)
    torch.testing.assert_close(train_x, _normalised(fake_mnist.train_x[order], MNIST_MEAN, MNIST_STD))
    assert torch.equal(train_y, fake_mnist.train_y[order])
    val_x, _ = _collect(loaders.val)
    torch.testing.assert_close(val_x, _normalised(fake_mnist.train_x[45:], MNIST_MEAN, MNIST_STD))


# ---------------------------------------------------------------------------------------------
# Missing and corrupt files


@pytest.mark.parametrize(("dataset", "subfolder"), [("cifar10", "cifar-10-batches-py"),
                                                   ("cifar100", "cifar-100-python"), ("mnist", "MNIST/raw")])
def test_missing_files_name_the_folder_and_the_fix(tmp_path: Path, dataset: str, subfolder: str) -> None:
    message = _one_line_error("--data-dir", build_loaders, DataConfig(name=dataset, data_dir=str(tmp_path)), seed=0)
    assert str(tmp_path) in message and subfolder in message and "--download" in message


def test_partly_missing_files_are_listed(fake_cifar10: FakeSet) -> None:
    (fake_cifar10.folder / "test_batch").unlink()
    message = _one_line_error("--data-dir", build_loaders, _cfg("cifar10", fake_cifar10), seed=0)
    assert "test_batch" in message and "data_batch" not in message


def test_corrupt_cifar_file_is_named(fake_cifar10: FakeSet) -> None:
    bad = fake_cifar10.folder / "data_batch_2"
    bad.write_bytes(bad.read_bytes()[:1000])
    message = _one_line_error("corrupt", build_loaders, _cfg("cifar10", fake_cifar10), seed=0)
    assert str(bad) in message


def test_corrupt_mnist_file_is_named(fake_mnist: FakeSet) -> None:
    bad = fake_mnist.folder / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    message = _one_line_error("corrupt", build_loaders, _cfg("mnist", fake_mnist), seed=0)
    assert str(bad) in message


# ---------------------------------------------------------------------------------------------
# Datasets without files


def test_digits_fixed_stratified_split_normalised_by_train_statistics() -> None:
    runs = [build_loaders(DataConfig(name="digits", batch_size=1437, test_batch_size=360), seed=s) for s in (1, 2)]
    for loaders in runs:
        assert loaders.val is None
        assert (loaders.train.num_samples, loaders.test.num_samples) == (1437, 360)
        assert (loaders.num_classes, loaders.input_shape) == (10, (1, 8, 8))
    train_x, _ = _collect(runs[0].train)
    assert abs(float(train_x.mean())) < 1e-5 and abs(float(train_x.std()) - 1) < 1e-3
    test_a, test_b = _collect(runs[0].test), _collect(runs[1].test)
    assert torch.equal(test_a[0], test_b[0]) and torch.equal(test_a[1], test_b[1])  # split ignores the run seed
    assert torch.bincount(test_a[1]).min() >= 35  # stratified: 35-37 test images of every digit

    held_out = build_loaders(DataConfig(name="digits", valid_split=0.2), seed=1)
    assert held_out.val is not None
    assert (held_out.train.num_samples, held_out.val.num_samples) == (1149, 288)


def test_synthetic_is_fixed_by_seed_zero_and_shaped_by_flags() -> None:
    cfg = DataConfig(name="synthetic", synthetic_shape=(2, 4, 4), synthetic_classes=3, synthetic_size=40,
                     batch_size=8, test_batch_size=256)
    a, b = build_loaders(cfg, seed=1), build_loaders(cfg, seed=2)
    assert (a.num_classes, a.input_shape, a.train.num_samples, a.test.num_samples) == (3, (2, 4, 4), 40, 256)
    test_x, test_y = _collect(a.test)
    assert test_x.shape == (256, 2, 4, 4) and 0 <= int(test_y.min()) and int(test_y.max()) < 3
    assert torch.equal(test_x, _collect(b.test)[0])


# ---------------------------------------------------------------------------------------------
# BatchLoader: determinism, resume, sharding


def _image_loader(n: int = 64, seed: int = 0, **kw: object) -> BatchLoader:
    """A training loader over random uint8 images with crop + flip; labels = sample ids."""
    x, _ = random_set(torch.Generator().manual_seed(0), n, (3, 8, 8), 10)
    kw = {"batch_size": 8, "train": True, **kw}
    return BatchLoader(x, torch.arange(n), normalize=Normalize((0.5,) * 3, (0.25,) * 3, torch.uint8),
                       augment=CropFlip(2, "reflect"), seed=seed, **kw)  # type: ignore[arg-type]


def _epoch(loader: BatchLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch, start)
    return list(loader)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_batches_are_a_function_of_seed_and_epoch() -> None:
    first, again = _epoch(_image_loader(), 3), _epoch(_image_loader(), 3)
    assert _same(first, again)
    assert len(first) == 8 and first[0][0].dtype == torch.float32
    other_epoch, other_seed = _epoch(_image_loader(), 4), _epoch(_image_loader(seed=1), 3)
    assert not torch.equal(first[0][1], other_epoch[0][1])  # another order
    assert not torch.equal(first[0][1], other_seed[0][1])


def test_resume_mid_epoch_yields_the_remaining_batches_bit_for_bit() -> None:
    loader = _image_loader()
    full = _epoch(loader, 2)
    assert _same(_epoch(_image_loader(), 2, start=3), full[3:])  # a fresh process resuming at 3
    assert _epoch(loader, 2, start=len(loader)) == []
    assert _same(list(loader), full)  # start_batch applies to one iteration only
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=len(loader) + 1)


@pytest.mark.parametrize("world_size", [2, 3])
def test_training_shards_are_disjoint_and_equally_long(world_size: int) -> None:
    shards = [_image_loader(n=103, rank=r, world_size=world_size) for r in range(world_size)]
    expected_len = (103 // world_size) // 8
    assert [len(s) for s in shards] == [expected_len] * world_size
    ids = [torch.cat([y for _, y in _epoch(s, 1)]) for s in shards]
    seen = torch.cat(ids)
    assert len(seen) == len(set(seen.tolist())) == expected_len * 8 * world_size
    # The augmentation of a batch depends on the rank, not only on the batch index.
    x0, x1 = (next(iter(s))[0] for s in shards[:2])
    assert not torch.equal(x0, x1)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_shards_cover_every_sample_exactly_once(world_size: int) -> None:
    ids = []
    for rank in range(world_size):
        loader = _image_loader(n=103, batch_size=10, train=False, rank=rank, world_size=world_size)
        batches = _epoch(loader, 5)
        assert len(batches) == len(loader) and all(len(y) <= 10 for _, y in batches)
        y = torch.cat([y for _, y in batches])
        assert torch.equal(y, torch.arange(rank, 103, world_size))  # strided, in order, unaugmented
        ids.append(y)
    assert torch.equal(torch.cat(ids).sort().values, torch.arange(103))


def test_build_loaders_shards_by_global_rank() -> None:
    cfg = DataConfig(name="digits", batch_size=32, test_batch_size=50)
    ranks = [build_loaders(cfg, seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert [len(r.train) for r in ranks] == [(1437 // 2) // 32] * 2
    assert [r.test.num_samples for r in ranks] == [360, 360]
    assert sum(len(_collect(r.test)[1]) for r in ranks) == 360
    assert not set(ranks[0].train.indices(0).tolist()) & set(ranks[1].train.indices(0).tolist())


# ---------------------------------------------------------------------------------------------
# Elastic resume: set_epoch(epoch, start_sample=global samples consumed), any world size / batch


def _ranks(n: int, world_size: int, batch_size: int, seed: int = 4) -> list[BatchLoader]:
    return [_image_loader(n=n, seed=seed, batch_size=batch_size, rank=r, world_size=world_size)
            for r in range(world_size)]


def test_train_shard_is_strided_and_whole_global_batches() -> None:
    from data_pipelines.sharding import train_batches, train_positions, train_shard

    order = torch.arange(100) * 10  # a stand-in permutation: entry = 10 * position
    # W=3, B=3 from global position 40: 60 left -> 6 steps of 9, positions 40 .. 93.
    assert train_batches(100, 3, 3, 40) == 6 and train_batches(100, 4, 2) == 12
    assert train_positions(100, 3, 1, 3, 40) == range(41, 94, 3)
    assert train_shard(order, 3, 1, 3, 40).tolist() == [10 * p for p in range(41, 94, 3)]
    assert train_shard(order, 3, 2, 3, 100).tolist() == [] and train_batches(100, 3, 3, 100) == 0
    used = torch.cat([train_shard(order, 3, r, 3, 40) for r in range(3)])
    assert sorted(used.tolist()) == [10 * p for p in range(40, 94)]


@pytest.mark.parametrize(("before", "after", "k", "left", "dropped"), [
    ((2, 4), (3, 3), 5, 6, 6),   # s = 40: (100 - 40) // 9 = 6 batches, 60 - 54 = 6 dropped
    ((2, 4), (1, 7), 5, 8, 4),   # 2 -> 1 processes: 60 // 7 = 8, 4 dropped
    ((1, 4), (2, 3), 5, 13, 2),  # 1 -> 2 processes: s = 20, 80 // 6 = 13, 2 dropped
    ((2, 4), (3, 3), 0, 11, 1),  # interrupted before the first step
    ((2, 4), (3, 3), 12, 0, 4),  # interrupted after the last step: nothing left
], ids=["2x4->3x3", "2x4->1x7", "1x4->2x3", "at-start", "at-end"])
def test_elastic_resume_uses_every_sample_at_most_once(before, after, k, left, dropped) -> None:
    n, epoch = 100, 3
    (w, b), (w2, b2) = before, after
    perm = _image_loader(n=n, seed=4, batch_size=1).indices(epoch)  # W=1, B=1: the whole order
    first = [torch.cat([y for _, y in _epoch(loader, epoch)[:k]] or [torch.zeros(0, dtype=torch.int64)])
             for loader in _ranks(n, w, b)]
    s = k * b * w  # global samples consumed before the interruption
    assert sorted(torch.cat(first).tolist()) == sorted(perm[:s].tolist())  # exactly positions [0, s)
    resumed = _ranks(n, w2, b2)
    rest = []
    for r, loader in enumerate(resumed):
        loader.set_epoch(epoch, start_sample=s)
        assert loader.batches_left() == left and len(loader) == (n // w2) // b2  # len: the full epoch
        batches = list(loader)
        assert len(batches) == left and all(len(y) == b2 for _, y in batches)
        ids = torch.cat([y for _, y in batches]) if batches else torch.zeros(0, dtype=torch.int64)
        assert ids.tolist() == perm[s + r: s + left * b2 * w2: w2].tolist()  # strided from s
        rest.append(ids)
    union = torch.cat(first + rest).tolist()
    assert len(union) == len(set(union)) == n - dropped
    assert set(union) == set(perm[: n - dropped].tolist())  # only the new final partial batch is missing
    # Augmentation of resumed batch j is that of batch s // (B' W') + j of rank r.
    if left:
        loader = resumed[w2 - 1]
        loader.set_epoch(epoch, start_sample=s)
        x, y = next(iter(loader))
        gen = torch.Generator().manual_seed(derive_seed(4, 1, epoch, s // (b2 * w2), w2 - 1))
        expect = loader.normalize(loader.augment(loader.images[y], gen))
        assert torch.equal(x, expect)


def test_same_setup_start_sample_is_start_batch_bit_for_bit() -> None:
    for loader in _ranks(100, 2, 4):
        full = _epoch(loader, 1)
        for k in (0, 3, len(loader)):
            loader.set_epoch(1, start_sample=k * 4 * 2)
            assert loader.batches_left() == len(loader) - k
            assert _same(list(loader), full[k:])
        assert _same(list(loader), full)  # start_sample applies to one iteration only
        assert loader.batches_left() == len(loader) == 12
        loader.set_epoch(1, start_batch=5)
        assert loader.start_sample == 40 and loader.batches_left() == 7


def test_start_sample_is_validated_with_one_line_errors() -> None:
    loader = _image_loader(n=100, batch_size=4, world_size=2)
    for bad in (-1, 101, 1.5, "8"):
        _one_line_error("start_sample", loader.set_epoch, 0, start_sample=bad)
    message = _one_line_error("must be an integer in [0, 100]", loader.set_epoch, 0, start_sample=101)
    assert message.startswith("start_sample 101 ")
    _one_line_error("not both", loader.set_epoch, 0, 2, start_sample=8)
    loader.set_epoch(0, start_sample=100)  # the whole epoch consumed: nothing left
    assert loader.batches_left() == 0 and list(loader) == []
    loader.set_epoch(0, start_sample=torch.tensor(8))  # a 0-d integer tensor from a checkpoint
    assert loader.batches_left() == 11
    test = _image_loader(n=100, batch_size=10, train=False)
    _one_line_error("only training loaders", test.set_epoch, 0, start_sample=10)
    test.set_epoch(0, start_sample=0)
    assert test.batches_left() == len(test) == 10
    test.set_epoch(0, start_batch=3)
    assert test.batches_left() == 7 and len(list(test)) == 7

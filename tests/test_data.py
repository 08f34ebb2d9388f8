"""Data: the embedded digits, torchvision datasets offline (real MNIST when present), synthetic shapes,
reproducible batches and augmentation, one-line errors."""

import pytest
import torch
from pipeline_helpers import MNIST_ROOT, have_mnist

from atmc_triton.data import (
    DATASETS,
    DataError,
    DataSpec,
    Split,
    iterate_batches,
    load_dataset,
    synthetic_dataset,
)


def test_digits_embedded_default():
    d = load_dataset("digits")
    assert (len(d.train), len(d.test)) == (1437, 360)
    assert d.train.x.shape[1:] == (1, 8, 8) and d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    x = torch.cat([d.train.x, d.test.x])
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(x * 16, (x * 16).round())  # 17 grey levels, scaled exactly to [0, 1]
    # stratified: every class in the test split in (almost) the overall proportion
    counts = torch.bincount(d.test.y, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    again = load_dataset("digits")
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.y, d.test.y)  # deterministic split
    train_rows = {tuple(r.tolist()) for r in d.train.x.flatten(1)}
    leaked = sum(tuple(r.tolist()) in train_rows for r in d.test.x.flatten(1))
    assert leaked <= 3  # the split is by example (the raw data has a few duplicate images)


def test_subsets_are_seeded():
    d = load_dataset("digits", subset=100, test_subset=50, seed=3)
    assert (len(d.train), len(d.test)) == (100, 50)
    same = load_dataset("digits", subset=100, test_subset=50, seed=3)
    other = load_dataset("digits", subset=100, seed=4)
    assert torch.equal(d.train.x, same.train.x) and not torch.equal(d.train.x, other.train.x)
    assert d.train.subset(None) is d.train and d.train.subset(10_000) is d.train
    with pytest.raises(ValueError):
        d.train.subset(0)


@pytest.mark.parametrize("name", list(DATASETS))
def test_synthetic_shapes(name):
    spec = DATASETS[name]
    d = synthetic_dataset(name, n_train=7, n_test=3, seed=1)
    assert d.train.x.shape == (7, *spec.in_shape) and d.test.x.shape == (3, *spec.in_shape)
    assert int(d.train.y.max()) < spec.num_classes
    x, y = d.train.take(torch.arange(7))
    assert x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1 and y.shape == (7,)
    torch.testing.assert_close(x * 255, d.train.x.float())  # uint8 read as ToTensor does


def test_batches_cover_the_split_in_a_seeded_order():
    split = Split(torch.rand(103, 1, 4, 4), torch.arange(103))
    ys = torch.cat([y for _, y in iterate_batches(split, 10, generator=torch.Generator().manual_seed(5))])
    assert sorted(ys.tolist()) == list(range(103)) and ys.tolist() != list(range(103))
    again = torch.cat([y for _, y in iterate_batches(split, 10, generator=torch.Generator().manual_seed(5))])
    other = torch.cat([y for _, y in iterate_batches(split, 10, generator=torch.Generator().manual_seed(6))])
    assert torch.equal(ys, again) and not torch.equal(ys, other)
    sizes = [len(y) for _, y in iterate_batches(split, 10, generator=torch.Generator(), drop_last=True)]
    assert sizes == [10] * 10
    assert torch.equal(torch.cat([y for _, y in iterate_batches(split, 7)]), torch.arange(103))  # eval: in order
    with pytest.raises(ValueError):
        next(iterate_batches(split, 0))


def test_augmentation_is_a_seeded_crop_and_flip():
    spec = DataSpec(10, (3, 8, 8), crop=2, flip=True)
    x = torch.rand(64, 3, 8, 8)
    split = Split(x, torch.arange(64))

    def run(seed):
        return [b for b in iterate_batches(split, 64, generator=torch.Generator().manual_seed(seed), spec=spec)]

    (a, ya), (b, _), (c, _) = run(0)[0], run(0)[0], run(1)[0]
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (64, 3, 8, 8)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for img, i in zip(a, ya.tolist()):  # every output is some 8x8 window of the padded image, maybe mirrored
        windows = padded[i].unfold(1, 8, 1).unfold(2, 8, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3, 8, 8)
        plain = (windows == img).flatten(1).all(1).any()
        mirrored = (windows.flip(3) == img).flatten(1).all(1).any()
        assert bool(plain or mirrored)
        flips += int(bool(mirrored and not plain))
    assert 10 < flips < 54
    unaug = next(iterate_batches(split, 64, generator=torch.Generator().manual_seed(0)))[0]
    assert torch.equal(unaug.sort(0).values, x.sort(0).values)  # no spec: no augmentation


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="unknown dataset"):
        synthetic_dataset("imagenet")
    with pytest.raises(DataError, match="does not exist") as e:
        load_dataset("mnist", tmp_path / "nope")
    assert "\n" not in str(e.value)
    for name in ("mnist", "cifar10", "cifar100", "svhn"):
        with pytest.raises(DataError, match=f"cannot load {name}") as e:
            load_dataset(name, tmp_path)  # exists but empty
        assert "\n" not in str(e.value) and "--download" in str(e.value)


@pytest.mark.skipif(not have_mnist(), reason=f"real MNIST not found under {MNIST_ROOT}")
def test_real_mnist_offline():
    d = load_dataset("mnist", MNIST_ROOT, subset=256, test_subset=128)
    assert d.train.x.shape == (256, 1, 28, 28) and d.train.x.dtype == torch.uint8
    assert len(d.test) == 128 and set(d.train.y.unique().tolist()) == set(range(10))
    x, _ = next(iterate_batches(d.train, 32))
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9

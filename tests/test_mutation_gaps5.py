"""Gaps the fifth mutation audit found (the datasets and batching, the paper's models, the pruning baselines, the
data-parallel helpers): behaviour no other test pinned, each checked against a value worked out by hand or a
documented one.

Every test here failed under at least one mutant of the module it names (the README's "Mutation audit, part 5"
lists them) and passes on the real code.
"""

import numpy as np
import pytest
import torch
import torchvision.datasets
from torch import nn

from atmc_triton import distributed
from atmc_triton.baselines import pruned_size
from atmc_triton.data import DATASETS, DataError, Split, iterate_batches, load_dataset, synthetic_dataset
from atmc_triton.distributed import init_from_env
from atmc_triton.models import CaffeLeNet, CifarResNet, DigitsCNN, WideResNet

# --- atmc_triton/data.py ---------------------------------------------------------------------------------------------


def test_split_refuses_mismatched_shapes():
    """Any one wrong shape is refused: a row count that differs between ``x`` and ``y``, or ``x`` without its channel
    axis (``or`` -> ``and`` between the three checks lived: only all three wrong at once was refused)."""
    with pytest.raises(ValueError, match=r"Split needs x \[N, C, H, W\] and y \[N\], got \(3, 1, 2, 2\), \(2,\)"):
        Split(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got \(3, 2, 2\), \(3,\)"):
        Split(torch.zeros(3, 2, 2), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_training_crops_take_every_shift_of_the_four_pixel_padding(name):
    """CIFAR and SVHN train with the standard augmentation: zero padding of 4 and a random 32x32 crop, i.e. every
    shift -4..4 in each axis (9 positions; CIFAR's flips mirror the column shift). Read off all-ones images by their
    zero border (cifar100's ``crop=4`` -> 3 and ``2 * p + 1`` -> ``2 // p + 1`` lived: shifts -3..3, or -4 only)."""
    spec = DATASETS[name]
    split = Split(torch.ones(400, 3, 32, 32), torch.zeros(400, dtype=torch.long))
    x, _ = next(iterate_batches(split, 400, generator=torch.Generator().manual_seed(0), spec=spec))
    rows, cols = x[:, 0].any(2), x[:, 0].any(1)  # [B, 32]: which rows / columns still hold the image

    def shift(lit):  # (zeros after the image) - (zeros before it): the crop's offset minus the padding
        first = lit.float().argmax(1)
        last = 31 - lit.flip(1).float().argmax(1)
        return ((31 - last) - first).tolist()

    assert set(shift(rows)) == set(range(-4, 5))
    col_shifts = set(shift(cols))
    if spec.flip:
        assert {abs(s) for s in col_shifts} == set(range(0, 5))
    else:
        assert col_shifts == set(range(-4, 5))


def test_synthetic_labels_cover_every_class_from_zero():
    """Synthetic labels are classes ``0 .. num_classes - 1``, each of them drawn (the low end 0 -> -1 lived: a label
    of -1, which ``cross_entropy`` refuses)."""
    for name, n in (("digits", 500), ("cifar100", 3000)):
        y = synthetic_dataset(name, n_train=n, n_test=1, seed=0).train.y
        assert set(y.tolist()) == set(range(DATASETS[name].num_classes))


def test_synthetic_dataset_default_sizes():
    """The signature's defaults: 64 training and 32 test rows (``bench/mnist_study.py``'s synthetic fallback uses the
    same sizes; ``n_train=64`` -> 65 lived)."""
    d = synthetic_dataset("mnist")
    assert (len(d.train), len(d.test)) == (64, 32)


class _FakeCIFAR10:
    """torchvision's CIFAR10 as far as ``load_dataset`` reads it: ``data`` uint8 ``[N, H, W, C]``, ``targets``."""

    def __init__(self, root, train, download):
        n = 5 if train else 3
        self.data = np.zeros((n, 32, 32, 3), dtype=np.uint8)
        self.data[1, 2, 3, 0] = 200  # image 1, row 2, column 3, red
        self.data[1, 4, 5, 2] = 7  # image 1, row 4, column 5, blue
        self.targets = list(range(n))


def test_cifar_images_are_read_channels_first(tmp_path, monkeypatch):
    """torchvision holds CIFAR as ``[N, 32, 32, 3]``; the split is ``[N, 3, 32, 32]`` with pixel ``(h, w)`` of
    channel ``c`` where it was (the permutation ``(0, 3, 1, 2)`` -> ``(1, 3, 1, 2)`` lived: no test reads CIFAR)."""
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeCIFAR10)
    d = load_dataset("cifar10", tmp_path)
    assert (len(d.train), len(d.test)) == (5, 3)
    x = d.train.x
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8
    assert (int(x[1, 0, 2, 3]), int(x[1, 2, 4, 5]), int(x.sum())) == (200, 7, 207)
    assert d.train.y.tolist() == [0, 1, 2, 3, 4]


def test_a_load_error_keeps_its_first_line(tmp_path, monkeypatch):
    """``DataError`` is one line: the first line of the loader's error, its summary (``splitlines()[0]`` -> ``[-1]``
    lived: torchvision's own "not found" errors are one line)."""

    def broken(*args, **kwargs):
        raise RuntimeError("Dataset not found.\n  details on a second line")

    monkeypatch.setattr(torchvision.datasets, "MNIST", broken)
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    assert str(e.value) == (
        f"cannot load mnist from {tmp_path}: Dataset not found.; pass --download (needs internet) or --data-root DIR "
        "holding it"
    )


# --- atmc_triton/baselines.py ----------------------------------------------------------------------------------------


def test_pruned_size_of_a_one_output_layer():
    """A weight with a single output row (a one-logit head) is sized like any other (``w[0].numel()`` -> ``w[1]``
    lived: an ``IndexError`` for one row). ``[1, 20]`` with one nonzero: CSR 8 B row pointers + one int16 index +
    one float32 and the pad word = 18 B, against dense 20 floats + pad = 84 B."""
    lin = nn.Linear(20, 1, bias=False)
    nn.init.zeros_(lin.weight)
    lin.weight.data[0, 7] = 0.5
    assert pruned_size(nn.Sequential(lin)) == {"size_bits": 32, "dense_bits": 640, "packed_bytes": 18, "nnz": 1}


# --- atmc_triton/models.py -------------------------------------------------------------------------------------------


def test_model_classes_default_to_ten_classes():
    """Each model class on its own defaults to the 10 classes of its dataset (MNIST, CIFAR-10, SVHN, digits), as
    ``build_model``'s ``num_classes=10`` (``WideResNet``'s 10 -> 9 lived: the registry always passes it)."""
    with torch.no_grad():
        assert CaffeLeNet()(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
        assert CifarResNet([1, 1, 1, 1])(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
        assert WideResNet(depth=10, widen=1)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
        assert DigitsCNN()(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_wide_resnet_feature_maps_are_32_16_8():
    """WRN (Zagoruyko & Komodakis, Table 1): a stride-1 3x3 stem, then groups at 32x32, 16x16 and 8x8 on a 32x32
    input (the stem's stride 1 -> 2 lived: the pooled head hides the resolution)."""
    model = WideResNet(depth=10, widen=1).eval()
    sizes = []
    for m in (model.conv1, *model.blocks):
        m.register_forward_hook(lambda mod, inp, out: sizes.append(tuple(out.shape[1:])))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    assert sizes == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]


# --- atmc_triton/distributed.py --------------------------------------------------------------------------------------


def test_cuda_requested_without_a_gpu_is_refused(monkeypatch):
    """``device="cuda"`` on a machine without CUDA is a one-line ``ValueError`` (its ``raise`` -> ``pass`` lived:
    ``torch.device("cuda")`` was returned and the first tensor moved there failed far from the cause)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device cuda requested but no CUDA GPU is available$"):
        init_from_env("cuda")


def test_a_local_rank_past_the_nodes_gpus_is_refused(monkeypatch):
    """Under torchrun with CUDA, local rank 3 on a node of 2 GPUs is refused before any GPU is selected or any peer
    contacted (its ``raise`` -> ``pass`` lived: no test starts more processes than GPUs)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    touched = []
    monkeypatch.setattr(torch.cuda, "set_device", touched.append)
    monkeypatch.setattr(torch.distributed, "rendezvous", lambda *a, **k: touched.append("rendezvous"))
    with pytest.raises(ValueError, match=r"^local rank 3 has no GPU: this node has 2; start at most that many"):
        init_from_env("cuda")
    assert touched == []


def _two_ranks(monkeypatch, me):
    """This process as rank ``me`` of two (the collectives themselves are not called)."""
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: me)


def test_set_rank_rng_state_restores_a_cuda_generator_only_where_one_was_saved(monkeypatch):
    """A rank's CPU generator is always restored; its GPU generator only when its entry holds one (a rank that never
    initialized CUDA saved none) and CUDA is there (``and`` -> ``or`` and ``in`` -> ``not in`` lived: no CPU test
    sees a ``"cuda"`` entry or a GPU; either mutant looks up the missing key)."""
    _two_ranks(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    cpu0, cpu1 = torch.Generator().manual_seed(0).get_state(), torch.Generator().manual_seed(1).get_state()
    gpu1 = torch.tensor([7, 8], dtype=torch.uint8)
    try:
        assert distributed.set_rank_rng_state([{"torch": cpu0}, {"torch": cpu1}])  # rank 1's entry: no "cuda"
        assert torch.equal(torch.get_rng_state(), cpu1) and restored == []
        assert distributed.set_rank_rng_state([{"torch": cpu0}, {"torch": cpu1, "cuda": gpu1}])
        assert restored == [(gpu1, 0)]
        assert not distributed.set_rank_rng_state([{"torch": cpu0}])  # saved by one rank: ignored
    finally:
        torch.manual_seed(0)

"""Review of the data, model zoo, DDP helpers and pruning baselines (2026-12-02): each test failed before its fix."""

import pytest
import torch

from atmc_triton.data import DataBundle, DataSpec, Split


def test_split_refuses_float_images_outside_0_1_and_negative_labels():
    """Float images in 0..255 (or already normalized, or NaN) used to be accepted: clean training and evaluation
    ran on them silently and the first attack failed later, blaming its own inputs. Negative labels too."""
    y = torch.tensor([0, 1, 2, 1])
    for bad in (torch.rand(4, 1, 8, 8) * 255, torch.randn(4, 1, 8, 8), torch.full((4, 1, 8, 8), float("nan"))):
        with pytest.raises(ValueError, match=r"float x in \[0, 1\]"):
            Split(bad, y)
    with pytest.raises(ValueError, match="labels >= 0"):
        Split(torch.rand(4, 1, 8, 8), torch.tensor([-1, 0, 1, 2]))
    ok = Split(torch.rand(4, 1, 8, 8), y)  # in range: kept as given, labels int64
    assert ok.y.dtype == torch.long and len(Split(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))) == 0


def test_databundle_checks_its_splits_against_the_spec():
    """A label >= num_classes (an IndexError in the loss on CPU, a device-side assert on CUDA) or inputs not shaped
    like ``spec.in_shape`` (a matmul shape error deep in the model) are refused where the bundle is made."""
    spec = DataSpec(3, (1, 8, 8))
    good = Split(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="train label 7 is not below the spec's 3 classes"):
        DataBundle("toy", spec, Split(good.x, torch.tensor([0, 1, 2, 7])), good)
    with pytest.raises(ValueError, match=r"test inputs are \(1, 4, 4\), the spec says \(1, 8, 8\)"):
        DataBundle("toy", spec, good, Split(torch.rand(2, 1, 4, 4), torch.tensor([0, 1])))
    assert len(DataBundle("toy", spec, good, good).train) == 4


def test_build_model_checks_mean_std_against_the_default_in_shape():
    """Without ``in_shape`` the channel check was skipped: ``lenet`` (1 channel) with a 3-channel mean built and then
    failed in its first forward with a conv channel error (the 1-channel input broadcast to 3 channels), and
    ``resnet34`` with a 1-channel mean/std was accepted and silently applied one statistic to every channel."""
    from atmc_triton.models import build_model

    with pytest.raises(ValueError, match=r"mean needs one value per input channel \(1\), got 3"):
        build_model("lenet", mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"mean needs one value per input channel \(3\), got 1"):
        build_model("resnet34", mean=(0.5,), std=(0.25,))
    with pytest.raises(ValueError, match=r"std needs one value per input channel \(3\), got 1"):
        build_model("wrn16_8", 10, (3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25,))
    m = build_model("digits_cnn", mean=(0.5,), std=(0.25,))  # right count: built, and runs
    assert m(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_iterate_batches_and_with_subsets_check_their_sizes():
    """``batch_size=True`` used to yield batches of one row, ``4.0`` a bare ``TypeError`` from ``range``;
    ``with_subsets(b, 2.5, None)`` a ``TypeError`` from slicing and ``True`` a one-row subset."""
    from atmc_triton.data import DataError, iterate_batches, synthetic_dataset, with_subsets

    d = synthetic_dataset("cifar10", 10, 3)
    for bs in (True, 4.0, "4", 0):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            list(iterate_batches(d.train, bs))
    for v in (2.5, True, 0):
        with pytest.raises(DataError, match="with_subsets: subset must be None or an int >= 1"):
            with_subsets(d, v, None)
    assert [len(y) for _, y in iterate_batches(d.train, 4)] == [4, 4, 2]
    assert [len(y) for _, y in iterate_batches(d.train, 4, drop_last=True)] == [4, 4]
    assert [len(y) for _, y in iterate_batches(d.train, 16, drop_last=True)] == [10]  # (documented: one short batch)
    assert len(with_subsets(d, 5, 2).train) == 5


def test_shard_refuses_a_rank_outside_the_world():
    """``shard(t, 5, 4)`` gave row 5 alone, ``shard(t, -1, 4)`` row 7 (another rank's rows), and ``shard(t, 1)`` in
    one process every row, as if rank 1 of a world of one were rank 0: a caller's wrong rank went unnoticed."""
    from atmc_triton.distributed import shard

    t = torch.arange(8)
    for r, w in ((5, 4), (-1, 4), (1, None), (0, 0), (1, 4.0), (True, 2)):
        with pytest.raises(ValueError, match=r"shard: rank must be an int in \[0, world\)"):
            shard(t, r, w)
    assert shard(t, 1, 4).tolist() == [1, 5] and shard(t).tolist() == list(range(8)) and shard(t, 0, 1) is t
    shares = [shard(t[:7], r, 3).tolist() for r in range(3)]  # every row once, over the ranks
    assert sorted(sum(shares, [])) == list(range(7))


def test_nnz_for_ratio_matches_atmc_budget_convention():
    """``nnz_for_ratio`` took the float product ``ratio * dense_bits / 32``: at 0.018 of LeNet (13,776,000 bits) it
    gave 7,748 nonzeros where ATMC's budget (``ratio_bits``, the ratio as a decimal) allows 7,749, and 28 for
    ``Linear(100, 1)`` at 0.29 (0.29 x 3200 is 927.99... in floats): the AP / NAP baselines got one weight less than
    the ATMC points they are compared with."""
    from torch import nn

    from atmc_triton.baselines import nnz_for_ratio
    from atmc_triton.budget import dense_bits, ratio_bits
    from atmc_triton.models import build_model

    assert nnz_for_ratio(nn.Linear(100, 1, bias=False), 0.29) == 29
    lenet = build_model("lenet")
    assert nnz_for_ratio(lenet, 0.018) == 7749 == ratio_bits(0.018, dense_bits(lenet)) // 32
    assert nnz_for_ratio(lenet, 0.01) == 4305 and nnz_for_ratio(nn.Linear(100, 10), 0.01) == 10


def test_numpy_numbers_accepted_and_bools_refused_like_the_rest_of_the_package():
    """``build_model("lenet", np.int64(10))``, ``magnitude_masks(m, np.int64(3))`` and ``nnz_for_ratio(m,
    np.float32(0.5))`` were refused ("must be an int", got ``np.int64(10)``) while ``load_dataset`` takes numpy
    integers; ``magnitude_masks(m, True)`` kept one weight and ``nnz_for_ratio(m, True)`` read ratio 1."""
    import numpy as np
    from torch import nn

    from atmc_triton.baselines import magnitude_masks, nnz_for_ratio
    from atmc_triton.models import build_model

    m = build_model("lenet", np.int64(10))
    assert m(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    lin = nn.Linear(4, 2)
    assert int(magnitude_masks(nn.Sequential(lin), np.int64(3))["0"].sum()) == 3
    assert nnz_for_ratio(lin, np.float32(0.5)) == 4
    with pytest.raises(ValueError, match="nnz must be an int"):
        magnitude_masks(nn.Sequential(lin), True)
    with pytest.raises(ValueError, match="ratio must be a number"):
        nnz_for_ratio(lin, True)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        build_model("lenet", True)


@pytest.mark.parametrize(("rows", "refused"), [(63, True), (1, True), (64, False), (200, False)])
def test_fit_refuses_a_short_training_split_the_ranks_cannot_share(rows, refused, monkeypatch):
    """A training split smaller than the (global) batch size trains on one short batch per epoch; with 2 ranks
    and an odd row count the shares were unequal (DDP's average of the rank means is then not the one-process
    step), and with 1 row one rank's share was empty (a NaN loss). Faked world of 2: the check comes before any
    collective, so a refused split fails here; an accepted one trains (no process group: no collective runs)."""
    import atmc_triton as at
    import atmc_triton.train as tr
    from atmc_triton.data import load_dataset
    from atmc_triton.train import Protocol, Schedule

    data = load_dataset("digits", subset=rows, test_subset=8)
    model = at.build_model("digits_cnn", 10, (1, 8, 8))
    monkeypatch.setattr(tr, "world_size", lambda: 2)
    sched = Schedule(epochs=1, lr=0.01, batch_size=128)
    opt, proto = torch.optim.SGD(model.parameters(), lr=0.01), Protocol(eps=0.1, pgd_steps=1)
    call = lambda: at.fit(model, opt, data, proto, sched, stage="s", eval_size=0)  # noqa: E731
    if refused:
        with pytest.raises(ValueError, match="cannot share equally"):
            call()
    else:
        call()  # no process group: the collectives are skipped, so an accepted split trains to the end


@pytest.mark.parametrize("arch", ["tv:resnet18", "tv:squeezenet1_1"])
def test_adapted_tv_stem_keeps_the_family_init(arch):
    """A ``tv:`` model for 1-channel input gets a new stem conv: drawn like the 3-channel one it replaces (ResNet's
    kaiming fan-out std sqrt(2 / (64 * 49)) = 0.025, where PyTorch's default for a new conv gave 0.082), a zero
    bias kept zero (SqueezeNet's stem has one)."""
    from atmc_triton.models import external_model

    torch.manual_seed(0)
    ref = external_model(arch, 10, (3, 32, 32))
    torch.manual_seed(0)
    one = external_model(arch, 10, (1, 32, 32))
    old, new = (next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)) for net in (ref, one))
    assert new.in_channels == 1 and old.in_channels == 3
    assert float(new.weight.std()) == pytest.approx(float(old.weight.std()), rel=0.1)
    if arch == "tv:resnet18":
        assert float(new.weight.std()) == pytest.approx((2 / (64 * 49)) ** 0.5, rel=0.1)
    else:
        assert new.bias is not None and bool((new.bias == 0).all()) and bool((old.bias == 0).all())

"""Models: the paper's exact dense sizes, shapes, normalization inside, and ResNet34 through the ATMC pipeline."""

import pytest
import torch
from pipeline_helpers import one_thread
from torch import nn
from torchvision.models.resnet import BasicBlock

import atmc_triton as at
from atmc_triton.data import synthetic_dataset
from atmc_triton.models import MODELS, CaffeLeNet, Normalize, build_model
from atmc_triton.train import Experiment, Protocol, Schedule


@pytest.mark.parametrize(
    "name, classes, shape, weights, bits",
    [
        ("lenet", 10, (1, 28, 28), 430_500, 13_776_000),
        ("resnet34", 10, (3, 32, 32), 21_265_088, 680_482_816),
        ("resnet34", 100, (3, 32, 32), 21_311_168, 681_957_376),
        ("wrn16_8", 10, (3, 32, 32), 10_954_160, 350_533_120),
        ("digits_cnn", 10, (1, 8, 8), 151_072, 4_834_304),
    ],
)
def test_dense_sizes_match_the_paper(name, classes, shape, weights, bits):
    model = build_model(name, classes, shape)
    counted = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert counted == weights
    assert at.dense_bits(model) == bits == 32 * weights


def test_model_structure():
    lenet = build_model("lenet", 10, (1, 28, 28))
    kinds = [type(m).__name__ for m in lenet.modules() if not isinstance(m, (nn.Sequential, CaffeLeNet))]
    assert kinds == ["Identity", "Conv2d", "MaxPool2d", "Conv2d", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    assert [m.out_channels for m in lenet.modules() if isinstance(m, nn.Conv2d)] == [20, 50]
    assert [m.out_features for m in lenet.modules() if isinstance(m, nn.Linear)] == [500, 10]
    r = build_model("resnet34", 10)
    assert isinstance(r.layer1[0], BasicBlock) and [len(r.layer1), len(r.layer2), len(r.layer3), len(r.layer4)] == [
        3,
        4,
        6,
        3,
    ]
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1) and isinstance(r.maxpool, nn.Identity)
    w = build_model("wrn16_8", 10)
    assert len(w.blocks) == 6 and w.fc.in_features == 512
    shortcuts = [b.shortcut for b in w.blocks]
    assert [s is not None for s in shortcuts] == [True, False, True, False, True, False]


@pytest.mark.parametrize(
    "name, shape",
    [
        ("lenet", (1, 28, 28)),
        ("lenet", (3, 32, 32)),
        ("digits_cnn", (1, 8, 8)),
        ("digits_cnn", (1, 28, 28)),
        ("resnet34", (3, 32, 32)),
        ("wrn16_8", (3, 32, 32)),
    ],
)
def test_forward_shapes(name, shape):
    with one_thread(), torch.no_grad():
        model = build_model(name, 7, shape).eval()
        assert model(torch.rand(2, *shape)).shape == (2, 7)


def test_normalization_lives_inside_the_model():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    torch.manual_seed(0)
    plain = build_model("wrn16_8", 10, (3, 32, 32), None, None).eval()
    torch.manual_seed(0)
    normed = build_model("wrn16_8", 10, (3, 32, 32), mean, std).eval()
    assert isinstance(normed.normalize, Normalize) and "normalize.mean" in normed.state_dict()
    x = torch.rand(2, 3, 32, 32)
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain(xn), atol=1e-5, rtol=1e-5)
    assert at.dense_bits(normed) == at.dense_bits(plain)


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("lenet", 1)
    with pytest.raises(ValueError, match=r"in_shape must be \(C, H, W\)"):
        build_model("lenet", 10, (28, 28))
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model("lenet", 10, (1, 8, 8))
    with pytest.raises(ValueError, match="both mean and std"):
        build_model("lenet", 10, (1, 28, 28), mean=(0.1,))
    assert set(MODELS) == {"lenet", "resnet34", "wrn16_8", "digits_cnn"}


def test_resnet34_synthetic_cifar_batch_through_atmc():
    """A CIFAR-shaped batch: compress_, one ADMM step under PGD, finalize_, evaluation."""
    data = synthetic_dataset("cifar10", n_train=2, n_test=2, seed=0)
    exp = Experiment(
        "resnet34",
        data,
        Protocol(eps=4 / 255, pgd_steps=1, apgd_steps=1),
        out=None,
        device="cpu",
        eval_size=0,
        attacks=("pgd", "apgd"),
        use_autoattack=False,
    )
    dense = exp.new_model()
    assert isinstance(dense.normalize, Normalize)  # CIFAR channel statistics inside the model
    cfg = at.ATMCConfig(nnz=100_000, bits=8)  # an explicit k skips the (CPU-slow) ratio search over 45M entries
    model, _ = exp.compress(dense, cfg, Schedule(epochs=1, lr=0.01, batch_size=2))
    assert at.is_finalized(model)
    assert len(at.atmc_layers(model)) == 37  # 33 convs + 3 shortcut convs + fc
    res = exp.evaluate(model)
    assert res.n == 2 and res.nnz <= 100_000 and res.dense_bits == 680_482_816
    assert res.size_bits <= 0.01 * res.dense_bits  # 8-bit codes + codebooks: under 1% of the dense size
    assert 0.0 <= res.robust_acc <= res.pgd_acc <= res.clean_acc <= 1.0 and res.suite == "apgd-ce-1+apgd-t-1"
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in dense.parameters())  # dense untouched

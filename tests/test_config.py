import pytest
import torch
from helpers import lenet
from torch import nn

import atmc_triton as at


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"ratio": 0.01, "bits": 0}, "bits"),
        ({"ratio": 0.01, "bits": 9}, "bits"),
        ({"ratio": 0.01, "bits": 32}, "bits"),
        ({"ratio": 0.01, "bits": 4.0}, "bits"),
        ({"ratio": 0.01, "bits": True}, "bits"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({}, "budget"),
        ({"ratio": 0.1, "nnz": 10}, "budget"),
        ({"nnz": -1}, "nnz"),
        ({"nnz": 3.0}, "nnz"),
        ({"ratio": 0.1, "rho": -1.0}, "rho"),
        ({"ratio": 0.1, "rho_factor": 0.0}, "rho_factor"),
        ({"ratio": 0.1, "quant_interval": 0}, "quant_interval"),
        ({"ratio": 0.1, "rho_every": 0}, "rho_every"),
        ({"ratio": 0.1, "max_iter": -1}, "max_iter"),
        ({"ratio": 0.1, "tol": -1e-3}, "tol"),
        ({"ratio": 0.1, "quant_method": "kmeans"}, "quant_method"),
        ({"ratio": 0.1, "init": "random"}, "init"),
        ({"ratio": 0.1, "rank": 4}, "rank"),  # rank needs init="svd"
        ({"ratio": 0.1, "init": "svd", "rank": 0}, "rank"),
        ({"ratio": 0.1, "init": "svd", "rank": 1.5}, "rank"),
        ({"ratio": 0.1, "init": "svd", "rank": -0.5}, "rank"),
        ({"ratio": 0.1, "layer_bits": {"fc": 12}}, "layer_bits['fc']"),
        ({"ratio": 0.1, "bits": None, "layer_bits": {"fc": 4}}, "layer_bits"),
    ],
)
def test_bad_config_names_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        at.ATMCConfig(**kwargs)


def test_config_is_frozen_and_hashable():
    cfg = at.ATMCConfig(ratio=0.01, layer_bits={"0": 4, "fc*": 2})
    with pytest.raises(AttributeError):
        cfg.bits = 4
    assert hash(cfg) == hash(at.ATMCConfig(ratio=0.01, layer_bits={"0": 4, "fc*": 2}))
    assert cfg.bits_for("0") == 4 and cfg.bits_for("fc1") == 2 and cfg.bits_for("conv") == 8


def test_exact_layer_name_beats_pattern():
    cfg = at.ATMCConfig(ratio=0.01, layer_bits={"fc*": 2, "fc1": 6})
    assert cfg.bits_for("fc1") == 6 and cfg.bits_for("fc2") == 2


def test_rank_resolution():
    cfg = at.ATMCConfig(ratio=0.1, init="svd", rank=0.5)
    assert cfg.rank_for(10, 7) == 4  # round(0.5 * 7)
    assert at.ATMCConfig(ratio=0.1, init="svd", rank=0.01).rank_for(10, 7) == 1
    with pytest.raises(ValueError, match="rank=8 is larger than this layer allows"):
        at.ATMCConfig(ratio=0.1, init="svd", rank=8).rank_for(10, 7)


def test_rank_too_large_for_a_layer_names_it():
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 3))
    with pytest.raises(ValueError, match=r"compress_: 1: .*rank=5"):
        at.compress_(model, at.ATMCConfig(ratio=0.1, init="svd", rank=5))


def test_nothing_to_compress():
    with pytest.raises(ValueError, match="nothing to compress"):
        at.compress_(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), at.ATMCConfig(ratio=0.1))
    with pytest.raises(ValueError, match="nothing to compress"):
        at.compress_(lenet(), at.ATMCConfig(ratio=0.1), filter_fn=lambda m, n: False)
    with pytest.raises(ValueError, match="bare layer"):
        at.compress_(nn.Linear(3, 3), at.ATMCConfig(ratio=0.1))


def test_non_float_dtype():
    lin = nn.Linear(4, 4)
    lin.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(ValueError, match="non-float"):
        at.compress_(nn.Sequential(lin), at.ATMCConfig(ratio=0.1))
    with pytest.raises(ValueError, match="floating-point"):
        at.ATMCLinear.from_dense(lin, at.ATMCConfig(ratio=0.1))


def test_grouped_conv_groups_must_divide_channels():
    with pytest.raises(ValueError, match="groups=3"):
        at.ATMCConv2d(4, 4, 3, groups=3)
    with pytest.raises(ValueError, match="groups=0"):
        at.ATMCConv2d(4, 4, 3, groups=0)


def test_exclude_and_floor_are_validated():
    assert at.ATMCConfig(ratio=0.1, exclude="fc").exclude == ("fc",)
    assert at.ATMCConfig(ratio=0.1, exclude=["fc", "*.head"]).excluded("a.head") == "*.head"
    for bad in ([1], [""], 3):
        with pytest.raises(ValueError, match="exclude"):
            at.ATMCConfig(ratio=0.1, exclude=bad)
    with pytest.raises(ValueError, match="floor"):
        at.ATMCConfig(ratio=0.1, floor="some")


def test_already_compressed_and_bad_cfg_type():
    model = at.compress_(lenet(), at.ATMCConfig(ratio=0.1))
    with pytest.raises(ValueError, match="already"):
        at.compress_(model, at.ATMCConfig(ratio=0.1))
    with pytest.raises(ValueError, match="ATMCConfig"):
        at.compress_(lenet(), {"ratio": 0.1})


def test_ratio_too_small_for_bits():
    with pytest.raises(ValueError, match="leaves no nonzeros"):
        at.compress_(nn.Sequential(nn.Linear(8, 8)), at.ATMCConfig(ratio=1e-3, bits=8))

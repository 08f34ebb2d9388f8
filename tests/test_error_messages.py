"""Common user mistakes end in an error that says what is wrong and how to fix it (the docs-versus-code audit).

Each case here used to end in an error from deep inside torch, safetensors or numpy (or in no error at all)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import atmc_triton as at


def _net(hidden: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 3))


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small budget on a toy model
        model = at.pack_(at.finalize_(at.compress_(_net(), at.ATMCConfig(ratio=0.3, bits=4))))
    path = tmp_path_factory.mktemp("packed") / "model.safetensors"
    at.save_packed(model, path)
    return model, path


# --- attacks: inputs that are not tensors ---------------------------------------------------------

X, Y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
ATTACKS = [at.pgd, at.fgsm, at.fgsm_rs, at.n_fgsm, at.wrm, at.apgd_ce, at.apgd_dlr, at.robust_suite]


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.__name__)
@pytest.mark.parametrize(
    "args, what, got",
    [
        ((_net(), X.numpy(), Y), "inputs x", "ndarray"),  # was: AttributeError on numpy's dtype
        ((_net(), X, [0, 1, 2, 0]), "labels y", "list"),  # was: 'list' object has no attribute 'dim'
        ((_net(), X, np.array([0, 1, 2, 0])), "labels y", "ndarray"),
        ((X, _net(), Y), "inputs x", "Sequential"),  # model and x swapped; was: no attribute 'dtype'
    ],
    ids=["numpy-x", "list-y", "numpy-y", "swapped"],
)
def test_attacks_name_inputs_that_are_not_tensors(attack, args, what, got):
    with pytest.raises(ValueError, match=f"attack {what} must be a torch.Tensor, got {got} \\(torch.as_tensor"):
        attack(*args)


# --- packed layers: an input of the wrong width -----------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 25), (4, 32), (2, 4, 4, 4)])
def test_packed_linear_names_an_input_of_the_wrong_width(packed_file, shape):
    model, _ = packed_file
    layer = model[1]
    assert isinstance(layer, at.PackedLinear) and layer.in_features == 16
    # was: reshape's "shape '[-1, 16]' is invalid for input of size 100" or "shape '[4, 8]' is invalid ..."
    with pytest.raises(ValueError, match=rf"in_features=16, got shape \({', '.join(map(str, shape))}\)"):
        layer(torch.rand(*shape))
    assert layer(torch.rand(2, 3, 16)).shape == (2, 3, 8)  # leading dimensions still pass through


# --- load_packed: arguments swapped, a model of other sizes ------------------------------------------


def test_load_packed_with_its_arguments_swapped(packed_file):
    _, path = packed_file
    # was: TypeError "stat: path should be string, bytes, os.PathLike or integer, not Sequential"
    with pytest.raises(ValueError, match="load_packed\\(model, path\\): model must be an nn.Module and path a file"):
        at.load_packed(str(path), _net())


@pytest.mark.parametrize("on_meta", [False, True])
def test_load_packed_refuses_a_model_of_other_sizes_and_leaves_it_alone(packed_file, on_meta):
    model, path = packed_file
    other = _net(hidden=5)  # fc1 16 -> 5, fc2 5 -> 3: the file holds 16 -> 8 -> 3
    if on_meta:
        other = other.to("meta")
    # was: no error; both layers silently became the file's, a 16 -> 8 -> 3 model
    with pytest.raises(ValueError, match=r"layer '1' is Linear \{'in_features': 16, 'out_features': 5\} in the model"):
        at.load_packed(other, path)
    assert type(other[1]) is nn.Linear and other[1].out_features == 5 and type(other[3]) is nn.Linear  # untouched
    twin = at.load_packed(_net().to("meta"), path)  # the right sizes still load, with the same outputs
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(twin(x), model(x))


def test_load_packed_refuses_a_conv_of_other_sizes(tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = at.pack_(at.finalize_(at.compress_(nn.Sequential(nn.Conv2d(3, 4, 3)), at.ATMCConfig(ratio=0.5))))
    at.save_packed(conv, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"layer '0' is Conv2d .*'kernel_size': \[5, 5\]\} in the model"):
        at.load_packed(nn.Sequential(nn.Conv2d(3, 4, 5)), tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"layer '0' is Linear .* but a conv2d"):
        at.load_packed(nn.Sequential(nn.Linear(27, 4)), tmp_path / "c.safetensors")


# --- evaluate / fit / Experiment: a DataBundle for a Split, a name for a Protocol, a string of attacks ----------


@pytest.fixture(scope="module")
def digits():
    return at.load_dataset("digits", subset=32, test_subset=16)


def _digits_model() -> nn.Module:
    torch.manual_seed(0)
    return at.build_model("digits_cnn", 10, (1, 8, 8))


@pytest.mark.parametrize(
    "call, match",
    [
        # was: TypeError "object of type 'DataBundle' has no len()"
        (lambda d, p: at.evaluate(_digits_model(), d, p), r"evaluate: split must be a Split \(a DataBundle's .test"),
        # was: AttributeError "'str' object has no attribute 'eval_steps'"
        (lambda d, p: at.evaluate(_digits_model(), d.test, "digits"), "evaluate: protocol must be a Protocol"),
        # was: "unknown attack(s) ['d', 'g', 'p']"
        (lambda d, p: at.evaluate(_digits_model(), d.test, p, attacks="pgd"), r"e.g. \('pgd',\), got the string"),
        (lambda d, p: at.Experiment("digits_cnn", d, p, attacks="pgd"), r"Experiment: attacks must be a sequence"),
        # was: AttributeError "'str' object has no attribute 'spec'" (at the first use)
        (lambda d, p: at.Experiment("digits_cnn", "digits", p), "Experiment: data must be a DataBundle"),
        # was: AttributeError "'NoneType' object has no attribute 'batch_size'"
        (
            lambda d, p: at.fit(
                _digits_model(), torch.optim.SGD(_digits_model().parameters(), 0.1), d, p, None, stage="s"
            ),
            "fit: schedule must be a Schedule",
        ),
        (
            lambda d, p: at.fit(_digits_model(), _digits_model().parameters(), d, p, at.Schedule(1, 0.1), stage="s"),
            r"fit: optimizer must be an Optimizer \(e.g. atmc_triton.ADMM",
        ),
        (
            lambda d, p: at.fit(
                _digits_model(),
                torch.optim.SGD(_digits_model().parameters(), 0.1),
                d.train,
                p,
                at.Schedule(1, 0.1),
                stage="s",
            ),
            "fit: data must be a DataBundle",
        ),
    ],
    ids=[
        "evaluate-bundle",
        "evaluate-protocol-name",
        "evaluate-attacks-str",
        "experiment-attacks-str",
        "experiment-data-name",
        "fit-no-schedule",
        "fit-parameters-as-optimizer",
        "fit-split-as-data",
    ],
)
def test_training_entry_points_name_arguments_of_the_wrong_kind(digits, call, match):
    with pytest.raises(ValueError, match=match):
        call(digits, at.PROTOCOLS["digits"])

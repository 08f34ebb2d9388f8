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

import copy

import pytest
import torch
from helpers import lenet, small_cnn
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import atmc_triton as at


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@given(
    out=st.sampled_from([1, 7, 63, 130]),
    inn=st.sampled_from([1, 7, 63, 129]),
    bias=st.booleans(),
    batch=st.integers(1, 5),
)
def test_identity_init_linear_equals_dense(out, inn, bias, batch):
    torch.manual_seed(out * 1000 + inn)
    dense = nn.Linear(inn, out, bias=bias)
    model = at.compress_(nn.Sequential(copy.deepcopy(dense)), at.ATMCConfig(nnz=1, init="identity"))
    x = torch.randn(batch, inn)
    assert max_rel(model(x), dense(x)) <= 1e-5
    layer = model[0]
    assert layer.U.shape == (out, min(out, inn)) and layer.C.shape == (out, inn)
    assert layer.rank == min(out, inn)


@pytest.mark.parametrize(
    "cin, cout, k, stride, padding, dilation, bias, hw",
    [
        (3, 7, 3, 2, 1, 1, True, 11),
        (1, 63, 5, 1, 2, 1, False, 9),
        (7, 1, (3, 1), (2, 3), (0, 1), 1, True, 13),
        (5, 16, 3, 1, "same", 2, True, 10),
        (63, 7, 1, 1, 0, 1, True, 7),
    ],
)
def test_identity_init_conv_equals_dense(cin, cout, k, stride, padding, dilation, bias, hw):
    dense = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    model = at.compress_(nn.Sequential(copy.deepcopy(dense)), at.ATMCConfig(nnz=1, init="identity"))
    x = torch.randn(2, cin, hw, hw + 2)
    assert max_rel(model(x), dense(x)) <= 1e-5
    assert model[0].weight.shape == dense.weight.shape


@pytest.mark.parametrize("padding", [1, "same", (0, 2)])
@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_padding_modes(padding, mode):
    """Every padding nn.Conv2d takes with a non-zero mode ("same" was refused: compress_ failed on such a model)."""
    torch.manual_seed(0)
    dense = nn.Conv2d(3, 4, (3, 4), padding=padding, padding_mode=mode)
    model = at.compress_(nn.Sequential(copy.deepcopy(dense)), at.ATMCConfig(nnz=1))
    x = torch.randn(2, 3, 8, 9)
    assert model(x).shape == dense(x).shape and max_rel(model(x), dense(x)) <= 1e-5


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"padding_mode": "bogus"}, "padding_mode must be one of"),  # (these failed at the first forward)
        ({"padding": "foo"}, "Invalid padding string 'foo'"),
        ({"stride": 2, "padding": "same"}, "padding='same' is not supported for strided convolutions"),
        ({"bits": 2.5}, r"bits must be an int in 1..8 or None, got 2.5"),  # (then its own state_dict did not load)
        ({"bits": True}, r"bits must be an int in 1..8 or None, got True"),  # (was 1 bit)
        ({"identity": 7}, r"identity must be 0 \(none\), 1 or 2, got 7"),  # (was treated as none)
    ],
)
def test_layer_constructors_refuse_bad_settings(kw, match):
    conv_only = {k: v for k, v in kw.items() if k in ("padding_mode", "padding", "stride")}
    with pytest.raises(ValueError, match=match):
        at.ATMCConv2d(3, 4, 3, **kw)
    if not conv_only:
        with pytest.raises(ValueError, match=match):
            at.ATMCLinear(5, 3, **kw)


def test_from_dense_refuses_a_meta_layer():
    with pytest.raises(ValueError, match="on the meta device"):  # (was: "Tensor.item() cannot be called on meta")
        at.ATMCLinear.from_dense(nn.Linear(4, 3, device="meta"), at.ATMCConfig(ratio=0.5))


@pytest.mark.parametrize("rank", [None, 3, 0.5])
def test_svd_init(rank):
    dense = nn.Linear(9, 6)
    layer = at.ATMCLinear.from_dense(dense, at.ATMCConfig(ratio=0.5, init="svd", rank=rank))
    r = {None: 6, 3: 3, 0.5: 3}[rank]
    assert layer.U.shape == (6, r) and layer.V.shape == (r, 9)
    assert torch.count_nonzero(layer.C) == 0
    w = dense.weight.detach().double()
    P, S, Qh = torch.linalg.svd(w)
    best = (P[:, :r] * S[:r]) @ Qh[:r]
    assert torch.allclose(layer.weight.double(), best, atol=1e-5)


def test_identity_init_uses_the_reference_layout():
    ident = at.ATMCConfig(nnz=1, init="identity")
    wide = at.ATMCLinear.from_dense(nn.Linear(9, 4), ident)  # out < in: (U + I) V
    tall = at.ATMCLinear.from_dense(nn.Linear(4, 9), ident)  # in <= out: U (V + I)
    assert int(wide.identity) == 1 and torch.count_nonzero(wide.U) == 0
    assert int(tall.identity) == 2 and torch.count_nonzero(tall.V) == 0


def test_shared_module_stays_shared_and_state_dict_round_trips():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    cfg = at.ATMCConfig(ratio=0.3, bits=3)
    at.compress_(model, cfg)
    assert model[0] is model[2] and isinstance(model[0], at.ATMCLinear)
    twin = at.compress_(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6)), cfg)
    sd = model.state_dict()
    for key in ("0.U_z", "0.V_u", "0.C_mask", "0.codebook", "0.bits", "atmc_nnz_budget", "atmc_bits_budget"):
        assert key in sd
    twin.load_state_dict(sd, strict=False)
    x = torch.randn(3, 6)
    assert torch.equal(twin[0](x), model[0](x))


def test_loading_a_checkpoint_from_another_config_is_refused():
    a = at.compress_(nn.Sequential(nn.Linear(6, 6)), at.ATMCConfig(ratio=0.3, bits=3))
    b = at.compress_(nn.Sequential(nn.Linear(6, 6)), at.ATMCConfig(ratio=0.3, bits=4))
    with pytest.raises(ValueError, match="bits: checkpoint has 3"):
        b.load_state_dict(a.state_dict())


def test_weight_property_and_extra_repr():
    layer = at.ATMCConv2d.from_dense(nn.Conv2d(2, 3, 3), at.ATMCConfig(ratio=0.5, bits=5))
    assert layer.weight.shape == (3, 2, 3, 3) and layer.weight.requires_grad
    assert "bits=5" in repr(layer)


def test_torch_compile_fullgraph_training_forward_backward():
    cfg = at.ATMCConfig(ratio=0.2, bits=4)
    model = at.compress_(small_cnn(), cfg).train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    out_e, out_c = model(x), compiled(x)
    assert torch.allclose(out_c, out_e, atol=1e-5)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), n


def test_compiled_model_trains_with_admm():
    cfg = at.ATMCConfig(nnz=2000, bits=4, quant_interval=2)
    model = at.compress_(lenet(), cfg)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    opt = at.ADMM(compiled, cfg, lr=0.01)  # unwraps the compiled wrapper
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
    assert sum(int((p != 0).sum()) for _, l in at.atmc_layers(model) for _, p in l.factors()) == 2000


def test_cached_weights_context():
    model = at.compress_(small_cnn(), at.ATMCConfig(ratio=0.2, bits=4))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    ref = model(x)
    with at.cached_weights(model):
        out = model(x)
        (gx,) = torch.autograd.grad(out.sum(), x)
        assert all(layer._cached_w is not None for _, layer in at.atmc_layers(model))
    assert torch.equal(out, ref) and gx.abs().sum() > 0
    assert all(layer._cached_w is None for _, layer in at.atmc_layers(model))
    assert model(x).grad_fn is not None


def test_copies_made_inside_cached_weights_carry_no_cache():
    """A deepcopy (or pickle) taken inside the context must not keep its weight cache for good."""
    torch.manual_seed(0)
    model = at.compress_(small_cnn(), at.ATMCConfig(ratio=0.2, bits=4))
    x = torch.randn(2, 3, 8, 8)
    with at.cached_weights(model):
        twin = copy.deepcopy(model)
    assert all(layer._cached_w is None for _, layer in at.atmc_layers(twin))
    with torch.no_grad():
        for _, layer in at.atmc_layers(twin):
            layer.C.mul_(2.0)  # the copy's factors change after the context
    ref = copy.deepcopy(twin)  # made outside any context
    assert torch.equal(twin(x), ref(x)) and not torch.equal(twin(x), model(x))
    assert twin(x).grad_fn is not None

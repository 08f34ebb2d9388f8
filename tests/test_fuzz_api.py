"""Hypothesis fuzzing of the public API: ``ATMCConfig``, ``compress_`` -> ``ADMM`` -> ``finalize_`` ->
``pack_`` / ``unpack`` / ``save_packed`` / ``load_packed`` on randomly built small models, and misuse.

Every call must either work or raise a ``ValueError`` for a documented reason. The small tests after each
fuzz test are the minimal reproducers of what the fuzzing found (all fixed since).
"""

import copy
import dataclasses
import math

import pytest
import torch
from atmc_triton.kernels.packed_format import FMT_EMPTY
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import atmc_triton as at
from atmc_triton.api import unmatched_layer_bits


def examples(n: int) -> settings:
    """``n`` examples under the ``ci`` profile, scaled like the active profile's count (``thorough``: 12x)."""
    return settings(max_examples=max(1, n * settings.default.max_examples // settings.get_profile("ci").max_examples))


# --- ATMCConfig ---------------------------------------------------------------------------------------------------

FIELDS = {f.name: f.default for f in dataclasses.fields(at.ATMCConfig)}
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.sampled_from([2**31, 2**63, 10**30, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "8", "0.1", "svd", "identity", "random"]),
    st.lists(st.integers(), max_size=2),
    st.just(object()),
)
KEYS = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=True), st.just(b"0"))
BITS = st.one_of(st.none(), st.integers(1, 8))
CONFIG_KWARGS = st.fixed_dictionaries(
    {},
    optional={
        "ratio": st.floats(0, 1) | JUNK,
        "nnz": st.integers(0, 10**6) | JUNK,
        "bits": BITS | JUNK,
        "layer_bits": st.none()
        | st.dictionaries(st.sampled_from(["0", "fc*", "features.1"]) | KEYS, BITS | JUNK, max_size=2)
        | JUNK,
        "rho": st.floats(0, 10) | JUNK,
        "rho_factor": st.floats(0, 2) | JUNK,
        "rho_every": st.integers(1, 5) | JUNK,
        "quant_interval": st.integers(1, 20) | JUNK,
        "max_iter": st.integers(0, 30) | JUNK,
        "tol": st.floats(0, 1e-2) | JUNK,
        "init": st.sampled_from(["identity", "svd", "sparse"]) | JUNK,
        "rank": st.none() | st.integers(1, 16) | st.floats(0, 1) | JUNK,
    },
)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < math.inf and x == x


def _bits_ok(b) -> bool:
    return _int(b) and 1 <= b <= 8


def documented_valid(kw: dict) -> bool:
    """The rules ``ATMCConfig``'s docstring states, written independently of its code."""
    c = FIELDS | kw
    lb = c["layer_bits"] if isinstance(c["layer_bits"], dict) else {}
    rank = c["rank"]
    return all(
        (
            c["layer_bits"] is None or isinstance(c["layer_bits"], dict),
            (c["ratio"] is None) != (c["nnz"] is None),
            c["ratio"] is None or (_real(c["ratio"]) and 0 < c["ratio"] < 1),
            c["nnz"] is None or (_int(c["nnz"]) and c["nnz"] >= 0),
            c["bits"] is None or _bits_ok(c["bits"]),
            not lb or (c["bits"] is not None and all(isinstance(k, str) and _bits_ok(b) for k, b in lb.items())),
            _real(c["rho"]) and c["rho"] >= 0,
            _real(c["rho_factor"]) and c["rho_factor"] > 0,
            _int(c["rho_every"]) and c["rho_every"] >= 1,
            _int(c["quant_interval"]) and c["quant_interval"] >= 1,
            _int(c["max_iter"]) and c["max_iter"] >= 0,
            _real(c["tol"]) and c["tol"] >= 0,
            c["init"] in ("identity", "svd", "sparse"),
            rank is None or (c["init"] == "svd" and (rank >= 1 if _int(rank) else _real(rank) and 0 < rank <= 1)),
        )
    )


@examples(400)
@given(kw=CONFIG_KWARGS)
def test_config_accepts_exactly_the_documented_values(kw):
    try:
        cfg = at.ATMCConfig(**kw)
    except ValueError as e:
        assert not documented_valid(kw), f"valid config refused: {e}"
        assert "ATMCConfig" in str(e)
        return
    assert documented_valid(kw)
    for name, default in FIELDS.items():
        want = kw.get(name, default)
        if name == "layer_bits":
            want = tuple(want.items()) or None if want else None
        assert getattr(cfg, name) == want, name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, name, want)
    assert hash(cfg) == hash(at.ATMCConfig(**kw)) and cfg == at.ATMCConfig(**kw)
    assert cfg.quantized == (cfg.bits is not None)


@pytest.mark.parametrize("field", ["ratio", "rho", "rho_factor", "tol"])
def test_config_rejects_ints_past_float_range(field):
    kw = {"ratio": 0.1} | {field: 10**400}
    with pytest.raises(ValueError, match=field):
        at.ATMCConfig(**kw)


@pytest.mark.parametrize("layer_bits", [5, True, 1.5, [1, 2], object()])
def test_config_rejects_a_non_mapping_layer_bits(layer_bits):
    with pytest.raises(ValueError, match="layer_bits"):
        at.ATMCConfig(ratio=0.1, layer_bits=layer_bits)


# --- random models through the whole pipeline ---------------------------------------------------------------------


@st.composite
def small_models(draw):
    """``(net, input shape, shared)``: Conv2d[/BatchNorm2d]/ReLU blocks, Flatten, Linear[/BatchNorm1d]/ReLU blocks,
    optionally nested in sub-Sequentials and with one Linear used twice."""
    c = draw(st.integers(1, 3))
    h, w = draw(st.integers(3, 6)), draw(st.integers(3, 6))
    shape, convs = (c, h, w), []
    for _ in range(draw(st.integers(0, 2))):
        out, k, s = draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
        p = max(draw(st.integers(0, 1)), math.ceil((k - min(h, w)) / 2))  # keep the output at least 1x1
        convs.append(nn.Conv2d(c, out, k, stride=s, padding=p, bias=draw(st.booleans())))
        if draw(st.booleans()):
            convs.append(nn.BatchNorm2d(out))
        convs.append(nn.ReLU())
        c, h, w = out, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    feat, lins = c * h * w, [nn.Flatten()]
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 8))
        lins.append(nn.Linear(feat, out, bias=draw(st.booleans())))
        if draw(st.booleans()):
            lins.append(nn.BatchNorm1d(out))
        lins.append(nn.ReLU())
        feat = out
    shared = draw(st.booleans())
    if shared:
        twice = nn.Linear(feat, feat)
        lins += [twice, nn.ReLU(), twice]
    if draw(st.booleans()):
        return nn.Sequential(nn.Sequential(*convs), nn.Sequential(*lins)), shape, shared
    return nn.Sequential(*convs, *lins), shape, shared


@st.composite
def configs(draw):
    budget = draw(
        st.one_of(
            st.builds(dict, ratio=st.sampled_from([0.3, 0.02, 0.1, 0.7, 0.99, 1e-3])),
            st.builds(dict, nnz=st.integers(0, 2000)),
        )
    )
    bits = draw(BITS)
    init = draw(st.sampled_from(["identity", "svd", "sparse"]))
    rank = draw(st.none() | st.integers(1, 4) | st.floats(0.05, 1.0)) if init == "svd" else None
    layer_bits = draw(st.none() | st.dictionaries(st.sampled_from(["0", "1.*", "*"]), st.integers(1, 8), max_size=2))
    return at.ATMCConfig(
        **budget,
        bits=bits,
        init=init,
        rank=rank,
        layer_bits=layer_bits if bits else None,
        quant_interval=draw(st.integers(1, 2)),
        rho=draw(st.sampled_from([0.0, 0.1, 1.0])),
    )


def factor_nnz(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for _, layer in at.atmc_layers(model) for _, p in layer.factors())


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to fp32 rounding: max error <= 1e-5 x the output's scale (at least 1)."""
    got, want = got.detach().double(), want.detach().double()
    return bool((got - want).abs().max() <= 1e-5 * want.abs().max().clamp_min(1.0))


@examples(60)
@given(
    arch=small_models(),
    cfg=configs(),
    exclude=st.sets(st.integers(0, 6), max_size=2),
    steps=st.integers(0, 2),
    mse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_model_compress_train_finalize_pack_round_trip(arch, cfg, exclude, steps, mse, seed, tmp_path_factory):
    torch.manual_seed(seed)
    net, shape, shared = arch
    skeleton = copy.deepcopy(net)  # the dense architecture load_packed fills in
    targets = [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    keep = {n for i, n in enumerate(targets) if i not in exclude}
    try:
        at.compress_(net, cfg, filter_fn=lambda m, n: n in keep)
    except ValueError as e:  # each refusal must have its documented cause
        msg = str(e)
        if "nothing to compress" in msg:
            assert not keep
        elif "larger than this layer allows" in msg:
            assert isinstance(cfg.rank, int)
        elif "matches no layer being compressed" in msg:
            assert unmatched_layer_bits(cfg, sorted(keep))
        else:
            assert cfg.ratio is not None and "leaves no nonzeros" in msg, msg
        event(f"compress_ refused: {msg[:40]}")
        return
    assert {n for n, _ in at.atmc_layers(net)} == keep
    k = int(net.atmc_nnz_budget)
    x = torch.randn(4, *shape)
    opt = at.ADMM(net, cfg, lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        out = net(x)
        (nn.functional.mse_loss(out, torch.randn_like(out)) if mse else out.sum()).backward()
        opt.step()
        assert factor_nnz(net) <= k
    at.finalize_(net).eval()
    want = net(x)

    assert at.is_finalized(net) and factor_nnz(net) <= k
    if cfg.ratio is not None:
        assert at.model_size_bits(net) <= cfg.ratio * at.dense_bits(net)
    for _, layer in at.atmc_layers(net):
        if layer.nbits is not None:
            assert all(torch.unique(p).numel() <= 2**layer.nbits + 1 for _, p in layer.factors())

    packed = at.pack_(copy.deepcopy(net))
    assert not at.atmc_layers(packed) and len(at.packed_layers(packed)) == len(at.atmc_layers(net))
    assert close(packed(x), want)
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    at.save_packed(packed, path)
    loaded = at.load_packed(skeleton, path).eval()
    assert torch.equal(loaded(x), packed(x))
    assert torch.equal(at.unpack(packed)(x), want)  # unpack is exact
    assert at.is_finalized(packed)
    event(f"round trip done, shared={shared}, quantized={cfg.quantized}")


@examples(20)
@given(
    conv=st.booleans(),
    dims=st.sampled_from([(1, 1), (1, 4), (4, 1), (3, 3)]),
    bits=st.sampled_from([None, 1, 8]),
    everything=st.booleans(),
    bias=st.booleans(),
)
def test_pack_edge_cases_keep_nothing_or_everything(conv, dims, bits, everything, bias):
    torch.manual_seed(7)
    out, inn = dims
    dense = nn.Conv2d(inn, out, 1, bias=bias) if conv else nn.Linear(inn, out, bias=bias)
    x = torch.randn(2, inn, 2, 3) if conv else torch.randn(2, inn)
    model = at.compress_(nn.Sequential(copy.deepcopy(dense)), at.ATMCConfig(nnz=10**9 if everything else 0, bits=bits))
    total = sum(p.numel() for _, p in model[0].factors())
    assert int(model.atmc_nnz_budget) == (total if everything else 0)
    at.finalize_(model)
    want = model(x)
    packed = at.pack_(copy.deepcopy(model))
    assert close(packed(x), want)
    if not everything:
        assert at.packed_nbytes(packed) == 0 and all(fmt == FMT_EMPTY for fmt in packed[0].fmts.values())
        bias_only = dense.bias.view(-1, *[1] * (x.dim() - 2)) if bias else 0
        assert torch.equal(want, torch.zeros_like(want) + bias_only)
    elif bits is None:  # nothing cut, nothing quantized: the dense layer exactly (up to rounding)
        assert close(want, dense(x))
    else:
        assert all(torch.unique(p).numel() <= 2**bits + 1 for _, p in model[0].factors())
    assert torch.equal(at.unpack(packed)(x), want)


# --- misuse -------------------------------------------------------------------------------------------------------

CALLS = ("compress_", "admm", "finalize_", "pack_", "unpack", "save_packed")
# the stage each call leads to from each stage, or None: a ValueError
NEXT = {
    "compress_": {"dense": "compressed"},
    "admm": {"compressed": "compressed", "finalized": "compressed"},  # trained factors: finalize_ again
    "finalize_": {"compressed": "finalized", "finalized": "finalized"},
    "pack_": {"finalized": "packed", "packed": "packed"},
    "unpack": {"packed": "finalized"},
    "save_packed": {"packed": "packed"},
}


@st.composite
def call_sequences(draw):
    """The happy path (each step usually kept) with random calls, mostly misuse, slipped in between."""
    calls = []
    for step in ("compress_", "admm", "finalize_", "pack_", "unpack", "pack_", "save_packed"):
        calls += draw(st.lists(st.sampled_from(CALLS), max_size=2))
        if draw(st.integers(0, 7)):
            calls.append(step)
    return calls


@examples(25)
@given(calls=call_sequences(), bits=BITS, seed=st.integers(0, 99))
def test_api_calls_in_any_order_work_or_raise_value_error(calls, bits, seed, tmp_path_factory):
    torch.manual_seed(seed)
    cfg = at.ATMCConfig(ratio=0.3, bits=bits, quant_interval=1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    x = torch.randn(2, 2, 4, 4)
    path = tmp_path_factory.mktemp("calls") / "m.safetensors"
    stage = "dense"
    for call in calls:
        want = NEXT[call].get(stage)
        before = model(x)
        try:
            if call == "compress_":
                assert at.compress_(model, cfg) is model
            elif call == "admm":
                opt = at.ADMM(model, cfg, lr=0.05)
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
            elif call == "save_packed":
                assert at.save_packed(model, path) > 0
            else:
                assert getattr(at, call)(model) is model
        except ValueError as e:
            assert want is None, f"{call} on a {stage} model: {e}"
            assert torch.equal(model(x), before), "a refused call changed the model"
            continue
        assert want is not None, f"{call} on a {stage} model did not raise"
        if call != "admm" and (call, stage) != ("finalize_", "compressed"):
            assert close(model(x), before), f"{call} on a {stage} model changed its output"
        stage = want
        assert at.is_finalized(model) == (stage == "finalized")
        assert bool(at.packed_layers(model)) == (stage == "packed")
    if stage == "packed":
        at.save_packed(model, path)
        assert torch.equal(
            at.load_packed(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4)), path)(x),
            model(x),
        )


@given(cfg=st.sampled_from([None, {"ratio": 0.1}, 0.1, "ratio=0.1"]))
def test_compress_and_admm_refuse_a_non_config(cfg):
    with pytest.raises(ValueError, match="ATMCConfig"):
        at.compress_(nn.Sequential(nn.Linear(3, 3)), cfg)
    with pytest.raises(ValueError, match="ATMCConfig"):
        at.ADMM(at.compress_(nn.Sequential(nn.Linear(3, 3)), at.ATMCConfig(nnz=3)), cfg)


@given(model=st.sampled_from([nn.Sequential(nn.ReLU()), nn.Sequential(nn.BatchNorm1d(3), nn.Flatten()), nn.Identity()]))
def test_models_without_linear_or_conv_are_refused_everywhere(model):
    cfg = at.ATMCConfig(ratio=0.1)
    calls = [
        (lambda: at.compress_(model, cfg), "nothing to compress"),
        (lambda: at.ADMM(model, cfg), "no ATMC"),
        (lambda: at.finalize_(model), "no ATMC"),
        (lambda: at.pack_(model), "no ATMC"),
        (lambda: at.unpack(model), "no packed"),
        (lambda: at.save_packed(model, "unused"), "no packed"),
    ]
    for fn, needle in calls:
        with pytest.raises(ValueError, match=needle):
            fn()


@pytest.mark.parametrize("fn", ["compress_", "ADMM", "finalize_", "pack_", "unpack"])
@pytest.mark.parametrize("obj", [None, "model", [nn.Linear(2, 2)]])
def test_non_module_models_raise_value_error(fn, obj):
    args = (obj, at.ATMCConfig(ratio=0.1)) if fn in ("compress_", "ADMM") else (obj,)
    with pytest.raises(ValueError, match="Module"):
        getattr(at, fn)(*args)


def test_save_packed_with_a_shared_module(tmp_path):
    lin = nn.Linear(4, 4)
    model = at.pack_(at.finalize_(at.compress_(nn.Sequential(lin, nn.ReLU(), lin), at.ATMCConfig(ratio=0.5, bits=2))))
    at.save_packed(model, tmp_path / "m.safetensors")
    twin = nn.Linear(4, 4)
    loaded = at.load_packed(nn.Sequential(twin, nn.ReLU(), twin), tmp_path / "m.safetensors")
    x = torch.randn(3, 4)
    assert loaded[0] is loaded[2] and torch.equal(loaded(x), model(x))


def test_training_after_finalize_is_not_packed_as_finalized():
    torch.manual_seed(0)
    cfg = at.ATMCConfig(ratio=0.5, bits=2, quant_interval=100)
    model = at.finalize_(at.compress_(nn.Sequential(nn.Linear(6, 5)), cfg))
    opt = at.ADMM(model, cfg, lr=0.1)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="finalize"):
        at.pack_(model)

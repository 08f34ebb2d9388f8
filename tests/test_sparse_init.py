"""``ATMCConfig(init="sparse")``: W = C only (rank 0, empty U and V) through every path: layers, ADMM (Triton
interpreter and reference), floors, the quantizer's empty segments, finalize_, budgets and bit allocation,
pack_ / unpack and the packed kernels, state dicts, export, the CLI and the MNIST study."""

import copy
import dataclasses
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from atmc_triton.kernels import lloyd_quantize, lloyd_quantize_ref
from atmc_triton.kernels.lowrank_gemm import atmc_linear_ref
from helpers import factor_nnz, lenet, small_cnn, train_steps
from hypothesis import event, example, given
from hypothesis import strategies as st
from pipeline_helpers import one_thread
from torch import nn

import atmc_triton as at
from atmc_triton import packed as pk
from atmc_triton.bitalloc import allocation_report
from atmc_triton.budget import floor_indices, nnz_budget
from atmc_triton.layers import IDENTITY_NONE, IDENTITY_V

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="interpreter test: needs TRITON_INTERPRET=1 (no GPU)")
SPARSE = at.ATMCConfig(ratio=0.3, bits=3, init="sparse", quant_interval=2)


def sparse_model(model: nn.Module, cfg: at.ATMCConfig = SPARSE) -> nn.Module:
    return at.compress_(model, cfg)


# --- config and layers -----------------------------------------------------------------------------------------------


def test_config_rank_zero_and_clear_errors():
    cfg = at.ATMCConfig(ratio=0.1, init="sparse")
    assert cfg.rank_for(7, 1000) == cfg.rank_for(1, 1) == 0
    with pytest.raises(ValueError, match="rank applies to init='svd' only; init='sparse' has no low-rank part"):
        at.ATMCConfig(ratio=0.1, init="sparse", rank=3)
    with pytest.raises(ValueError, match="init must be one of"):
        at.ATMCConfig(ratio=0.1, init="lean")
    with pytest.raises(ValueError, match="identity=2 needs full rank"):  # rank 0 cannot carry an identity term
        at.ATMCLinear(4, 5, rank=0, identity=IDENTITY_V)
    with pytest.raises(ValueError, match="rank must be an int in 0..4"):
        at.ATMCLinear(4, 5, rank=-1)


@given(out=st.sampled_from([1, 7, 63, 130]), inn=st.sampled_from([1, 7, 63, 129]), bias=st.booleans())
@example(out=1, inn=1, bias=False)
@example(out=1000, inn=1, bias=True)
@example(out=7, inn=1031, bias=True)
def test_linear_equals_dense_bit_for_bit(out, inn, bias):
    torch.manual_seed(out * 1000 + inn)
    dense = nn.Linear(inn, out, bias=bias)
    layer = at.compress_(nn.Sequential(copy.deepcopy(dense)), at.ATMCConfig(nnz=1, init="sparse"))[0]
    event(f"max(out, in) >= 1000: {max(out, inn) >= 1000}")
    assert layer.U.shape == (out, 0) and layer.V.shape == (0, inn) and layer.rank == 0
    assert layer.U_z.shape == layer.U_u.shape == layer.U_mask.shape == (out, 0)
    assert int(layer.identity) == IDENTITY_NONE and torch.equal(layer.C, dense.weight)
    x = torch.randn(3, inn)
    assert torch.equal(layer(x), dense(x))  # W = C is the dense weight itself: no rounding anywhere
    assert "rank=0" in repr(layer)


@pytest.mark.parametrize(
    "kw",
    [
        dict(in_channels=3, out_channels=7, kernel_size=3, stride=2, padding=1),
        dict(in_channels=1, out_channels=63, kernel_size=5, padding=2, bias=False),
        dict(in_channels=6, out_channels=4, kernel_size=3, padding=1, groups=2),
        dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),  # depthwise
        dict(in_channels=3, out_channels=5, kernel_size=3, padding=1, padding_mode="reflect"),
    ],
)
def test_conv_equals_dense_bit_for_bit(kw):
    torch.manual_seed(0)
    dense = nn.Conv2d(**kw)
    layer = at.compress_(nn.Sequential(copy.deepcopy(dense)), at.ATMCConfig(nnz=1, init="sparse"))[0]
    x = torch.randn(2, kw["in_channels"], 9, 11)
    assert torch.equal(layer(x), dense(x)) and layer.U.numel() == layer.V.numel() == 0
    assert "rank=0" in repr(layer)


def test_attention_projections_are_sparse_and_equal():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = at.compress_(nn.Sequential(copy.deepcopy(mha)), at.ATMCConfig(ratio=0.5, init="sparse"))
    layer = model[0]
    assert layer.in_proj.rank == layer.out_proj.rank == 0
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x, x, x)[0], mha(x, x, x)[0], rtol=0, atol=1e-6)


def test_gradients_equal_a_masked_dense_layer():
    """A finalized (pruned + quantized) sparse layer is a plain dense layer holding ``C``: same outputs, input
    and weight gradients, bit for bit."""
    torch.manual_seed(0)
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    model = at.finalize_(sparse_model(lenet(), at.ATMCConfig(ratio=0.05, bits=4, init="sparse")))
    plain = at.export_dense(model)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.cross_entropy(model(xa), y).backward()
    F.cross_entropy(plain(xb), y).backward()
    assert torch.equal(xa.grad, xb.grad)
    for (_, layer), dense in zip(at.atmc_layers(model), [m for m in plain.modules() if hasattr(m, "weight")]):
        assert torch.equal(layer.C.grad.view_as(dense.weight), dense.weight.grad)
        assert torch.equal(layer.C_mask, layer.C != 0) and 0 < int(layer.C_mask.sum()) < layer.C.numel()
        assert layer.U.grad.shape == layer.U.shape and layer.V.grad.shape == layer.V.shape  # empty, in the graph


# --- the optimizer ----------------------------------------------------------------------------------------------------


def test_training_state_is_the_dense_weights_only():
    """The memory the issue asked about: factor entries = dense weights, and no store rebuild per step."""
    dense = lenet()
    ident = at.compress_(copy.deepcopy(dense), at.ATMCConfig(ratio=0.01, init="identity"), return_report=True)
    sparse = at.compress_(copy.deepcopy(dense), at.ATMCConfig(ratio=0.01, init="sparse"), return_report=True)
    assert sparse.factor_entries == sparse.compressed_weights == 430_500
    assert ident.factor_entries == 2 * 430_500 + 20 * 20 + 50 * 50 + 500 * 500 + 10 * 10
    assert sparse.nnz_budget == ident.nnz_budget  # the same magnitudes compete for the same budget
    model = sparse_model(small_cnn())
    opt = at.ADMM(model, SPARSE, lr=0.05)
    train_steps(model, opt, 1, torch.rand(4, 3, 8, 8), torch.arange(4))
    assert opt.store.n == sum(layer.C.numel() for _, layer in at.atmc_layers(model))
    assert not opt.store.sync()  # zero-size U / V views must not look replaced (data_ptr() is 0)


@interp
@pytest.mark.parametrize("floor", ["rows", "last", "none"])
def test_admm_on_triton_interpreter_matches_reference(monkeypatch, floor):
    from atmc_triton.kernels.admm import admm_dual_update_triton, admm_step_triton

    from atmc_triton import optim

    cfg = dataclasses.replace(SPARSE, floor=floor)
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 5
    torch.manual_seed(0)
    ref = sparse_model(small_cnn(), cfg)
    ref_opt = at.ADMM(ref, cfg, lr=0.05, backend="reference")
    train_steps(ref, ref_opt, 4, x, y)  # two quantizer steps
    monkeypatch.setattr(optim, "admm_step", admm_step_triton)
    monkeypatch.setattr(optim, "admm_dual_update", admm_dual_update_triton)
    torch.manual_seed(0)
    model = sparse_model(small_cnn(), cfg)
    opt = at.ADMM(model, cfg, lr=0.05)
    assert opt._step_op is admm_step_triton
    train_steps(model, opt, 4, x, y)
    assert factor_nnz(model) == opt.param_groups[0]["k"]
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    fl = floor_indices([m for _, m in at.atmc_layers(model)], at.api.model_floor(model))
    assert bool((opt.store.w[fl] != 0).all()) and (fl.numel() > 0) == (floor != "none")
    offs = opt.store.offsets  # every floor entry sits in a C segment
    c_ranges = [(offs[s], offs[s + 1]) for s in range(2, len(offs) - 1, 3)]
    assert all(any(a <= int(i) < b for a, b in c_ranges) for i in fl)


DDP_SCRIPT = r"""
import tempfile, torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
import atmc_triton as at
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
torch.manual_seed(0)
cfg = at.ATMCConfig(ratio=0.3, bits=3, init="sparse", quant_interval=2)
model = at.compress_(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), cfg)
opt = at.ADMM(model, cfg)
net = DDP(model)
for _ in range(4):  # the second forward fails if a parameter (an empty U or V) took no part in the first
    opt.zero_grad()
    net(torch.randn(4, 8)).sum().backward()
    opt.step()
dist.destroy_process_group()
print("DDP OK", opt.steps)
"""


def test_ddp_trains_a_sparse_model(tmp_path):
    """DDP requires every parameter to receive a gradient: the empty U and V must stay in the graph."""
    from procwatch import run_watched

    log = tmp_path / "ddp.log"
    run_watched([sys.executable, "-c", DDP_SCRIPT], log, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "DDP OK 4" in log.read_text()


@pytest.mark.parametrize("fn", [lloyd_quantize_ref, lloyd_quantize])
def test_quantizer_segments_of_length_zero(fn):
    torch.manual_seed(0)
    c1, c2 = torch.randn(40), torch.randn(9)
    flat = torch.cat([c1, c2])
    offsets = torch.tensor([0, 0, 0, 40, 40, 40, 49])  # layer 1: U, V empty, C; layer 2: U, V empty, C
    bits = torch.tensor([3, 3, 3, 2, 2, 2], dtype=torch.int32)
    book, _, q, err = fn(flat, offsets, bits, 20, 1e-5, "fast")
    for seg, (vals, b) in zip((2, 5), ((c1, 3), (c2, 2))):
        one = lloyd_quantize_ref(vals, torch.tensor([0, vals.numel()]), torch.tensor([b], dtype=torch.int32), 20, 1e-5)
        assert torch.equal(book[seg], one[0][0]) and float(err[seg]) == float(one[3][0])
    assert not book[[0, 1, 3, 4]].any() and not err[[0, 1, 3, 4]].any()
    assert torch.isfinite(q).all() and int(torch.unique(q[:40]).numel()) <= 2**3 + 1


@pytest.mark.parametrize("ratio, bits", [(0.05, 4), (0.02, None)])
def test_finalize_keeps_the_budget_and_everything_in_c(ratio, bits):
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    cfg = at.ATMCConfig(ratio=ratio, bits=bits, init="sparse", quant_interval=2)
    model = sparse_model(lenet(), cfg)
    train_steps(model, at.ADMM(model, cfg, lr=0.05), 3, x, y)
    at.finalize_(model)
    rep = at.size_report(model)
    assert rep.ratio <= ratio and rep.nnz <= int(model.atmc_nnz_budget)
    assert all(f.nnz == 0 and 0 in f.shape for f in rep.factors if f.factor in "UV")
    assert sum(f.nnz for f in rep.factors if f.factor == "C") == rep.nnz > 0
    for _, layer in at.atmc_layers(model):
        assert torch.equal(layer.C_z, layer.C) and int(torch.unique(layer.C[layer.C != 0]).numel()) <= 2 ** (bits or 24)


def test_bit_allocation_sees_the_same_problem_as_identity():
    """Under init identity the weights sit in one factor and the rest is zero, so the bit allocation (and the
    budget) of the sparse init must be the same."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 36, 63), nn.ReLU(), nn.Linear(63, 7))
    cfg = at.ATMCConfig(ratio=0.02, bits=8)
    a = allocation_report(dense, cfg, (1, 3, 8))
    b = allocation_report(dense, dataclasses.replace(cfg, init="sparse"), (1, 3, 8))
    assert a.bits == b.bits and a.k == b.k and a.distortion == pytest.approx(b.distortion, rel=1e-9)
    layers = at.atmc_layers(at.compress_(copy.deepcopy(dense), dataclasses.replace(cfg, init="sparse")))
    assert nnz_budget(layers, dataclasses.replace(cfg, init="sparse"), at.dense_bits(dense))[0] == a.uniform[8][0]


# --- packed inference, state dicts, files -----------------------------------------------------------------------------


def _finalized_sparse(model, ratio=0.2, bits=4, x=None, y=None):
    cfg = at.ATMCConfig(ratio=ratio, bits=bits, init="sparse", quant_interval=1)
    sparse_model(model, cfg)
    if x is not None:
        train_steps(model, at.ADMM(model, cfg, lr=0.05), 2, x, y)
    return at.finalize_(model).eval()


def test_pack_unpack_bit_exact_and_the_packed_file(tmp_path):
    torch.manual_seed(0)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    model = _finalized_sparse(lenet(), 0.05, 4, x, y)
    want = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    packed = pk.pack_(copy.deepcopy(model))
    for _, layer in pk.packed_layers(packed):
        assert layer.rank == 0 and layer.fmts["U"] == layer.fmts["V"] == 0  # FMT_EMPTY: nothing stored
        assert layer.factor_nbytes("U") == layer.factor_nbytes("V") == 0
    torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-6)
    pk.save_packed(packed, tmp_path / "m.safetensors")
    loaded = pk.load_packed(lenet(), tmp_path / "m.safetensors")
    assert torch.equal(loaded(x), packed(x))
    back = pk.unpack(packed)
    after = back.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert v.dtype == after[k].dtype and torch.equal(v, after[k]), k
    assert at.is_finalized(back) and torch.equal(back(x), want)


def test_packed_linear_rank_zero_reference_and_errors():
    torch.manual_seed(0)
    model = _finalized_sparse(nn.Sequential(nn.Linear(63, 7)), 0.3, 3)
    layer = pk.pack_(copy.deepcopy(model))[0]
    x = torch.randn(5, 63)
    args = layer.factor_args()
    got = atmc_linear_ref(x, layer.bias, 7, 0, 0, *args)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6)
    bad = list(args)
    bad[0:5] = layer.factor("C")  # a non-empty U at rank 0
    with pytest.raises(ValueError, match="r = 0 \\(W = C\\) needs empty U and V"):
        atmc_linear_ref(x, layer.bias, 7, 0, 0, *bad)


@interp
@pytest.mark.parametrize("M", [1, 7, 40])
def test_packed_linear_rank_zero_triton_interpreter(M):
    """The Triton launcher at rank 0 launches only C's product (U and V are empty) and equals the reference."""
    from atmc_triton.kernels import lowrank_gemm_triton as lt

    torch.manual_seed(M)
    model = _finalized_sparse(nn.Sequential(nn.Linear(63, 7)), 0.3, 3)
    layer = pk.pack_(copy.deepcopy(model))[0]
    f = layer.factor_args()
    x = torch.randn(M, 63)
    got = lt.linear_launch(x, layer.bias, 7, 0, 0, [f[i : i + 5] for i in (0, 5, 10)])
    torch.testing.assert_close(got, atmc_linear_ref(x, layer.bias, 7, 0, 0, *f), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_and_refusal_across_inits():
    torch.manual_seed(0)
    sparse = sparse_model(small_cnn())
    twin = sparse_model(small_cnn())
    twin.load_state_dict(sparse.state_dict())
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(twin.eval()(x), sparse.eval()(x))
    ident = at.compress_(small_cnn(), dataclasses.replace(SPARSE, init="identity"))
    svd = at.compress_(small_cnn(), dataclasses.replace(SPARSE, init="svd"))
    with pytest.raises(ValueError, match=r"saved with init='identity' \(rank 6\).*this layer has init='sparse'"):
        sparse.load_state_dict(ident.state_dict())
    with pytest.raises(ValueError, match=r"saved with init='svd' \(rank 6\).*this layer has init='sparse'"):
        sparse.load_state_dict(svd.state_dict())
    with pytest.raises(ValueError, match=r"saved with init='sparse'.*this layer has init='identity' \(rank 6\)"):
        ident.load_state_dict(sparse.state_dict())


# --- the CLI and the study --------------------------------------------------------------------------------------------


def test_cli_train_init_sparse_on_digits(tmp_path, capsys):
    from test_cli import FAST

    from atmc_triton.checkpoint import load_checkpoint
    from atmc_triton.cli import main

    out = tmp_path / "run"
    with one_thread():
        rc = main(["train", "--init", "sparse", "--subset", "128", "--test-subset", "32", "--out", str(out), *FAST])
    assert rc == 0
    ck = load_checkpoint(out / "atmc_final.pt")
    assert ck["meta"]["atmc"]["init"] == "sparse"
    shapes = {k: tuple(v.shape) for k, v in ck["model"].items() if k.endswith((".U", ".V"))}
    assert shapes and all(0 in s for s in shapes.values())
    assert "ATMC-compressed" in capsys.readouterr().out
    try:
        rc = main(["train", "--init", "sparse", "--rank", "3", "--out", str(tmp_path / "bad")])
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "init='sparse' has no low-rank part" in err and "Traceback" not in err


def test_study_has_an_atmc_sparse_method():
    from bench import mnist_study

    study = types.SimpleNamespace(cfg=mnist_study.PRESETS["tiny"])
    cfg = mnist_study.Study.atmc_config(study, mnist_study.Point("ATMC-sparse", 0.01))
    assert (cfg.init, cfg.rank, cfg.bits, cfg.ratio) == ("sparse", None, 8, 0.01)
    assert mnist_study.Study.atmc_config(study, mnist_study.Point("ATMC-8b", 0.01)).init == study.cfg.init
    tiny = dataclasses.replace(mnist_study.PRESETS["tiny"], ratios=(0.01,), methods=("ATMC-8b", "ATMC-sparse"))
    assert [p.method for p in mnist_study.points(tiny)] == ["DA", "ATMC-8b", "NAT", "ATMC-sparse"]


def test_train_state_bench_counts_every_tensor_once():
    from atmc_triton.models import build_model
    from bench.train_state import measure

    n = sum(p.numel() for p in build_model("digits_cnn", 10, (1, 8, 8)).parameters())
    sparse, ident = measure("digits_cnn", "sparse"), measure("digits_cnn", "identity")
    assert sparse["params"] == sparse["grads"] == sparse["momentum"] == 4 * n  # every weight once, as dense
    assert 9 * 151_072 <= sparse["buffers"] <= 9 * 151_072 + 4 * 3 * 257 * 4 + 1024  # Z, u, mask; 4 x 3 codebooks
    assert ident["params"] > 2 * sparse["params"] and sparse["total"] < 0.5 * ident["total"]

"""The Triton ADMM step (radix-select projection) and dual update against their references.

CPU tensors run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, skipped otherwise);
the same checks run on CUDA tensors as ``gpu`` tests: ``python -m pytest -m gpu tests/test_admm_triton.py``.
"""

import copy
import math
import os

import pytest
import torch
from helpers import factor_nnz, small_cnn, train_steps
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import atmc_triton as at

pytest.importorskip("triton")
from atmc_triton.kernels import admm as admm_mod  # noqa: E402
from atmc_triton.kernels.admm import (  # noqa: E402
    admm_dual_update,
    admm_dual_update_ref,
    admm_dual_update_triton,
    admm_step_ref,
    admm_step_triton,
    project_topk_,
)
from atmc_triton.kernels.admm_triton import BLOCK, launch_admm_step, launch_plan  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="interpreter test: needs TRITON_INTERPRET=1 (no GPU)")
DEVICES = [pytest.param("cpu", marks=interp), pytest.param("cuda", marks=pytest.mark.gpu)]
HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, rho=0.3)
NAN = float("nan")

# (tile size, max programs): several programs with several tiles each, one tile per program, the default
PLANS = [(256, 2), (256, 512), (BLOCK, 512)]


def layer_factors(shapes: list[tuple[int, int]], g: torch.Generator, ties: bool) -> torch.Tensor:
    """Flat factors of ATMC layers with the identity init: U [out, r], V [r, in], C [out, in]."""
    parts = []
    for out, inn in shapes:
        r = min(out, inn)
        for numel, scale in ((out * r, 0.5), (r * inn, 0.0), (out * inn, 0.0)):  # one factor holds W
            x = torch.randn(numel, generator=g) * scale
            if ties:
                x = torch.randint(-2, 3, (numel,), generator=g).float() * 0.25
            parts.append(x)
    return torch.cat(parts)


def make_state(shapes, seed: int, ties: bool, grad_dtype=torch.float32, device="cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    w = layer_factors(shapes, g, ties)
    n = w.numel()
    t = dict(
        w=w,
        grad=(torch.randn(n, generator=g) * 0.1).to(grad_dtype),
        mom=torch.randn(n, generator=g) * 0.01,
        z=torch.randn(n, generator=g) * 0.1,
        u=torch.randn(n, generator=g) * 0.01,
        mask=torch.zeros(n, dtype=torch.bool),
    )
    return {key: v.to(device) for key, v in t.items()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN equals NaN of the same pattern)."""
    if a.dtype.is_floating_point:
        return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def unprojected(t: dict, lr, momentum, weight_decay, rho, nesterov):
    """The gradient step of the reference, before the projection: ``(w, mom)``."""
    g = t["grad"].float() + weight_decay * t["w"] + rho * (t["w"] - t["z"] + t["u"])
    m = t["mom"] * momentum + g
    return t["w"] - lr * (g + momentum * m if nesterov else m), m


def run_triton(t: dict, k: int, nesterov: bool, plan=(BLOCK, 512), poison_mask=None, **hp):
    """Launch on ``t`` (mutated) with NaN-poisoned scratch and tau; returns ``(tau, wn, mn)``."""
    n = t["w"].numel()
    wn, mn = torch.full_like(t["w"], NAN), torch.full_like(t["w"], NAN)
    tau = torch.full((), NAN, device=t["w"].device)
    if poison_mask is not None:
        t["mask"].copy_(poison_mask)
    block, programs = plan
    launch_admm_step(
        t["w"],
        t["grad"],
        t["mom"],
        t["z"],
        t["u"],
        t["mask"],
        wn,
        mn,
        tau,
        hp["lr"],
        hp["momentum"],
        hp["weight_decay"],
        hp["rho"],
        k,
        nesterov,
        block=block,
        max_programs=programs,
    )
    assert launch_plan(n, block, programs)[0] <= programs
    return tau, wn, mn


def check_against_reference(t0: dict, k: int, nesterov: bool, plan, hp=HP):
    ref = copy.deepcopy(t0)
    tau_ref = admm_step_ref(**ref, **hp, k=k, nesterov=nesterov)
    tri = copy.deepcopy(t0)
    tau, wn, mn = run_triton(tri, k, nesterov, plan, poison_mask=~ref["mask"], **hp)
    # 1) the gradient step matches the reference to fp32 rounding
    wn_ref, mn_ref = unprojected(t0, nesterov=nesterov, **hp)
    torch.testing.assert_close(wn, wn_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mn, mn_ref, rtol=1e-6, atol=1e-7)
    # 2) the projection is exact: the reference projection of the Triton-updated values
    pw, pm = wn.clone(), mn.clone()
    keep, tau_expect = project_topk_(pw, k, pm)
    assert torch.equal(tri["w"], pw) and torch.equal(tri["mom"], pm)
    assert torch.equal(tri["mask"], keep & (pw != 0))
    assert torch.equal(tau.cpu(), tau_expect.float().cpu())
    assert int(keep.sum()) == min(k, t0["w"].numel())
    # 3) bit-identical updates give the reference's outputs exactly; the interpreter contracts nothing into
    #    FMAs, so there they always are; z, u and grad are read-only
    if wn.device.type == "cpu":
        assert same(wn, wn_ref) and same(mn, mn_ref)
    if torch.equal(wn, wn_ref) and torch.equal(mn, mn_ref):
        for key in ("w", "mom", "mask"):
            assert torch.equal(tri[key], ref[key]), key
        assert torch.equal(tau.cpu(), tau_ref.cpu())
    for key in ("z", "u", "grad"):
        assert torch.equal(tri[key], t0[key]), key


dims = st.sampled_from([1, 2, 3, 7, 13, 40, 64])
layer_lists = st.lists(st.tuples(dims, dims), min_size=1, max_size=4)


@pytest.mark.parametrize("device", DEVICES)
@given(
    shapes=layer_lists,
    seed=st.integers(0, 99),
    k_pick=st.sampled_from(["0", "1", "all", "over", "frac", "frac"]),
    k_frac=st.floats(0, 1),
    values=st.sampled_from(["normal", "ties", "exact ties"]),
    nesterov=st.booleans(),
    plan=st.sampled_from(PLANS[:2]),
)
def test_step_matches_reference(device, shapes, seed, k_pick, k_frac, values, nesterov, plan):
    t0 = make_state(shapes, seed, values != "normal", device=device)
    n = t0["w"].numel()
    k = {"0": 0, "1": 1, "all": n, "over": n + 3, "frac": round(k_frac * n)}[k_pick]
    hp = dict(HP, lr=0.0) if values == "exact ties" else HP  # lr = 0 keeps the tied values exactly
    check_against_reference(t0, k, nesterov, plan, hp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize(
    "shapes,k",
    [
        ([(1, 1)], 1),  # a single layer of 1x1: 3 elements
        ([(1, 1)], 2),
        ([(64, 48), (1, 1), (7, 13)], 2500),  # larger than one 2048-element tile
        ([(64, 48), (33, 65)], 3),
    ],
)
def test_odd_sizes_and_large_factors(device, plan, shapes, k):
    for ties in (False, True):
        check_against_reference(make_state(shapes, 5, ties, device=device), k, False, plan)


@pytest.mark.parametrize("device", DEVICES)
def test_single_element(device):
    for k in (0, 1, 2):
        t0 = {key: v[:1].clone() for key, v in make_state([(1, 1)], 3, False, device=device).items()}
        check_against_reference(t0, k, False, (256, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", PLANS[:2])
def test_heavy_ties_keep_the_lowest_flat_indices(device, plan):
    n = 3001
    for fill, k in ((1.0, 1000), (0.0, 2999), (-0.5, 1)):  # one magnitude everywhere
        t = dict(
            w=torch.full((n,), fill),
            grad=torch.zeros(n),
            mom=torch.ones(n),
            z=torch.zeros(n),
            u=torch.zeros(n),
            mask=torch.zeros(n, dtype=torch.bool),
        )
        t = {key: v.to(device) for key, v in t.items()}
        tau, _, _ = run_triton(t, k, False, plan, lr=0.0, momentum=0.5, weight_decay=0.0, rho=0.0)
        keep = torch.arange(n, device=device) < k
        assert float(tau) == abs(fill)
        assert torch.equal(t["w"], torch.where(keep, fill, 0.0).to(device))
        assert torch.equal(t["mom"], torch.where(keep, 0.5, 0.0).to(device))
        assert torch.equal(t["mask"], keep & (fill != 0))


@pytest.mark.parametrize("device", DEVICES)
def test_ties_at_zero_after_nonzeros_in_earlier_programs(device):
    """tau = 0: the tie offsets of later programs count only zeros, not the nonzeros before them."""
    n = 4000
    w = torch.zeros(n)
    w[:1500] = torch.linspace(0.5, 1.0, 1500)  # 4 programs of 4 x 256: nonzeros fill 1.5 program chunks
    t = dict(
        w=w,
        grad=torch.zeros(n),
        mom=torch.ones(n),
        z=torch.zeros(n),
        u=torch.zeros(n),
        mask=torch.ones(n, dtype=torch.bool),
    )
    t = {key: v.to(device) for key, v in t.items()}
    k = 1500 + 1200  # every nonzero, then the first 1200 zeros by index
    tau, _, _ = run_triton(t, k, False, (256, 4), lr=0.0, momentum=1.0, weight_decay=0.0, rho=0.0)
    keep = (torch.arange(n) < k).to(device)
    assert float(tau) == 0.0
    assert torch.equal(t["mom"], keep.float()) and torch.equal(t["w"], w.to(device))
    assert torch.equal(t["mask"], (torch.arange(n) < 1500).to(device))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("device", DEVICES)
@given(
    seed=st.integers(0, 50),
    bad=st.sampled_from([NAN, math.inf, -math.inf, 1e38]),
    k=st.sampled_from([0, 3, 10**6]),
    where=st.sampled_from(["first", "last", "random"]),
)
def test_nonfinite_update_writes_nothing(device, seed, bad, k, where):
    t0 = make_state([(13, 7), (40, 40)], seed, False, device=device)
    n = t0["w"].numel()
    i = {"first": 0, "last": n - 1, "random": seed * 37 % n}[where]
    t0["grad"][i] = bad
    if bad == 1e38:  # finite grad, overflowing momentum: 3e38 * 0.9 + 1e38 > float32 max
        t0["mom"][i] = 3e38
    t0["mask"] = torch.rand(n, generator=torch.Generator().manual_seed(seed)).to(device) < 0.5
    t = copy.deepcopy(t0)
    tau, _, _ = run_triton(t, k, False, (256, 4), **HP)
    assert math.isnan(float(tau))
    for key in t0:
        assert same(t[key], t0[key]), key
    ref = copy.deepcopy(t0)  # the reference refuses the same way
    assert math.isnan(float(admm_step_ref(**ref, **HP, k=k, nesterov=False)))
    for key in t0:
        assert same(ref[key], t0[key]), key
    # the workspace is fresh every call: a finite step afterwards is a normal step
    t["grad"][i] = 0.0
    check_against_reference(t, 3, False, (256, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_grads(device):
    dtypes = [torch.float16] + ([torch.bfloat16] if device == "cuda" else [])  # the interpreter has no bf16
    for dtype in dtypes:
        t0 = make_state([(40, 13), (7, 7)], 1, False, grad_dtype=dtype, device=device)
        check_against_reference(t0, 300, True, (256, 4))


@pytest.mark.parametrize("device", DEVICES)
@given(n=st.sampled_from([1, 7, 63, 1000, 4097]), seed=st.integers(0, 20))
def test_dual_update_matches_reference(device, n, seed):
    g = torch.Generator().manual_seed(seed)
    u, w, z = (torch.randn(n, generator=g).to(device) for _ in range(3))
    u_ref = u.clone()
    admm_dual_update_ref(u_ref, w, z)
    admm_dual_update_triton(u, w, z)
    assert torch.equal(u, u_ref)  # u + (w - z): no product, so no contraction either


@interp
def test_launchers_validate_inputs(monkeypatch):
    t = make_state([(3, 4)], 0, False)
    n = t["w"].numel()
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.0, rho=0.1, k=3, nesterov=False)
    cases = [
        ({"mask": torch.zeros(n)}, "mask must be bool"),
        ({"z": torch.zeros(n - 1)}, f"z must be 1-D with {n}"),
        ({"w": t["w"].double()}, "w must be float32"),
        ({"grad": t["grad"].int()}, "grad must be float32/float16/bfloat16"),
        ({"u": torch.zeros(2 * n)[::2]}, "u must be contiguous"),
        ({"mom": torch.zeros(n, 1)}, "mom must be 1-D"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            admm_step_triton(**{**t, **change}, **kw)
    with pytest.raises(ValueError, match="k must be >= 0"):
        admm_step_triton(**t, **{**kw, "k": -1})
    for change, msg in [
        ((torch.zeros(n), torch.zeros(n - 1)), "z has shape"),
        ((torch.zeros(n).double(), torch.zeros(n)), "w must be float32"),
        ((torch.zeros(2 * n)[::2], torch.zeros(n)), "w must be contiguous"),
    ]:
        with pytest.raises(ValueError, match=msg):
            admm_dual_update_triton(t["u"], *change)
    big = {key: torch.empty(2**31, dtype=v.dtype, device="meta") for key, v in t.items()}  # no memory
    with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1 elements"):
        admm_step_triton(**big, **kw)
    with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1 elements"):
        admm_dual_update_triton(big["u"], big["w"], big["z"])
    monkeypatch.setattr(admm_mod, "interpreted", lambda: False)  # as on a machine with compiled Triton
    with pytest.raises(ValueError, match="need CUDA tensors"):
        admm_step_triton(**t, **kw)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        admm_dual_update_triton(t["u"], t["w"], t["z"])


def test_dual_update_op_compiles_in_one_frame():
    from torch._dynamo.testing import CompileCounter

    u, w, z = torch.randn(300), torch.randn(300), torch.randn(300)
    u2 = u.clone()
    counter = CompileCounter()
    torch._dynamo.reset()
    torch.compile(lambda a, b, c: admm_dual_update(a, b, c), fullgraph=True, backend=counter)(u, w, z)
    assert counter.frame_count == 1
    admm_dual_update_ref(u2, w, z)
    assert torch.equal(u, u2)


# --- the optimizer on the Triton kernels ---------------------------------------------------


def triton_optimizer(monkeypatch, cfg, **kw):
    """An ADMM optimizer whose factor step and dual update run the Triton launchers on CPU."""
    import atmc_triton.optim as optim

    monkeypatch.setattr(optim, "admm_step", admm_step_triton)
    monkeypatch.setattr(optim, "admm_dual_update", admm_dual_update_triton)
    torch.manual_seed(0)
    model = at.compress_(small_cnn(), cfg)
    return model, at.ADMM(model, cfg, lr=0.05, **kw)


@interp
def test_optimizer_on_triton_matches_reference(monkeypatch):
    cfg = at.ATMCConfig(ratio=0.3, bits=3, quant_interval=2)
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 5
    torch.manual_seed(0)
    ref_model = at.compress_(small_cnn(), cfg)
    ref_opt = at.ADMM(ref_model, cfg, lr=0.05)
    train_steps(ref_model, ref_opt, 4, x, y)
    model, opt = triton_optimizer(monkeypatch, cfg)
    train_steps(model, opt, 4, x, y)
    assert factor_nnz(model) == opt.param_groups[0]["k"]
    for (name, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.equal(a, b), name  # interpreter arithmetic is the reference's, bit for bit


@interp
@pytest.mark.parametrize("where", ["factor", "dense"])
def test_optimizer_nonfinite_grad(monkeypatch, where):
    cfg = at.ATMCConfig(ratio=0.3, bits=3, quant_interval=3)  # the quantizer is not due at step 2
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 5
    for check in (True, False):
        model, opt = triton_optimizer(monkeypatch, cfg, check_finite=check)
        train_steps(model, opt, 1, x, y)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        layer = at.atmc_layers(model)[0][1]
        (layer.V.grad if where == "factor" else layer.bias.grad).view(-1)[0] = float("inf")
        before, mom = copy.deepcopy(model.state_dict()), opt.store.mom.clone()
        dense_mom = [b["momentum_buffer"].clone() for p, b in opt.state.items() if not isinstance(p, str)]
        if check:
            with pytest.raises(FloatingPointError, match="NaN or Inf"):
                opt.step()
        else:
            opt.step()  # voided on the device, counted
            assert int(opt.nonfinite_steps) == 1
        for key, v in model.state_dict().items():
            assert torch.equal(v, before[key]), key
        assert torch.equal(opt.store.mom, mom)
        after = [b["momentum_buffer"] for p, b in opt.state.items() if not isinstance(p, str)]
        assert all(torch.equal(a, b) for a, b in zip(after, dense_mom))


# --- GPU only ---------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_step_is_deterministic_and_compiles():
    from torch._dynamo.testing import CompileCounter

    t0 = make_state([(512, 512), (1000, 700), (3, 3)], 0, False, device="cuda")
    k = t0["w"].numel() // 7
    outs = []
    for _ in range(2):
        t = copy.deepcopy(t0)
        tau = at.kernels.admm_step(**t, **HP, k=k, nesterov=False)  # the op: Triton on CUDA
        outs.append((tau, t))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(outs[0][1][key], outs[1][1][key]) for key in t0)
    t = copy.deepcopy(t0)
    counter = CompileCounter()
    torch._dynamo.reset()
    tau_c = torch.compile(
        lambda **a: at.kernels.admm_step(**a, **HP, k=k, nesterov=False), fullgraph=True, backend=counter
    )(**t)
    assert counter.frame_count == 1 and torch.equal(tau_c, outs[0][0])
    t = copy.deepcopy(t0)
    torch._dynamo.reset()
    tau_i = torch.compile(lambda **a: at.kernels.admm_step(**a, **HP, k=k, nesterov=False), fullgraph=True)(**t)
    assert torch.equal(tau_i, outs[0][0]) and torch.equal(t["mask"], outs[0][1]["mask"])


@pytest.mark.gpu
def test_gpu_step_is_cuda_graph_capturable():
    t0 = make_state([(256, 300), (64, 64)], 2, False, device="cuda")
    k = t0["w"].numel() // 3
    t = copy.deepcopy(t0)
    at.kernels.admm_step(**t, **HP, k=k, nesterov=False)  # warm up (compile the kernels)
    t = copy.deepcopy(t0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tau = at.kernels.admm_step(**t, **HP, k=k, nesterov=False)
    for key in t0:
        t[key].copy_(t0[key])
    graph.replay()
    ref = copy.deepcopy(t0)
    tau_eager = at.kernels.admm_step(**ref, **HP, k=k, nesterov=False)
    assert torch.equal(tau, tau_eager) and all(torch.equal(t[key], ref[key]) for key in t0)


@pytest.mark.gpu
def test_gpu_optimizer_keeps_exact_budget():
    cfg = at.ATMCConfig(ratio=0.2, bits=4, quant_interval=2)
    model = at.compress_(small_cnn(), cfg).cuda()
    opt = at.ADMM(model, cfg, lr=0.05)
    x, y = torch.randn(6, 3, 8, 8, device="cuda"), torch.arange(6, device="cuda") % 5

    def check():
        assert factor_nnz(model) == opt.param_groups[0]["k"]
        for _, layer in at.atmc_layers(model):
            for f, p in layer.factors():
                assert torch.equal(getattr(layer, f"{f}_mask"), p != 0)

    train_steps(model, opt, 5, x, y, check)

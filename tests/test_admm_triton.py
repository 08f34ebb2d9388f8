"""The Triton ADMM step (radix-select projection) and dual update against their references.

CPU tensors run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, skipped otherwise);
the same checks run on CUDA tensors as ``gpu`` tests: ``python -m pytest -m gpu tests/test_admm_triton.py``.
"""

import copy
import math
import os

import numpy as np
import pytest
import torch
from helpers import factor_nnz, small_cnn, train_steps
from hypothesis import event, given
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
)
from atmc_triton.kernels.admm_triton import (  # noqa: E402
    BAND,
    BAND_HALF,
    BLOCK,
    FULL,
    MAX_PROGRAMS,
    PATH_WORD,
    band_segment,
    launch_admm_step,
    launch_plan,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="interpreter test: needs TRITON_INTERPRET=1 (no GPU)")
DEVICES = [pytest.param("cpu", marks=interp), pytest.param("cuda", marks=pytest.mark.gpu)]
HP = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, rho=0.3)
NAN = float("nan")

# (tile size, max programs): several programs with several tiles each, one tile per program, the default
PLANS = [(256, 2), (256, 512), (BLOCK, MAX_PROGRAMS)]


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
        return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    return torch.equal(a, b)


def unprojected(t: dict, lr, momentum, weight_decay, rho, nesterov):
    """The gradient step of the reference, before the projection: ``(w, mom)``."""
    g = t["grad"].float() + weight_decay * t["w"] + rho * (t["w"] - t["z"] + t["u"])
    m = t["mom"] * momentum + g
    return t["w"] - lr * (g + momentum * m if nesterov else m), m


def run_triton(t: dict, k: int, nesterov: bool, plan=(BLOCK, MAX_PROGRAMS), poison_mask=None, hint=None, **hp):
    """Launch on ``t`` (mutated) with NaN-poisoned scratch and tau; returns ``(tau, s, ws)``."""
    n = t["w"].numel()
    s = torch.full_like(t["w"], NAN)
    tau = torch.full((), NAN, device=t["w"].device)
    if poison_mask is not None:
        t["mask"].copy_(poison_mask)
    if hint is not None:
        hint = torch.tensor(float(hint), dtype=torch.float32, device=t["w"].device)
    block, programs = plan
    ws = launch_admm_step(
        t["w"],
        t["grad"],
        t["mom"],
        t["z"],
        t["u"],
        t["mask"],
        s,
        tau,
        hp["lr"],
        hp["momentum"],
        hp["weight_decay"],
        hp["rho"],
        k,
        nesterov,
        tau_hint=hint,
        block=block,
        max_programs=programs,
    )
    assert launch_plan(n, block, programs)[0] <= programs
    return tau, s, ws


def check_against_reference(t0: dict, k: int, nesterov: bool, plan, hp=HP, hint=None):
    """The Triton step on a copy of ``t0`` equals the reference; returns the path it took (BAND / FULL,
    None when 0 < k < n does not hold)."""
    ref = copy.deepcopy(t0)
    tau_ref = admm_step_ref(**ref, **hp, k=k, nesterov=nesterov)
    tri = copy.deepcopy(t0)
    if isinstance(hint, str):  # relative to the true tau: "exact", "near", "far up", "far down"
        hint = float(tau_ref) * {"exact": 1.0, "near": 1.01, "far up": 1e6, "far down": 1e-6}[hint]
    tau, s, ws = run_triton(tri, k, nesterov, plan, poison_mask=~ref["mask"], hint=hint, **hp)
    n = t0["w"].numel()
    for key in ("z", "u", "grad"):  # read-only
        assert torch.equal(tri[key], t0[key]), key
    if t0["w"].device.type == "cpu":
        # the interpreter contracts nothing into FMAs: its arithmetic is the reference's, bit for bit
        g = t0["grad"].float() + hp["weight_decay"] * t0["w"] + hp["rho"] * (t0["w"] - t0["z"] + t0["u"])
        assert same(s, g if nesterov else t0["mom"] * hp["momentum"] + g)  # the kept scratch: m (Nesterov: g)
        for key in ("w", "mom", "mask"):  # (the kernels write +0.0 where the reference's w * keep gives -0.0)
            assert torch.equal(tri[key], ref[key]), key
        assert same(tau, tau_ref)
    else:  # a GPU may contract into FMAs (1 ulp): the projection must still keep at most min(k, n)
        both = tri["mask"] & ref["mask"]  # an ulp may swap one pair at the cut (as inductor's graph may)
        assert int((tri["mask"] != ref["mask"]).sum()) <= 2
        torch.testing.assert_close(tri["w"][both], ref["w"][both], rtol=1e-5, atol=1e-6)
        assert torch.all(tri["w"][~tri["mask"]] == 0)
        kept = int(((tri["w"] != 0) | (tri["mom"] != 0)).sum())
        assert kept <= min(k, n)
        torch.testing.assert_close(tau, tau_ref, rtol=1e-5, atol=0)
    if int(ref["mask"].sum()) == min(k, n):  # every kept entry nonzero: the count is exact
        assert int(tri["mask"].sum()) == min(k, n)
    return int(ws[PATH_WORD]) if 0 < k < n else None  # KEEP_ALL / KEEP_NONE steps select nothing


dims = st.sampled_from([1, 2, 3, 7, 13, 40, 64])
# the previous tau given to the kernels: none, the true tau (or relative to it), and edge values
HINTS = [None, "exact", "near", "far up", "far down", 0.0, math.inf, NAN, 1e-40, 3e38]
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
    hint=st.sampled_from(HINTS),
)
def test_step_matches_reference(device, shapes, seed, k_pick, k_frac, values, nesterov, plan, hint):
    t0 = make_state(shapes, seed, values != "normal", device=device)
    n = t0["w"].numel()
    k = {"0": 0, "1": 1, "all": n, "over": n + 3, "frac": round(k_frac * n)}[k_pick]
    hp = dict(HP, lr=0.0) if values == "exact ties" else HP  # lr = 0 keeps the tied values exactly
    path = check_against_reference(t0, k, nesterov, plan, hp, hint)
    if 0 < k < n:
        event(f"path {'BAND' if path == BAND else 'FULL'}")


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
    for k in (-1, 2.5, True):  # (2.5 was truncated to 2 by the launcher; the reference failed in numpy)
        for step in (admm_step_triton, admm_step_ref):
            with pytest.raises(ValueError, match="k must be an int >= 0"):
                step(**copy.deepcopy(t), **{**kw, "k": k})
    ref, tri = copy.deepcopy(t), copy.deepcopy(t)
    assert same(admm_step_triton(**tri, **{**kw, "k": np.int64(3)}), admm_step_ref(**ref, **kw))  # numpy ints too
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
    w[:5] = torch.tensor([math.inf, -math.inf, NAN, 3e38, -0.0])  # non-finite and overflowing entries
    z[5:10] = -3e38
    u2 = u.clone()
    counter = CompileCounter()
    torch._dynamo.reset()
    torch.compile(lambda a, b, c: admm_dual_update(a, b, c), fullgraph=True, backend=counter)(u, w, z)
    assert counter.frame_count == 1
    u2 += w - z  # the reference written out: u + (w - z)
    assert same(u, u2)


@pytest.mark.parametrize(
    "case",
    ["ties", "fp16 grads", "k = 0", "k = 1", "k = n - 1", "k = n", "nan grad", "nesterov", "hint nan", "hint inf"],
)
def test_admm_step_op_compiles_in_one_frame_and_matches_the_reference(case):
    """torch.compile(op) in one frame against the reference, and the Triton launcher against it too (on CPU
    tensors the compiled op runs its CPU kernel, the reference itself; the launcher runs in the
    interpreter), on inputs where kernel and reference could part: ties, half grads, the k edges, the
    non-finite void path, Nesterov, odd hints."""
    from torch._dynamo.testing import CompileCounter

    t0 = make_state([(13, 7), (40, 9)], 3, case == "ties", torch.float16 if case == "fp16 grads" else torch.float32)
    n = t0["w"].numel()
    k = {"k = 0": 0, "k = 1": 1, "k = n - 1": n - 1, "k = n": n}.get(case, n // 3)
    if case == "nan grad":
        t0["grad"][n // 2] = NAN
    t0["mask"] = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5
    nesterov = case == "nesterov"
    hint = torch.tensor({"hint nan": NAN, "hint inf": math.inf}.get(case, 0.7))
    hp = dict(HP, lr=0.0) if case == "ties" else HP
    ref = copy.deepcopy(t0)
    tau_ref = admm_step_ref(**ref, **hp, k=k, nesterov=nesterov)
    t = copy.deepcopy(t0)
    counter = CompileCounter()
    torch._dynamo.reset()
    step = torch.compile(
        lambda **a: at.kernels.admm_step(**a, **hp, k=k, nesterov=nesterov, tau_hint=hint),
        fullgraph=True,
        backend=counter,
    )
    tau = step(**t)
    assert counter.frame_count == 1
    assert same(tau, tau_ref)
    for key in t0:
        assert same(t[key], ref[key]), key
    launched = copy.deepcopy(t0)
    assert same(admm_step_triton(**launched, **hp, k=k, nesterov=nesterov, tau_hint=hint), tau_ref)
    for key in t0:  # equal values (the kernels write +0.0 where the reference's w * keep gives -0.0)
        torch.testing.assert_close(launched[key], ref[key], rtol=0, atol=0, equal_nan=True, msg=key)
    if case == "nan grad":
        assert math.isnan(float(tau)) and all(same(t[key], t0[key]) for key in t0)  # nothing written


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
    cfg = at.ATMCConfig(ratio=0.3, bits=3, quant_interval=3, init="identity")  # no quantizer at step 2; V exists
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
    for hint in (outs[0][0] * 1.01, torch.full((), NAN, device="cuda")):  # BAND and FULL paths agree
        t = copy.deepcopy(t0)
        tau = at.kernels.admm_step(**t, **HP, k=k, nesterov=False, tau_hint=hint)
        assert torch.equal(tau, outs[0][0]) and all(torch.equal(t[key], outs[0][1][key]) for key in t0)
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
    ref = copy.deepcopy(t0)  # inductor's graph against the reference (FMA contraction: an ulp or two)
    tau_ref = admm_step_ref(**ref, **HP, k=k, nesterov=False)
    torch.testing.assert_close(tau_i, tau_ref, rtol=1e-5, atol=0)
    assert int(t["mask"].sum()) == int(ref["mask"].sum()) == k
    both = t["mask"] & ref["mask"]  # at most one pair at the cut may swap when an FMA moves a value by an ulp
    assert int((t["mask"] != ref["mask"]).sum()) <= 2
    torch.testing.assert_close(t["w"][both], ref["w"][both], rtol=1e-5, atol=1e-6)


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


# --- the band path (previous tau as a hint) against the full radix select ------------------------


def band_state(w: torch.Tensor, device) -> dict:
    """A step that keeps ``w`` exactly (lr = 0 below): z = u = grad = 0, momentum 1."""
    n = w.numel()
    t = dict(w=w, grad=torch.zeros(n), mom=torch.ones(n), z=torch.zeros(n), u=torch.zeros(n))
    return {**{key: v.to(device) for key, v in t.items()}, "mask": torch.zeros(n, dtype=torch.bool, device=device)}


FROZEN = dict(lr=0.0, momentum=0.5, weight_decay=0.0, rho=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "hint,path",
    [
        ("exact", BAND),
        ("near", BAND),
        (None, FULL),
        ("far up", FULL),  # tau moved 6 orders of magnitude down since the hint
        ("far down", FULL),
        (0.0, FULL),
        (math.inf, FULL),  # the tau of a k = 0 step
        (NAN, FULL),  # the tau of a voided step
    ],
)
def test_band_path_is_taken_when_tau_is_near_and_equals_the_full_select(device, hint, path):
    t0 = make_state([(64, 48), (33, 65)], 11, False, device=device)
    n = t0["w"].numel()
    for k in (1, 3, n // 3, n - 1):
        assert check_against_reference(t0, k, False, (256, 4), HP, hint) == path, (k, hint)


@pytest.mark.parametrize("device", DEVICES)
def test_band_ties_across_programs(device):
    """BAND path, tau tied across several program chunks: the cut falls inside the third chunk."""
    n = 6000  # (256, 4): 4 programs of 6 x 256 = 1536 elements
    w = torch.zeros(n)
    w[3::11] = -0.25  # ties at tau, spread over every chunk
    w[::7] = 0.5  # above tau
    ties, above = int((w == -0.25).sum()), int((w == 0.5).sum())
    t0 = band_state(w, device)
    for k in (above + 1, above + 150, above + 300, above + ties - 1, above + ties):
        assert check_against_reference(t0, k, False, (256, 4), FROZEN, 0.25) == BAND, k


@pytest.mark.parametrize("device", DEVICES)
def test_every_weight_equal(device):
    """Every magnitude equal: the band holds all n (BAND while each program's segment holds its chunk's
    band, FULL when one overflows)."""
    for n, plan, path in ((900, (256, 8), BAND), (10000, (256, 2), FULL)):
        programs, tiles = launch_plan(n, *plan)
        assert (band_segment(tiles * plan[0]) >= tiles * plan[0]) == (path == BAND)  # FULL: a segment overflows
        t0 = band_state(torch.where(torch.arange(n) % 2 == 0, 0.75, -0.75), device)
        for k in (1, n // 2, n - 1):
            assert check_against_reference(t0, k, False, plan, FROZEN, 0.75) == path, (n, k)


@pytest.mark.parametrize("device", DEVICES)
def test_tau_at_the_band_edges(device):
    """The k-th key exactly at the band's low end, just below it, at its top and just above it."""
    tau = 1.0
    tk = torch.tensor(tau).view(torch.int32).item()
    keys = torch.tensor([tk - BAND_HALF - 1, tk - BAND_HALF, tk + BAND_HALF - 1, tk + BAND_HALF], dtype=torch.int32)
    vals = keys.view(torch.float32)
    w = torch.cat([vals.repeat_interleave(5), torch.full((30,), 4.0)])  # 30 far above, 5 of each edge key
    t0 = band_state(w, device)
    # by rank: 30 far above, then 5 at the band's end (excluded), 5 at its top, 5 at its low end, 5 below it
    expect = {31: FULL, 35: FULL, 36: BAND, 40: BAND, 41: BAND, 45: BAND, 46: FULL, 49: FULL, 50: None}
    for k in expect:
        path = check_against_reference(t0, k, False, (256, 2), FROZEN, tau)
        assert path == expect[k], (k, path)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nesterov", [False, True])
def test_budget_schedule_with_the_previous_tau(device, nesterov):
    """Several steps in lockstep with the reference, k changing every step, each step hinted with
    the tau the kernels returned the step before (the optimizer's use)."""
    t = make_state([(64, 48), (40, 13), (7, 7)], 4, False, device=device)
    n = t["w"].numel()
    t["w"] += (torch.randn(n, generator=torch.Generator().manual_seed(9)) * 0.3).to(device)
    ref = copy.deepcopy(t)
    hp = dict(HP, lr=0.005)  # tau moves 0.3-1 % a step while k stays
    hint, paths = None, []
    for step, k in enumerate((n // 2, n // 2, n // 2 - 5, n // 10, n // 10, 1, 0, n // 4, n, n // 4)):
        g = torch.Generator().manual_seed(step)
        t["grad"].copy_(torch.randn(n, generator=g) * 0.1)
        ref["grad"].copy_(t["grad"])
        tau_ref = admm_step_ref(**ref, **hp, k=k, nesterov=nesterov)
        tau, _, ws = run_triton(t, k, nesterov, (256, 4), hint=hint, **hp)
        if t["w"].device.type == "cpu":  # the interpreter contracts nothing into FMAs: bit for bit
            for key in ("w", "mom", "mask"):
                assert torch.equal(t[key], ref[key]), (step, key)
            assert same(tau, tau_ref), step
        else:  # a GPU may contract into FMAs (1 ulp, as in check_against_reference): each step from one state
            torch.testing.assert_close(t["w"], ref["w"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(tau, tau_ref, rtol=1e-5, atol=0)
            assert int(((t["w"] != 0) | (t["mom"] != 0)).sum()) <= min(k, n), step
            ref = copy.deepcopy(t)
        paths.append(int(ws[PATH_WORD]) if 0 < k < n else None)
        hint = float(tau)
    # no hint, k / 5, k -> 1, after k = 0 (hint inf), after k = n (hint 0): FULL; a steady or slowly moving k: BAND
    assert paths == [FULL, BAND, BAND, FULL, BAND, FULL, None, FULL, None, FULL], paths

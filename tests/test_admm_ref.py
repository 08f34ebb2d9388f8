"""The reference ADMM step and projection, and the ADMM optimizer built on them."""

import collections
import copy

import pytest
import torch
from atmc_triton.kernels import admm_step, admm_step_ref, project_topk_
from helpers import factor_nnz, lenet, small_cnn, train_steps
from hypothesis import Phase, event, example, given, settings
from hypothesis import strategies as st
from torch import nn

import atmc_triton as at


def flat_inputs(n: int, seed: int = 0, ties: bool = False):
    """Random flat ADMM state. ``ties``: ``w`` takes values in {0, +-0.5, +-1} and ``grad``, ``mom``, ``z``, ``u`` are
    scalar multiples of ``w``, so every step is odd in ``w`` and entries tied in ``|w|`` stay exactly tied."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        w = torch.randint(-2, 3, (n,), generator=g).float() * 0.5
        a, b, c, d = (torch.rand(4, generator=g) * 2 - 1).tolist()
        grad, mom, z, u = a * w, 0.1 * b * w, c * w, 0.1 * d * w
    else:
        w, grad, z = (torch.randn(n, generator=g) for _ in range(3))
        mom, u = torch.randn(n, generator=g) * 0.1, torch.randn(n, generator=g) * 0.1
    return dict(w=w, grad=grad, mom=mom, z=z, u=u, mask=torch.zeros(n, dtype=torch.bool))


def autograd_step(t, lr, momentum, wd, rho, k, nesterov):
    """The reference code's formulation: autograd on the prox term, torch SGD, then top-k."""
    w = t["w"].clone().requires_grad_(True)
    (rho / 2 * (w - t["z"] + t["u"]).square().sum()).backward()
    g = w.grad + t["grad"]
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    opt.state[w]["momentum_buffer"] = t["mom"].clone()
    w.grad = g
    opt.step()
    w = w.detach()
    mom = opt.state[w]["momentum_buffer"] if w in opt.state else None
    return w, mom


SIZES = (63, 1000, 7, 2, 1)


@st.composite
def step_cases(draw):
    """``(n, k, seed, nesterov, ties)``: k is n // 2, 1, n - 1, n or 0 half the time, else uniform in 1..n."""
    n = draw(st.sampled_from(SIZES))
    k = draw(st.one_of(st.sampled_from([n // 2, 1, n - 1, n, 0]), st.integers(1, n)))
    return n, max(k, 0), draw(st.integers(0, 99)), draw(st.booleans()), draw(st.booleans())


def edges(n: int, k: int, seed: int, ties: bool) -> set[str]:
    """Which edges of the projection a case reaches (``tie at the threshold``: the k-th and (k+1)-th largest
    ``|w|`` are equal, so the flat index decides)."""
    out = {"k = 0"} if k == 0 else {"k = n"} if k == n else set()
    out |= {"k = 1"} if k == 1 < n else set()
    out |= {"k = n - 1"} if 0 < k == n - 1 else set()
    out |= {"1 < k < n - 1"} if 1 < k < n - 1 else set()
    if ties and 0 < k < n:
        mags = torch.sort(flat_inputs(n, seed, ties)["w"].abs(), descending=True).values
        out |= {"tie at the threshold"} if mags[k - 1] == mags[k] else set()
    return out


reached = collections.Counter()  # edges seen by the test below (read by test_step_cases_reach_every_edge)
EDGES = {"k = 0", "k = 1", "k = n - 1", "k = n", "1 < k < n - 1", "tie at the threshold"}


@given(case=step_cases())
@example(case=(63, 0, 1, False, False))
@example(case=(63, 1, 2, True, True))
@example(case=(1000, 999, 3, False, True))
@example(case=(1000, 1000, 4, True, False))
@example(case=(1, 1, 5, False, True))
@example(case=(1000, 500, 6, False, True))  # ~400 entries tie at |w| = 0.5 around the 500th
@example(case=(7, 3, 7, True, True))
def test_step_is_sgd_then_exactly_k_survive_ties_by_lowest_index(case):
    n, k, seed, nesterov, ties = case
    for e in edges(n, k, seed, ties):
        event(e)
    reached.update(edges(n, k, seed, ties) | {"cases"})
    t = flat_inputs(n, seed, ties)
    w0 = t["w"].clone()
    w_ag, _ = autograd_step(t, 0.05, 0.9, 1e-3, 0.3, k, nesterov)
    mom_expect = 0.9 * t["mom"] + t["grad"] + 1e-3 * t["w"] + 0.3 * (t["w"] - t["z"] + t["u"])
    tau = admm_step_ref(**t, lr=0.05, momentum=0.9, weight_decay=1e-3, rho=0.3, k=k, nesterov=nesterov)
    if ties:  # |w| order is exact here: the survivors are the first k of (|w| descending, flat index ascending)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.sort(-w0.abs(), stable=True).indices[:k]] = True
        assert torch.equal(t["w"] != 0, keep & (w0 != 0)), "not exactly the k largest |w| with ties by lowest index"
    else:  # a top-k of |w| up to fp32 rounding
        keep = t["mask"] | ((t["w"] == 0) & (t["mom"] != 0))
        if k >= n:
            keep = torch.ones(n, dtype=torch.bool)
        assert int(keep.sum()) == min(k, n), "not exactly min(k, n) survivors"
    assert torch.allclose(t["w"][keep], w_ag[keep], atol=1e-6)
    assert torch.all(t["w"][~keep] == 0) and torch.all(t["mom"][~keep] == 0)
    assert torch.allclose(t["mom"][keep], mom_expect[keep], atol=1e-6)
    if 0 < k < n:
        kept_min = w_ag.abs()[keep].min()
        assert torch.all(w_ag.abs()[~keep] <= kept_min + 1e-6)
        assert abs(float(tau) - float(kept_min)) <= 1e-6
    assert torch.equal(t["mask"], t["w"] != 0)


def test_step_cases_reach_every_edge():
    """The test above, re-run on exactly the examples the active profile generates for it (seeded by the test's
    own digest, the explicit @examples left out), reaches every edge, and k = 0 is at most a quarter of them."""
    reached.clear()
    inner = test_step_is_sgd_then_exactly_k_survive_ties_by_lowest_index.hypothesis.inner_test
    settings(database=None, phases=[Phase.generate])(given(case=step_cases())(inner))()
    cases = reached.pop("cases")
    assert cases == settings.default.max_examples
    assert EDGES <= set(reached), f"edges never generated: {EDGES - set(reached)}"
    assert reached["k = 0"] <= cases // 4, f"k = 0 in {reached['k = 0']} of {cases} generated cases"


def test_budget_edge_cases():
    for k, expect in [(0, 0), (1, 1), (50, 50)]:
        t = flat_inputs(50, ties=True)
        nnz = int((t["w"] != 0).sum())
        tau = admm_step_ref(**t, lr=0.0, momentum=0.0, weight_decay=0.0, rho=0.0, k=k, nesterov=False)
        assert int((t["w"] != 0).sum()) == min(expect, nnz) and int(t["mask"].sum()) == int((t["w"] != 0).sum())
    assert float(tau) == 0.0  # nothing pruned
    t = flat_inputs(50)
    tau = admm_step_ref(**t, lr=0.0, momentum=0.0, weight_decay=0.0, rho=0.0, k=0, nesterov=False)
    assert float(tau) == float("inf") and not t["mask"].any() and not t["w"].any()


def test_heavy_ties_keep_exactly_k_lowest_indices():
    w = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 1.0])
    keep, tau = project_topk_(w, 3)
    assert keep.tolist() == [True, True, True, False, False, False] and float(tau) == 1.0
    w = torch.ones(1000)
    keep, _ = project_topk_(w, 10)
    assert keep.nonzero().view(-1).tolist() == list(range(10))


def test_step_rejects_bad_inputs():
    t = flat_inputs(10)
    base = dict(lr=0.1, momentum=0.9, weight_decay=0.0, rho=0.1, k=3, nesterov=False)
    with pytest.raises(ValueError, match="mask must be bool"):
        admm_step_ref(**{**t, "mask": torch.zeros(10)}, **base)
    with pytest.raises(ValueError, match="z must be 1-D with 10"):
        admm_step_ref(**{**t, "z": torch.zeros(9)}, **base)
    with pytest.raises(ValueError, match="float32"):
        admm_step_ref(**{**t, "w": t["w"].double()}, **base)
    with pytest.raises(ValueError, match="k must be"):
        admm_step_ref(**t, **{**base, "k": -1})
    with pytest.raises(ValueError, match="contiguous"):
        admm_step_ref(**{**t, "u": torch.zeros(20)[::2]}, **base)


def test_half_precision_grads_are_accepted():
    t = flat_inputs(100)
    t32 = copy.deepcopy(t)
    t["grad"] = t["grad"].bfloat16()
    t32["grad"] = t["grad"].float()
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, rho=0.1, k=40, nesterov=False)
    admm_step(**t, **kw)
    admm_step(**t32, **kw)
    assert torch.equal(t["w"], t32["w"])


# --- the optimizer --------------------------------------------------------------------------


def setup(cfg=None, model_fn=small_cnn, **opt_kw):
    cfg = cfg or at.ATMCConfig(ratio=0.3, bits=3, quant_interval=2)
    model = at.compress_(model_fn(), cfg)
    return model, at.ADMM(model, cfg, lr=0.05, **opt_kw), cfg


def batch(model_fn=small_cnn):
    if model_fn is lenet:
        return torch.rand(6, 1, 28, 28), torch.arange(6) % 10
    return torch.randn(6, 3, 8, 8), torch.arange(6) % 5


@given(
    ratio=st.sampled_from([0.05, 0.2, 0.5]),
    bits=st.sampled_from([None, 1, 3, 8]),
    steps=st.integers(1, 6),
    interval=st.integers(1, 3),
)
def test_nnz_never_exceeds_k(ratio, bits, steps, interval):
    cfg = at.ATMCConfig(ratio=ratio, bits=bits, quant_interval=interval)
    model, opt, _ = setup(cfg)
    k = opt.param_groups[0]["k"]
    x, y = batch()
    dense_count = sum(p.numel() for _, l in at.atmc_layers(model) for _, p in l.factors())

    def check():
        nnz = factor_nnz(model)
        assert nnz <= k
        if k < dense_count:
            assert nnz == k  # the budget binds: gradient steps make every entry nonzero
        for _, layer in at.atmc_layers(model):
            for f, p in layer.factors():
                assert torch.equal(getattr(layer, f"{f}_mask"), p != 0)

    train_steps(model, opt, steps, x, y, check)


def test_quantizer_runs_every_interval_and_dual_update():
    model, opt, cfg = setup()
    x, y = batch()
    layer = at.atmc_layers(model)[0][1]
    z0, u0 = opt.store.z.clone(), opt.store.u.clone()
    train_steps(model, opt, 1, x, y)
    assert torch.equal(opt.store.z, z0) and torch.equal(opt.store.u, u0)
    assert opt.state["admm"]["quant_steps"] == 0
    train_steps(model, opt, 1, x, y)
    assert opt.state["admm"]["quant_steps"] == 1
    assert not torch.equal(opt.store.z, z0) and not torch.equal(opt.store.u, u0)
    for f, _ in layer.factors():
        assert torch.unique(getattr(layer, f"{f}_z")).numel() <= 2**3 + 1


def test_dual_update_formula():
    model, opt, cfg = setup()
    x, y = batch()
    train_steps(model, opt, 1, x, y)
    s = opt.store
    u_before, w_now = s.u.clone(), s.w.clone()
    err = opt.quantize_()
    assert torch.allclose(s.u, u_before + w_now - s.z)
    ref = at.kernels.lloyd_quantize_ref(w_now + u_before, s.offsets_t, s.bits_t, cfg.max_iter, cfg.tol)
    assert torch.equal(s.z, ref[2]) and torch.allclose(err, ref[3])


def test_rho_schedule():
    cfg = at.ATMCConfig(ratio=0.3, bits=3, quant_interval=1, rho=0.1, rho_factor=2.0, rho_every=2)
    model, opt, _ = setup(cfg)
    x, y = batch()
    train_steps(model, opt, 5, x, y)
    assert opt.param_groups[0]["rho"] == pytest.approx(0.1 * 2**2)


def test_dense_params_follow_torch_sgd():
    model, opt, _ = setup(weight_decay=1e-3, momentum=0.9)
    ref_model = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if n.split(".")[-1] not in "UVC"]
    ref_params = [p for n, p in ref_model.named_parameters() if n in names]
    sgd = torch.optim.SGD(ref_params, lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = batch()
    for _ in range(3):
        for m, o in ((model, opt), (ref_model, sgd)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        sgd.step()
        ref_model.load_state_dict(
            {k: v for k, v in model.state_dict().items() if k.split(".")[-1][0] in "UVC"}, strict=False
        )  # keep factors in lockstep
    for n, p in model.named_parameters():
        if n in names:
            assert torch.allclose(p, dict(ref_model.named_parameters())[n], atol=1e-6), n


def test_state_dict_resume_is_exact():
    x, y = batch()
    model, opt, cfg = setup()
    train_steps(model, opt, 3, x, y)
    ckpt_model = copy.deepcopy(model.state_dict())
    ckpt_opt = copy.deepcopy(opt.state_dict())
    train_steps(model, opt, 4, x, y)
    torch.manual_seed(1)
    model2 = at.compress_(small_cnn(), cfg)
    model2.load_state_dict(ckpt_model)
    opt2 = at.ADMM(model2, cfg, lr=0.05)
    opt2.load_state_dict(ckpt_opt)
    assert opt2.steps == 3
    train_steps(model2, opt2, 4, x, y)
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    assert opt2.state["admm"] == opt.state["admm"]


def test_lr_scheduler_drives_both_groups():
    model, opt, _ = setup()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch()
    train_steps(model, opt, 1, x, y)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.025]


def test_nonfinite_grad_raises_before_writing():
    model, opt, _ = setup(at.ATMCConfig(ratio=0.3, bits=3, quant_interval=2, init="identity"))  # V [r, in] exists
    x, y = batch()
    train_steps(model, opt, 2, x, y)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    at.atmc_layers(model)[1][1].V.grad[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    mom = opt.store.mom.clone()
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(opt.store.mom, mom) and opt.steps == 2


@pytest.mark.parametrize("check_finite", [True, False])
def test_a_nonfinite_dense_grad_leaves_every_grad_as_it_was(check_finite):
    """The step is voided through a NaN in the first factor grad; that grad is put back afterwards (it was left
    NaN, so a user debugging the FloatingPointError was pointed at a factor)."""
    model, opt, _ = setup(at.ATMCConfig(ratio=0.3, bits=3, init="identity"), check_finite=check_finite)
    x, y = batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    dense = [p for g in opt.param_groups[1:] for p in g["params"]]
    dense[0].grad.view(-1)[0] = float("nan")
    grads = [p.grad.clone() for p in model.parameters()]
    if check_finite:
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            opt.step()
    else:
        opt.step()
        assert int(opt.nonfinite_steps) == 1
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("assign", [False, True])
def test_optimizer_state_loads_after_the_model_with_assign(assign):
    """The usual order (model, then optimizer) with load_state_dict(assign=True): the momenta were dropped (zeros)."""
    model, opt, cfg = setup(at.ATMCConfig(ratio=0.3, bits=3, init="identity"))
    x, y = batch()
    train_steps(model, opt, 2, x, y)
    sd, osd = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    model2, opt2, _ = setup(cfg)
    model2.load_state_dict(sd, assign=assign)
    opt2.load_state_dict(osd)
    assert torch.equal(opt2.store.mom, opt.store.mom) and float(opt.store.mom.abs().sum()) > 0
    train_steps(model, opt, 1, x, y)
    train_steps(model2, opt2, 1, x, y)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_views_survive_set_to_none_and_reassignment():
    model, opt, _ = setup(at.ATMCConfig(ratio=0.3, bits=3, quant_interval=2, init="identity"))  # U is not empty
    x, y = batch()
    train_steps(model, opt, 1, x, y)
    model.zero_grad(set_to_none=True)  # user bypasses opt.zero_grad
    nn.functional.cross_entropy(model(x), y).backward()
    layer = at.atmc_layers(model)[0][1]
    g = layer.U.grad.clone()
    opt.step()
    assert torch.equal(layer.U.grad, g)  # the fresh grad was routed into the flat buffer
    # load_state_dict(assign=True) replaces tensors; the store re-adopts them
    sd = copy.deepcopy(model.state_dict())
    model.load_state_dict(sd, assign=True)
    train_steps(model, opt, 2, x, y)
    assert factor_nnz(model) <= opt.param_groups[0]["k"]
    assert layer.U.data_ptr() == opt.store.w.data_ptr() + 0


def test_admm_errors():
    with pytest.raises(ValueError, match="no ATMC layers"):
        at.ADMM(small_cnn(), at.ATMCConfig(ratio=0.1))
    model = at.compress_(small_cnn(), at.ATMCConfig(ratio=0.3))
    with pytest.raises(ValueError, match="lr"):
        at.ADMM(model, at.ATMCConfig(ratio=0.3), lr=-1)
    with pytest.raises(ValueError, match="ATMCConfig"):
        at.ADMM(model, None)
    model.double()
    with pytest.raises(ValueError, match="float32"):
        at.ADMM(model, at.ATMCConfig(ratio=0.3))


@st.composite
def random_model(draw):
    """A random conv stack (odd channels/kernels, stride, padding, bias) followed by random linears."""
    c_in = c = draw(st.integers(1, 3))
    layers, hw = [], 9
    for _ in range(draw(st.integers(0, 2))):
        out, k = draw(st.integers(1, 13)), draw(st.sampled_from([1, 3]))
        layers += [
            nn.Conv2d(c, out, k, stride=draw(st.integers(1, 2)), padding=k // 2, bias=draw(st.booleans())),
            nn.ReLU(),
        ]
        hw = (hw - 1) // layers[-2].stride[0] + 1
        c = out
    layers.append(nn.Flatten())
    feat = c * hw * hw
    for _ in range(draw(st.integers(1, 3))):
        out = draw(st.integers(1, 40))
        layers += [nn.Linear(feat, out, bias=draw(st.booleans())), nn.ReLU()]
        feat = out
    return nn.Sequential(*layers[:-1]), c_in


@given(
    arch=random_model(),
    ratio=st.sampled_from([3e-3, 1e-2, 5e-2, 0.2, 0.6]),
    bits=st.sampled_from([None, 1, 2, 4, 8]),
    steps=st.integers(0, 4),
    seed=st.integers(0, 9),
)
def test_finalize_meets_levels_and_ratio(arch, ratio, bits, steps, seed):
    net, c = arch
    torch.manual_seed(seed)
    cfg = at.ATMCConfig(ratio=ratio, bits=bits, quant_interval=2)
    try:
        model = at.compress_(net, cfg)
    except ValueError as e:
        assert "leaves no nonzeros" in str(e)
        return
    opt = at.ADMM(model, cfg, lr=0.05)
    x = torch.randn(5, c, 9, 9)
    out = model(x)
    train_steps(model, opt, steps, x, torch.randint(0, out.shape[1], (5,)))
    at.finalize_(model)
    assert at.is_finalized(model)
    assert at.model_size_bits(model) <= ratio * at.dense_bits(model)
    assert factor_nnz(model) <= opt.param_groups[0]["k"]
    for _, layer in at.atmc_layers(model):
        for f, p in layer.factors():
            vals = torch.unique(p)
            if bits is not None:
                assert vals.numel() <= 2**bits + 1
                nz = vals[vals != 0]
                row = layer.codebook["UVC".index(f)]
                assert torch.equal(row[1 : 1 + nz.numel()], nz)
            assert torch.equal(getattr(layer, f"{f}_z"), p)
            assert torch.count_nonzero(getattr(layer, f"{f}_u")) == 0


def test_finalize_binds_to_exact_budget():
    cfg = at.ATMCConfig(ratio=0.01, bits=8, init="identity")  # 12 non-empty factors
    model = at.compress_(lenet(), cfg)
    k = int(model.atmc_nnz_budget)
    # k assumed the 3 factors holding weights; put large distinct values into all 12 instead
    with torch.no_grad():
        for _, layer in at.atmc_layers(model):
            for _, p in layer.factors():
                flat = p.view(-1)
                flat.zero_()
                idx = torch.randperm(flat.numel())[: min(flat.numel(), k // 12)]
                flat[idx] = 1 + torch.rand(idx.numel())
            layer.reset_admm_state()
    at.finalize_(model)
    assert factor_nnz(model) < k
    bits = at.model_size_bits(model)
    assert bits <= 0.01 * at.dense_bits(model)
    assert bits > 0.0099 * at.dense_bits(model)  # the cut is tight, not wasteful


def test_tiny_run_is_deterministic():
    def run():
        torch.manual_seed(7)
        cfg = at.ATMCConfig(ratio=0.01, bits=4, quant_interval=3)
        model = at.compress_(lenet(), cfg)
        opt = at.ADMM(model, cfg, lr=0.02)
        g = torch.Generator().manual_seed(3)
        for _ in range(7):
            x, y = torch.rand(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        at.finalize_(model)
        return model.state_dict()

    a, b = run(), run()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_reference_backend_matches_auto_and_rejects_unknown():
    x, y = batch()
    runs = []
    for backend in ("auto", "reference"):
        torch.manual_seed(3)
        model, opt, _ = setup(backend=backend)
        train_steps(model, opt, 4, x, y)
        runs.append(model.state_dict())
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k
    with pytest.raises(ValueError, match="backend"):
        setup(backend="cuda")


def test_admm_moves_its_floor_indices_with_the_model():
    """ADMM built on the CPU, the model moved afterwards (``model.cuda()``; ``meta`` stands in here): the store
    follows the model, and the floor's indices must too, or every step indexes the device's buffers with host
    indices (a copy and a sync per index op on a GPU)."""
    cfg = at.ATMCConfig(ratio=0.2, bits=4, floor="rows")
    model = at.compress_(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), cfg)
    opt = at.ADMM(model, cfg, lr=0.05)
    floor = opt._floor.clone()
    assert floor.numel() > 0 and floor.device.type == "cpu"
    model.to("meta")
    opt._sync()  # what step() and zero_grad() do first
    assert opt.store.device.type == "meta" and opt._floor.device.type == "meta" and opt._floor.shape == floor.shape

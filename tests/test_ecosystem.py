"""ATMC models inside the rest of PyTorch: copying and pickling a model with its ADMM optimizer, the meta-device
``to_empty`` + ``load_state_dict`` pattern, parametrizations on factors, ``torch.export`` of packed models with a
dynamic batch, and ``torch.compile`` of a whole training step (forward, backward, ``ADMM.step``)."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn
from torch.export import Dim

import atmc_triton as at

CFG = at.ATMCConfig(ratio=0.2, bits=4, init="svd", quant_interval=2)


def _model(cfg: at.ATMCConfig = CFG, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 7))
    return at.compress_(m, cfg)


def _x(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _step(model: nn.Module, opt: at.ADMM, x: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    return loss


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_deepcopy_and_pickle_of_model_with_admm_train_like_the_original():
    m = _model()
    opt = at.ADMM(m, CFG, lr=0.05)
    _step(m, opt, _x())
    m2, opt2 = copy.deepcopy((m, opt))  # was AttributeError: 'ADMM' object has no attribute 'store'
    buf = io.BytesIO()
    torch.save((m, opt), buf)
    buf.seek(0)
    m3, opt3 = torch.load(buf, weights_only=False)
    for i in range(3):  # across a quantizer step (quant_interval=2)
        for mm, oo in ((m, opt), (m2, opt2), (m3, opt3)):
            _step(mm, oo, _x(seed=i))
    assert _same_state(m, m2) and _same_state(m, m3)
    assert opt2.steps == opt3.steps == opt.steps == 4
    assert opt2.state_dict()["state"]["admm"] == opt.state_dict()["state"]["admm"]
    # the copy is independent: nothing shared with the original
    ptrs = {t.data_ptr() for t in m.state_dict().values() if t.numel()}
    assert not ptrs & {t.data_ptr() for t in m2.state_dict().values() if t.numel()}
    # a copy of the optimizer alone drives its own copy of the model (as for torch.optim.SGD)
    opt4 = copy.deepcopy(opt)
    before = m.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    opt4.zero_grad()
    opt4.step()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_meta_to_empty_then_load_state_dict():
    m = _model()
    opt = at.ADMM(m, CFG, lr=0.05)
    _step(m, opt, _x())
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    twin = copy.deepcopy(m).to(device="meta")
    twin.to_empty(device="cpu")  # bits / identity buffers now hold garbage
    with torch.no_grad():
        twin[0].bits.fill_(-93)  # what uninitialized memory may hold, made certain
        twin[3].identity.fill_(7)
    twin.load_state_dict(sd)  # was ValueError "0.bits: checkpoint has 4, this layer has -93"
    assert _same_state(twin, m)
    assert torch.equal(twin(_x()), m(_x()))
    # the optimizer of a model sent to meta and back re-adopts the loaded tensors (and keeps its momenta)
    ref, ref_opt = copy.deepcopy((m, opt))
    m.to(device="meta")
    m.to_empty(device="cpu")
    m.load_state_dict(sd)
    for i in range(3):
        _step(m, opt, _x(seed=i))
        _step(ref, ref_opt, _x(seed=i))
    assert _same_state(m, ref)
    # load_state_dict(assign=True) puts new Parameter objects in the model too: the biases (ADMM's dense group) and
    # the factors keep training
    m.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, assign=True)
    for i in range(2):
        _step(m, opt, _x(seed=i))
        _step(ref, ref_opt, _x(seed=i))
    assert _same_state(m, ref)
    # a checkpoint of another config is still refused
    other = _model(at.ATMCConfig(ratio=0.2, bits=3, init="svd"))
    with pytest.raises(ValueError, match="0.bits: checkpoint has 4, this layer has 3"):
        other.load_state_dict(sd)


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_parametrized_factor_is_refused_by_admm_naming_the_cure():
    m = _model()
    parametrize.register_parametrization(m[3], "C", _Double())
    assert m(_x()).shape == (4, 7)  # the forward works
    with pytest.raises(ValueError, match=r"factor C of ParametrizedATMCLinear carries a .*remove_parametrizations"):
        at.ADMM(m, CFG, lr=0.05)
    parametrize.remove_parametrizations(m[3], "C")
    at.ADMM(m, CFG, lr=0.05)


def _packed() -> nn.Module:
    torch.manual_seed(0)
    m = at.compress_(nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 5)), at.ATMCConfig(ratio=0.3, bits=4))
    opt = at.ADMM(m, at.ATMCConfig(ratio=0.3, bits=4), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(8, 40)).square().mean().backward()
        opt.step()
    return at.pack_(at.finalize_(m.eval()))


@pytest.mark.parametrize("strict", [False, True])
def test_export_of_packed_model_with_dynamic_batch_equals_eager(strict):
    m = _packed()
    lin = m[0]
    sizes = (1, 7, 63, 1000)
    paths = {lin.path(n, torch.float32) for n in sizes}
    assert {"split_k", "dense"} <= paths, paths  # the batch sizes span the packed op and the cached dense weight
    x = torch.randn(7, 40)
    ds = {"input": {0: Dim("batch", min=1, max=4096)}}
    ep = torch.export.export(m, (x,), dynamic_shapes=ds, strict=strict)  # was ConstraintViolationError
    for n in sizes:
        xn = torch.randn(n, 40, generator=torch.Generator().manual_seed(n))
        want = m(xn)
        got = ep.module()(xn)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    names = set(ep.state_dict) | set(ep.constants)
    assert not any("weight_cache" in n for n in names), names  # the program holds the packed tensors only


def _ops(ep) -> dict[str, int]:
    code = ep.graph_module.print_readable(print_output=False)  # the branches' submodules included
    return {k: code.count(k) for k in ("higher_order.cond", "atmc_linear", "atmc_decode")}


@pytest.mark.parametrize("strict", [False, True])
def test_exported_packed_linear_chooses_its_path_as_eager_does(strict):
    m = _packed()
    assert m[0].crossover(4) == m[2].crossover(4) == 17  # 7 rows take the packed op, 1000 the dense weight
    dyn = torch.export.export(
        m, (torch.randn(7, 40),), dynamic_shapes={"input": {0: Dim("batch", min=1, max=4096)}}, strict=strict
    )
    got = _ops(dyn)  # one cond per layer, each holding both paths
    assert got["higher_order.cond"] > 0 and got["atmc_linear"] > 0 and got["atmc_decode"] > 0, got
    for n, kernel in ((7, True), (1000, False)):  # a static batch: one path, the one eager takes
        x = torch.randn(n, 40, generator=torch.Generator().manual_seed(n))
        ep = torch.export.export(m, (x,), strict=strict)
        got = _ops(ep)
        # was: every export decoded W and ran F.linear, so a small-batch program never ran the packed kernels
        assert (got["atmc_linear"] > 0, got["atmc_decode"] > 0, got["higher_order.cond"]) == (kernel, not kernel, 0)
        torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_exported_packed_model_runs_the_kernels_on_cuda():
    m = _packed().cuda().half()
    ds = {"input": {0: Dim("batch", min=1, max=4096)}}
    ep = torch.export.export(m, (torch.randn(7, 40, device="cuda", dtype=torch.float16),), dynamic_shapes=ds)
    for n in (1, 7, 63, 1000):  # both branches of each layer's cond
        x = torch.randn(n, 40, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-2, atol=1e-2)


def test_packed_linear_under_autocast_gives_the_autocast_dtype_on_every_path():
    m = _packed()
    for n in (1, 7, 63, 1000):  # the packed op, then the cached dense weight
        x = torch.randn(n, 40, generator=torch.Generator().manual_seed(n))
        want = torch.nn.functional.linear(x.bfloat16(), m[0].weight.bfloat16(), m[0].bias.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m[0](x)  # was float32 below the crossover (the packed op), bfloat16 from it on
        assert got.dtype == torch.bfloat16, (n, m[0].path(n, x.dtype))
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_admm_refuses_a_model_moved_to_half_precision_and_resumes_in_float32(dtype):
    m = _model()
    opt = at.ADMM(m, CFG, lr=0.05)
    _step(m, opt, _x())
    m.to(dtype)
    layer = m[3]
    assert {t.dtype for t in (layer.C, layer.C_z, layer.C_u, layer.codebook)} == {dtype}
    assert m(_x().to(dtype)).dtype == dtype  # inference in half precision works
    match = rf"float32 master weights.*factor U of ATMCConv2d\(3, 4, .* is {dtype} on cpu.*use autocast"
    with pytest.raises(ValueError, match=match):
        at.ADMM(m, CFG, lr=0.05)
    m.zero_grad()
    m(_x().to(dtype)).float().square().mean().backward()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # nothing written
    m.float()
    _step(m, opt, _x())  # back in float32 the attached optimizer trains on
    assert opt.steps == 2


def test_compiled_training_step_equals_eager():
    torch._dynamo.reset()
    cfg = at.ATMCConfig(ratio=0.2, bits=4, init="svd", quant_interval=2, rho_every=1, rho_factor=1.1)
    m1 = _model(cfg)
    m2 = copy.deepcopy(m1)
    o1, o2 = at.ADMM(m1, cfg, lr=0.05), at.ADMM(m2, cfg, lr=0.05)
    s1, s2 = (torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9**e) for o in (o1, o2))
    step = torch.compile(_step)
    torch._dynamo.utils.counters.clear()
    for i, n in enumerate((4, 4, 5, 3, 4, 4, 4, 4, 4, 4, 4, 4)):  # batch changes; lr and rho change at every step
        x = _x(n, seed=i)
        torch.testing.assert_close(step(m2, o2, x), _step(m1, o1, x), rtol=1e-6, atol=1e-6)
        s1.step()
        s2.step()
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    assert o1.steps == o2.steps == 12 and o2.param_groups[0]["rho"] == o1.param_groups[0]["rho"] > cfg.rho
    # ADMM.step and zero_grad run eagerly (torch.compiler.disable): the step used to recompile at every new lr /
    # rho (9 graphs here, then dynamo's recompile limit) and the store's bookkeeping once per factor segment
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2, dict(torch._dynamo.utils.counters["stats"])
    torch._dynamo.reset()


def _hook_warnings(model: nn.Module) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        at.compress_(model, at.ATMCConfig(ratio=0.5, bits=None))
    return [str(w.message) for w in seen if "carry hooks" in str(w.message)]


def test_compress_warns_about_the_hooks_and_parametrizations_it_drops():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 7))
    assert _hook_warnings(copy.deepcopy(plain)) == []
    hooked = copy.deepcopy(plain)
    hooked[0].register_forward_hook(lambda *a: None)
    assert len(msgs := _hook_warnings(hooked)) == 1 and "layers 0 carry hooks" in msgs[0]
    normed = copy.deepcopy(plain)
    torch.nn.utils.parametrizations.weight_norm(normed[3])
    want = normed(_x())
    assert len(msgs := _hook_warnings(normed)) == 1 and "layers 3 carry hooks" in msgs[0]
    torch.testing.assert_close(normed(_x()), want)  # the normalized weight is what got compressed

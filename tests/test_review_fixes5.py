"""Defects a review of the kernel launchers found (2026-12-02), each pinned by value. Every test here failed on the
code before its fix (each fix was planted out once and the test re-run).

1. fp16 low-rank GEMM: the intermediate ``t = x deq(V)^T`` was rounded to fp16 inside the tile kernel's ``_mma``;
2. ``method="optimal"`` crashed (IndexError in the DP) on a segment holding an infinity;
3. the six ops refused meta tensors (device and value checks, kernel launches);
4. the fp16 bias gradient of ``atmc_linear`` was summed in fp16;
5. the Triton Lloyd kernel's error ``total_sq - gain`` cancelled for tiny errors beside large values;
6. the non-finite rule (err NaN) was not the same in the reference and the kernel, nor for every method;
7. offsets ``[k != 0]`` with no values passed the Triton launcher; ``errors_for_bits_ref`` named
   ``lloyd_quantize`` in its errors.
"""

import contextlib
import os

import atmc_triton.kernels  # noqa: F401  (registers the atmc ops)
import pytest
import torch
from atmc_triton.kernels.lloyd import METHODS, errors_for_bits_ref, lloyd_quantize_ref
from atmc_triton.kernels.lowrank_gemm import atmc_linear, atmc_linear_ref
from atmc_triton.kernels.packed_format import FMT_DENSE, FMT_EMPTY, encode_factor
from torch._subclasses.fake_tensor import FakeTensorMode

lt = pytest.importorskip("atmc_triton.kernels.lloyd_triton")
from atmc_triton.kernels import lowrank_gemm_triton as gt  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


# --- 1. fp16 low-rank GEMM: t stays float32 ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [5, 48])  # the split-K small-M path and the large-tile path
def test_fp16_lowrank_intermediate_is_not_rounded_to_fp16(device, M):
    """fp16 x with ``|t| = |x V^T|`` up to ~1e5 (past fp16's 65504) and a small U: y is ~1e3, well inside fp16. The
    kernel rounded t to fp16 before ``t U^T``: every output was inf / NaN (120 of 120 at M = 5, 1152 of 1152 at
    M = 48), and in range it was an fp16 ulp off the float32-accumulating reference. Now t stays float32 (a tf32 dot):
    the output matches the reference to its fp16 rounding."""
    g = torch.Generator().manual_seed(0)
    N, K, r = 24, 40, 8
    V = torch.randint(1, 5, (r, K), generator=g).float() * 20  # levels 20..80
    U = torch.randint(-3, 4, (N, r), generator=g).float() * 1e-3
    x = (torch.rand(M, K, generator=g) * 60 + 10).half()
    e = torch.empty(0, dtype=torch.int32)
    none = (FMT_EMPTY, e, e.float(), e, e.short())
    facs = [encode_factor(U, False, FMT_DENSE), encode_factor(V, False, FMT_DENSE), none]
    b = torch.randn(N, generator=g).half()
    want = atmc_linear_ref(x, b, N, r, 0, *(t for f in facs for t in f)).double()
    assert float((x.float() @ V.T).abs().max()) > 65504  # the case: t leaves fp16's range
    dev = [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in f) for f in facs]
    regime = "tile_small" if M <= gt.SMALL_M else "tile_large"
    cfg = {"tile": dict(gt.FIXED_CONFIG[regime]), "csr": dict(gt.FIXED_CONFIG["csr"])}
    got = gt.linear_launch(x.to(device), b.to(device), N, r, 0, dev, cfg).cpu().double()
    assert got.dtype == torch.float64 and bool(got.isfinite().all()), int((~got.isfinite()).sum())
    # within an fp16 ulp of |y| (plus tf32 rounding of t on a GPU: 2^-11 of |t| |U|)
    slack = 2.0**-10 * want.abs() + 2.0**-10 * ((x.float() @ V.T).abs() @ U.abs().T).double()
    assert bool(((got - want).abs() <= slack).all()), float((got - want).abs().max())


# --- 2 and 6. the non-finite rule, for every method and entry point ---------------------------------------------------


def _non_finite_case():
    """Segments: +inf (fitted), -inf (fitted), NaN (fitted), finite, +inf among <= 2 nonzeros (kept exactly), finite."""
    g = torch.Generator().manual_seed(1)
    segs = [torch.randn(n, generator=g) for n in (120, 90, 100, 110, 3, 70)]
    segs[0][7] = float("inf")
    segs[1][40] = -float("inf")
    segs[2][3] = float("nan")
    segs[4] = torch.tensor([0.0, float("inf"), 1.5])
    values = torch.cat(segs)
    offsets = torch.tensor([0] + [len(s) for s in segs]).cumsum(0)
    bits = torch.tensor([3, 2, 3, 3, 1, 2])
    bad = torch.tensor([True, True, True, False, True, False])
    return values, offsets, bits, bad


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_rule_in_the_reference(method):
    """A segment with a NaN or an infinity gets err NaN (every b of errors_for_bits), the others are what they are
    without it. Before: "optimal" raised IndexError; "fast"/"lloyd" gave inf for a +inf segment, NaN for -inf, and
    0 for a kept-exactly segment holding an infinity."""
    values, offsets, bits, bad = _non_finite_case()
    _, _, q, err = lloyd_quantize_ref(values, offsets, bits, 20, 0.0, method)
    assert q.shape == values.shape and bool(err[bad].isnan().all()) and bool(err[~bad].isfinite().all()), err
    table = errors_for_bits_ref(values, offsets, 20, 0.0, method)
    assert bool(table[bad].isnan().all()) and bool(table[~bad].isfinite().all()), table
    for i in torch.nonzero(~bad).view(-1).tolist():  # the finite segments, alone
        a, b = int(offsets[i]), int(offsets[i + 1])
        alone = lloyd_quantize_ref(values[a:b], torch.tensor([0, b - a]), bits[i : i + 1], 20, 0.0, method)[3]
        assert float(err[i]) == float(alone[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["lloyd", "fast"])  # ("optimal" runs the reference on host copies)
def test_non_finite_rule_in_the_triton_kernel(device, method):
    """The kernel agrees with the reference: NaN for the non-finite segments (it gave inf for +inf and -inf ones,
    0 for a kept-exactly one), the finite segments' errors as the reference's."""
    values, offsets, bits, bad = _non_finite_case()
    want = lloyd_quantize_ref(values, offsets, bits, 20, 0.0, method)[3]
    _, codes, q, err = (t.cpu() for t in lt.lloyd_quantize_triton(*(t.to(device) for t in (values, offsets, bits)),
                                                                   20, 0.0, method))  # fmt: skip
    assert bool(err[bad].isnan().all()), err
    torch.testing.assert_close(err[~bad], want[~bad], rtol=1e-5, atol=0)
    table = lt.errors_for_bits_triton(values.to(device), offsets.to(device), 20, 0.0, method).cpu()
    assert bool(table[bad].isnan().all()) and bool(table[~bad].isfinite().all()), table


# --- 3. meta tensors ----------------------------------------------------------------------------------------------


def _op_calls(dev: str, factor: tuple):
    """Every registered op on ``dev`` tensors (made at call time, so inside a fake mode): ``(name, call, want)``, want
    the outputs' ``(shape, dtype)``."""
    n = 10
    f32 = lambda *s: torch.zeros(*s, device=dev)  # noqa: E731
    fac = tuple(torch.empty(t.shape, dtype=t.dtype, device=dev) if isinstance(t, torch.Tensor) else t for t in factor)
    e = torch.empty(0, dtype=torch.int32, device=dev)
    none = (FMT_EMPTY, e, e.float(), e, e.short())
    off, bits = torch.zeros(3, dtype=torch.int64, device=dev), torch.zeros(2, dtype=torch.int64, device=dev)
    mask = torch.zeros(n, dtype=torch.bool, device=dev)
    ops = torch.ops.atmc
    yield "admm_step", lambda: ops.admm_step(*(f32(n) for _ in range(5)), mask, 0.1, 0.9, 0.0, 0.1, 3, False), [((), 1)]
    yield "admm_dual_update", lambda: ops.admm_dual_update(f32(n), f32(n), f32(n)), []
    for m in METHODS:
        want = [((2, 257), 1), ((n,), torch.int16), ((n,), 1), ((2,), 1)]
        yield f"lloyd_quantize {m}", lambda m=m: ops.lloyd_quantize(f32(n), off, bits, 5, 0.0, m), want
        yield f"lloyd_errors_for_bits {m}", lambda m=m: ops.lloyd_errors_for_bits(f32(n), off, 5, 0.0, m), [((2, 8), 1)]
    for dt in (torch.float32, torch.float16, torch.float64):
        x = lambda dt=dt: torch.zeros(3, 8, device=dev, dtype=dt)  # noqa: E731
        yield f"atmc_linear {dt}", lambda x=x: ops.atmc_linear(x(), None, 6, 0, 0, *none, *none, *fac), [((3, 6), dt)]
    yield "atmc_decode", lambda: ops.atmc_decode(fac[0], 6, 8, *fac[1:]), [((6, 8), 1)]


@pytest.mark.parametrize("mode", ["meta", "fake meta", "fake cpu"])
def test_every_op_accepts_meta_tensors(mode):
    """All six ops on meta tensors (eager, and fake ones as torch.compile / FakeTensorMode traces them) return outputs
    of the right shape, dtype and device. Before: admm_step, admm_dual_update, lloyd_quantize and
    lloyd_errors_for_bits refused the meta device ("the Triton kernels need CUDA tensors"), atmc_linear launched a
    kernel ("0 active drivers"), atmc_decode (eager meta and fake meta) read the codes."""
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    factor = encode_factor(torch.where(w.abs() > 0.5, w, 0.0), False, FMT_DENSE)
    dev = "cpu" if mode == "fake cpu" else "meta"
    with contextlib.nullcontext() if mode == "meta" else FakeTensorMode():
        for name, call, want in _op_calls(dev, factor):
            out = call()
            outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
            got = [(tuple(o.shape), o.dtype, o.device.type) for o in outs]
            assert got == [(s, torch.float32 if d == 1 else d, dev) for s, d in want], (name, got)


def test_ops_on_meta_tensors_compile():
    """torch.compile (fullgraph) of the ops on meta tensors: traced and run, outputs on meta."""

    def f(x, w, g, m, z, u, mask, off, bits):
        tau = torch.ops.atmc.admm_step(w, g, m, z, u, mask, 0.1, 0.9, 0.0, 0.1, 3, False)
        book, codes, q, err = torch.ops.atmc.lloyd_quantize(w, off, bits, 5, 0.0, "lloyd")
        return tau, q, err, torch.ops.atmc.lloyd_errors_for_bits(w, off, 5, 0.0, "lloyd"), x * 2

    n = 10
    args = [torch.zeros(3, device="meta")] + [torch.zeros(n, device="meta") for _ in range(5)]
    args += [torch.zeros(n, dtype=torch.bool, device="meta"), torch.zeros(3, dtype=torch.int64, device="meta")]
    args += [torch.zeros(2, dtype=torch.int64, device="meta")]
    out = torch.compile(f, backend="eager", fullgraph=True)(*args)
    assert [(tuple(o.shape), o.device.type) for o in out] == [((), "meta"), ((n,), "meta"), ((2,), "meta"),
                                                               ((2, 8), "meta"), ((3,), "meta")]  # fmt: skip


# --- 4. the fp16 bias gradient is summed in float32 -------------------------------------------------------------------


def test_fp16_bias_gradient_is_summed_in_float32():
    """fp16 x (so an fp16 grad) and a float32 bias: db was ``grad.sum(0)`` in fp16, inf past 65504 (4095 rows of
    30) and rounded to 11 bits below it (4095 x 0.3 gave 1229, not 1228.70). Now summed in float32 and cast to the
    bias dtype."""
    M, K, N = 4095, 8, 4
    e = torch.empty(0, dtype=torch.int32)
    none = (FMT_EMPTY, e, e.float(), e, e.short())
    C = encode_factor(torch.eye(N, K), False, FMT_DENSE)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3)).half()
    bias = torch.zeros(N, requires_grad=True)
    y = atmc_linear(x, bias, N, 0, 0, *none, *none, *C)
    grad = torch.full((M, N), 30.0, dtype=torch.float16)
    grad[:, 1] = 0.3  # sum 1228.70: fp16's ulp there is 1
    grad[:, 2] = torch.linspace(0, 1, M).half()
    y.backward(grad)
    want = grad.double().sum(0)
    assert bias.grad.dtype == torch.float32 and bool(bias.grad.isfinite().all()), bias.grad
    torch.testing.assert_close(bias.grad.double(), want, rtol=1e-6, atol=0)


# --- 5. the Triton Lloyd error does not cancel ------------------------------------------------------------------------


def _cancelling_case():
    """A large first segment (the global prefix sums grow) and one of ~1e4 values on 5 levels, two 1 ulp apart, at
    b = 2 (4 free centres): its error (7.0e-4) is 3e-16 of its sum of squares (2.5e12)."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3000, generator=g) * 3e4
    levels = torch.tensor([10000.0, 10000.0009765625, 20000.0, 30000.0, -40000.0])
    seg = levels[torch.randint(0, 5, (4000,), generator=g)]
    return torch.cat([big, seg]), torch.tensor([0, 3000, 7000]), torch.tensor([8, 2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["lloyd", "fast"])
def test_triton_lloyd_error_does_not_cancel(device, method):
    """The kernel's ``total_sq - gain`` gave 9.77e-4 for an error of 6.98e-4 (+40 %, rounding noise of 2.5e12 in
    float64); it now sums the squares directly where the difference is <= 1e-9 of the total, as the reference does:
    the same error as the reference and as ``(x - q)^2`` summed from its own q."""
    values, offsets, bits = _cancelling_case()
    want = lloyd_quantize_ref(values, offsets, bits, 20, 0.0, method)[3]
    _, _, q, err = (t.cpu() for t in lt.lloyd_quantize_triton(*(t.to(device) for t in (values, offsets, bits)),
                                                              20, 0.0, method))  # fmt: skip
    direct = float((values[3000:].double() - q[3000:].double()).square().sum())
    assert 0 < direct < 1e-15 * float(values[3000:].double().square().sum())  # the case: a cancelling error
    torch.testing.assert_close(err, want, rtol=1e-5, atol=0)
    assert float(err[1]) == pytest.approx(direct, rel=1e-6)
    table = lt.errors_for_bits_triton(values.to(device), offsets.to(device), 20, 0.0, method).cpu()
    assert float(table[1, 1]) == pytest.approx(float(want[1]), rel=1e-5)


# --- 7. offsets always validated; errors_for_bits names itself --------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_offsets_are_validated_on_every_entry_point(device):
    """Offsets ``[3]`` with no values (S = 0) passed the Triton launchers unchecked (the reference refused them); now
    every entry point refuses them, and bad offsets in general, each naming itself."""
    empty = torch.zeros(0, device=device)
    for offsets in ([3], [0, 2, 1, 3], [0, 4]):
        values = empty if offsets == [3] else torch.ones(3, device=device)
        off = torch.tensor(offsets, device=device)
        bits = torch.full((len(offsets) - 1,), 2, device=device)
        for method in METHODS:
            for f, args, name in (
                (lt.lloyd_quantize_triton, (values, off, bits), "lloyd_quantize"),
                (lt.errors_for_bits_triton, (values, off), "errors_for_bits"),
                (lloyd_quantize_ref, (values.cpu(), off.cpu(), bits.cpu()), "lloyd_quantize"),
                (errors_for_bits_ref, (values.cpu(), off.cpu()), "errors_for_bits"),
            ):
                with pytest.raises(ValueError, match=rf"^{name}: offsets must rise from 0 to values.numel\(\)"):
                    f(*args, 5, 0.0, method)


def test_errors_for_bits_names_itself():
    """``errors_for_bits_ref`` raised "lloyd_quantize: ..." for its own bad arguments."""
    v, off = torch.ones(4), torch.tensor([0, 4])
    for args in (
        (v, off, 5, 0.0, "nope"),
        (v.double(), off, 5, 0.0, "fast"),
        (v, off.int(), 5, 0.0, "fast"),
        (v, off, -1, 0.0, "fast"),
        (v, torch.tensor([0, 5]), 5, 0.0, "fast"),
    ):
        for f in (errors_for_bits_ref, lt.errors_for_bits_triton):
            with pytest.raises(ValueError, match=r"^errors_for_bits: "):
                f(*args)

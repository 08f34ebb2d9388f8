"""The Triton segmented Lloyd quantizer (``method="lloyd"``) against its PyTorch reference.

``"optimal"`` (the exact DP) has no kernel: on CUDA the launcher runs the reference on host copies
(tested below). The device fast path (``method="fast"``) is tested in ``test_lloyd_window_triton.py``;
everything else here pins ``method="lloyd"``.

CPU tensors run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest
without a GPU); the same checks run as ``gpu`` tests on CUDA tensors with compiled kernels.
The reference always runs on CPU.
"""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import helpers  # noqa: E402
from atmc_triton.kernels import lloyd_triton as lt  # noqa: E402
from atmc_triton.kernels.lloyd import (  # noqa: E402
    NUM_SLOTS,
    errors_for_bits,
    errors_for_bits_ref,
    lloyd_quantize,
    lloyd_quantize_ref,
)
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch._dynamo.testing import CompileCounter  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every launcher output starts as NaN (floats) or a sentinel (ints): unwritten elements show."""

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -12345
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(lt, "_new", poisoned)


def _make(segs, bits, device):
    values = torch.from_numpy(np.concatenate(segs).astype(np.float32)) if segs else torch.zeros(0)
    offsets = torch.tensor(np.cumsum([0] + [len(s) for s in segs]), dtype=torch.int64)
    return values.to(device), offsets.to(device), torch.tensor(bits, dtype=torch.int32, device=device)


def assert_matches_reference(values, offsets, bits, max_iter=20, tol=0.0):
    """Triton (on values.device) vs reference (CPU): codebooks to 1e-6 rel, same codes and q, errors to 1e-5 rel."""
    got = [t.cpu() for t in lt.lloyd_quantize_triton(values, offsets, bits, max_iter, tol, "lloyd")]
    want = lloyd_quantize_ref(values.cpu(), offsets.cpu(), bits.cpu(), max_iter, tol, "lloyd")
    book, codes, q, err = got
    assert book.shape == want[0].shape and codes.dtype == torch.int16 and q.dtype == err.dtype == torch.float32
    torch.testing.assert_close(book, want[0], rtol=1e-6, atol=0)
    assert torch.equal(codes, want[1])
    assert torch.equal(q, want[2])
    # the SSE is total - gain in float64: allow rounding relative to the segment's energy
    o = offsets.cpu().tolist()
    x64 = values.cpu().double()
    energy = torch.tensor([float(x64[a:b].square().sum()) for a, b in zip(o, o[1:])])
    assert torch.all((err.double() - want[3].double()).abs() <= 1e-5 * want[3].double().abs() + 1e-12 * energy + 1e-30)
    return got


def segment(max_len=400):
    return helpers.segment(max_len)


@pytest.mark.parametrize("device", DEVICES)
@given(
    segs=st.lists(segment(), min_size=1, max_size=5),
    data=st.data(),
    max_iter=st.sampled_from([0, 1, 3, 20]),
    tol=st.sampled_from([0.0, 1e-4]),
)
def test_matches_reference(device, segs, data, max_iter, tol):
    bits = [data.draw(st.integers(1, 8)) for _ in segs]
    assert_matches_reference(*_make(segs, bits, device), max_iter, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_boundary_and_multiblock_lengths(device):
    rng = np.random.default_rng(1)
    segs, bits = [], []
    for b in (1, 3, 8):
        for n in (0, 1, 2**b - 1, 2**b, 2**b + 1, 63, 1001):
            segs.append(rng.standard_normal(n))
            bits.append(b)
    segs.append(rng.standard_t(2.0, 9000))  # several sum-of-squares and code blocks
    bits.append(4)
    assert_matches_reference(*_make(segs, bits, device))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    assert_matches_reference(*_make([np.zeros(0), np.zeros(0)], [3, 8], device))
    values, offsets, _ = _make([np.zeros(0)], [1], device)
    assert torch.equal(lt.errors_for_bits_triton(values, offsets, 20, 0.0, "lloyd").cpu(), torch.zeros(1, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_zeros_duplicates_and_ties(device):
    segs = [
        np.zeros(50),
        np.full(50, 0.5),  # one level
        np.array([1.0, -1.0] * 20),
        np.repeat(np.arange(-6, 7) * 0.5, 11),  # 12 distinct nonzeros, 2^3 centres: exact ties at midpoints
        np.array([1.0] * 30 + [1.0001] * 30 + [5.0] * 40),  # an empty cluster keeps its centre
        np.array([-1e-40, 1e-40, 0.0, -0.0, 3e-39, -2.0, 7.0] * 5),  # denormals are nonzeros
    ]
    book, codes, q, err = assert_matches_reference(*_make(segs, [3, 1, 1, 3, 2, 2], device))
    assert torch.all(q[:50] == 0) and float(err[0]) == 0
    assert torch.all(q[50:100] == 0.5)


@pytest.mark.parametrize("device", DEVICES)
@given(segs=st.lists(segment(max_len=300), min_size=1, max_size=4), data=st.data())
def test_invariants(device, segs, data):
    bits = [data.draw(st.integers(1, 8)) for _ in segs]
    values, offsets, bits_t = _make(segs, bits, device)
    book, codes, q, err = [t.cpu() for t in lt.lloyd_quantize_triton(values, offsets, bits_t, 20, 0.0, "lloyd")]
    init_err = lt.lloyd_quantize_triton(values, offsets, bits_t, 0, 0.0, "lloyd")[3].cpu()
    assert torch.all(book[:, 0] == 0)
    o = offsets.cpu().tolist()
    for s, x in enumerate(segs):
        qs, cs = q[o[s] : o[s + 1]], codes[o[s] : o[s + 1]].long()
        assert torch.equal(qs, book[s][cs])  # codes decode to q
        zero = torch.from_numpy(x) == 0
        assert torch.all(cs[zero] == 0) and torch.all(qs[zero] == 0)  # zeros -> the zero slot
        assert torch.all((cs >= 0) & (cs <= 2 ** bits[s]))
        direct = float(((torch.from_numpy(x).double() - qs.double()) ** 2).sum())
        assert float(err[s]) == pytest.approx(direct, rel=1e-5, abs=1e-6)
        assert float(err[s]) <= float(init_err[s]) * (1 + 1e-6) + 1e-9  # never above the initial codebook's


@pytest.mark.parametrize("device", DEVICES)
def test_errors_for_bits(device):
    rng = np.random.default_rng(2)
    segs = [
        rng.standard_normal(700),
        rng.standard_t(1.5, 300),
        np.zeros(9),
        rng.standard_normal(5),
        np.zeros(0),
        rng.integers(-3, 4, 400) * 0.25,
    ]
    values, offsets, _ = _make(segs, [1] * len(segs), device)
    got = lt.errors_for_bits_triton(values, offsets, 20, 1e-5, "lloyd").cpu()
    want = errors_for_bits_ref(values.cpu(), offsets.cpu(), 20, 1e-5, "lloyd")
    assert got.shape == (len(segs), 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    for b in (1, 4, 8):  # the table's columns are the quantizer's errors
        bits = torch.full((len(segs),), b, dtype=torch.int32, device=device)
        torch.testing.assert_close(
            lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "lloyd")[3].cpu(), got[:, b - 1]
        )
    assert torch.all(got[:, 1:] <= got[:, :-1] * (1 + 1e-6) + 1e-9)  # more bits, less error (on these inputs)


def _args(device):
    values, offsets, bits = _make([np.linspace(-1, 1, 40), np.ones(3)], [2, 2], device)
    return values, offsets, bits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda v, o, b: (v.double(), o, b), "float32"),
        (lambda v, o, b: (v.view(1, -1), o, b), "1-D"),
        (lambda v, o, b: (v, o.int(), b), "offsets"),
        (lambda v, o, b: (v, o.to("meta"), b), "meta"),
        (lambda v, o, b: (v, o, b[:1]), "bits"),
        (lambda v, o, b: (v, o, b.float()), "bits"),
        (lambda v, o, b: (v, o.flip(0).contiguous(), b), "rise"),
        (lambda v, o, b: (v, o.clone().fill_(0), b), "rise"),
        (lambda v, o, b: (v, o, b * 0), "1..8"),
        (lambda v, o, b: (v, o, b + 7), "1..8"),
    ],
)
def test_launcher_rejects_bad_inputs(device, mutate, needle):
    with pytest.raises(ValueError, match=needle):
        lt.lloyd_quantize_triton(*mutate(*_args(device)), 20, 0.0, "lloyd")


@pytest.mark.parametrize("device", DEVICES)
def test_launcher_reads_strided_views_like_the_reference(device):
    """Views (every other element, a flipped copy's flip) give the contiguous inputs' results, as the reference
    does (the launcher used to refuse them: the same op raised on CUDA and worked on CPU)."""
    values, offsets, bits = _args(device)
    views = (torch.stack([values, -values], 1)[:, 0], offsets.flip(0).flip(0), torch.stack([bits, bits], 1)[:, 1])
    assert not views[0].is_contiguous() and not views[2].is_contiguous()
    want = lt.lloyd_quantize_triton(values, offsets, bits, 20, 0.0)
    for a, b in zip(lt.lloyd_quantize_triton(*views, 20, 0.0), want):
        assert torch.equal(a, b)
    assert torch.equal(
        lt.errors_for_bits_triton(views[0], views[1], 20, 0.0), lt.errors_for_bits_triton(values, offsets, 20, 0.0)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_launcher_rejects_bad_scalars(device):
    values, offsets, bits = _args(device)
    with pytest.raises(ValueError, match="max_iter"):
        lt.lloyd_quantize_triton(values, offsets, bits, -1, 0.0, "lloyd")
    with pytest.raises(ValueError, match="tol"):
        lt.errors_for_bits_triton(values, offsets, 20, -1.0, "lloyd")
    with pytest.raises(ValueError, match="offsets"):
        lt.errors_for_bits_triton(values, offsets[:-1], 20, 0.0, "lloyd")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["optimal"])
def test_optimal_runs_the_reference_on_the_host(device, method):
    values, offsets, bits = _make([np.random.default_rng(8).standard_t(3, 700), np.zeros(3)], [6, 2], device)
    got = lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, method)
    want = lloyd_quantize_ref(values.cpu(), offsets.cpu(), bits.cpu(), 20, 1e-5, method)
    for a, b in zip(got, want):
        assert a.device == values.device and torch.equal(a.cpu(), b)
    table = lt.errors_for_bits_triton(values, offsets, 20, 1e-5, method)
    assert torch.equal(table.cpu(), errors_for_bits_ref(values.cpu(), offsets.cpu(), 20, 1e-5, method))
    with pytest.raises(ValueError, match="method"):
        lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "kmeans")


def test_layout_constants_agree():
    from atmc_triton.kernels.lloyd import MAX_BITS

    assert (lt.NUM_SLOTS, lt.NBITS, lt.LANES) == (NUM_SLOTS, MAX_BITS, 2**MAX_BITS)


def _compiled_once(fn, *args):
    counter = CompileCounter()
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=counter)(*args)
    assert counter.frame_count == 1
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fast", "optimal", "lloyd"])
def test_ops_compile_in_one_frame(device, method):
    """torch.compile(op) in one frame against the reference, and the Triton launchers (not the op: on CPU
    tensors the compiled op runs its CPU kernel, the reference itself) against it too, on inputs with
    exact midpoint ties, duplicates, denormals, a one-sided segment and a segment kept exactly (where
    kernel and reference could differ)."""
    rng = np.random.default_rng(3)
    segs = [
        rng.standard_t(3, 500),
        np.zeros(4),
        np.repeat(np.arange(-6, 7) * 0.5, 11),
        np.array([-1e-40, 1e-40, 0.0, 3e-39, -2.0, 7.0] * 5),
        np.abs(rng.standard_normal(300)) + 0.3,
        rng.standard_normal(8),
    ]
    values, offsets, bits = _make(segs, [3, 2, 3, 2, 4, 3], device)

    def f(v, o, b):
        book, codes, q, err = lloyd_quantize(v, o, b, 10, 0.0, method)
        return book, codes, q, err, errors_for_bits(v, o, 10, 0.0, method)

    vc, oc, bc = values.cpu(), offsets.cpu(), bits.cpu()
    want = (*lloyd_quantize_ref(vc, oc, bc, 10, 0.0, method), errors_for_bits_ref(vc, oc, 10, 0.0, method))
    launched = (
        *lt.lloyd_quantize_triton(values, offsets, bits, 10, 0.0, method),
        lt.errors_for_bits_triton(values, offsets, 10, 0.0, method),
    )
    for results in (_compiled_once(f, values, offsets, bits), launched):
        if device == "cuda" and method == "fast":  # on a GPU "fast" promises quality, not the reference's bits
            book, codes, q, err, table = (t.cpu() for t in results)
            o = offsets.tolist()
            for s in range(len(o) - 1):  # codes decode to q
                assert torch.equal(q[o[s] : o[s + 1]], book[s][codes[o[s] : o[s + 1]].long()])
            torch.testing.assert_close(err, want[3], rtol=1e-3, atol=1e-9)
            torch.testing.assert_close(table, want[4], rtol=1e-3, atol=1e-9)
            continue
        for got, ref in zip(results, want, strict=True):
            if got.dtype == torch.int16:
                assert torch.equal(got.cpu(), ref)
            else:
                torch.testing.assert_close(got.cpu(), ref, rtol=1e-6, atol=1e-12)


def test_a_cpu_graph_holds_the_op_as_one_node_that_runs_the_reference():
    """CPU tensors (interpreter or not): the AOT trace records ``atmc::lloyd_quantize_cpu`` instead of Triton
    kernels no CPU backend could run (it used to refuse under TRITON_INTERPRET=1 and fail without it)."""
    values, offsets, bits = _args("cpu")
    torch._dynamo.reset()
    got = torch.compile(lambda v, o, b: lloyd_quantize(v, o, b, 5, 0.0, "lloyd"), backend="aot_eager")(
        values, offsets, bits
    )
    for a, b in zip(got, lloyd_quantize_ref(values, offsets, bits, 5, 0.0, "lloyd")):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_inductor_graph_runs_the_kernels():
    values, offsets, bits = _make([np.random.default_rng(4).standard_normal(3000), np.zeros(7)], [5, 3], "cuda")
    torch._dynamo.reset()
    got = torch.compile(lambda v, o, b: lloyd_quantize(v, o, b, 20, 0.0), fullgraph=True)(values, offsets, bits)
    book, codes, q, err = lloyd_quantize(values, offsets, bits, 20, 0.0)
    # inductor may lower the float64 prefix sums in another order: a centre can move by an ulp, rarely a code
    torch.testing.assert_close(got[0], book, rtol=1e-6, atol=1e-12)
    assert (got[1] != codes).float().mean() < 1e-3
    o = offsets.tolist()
    for s in range(len(o) - 1):  # each segment's codes decode to its q with its own codebook
        assert torch.equal(got[2][o[s] : o[s + 1]], got[0][s][got[1][o[s] : o[s + 1]].long()])
    torch.testing.assert_close(got[3], err, rtol=1e-5, atol=0)


@pytest.mark.skipif(INTERPRET, reason="CPU tensors are valid in the interpreter")
def test_launcher_refuses_cpu_tensors_when_compiled():
    with pytest.raises(ValueError, match="CUDA"):
        lt.lloyd_quantize_triton(*_args("cpu"), 20, 0.0)


@pytest.mark.gpu
def test_cuda_op_dispatches_to_the_launcher():
    values, offsets, bits = _make([np.random.default_rng(5).standard_normal(2000)], [4], "cuda")
    for a, b in zip(
        lloyd_quantize(values, offsets, bits, 20, 1e-5), lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5)
    ):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_large_segments_match_reference():
    """ResNet-like segment sizes: float64 summation order may move rare centres by an ulp."""
    rng = np.random.default_rng(6)
    segs = [rng.standard_normal(n) * 0.05 * (rng.random(n) < 0.6) for n in (2_359_296, 262_144, 65_536, 4_608, 1)]
    values, offsets, bits = _make(segs, [8, 4, 8, 2, 3], "cuda")
    # "lloyd": the same partition up to summation order; "fast" promises quality on a GPU, not bits (a near-tie
    # of the windowed DP may resolve the other way): its contract is checked in test_lloyd_window_triton.py
    book, codes, q, err = [t.cpu() for t in lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "lloyd")]
    want = lloyd_quantize_ref(values.cpu(), offsets.cpu(), bits.cpu(), 20, 1e-5, "lloyd")
    torch.testing.assert_close(book, want[0], rtol=1e-6, atol=1e-12)
    assert (codes != want[1]).float().mean() < 1e-5
    torch.testing.assert_close(err, want[3], rtol=1e-5, atol=0)
    assert book.shape[1] == NUM_SLOTS

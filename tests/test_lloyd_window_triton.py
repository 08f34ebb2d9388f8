"""The device fast path (``method="fast"``: init kernel of ``lloyd_window_triton``, then Lloyd) against the
reference, the exact optimum and the legacy quantizer; no host read-back inside the launch.

Contract (``kernels/lloyd_window_triton.py``): SSE within 1.02x the exact pinned-zero optimum, never
above the legacy ``"lloyd"`` result, exact (q == x) with <= 2^b distinct nonzeros. In the
interpreter the kernels also reproduce the reference's codes and codebooks on every case here;
compiled on a GPU, float64 scans in another order may resolve a near-tie the other way, so the
``gpu`` tests check the contract only.
"""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from atmc_triton.kernels import lloyd_triton as lt  # noqa: E402
from atmc_triton.kernels.lloyd import errors_for_bits_ref, lloyd_quantize_ref  # noqa: E402
from atmc_triton.kernels.lloyd_optimal import optimal_sse  # noqa: E402
from helpers import edge_examples, segment_and_bits  # noqa: E402
from hypothesis import given  # noqa: E402
from test_lloyd_triton import DEVICES, _make, _poison_outputs  # noqa: E402, F401

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_fast(values, offsets, bits, max_iter=20, tol=1e-5):
    """Run the launcher's fast path and check it against the contract (and, in the interpreter, bit equality)."""
    book, codes, q, err = [t.cpu() for t in lt.lloyd_quantize_triton(values, offsets, bits, max_iter, tol, "fast")]
    vc, oc, bc = values.cpu(), offsets.cpu(), bits.cpu()
    ref = lloyd_quantize_ref(vc, oc, bc, max_iter, tol, "fast")
    legacy = lloyd_quantize_ref(vc, oc, bc, max_iter, tol, "lloyd")
    o = oc.tolist()
    for s, b in enumerate(bc.tolist()):
        x, sl = vc[o[s] : o[s + 1]].numpy(), slice(o[s], o[s + 1])
        cs, qs = codes[sl].long(), q[sl]
        assert float(book[s, 0]) == 0 and torch.equal(qs, book[s][cs])  # codes decode to q
        assert torch.all(cs[torch.from_numpy(x) == 0] == 0) and torch.all((cs >= 0) & (cs <= 2**b))
        x64 = x.astype(np.float64)
        energy, got = float((x64**2).sum()), float(((x64 - qs.double().numpy()) ** 2).sum())
        assert float(err[s]) == pytest.approx(got, rel=1e-5, abs=1e-9 * energy + 1e-30)
        assert got <= 1.02 * optimal_sse(x, b) + 1e-12 * energy + 1e-30, (s, b)  # within 1.02x of the optimum
        old = float(((x64 - legacy[2][sl].double().numpy()) ** 2).sum())
        assert got <= old * (1 + 1e-6) + 1e-12 * energy + 1e-30, (s, b)  # never worse than the legacy
        if np.unique(x[x != 0]).size <= 2**b:  # exact: the distinct nonzeros are the centres
            assert torch.equal(qs, torch.from_numpy(x)) and float(err[s]) == 0
            assert torch.equal(cs, ref[1][sl].long()) and torch.equal(book[s], ref[0][s])
    if values.device.type == "cpu":  # the interpreter: the reference's arithmetic, formula for formula
        assert torch.equal(codes, ref[1]) and torch.equal(q, ref[2])
        torch.testing.assert_close(book, ref[0], rtol=1e-6, atol=0)
    return book, codes, q, err


def _edge_segments():
    rng = np.random.default_rng(11)
    segs, bits = [], []
    for b in (1, 3, 4):
        for n in (0, 1, 2**b - 1, 2**b, 2**b + 1, 7, 63, 300)[: 8 if b == 3 else 6]:
            segs.append(rng.standard_normal(n))
            bits.append(b)
    segs += [
        np.zeros(9),
        np.full(40, -0.5),  # all equal
        np.repeat(rng.standard_normal(8), 9),  # 8 distinct nonzeros, 72 values, b = 3: exact
        np.where(rng.random(400) < 0.6, 0.75, rng.integers(-5, 7, 400) * 0.3),  # heavy ties
        np.concatenate([np.abs(rng.standard_normal(300)) + 0.5, -rng.random(9) * 0.1]),  # one-sided
        np.array([-1e-40, 1e-40, 0.0, 3e-39, -2.0, 7.0] * 5),  # denormals are nonzeros
        rng.standard_t(3, 1500) * (rng.random(1500) < 0.8),  # > 16 * 2^b distinct: the value-grid atoms
    ]
    bits += [2, 1, 3, 4, 2, 2, 2]
    return segs, bits


@pytest.mark.parametrize("device", DEVICES)
def test_fast_edges_and_both_atom_grids(device):
    segs, bits = _edge_segments()
    atoms = {"runs" if np.unique(x[x != 0]).size <= max(512, 16 * 2**b) else "grid" for x, b in zip(segs, bits)}
    assert atoms == {"runs", "grid"}  # both atom constructions are reached
    check_fast(*_make(segs, bits, device))


@pytest.mark.parametrize("device", DEVICES)
def test_fast_many_centres_and_passes(device):
    """b = 6 and b = 8 (the largest chains), and the refinement really runs several passes."""
    rng = np.random.default_rng(12)
    segs = [rng.laplace(size=300), rng.standard_t(3, 300)]
    values, offsets, bits = _make(segs, [6, 8], device)
    seen, fast_init = [], lt._fast_init
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lt, "_fast_init", lambda *a: seen.append(fast_init(*a)) or seen[-1])
        check_fast(values, offsets, bits)
    passes = seen[0][3].cpu()
    assert torch.all(passes >= 3), passes


@pytest.mark.parametrize("device", DEVICES)
def test_fast_pass_counts_match_the_reference(device, monkeypatch):
    """Each problem runs the reference's number of refinement passes: one where the first pass moves no boundary
    (tight clusters; a pass counted as moved there would run a second), several on a Laplace segment. The kernel
    reads a boundary's value before the pass from its candidate row, not from the boundaries it rewrites."""
    import atmc_triton.kernels.lloyd as lloyd

    rng = np.random.default_rng(0)
    tight = [np.repeat(c, 12) + rng.standard_normal(c.size * 12) * 1e-3 for c in rng.standard_normal((3, 3)) * 3]
    segs, bits = [*tight, rng.laplace(size=150)], [1, 1, 1, 3]
    want, refine = [], lloyd.refine_partition
    monkeypatch.setattr(lloyd, "refine_partition", lambda *a, **k: want.append(refine(*a, **k)[2]) or refine(*a, **k))
    for x, b in zip(segs, bits):  # the reference's count, one segment at a time (it reports the largest)
        x = torch.from_numpy(x.astype(np.float32))
        lloyd_quantize_ref(x, torch.tensor([0, x.numel()]), torch.tensor([b], dtype=torch.int32), 20, 1e-5, "fast")
    monkeypatch.setattr(lloyd, "refine_partition", refine)
    assert 1 in want[:3] and want[3] >= 3, want  # both kinds reached
    seen, fast_init = [], lt._fast_init
    monkeypatch.setattr(lt, "_fast_init", lambda *a: seen.append(fast_init(*a)) or seen[-1])
    check_fast(*_make(segs, bits, device))
    assert seen[0][3].cpu().tolist() == want


@pytest.mark.parametrize("device", DEVICES)
def test_fast_far_outliers(device):
    """One weight 100x out of a Gaussian bulk at b = 6 (b = 6, not 8: a quarter of the interpreter's time): the
    compand cap changes the partition, which the kernel must reproduce (at b = 8 the same segment is 1.84x the
    optimum without the cap, 1.005x with it). One far outlier each side at b = 1: the end atoms as candidates of
    the first and last free boundaries (1.62x without them). Three at b = 2: the one-atom clusters at the
    spread's ends (1.18x without them)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1000) * 0.05
    x[rng.integers(1000)] *= 100
    y = np.random.default_rng(5).standard_normal(4000) * 0.05
    y[7], y[11] = -17.0, 3.3
    r = np.random.default_rng(3)  # three 100x out at b = 2: a one-atom cluster at a spread's end (1.18x without)
    z = r.standard_normal(6000)
    z[r.choice(6000, 3, replace=False)] *= 100
    check_fast(*_make([x, y, z * 0.05], [6, 1, 2], device))


@pytest.mark.parametrize("device", DEVICES)
@given(xb=segment_and_bits(max_len=300, max_bits=4))
@edge_examples
def test_fast_matches_reference(device, xb):
    """Drawn segments (the strategy reaches every edge: ``test_lloyd_optimal``), two per launch."""
    x, b = xb
    check_fast(*_make([x, x[::-1].copy()], [b, max(1, b - 1)], device))


@pytest.mark.parametrize("device", DEVICES)
def test_fast_errors_for_bits(device):
    rng = np.random.default_rng(13)
    segs = [rng.standard_normal(90), np.zeros(5), rng.integers(-3, 4, 60) * 0.25, rng.standard_t(2, 40), []]
    values, offsets, _ = _make(segs, [1] * len(segs), device)
    got = lt.errors_for_bits_triton(values, offsets, 20, 1e-5, "fast").cpu()
    want = errors_for_bits_ref(values.cpu(), offsets.cpu(), 20, 1e-5, "fast")
    # (on a GPU "fast" promises quality, not bits: a near-tie may resolve the other way at an equal error)
    torch.testing.assert_close(got, want, rtol=1e-5 if device == "cpu" else 1e-3, atol=1e-9)
    for b in (1, 5):  # the table's columns are the quantizer's errors
        bits = torch.full((len(segs),), b, dtype=torch.int32, device=device)
        torch.testing.assert_close(
            lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "fast")[3].cpu(), got[:, b - 1]
        )


@pytest.mark.parametrize("device", DEVICES)
def test_fast_non_finite_value_poisons_only_its_segment(device):
    rng = np.random.default_rng(14)
    bad = rng.standard_normal(300)
    bad[5] = np.nan
    values, offsets, bits = _make([bad, rng.standard_normal(300)], [3, 3], device)
    err = lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "fast")[3].cpu()
    want = lloyd_quantize_ref(values.cpu()[300:], torch.tensor([0, 300]), bits.cpu()[1:], 20, 1e-5, "fast")[3]
    assert torch.isnan(err[0]) and torch.isfinite(err[1])
    torch.testing.assert_close(err[1:], want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fast_scans_match_torch(device):
    """The fused scans: ranks exactly, prefix sums of values and of squares to float64 rounding, across blocks (1,024
    values each), empty segments (inside and at the end), a run continuing into the next segment, NaN."""
    rng = np.random.default_rng(15)
    segs = [rng.integers(-3, 4, 2100) * 0.5, [], np.full(7, 0.5), [0.5], rng.standard_normal(63), [0.0, 2.0], [], []]
    segs[4][5] = np.nan
    values, offsets, _ = _make(segs, [1] * len(segs), device)
    srt = lt._segment_sort(values, offsets)
    prefix, prefix2, rank = (t.cpu() for t in lt._scans(srt, offsets, True))
    s, o = srt.cpu(), offsets.cpu()
    new = torch.ones(s.numel(), dtype=torch.bool)
    new[1:] = s[1:] != s[:-1]
    new[o[:-1][o[:-1] < s.numel()]] = True  # every non-empty segment starts a run
    assert torch.equal(rank, torch.cumsum(new & (s != 0), 0, dtype=torch.int32))
    want = torch.cumsum(torch.where(torch.isfinite(s), s, 0.0).double().square(), 0)
    torch.testing.assert_close(prefix2, want, rtol=1e-12, atol=1e-12)
    want1 = torch.cumsum(torch.where(torch.isfinite(s), s, 0.0).double(), 0)  # (the prefix sums: same launches)
    torch.testing.assert_close(prefix, want1, rtol=1e-12, atol=1e-12)
    assert int(rank[2099]) < int(rank[2100 + 6])  # the 0.5 run of segment 2 is new (segment 0 ends with 1.5)


FORBIDDEN = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "__array__")


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1")
def test_fast_launch_reads_nothing_back(monkeypatch):
    """Every tensor read-back (``.tolist/.item/bool/int/float/.cpu/.numpy``) raises outside the kernels while
    the launchers run with the value checks skipped, as under CUDA-graph capture."""
    rng = np.random.default_rng(15)
    values, offsets, bits = _make([rng.standard_normal(100), np.zeros(3), rng.standard_normal(30)], [3, 2, 6], "cpu")
    want = lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "fast")
    want_table = lt.errors_for_bits_triton(values, offsets, 20, 1e-5, "fast")
    inside = [0]  # kernel launches in progress (the interpreter itself reads its arguments back)

    def guarded(name, orig):
        def f(self, *args, **kwargs):
            if not inside[0]:
                raise AssertionError(f"host read-back in the launcher: Tensor.{name}")
            return orig(self, *args, **kwargs)

        return f

    real_wrap = lt.wrap_triton

    class Launch:
        def __init__(self, kernel):
            self.launcher = real_wrap(kernel)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                inside[0] += 1
                try:
                    return self.launcher[grid](*args, **kwargs)
                finally:
                    inside[0] -= 1

            return run

    monkeypatch.setattr(lt, "_skip_value_checks", lambda v: True)
    monkeypatch.setattr(lt, "wrap_triton", Launch)
    for name in FORBIDDEN:
        monkeypatch.setattr(torch.Tensor, name, guarded(name, getattr(torch.Tensor, name)))
    with pytest.raises(AssertionError, match="read-back"):  # the guard is live
        values.tolist()
    got = lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "fast")
    got_table = lt.errors_for_bits_triton(values, offsets, 20, 1e-5, "fast")
    monkeypatch.undo()
    for a, b in zip((*got, got_table), (*want, want_table)):
        assert torch.equal(a, b)


def _quality_cases():
    rng = np.random.default_rng(7)
    n = 6000
    fams = [rng.standard_normal(n), rng.laplace(size=n), rng.standard_t(3, n)]
    v = rng.laplace(size=4 * n)
    fams.append(v * (np.abs(v) >= np.quantile(np.abs(v), 0.95)))
    return [x.astype(np.float32) for x in fams]


@pytest.mark.gpu
def test_fast_quality_cases_on_gpu():
    """The synthetic families of ``test_lloyd_optimal`` at every b, compiled (the interpreter run of the
    same cases is ``python -m bench.quant_quality_triton``)."""
    segs, bits = [], []
    for x in _quality_cases():
        segs += [x] * 8
        bits += list(range(1, 9))
    check_fast(*_make(segs, bits, "cuda"))


@pytest.mark.gpu
def test_fast_path_is_cuda_graph_capturable():
    rng = np.random.default_rng(16)
    segs = [rng.standard_t(3, 5000), np.zeros(7), rng.standard_normal(900)]
    values, offsets, bits = _make(segs, [8, 2, 4], "cuda")
    eager = lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "fast")  # compiles the kernels
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the launch raises
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lt, "_skip_value_checks", lambda v: True)
            for a, b in zip(lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "fast"), eager):
                assert torch.equal(a, b)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "fast")
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "fast")
    values.copy_(values.flip(0))
    graph.replay()
    for a, b in zip(out, lt.lloyd_quantize_triton(values, offsets, bits, 20, 1e-5, "fast")):
        assert torch.equal(a, b)


class _AnyGrid(dict):
    def __getitem__(self, grid):
        return super().__getitem__(None)


@pytest.mark.skipif(not INTERPRET, reason="bit equality of the atoms holds in the interpreter only")
def test_fast_atoms_match_the_reference_on_the_grid():
    """The kernel's atom boundaries equal the reference's (``atom_bounds`` plus the sign change) on segments
    with more than ``max(512, 16 K)`` distinct values: quantiles, compand points and the cube-root grid. The
    results alone cannot show it (a grid one compand step off still gave the same codes and inits)."""
    from atmc_triton.kernels import lloyd_window_triton as wt
    from atmc_triton.kernels.lloyd import atom_bounds
    from atmc_triton.kernels.lloyd_batch import unique_ints

    rng = np.random.default_rng(3)
    t3 = rng.standard_t(3, 700) * 0.05
    out = rng.standard_normal(800) * 0.05
    out[[17, 400]] = 5.0, -7.0  # far outliers: the compand points must not follow the value range
    segs, bits = [t3, out], [2, 5]
    assert all(np.unique(x).size > 512 for x in segs)  # the grid, not one atom per run
    values, offsets, bits_t = _make(segs, bits, "cpu")
    srt, prefix, _, prefix2, rank = lt._prepare(values, offsets, True)
    made, new, wrap = [], lt._new, lt.wrap_triton
    no_launch = {None: lambda **kw: None}  # the refinement is not needed here: launch it on no grid
    with pytest.MonkeyPatch.context() as mp:  # keep the launcher's scratch tensors
        mp.setattr(lt, "_new", lambda *a: made.append(new(*a)) or made[-1])
        mp.setattr(lt, "wrap_triton", lambda k: wrap(k) if k is not wt.fast_refine_kernel else _AnyGrid(no_launch))
        lt._fast_init(srt, prefix, prefix2, rank, offsets, bits_t)
    (atoms,) = [t for t in made if t.shape == (2, wt.ASTRIDE) and t.dtype == torch.int32]
    (state,) = [t for t in made if t.shape == (2, 4)]
    o = offsets.tolist()
    for s, b in enumerate(bits):
        x = srt[o[s] : o[s + 1]].numpy()
        nz = x[x != 0]
        want = unique_ints(np.append(atom_bounds(nz, 2**b), np.searchsorted(nz, 0.0)))
        G = int(state[s, 0])
        assert G == want.size - 1 and np.array_equal(atoms[s, : G + 1].numpy(), want), s

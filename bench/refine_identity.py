"""The fast quantizer's refinement against an older commit's, bit for bit and in CPU time:
``python -m bench.refine_identity [--rev REV] [--n N] [--time R] [--new REV]``.

Runs :func:`refine_partition` and one ``_pass`` of ``kernels/lloyd_window.py`` at ``--rev`` (default
``2499496``, before the CPU rework of ``_pass``) and of this tree (or of ``--new REV``) on the same problems and
asserts ``np.array_equal`` on ``B``, ``zc``, the pass count, and ``B``, ``zero_at``, ``cost`` of the pass
(NaN equal, and the cost's bits where it is not NaN). Problems: ``N`` random batches (``S`` = 1..6,
``K = 2^b - 1`` for b = 1..8 and odd ``K``, ``W`` = 1..8; Gaussian, one-signed, tied, tiny, huge values;
NaN / inf values; empty atoms (counts that do not rise); NaN / inf poked into the prefix arrays;
``max_passes`` 1, 2, 3, 32 and ``rtol`` 0, 1e-3, so they stop at different passes), ``N / 3`` single
problems with a NaN in the middle of ``P1`` or ``P2``, and the two problems of ``2M/30`` (2M Gaussian
values in 30 segments) at b = 4 and 8 as :func:`lloyd_quantize_ref` builds them. ``--time R``: CPU seconds
(median of ``R``, interleaved, one torch thread) of ``_pass`` and ``refine_partition`` on those two.
Exit status 1 on any mismatch (each is saved to an ``.npz`` whose path is printed).
"""

from __future__ import annotations

import argparse
import collections
import functools
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def at_rev(rev: str):
    """``kernels/lloyd_window.py`` at ``rev`` (``"tree"``: this tree's), with the modules it imports at ``rev``."""
    if rev == "tree":
        import atmc_triton.kernels.lloyd_window as mod

        return mod
    from bench.lloyd_cpu_ab import old_module

    return old_module(rev, "lloyd_window")


def values(rng: np.random.Generator, m: int, stats: collections.Counter) -> np.ndarray:
    """``m`` ascending float32 values (as float64), NaN last."""
    kind = rng.choice(["gauss", "pos", "neg", "ties", "tiny", "huge"], p=[0.3, 0.15, 0.15, 0.25, 0.08, 0.07])
    stats[str(kind)] += 1
    if kind == "ties":
        v = rng.integers(-3, 4, m).astype(np.float64)
        v[v == 0] = 1.0
    else:
        v = rng.standard_t(1, m) if kind == "huge" else rng.standard_normal(m)
        v = np.abs(v) + 1e-3 if kind == "pos" else -np.abs(v) - 1e-3 if kind == "neg" else v
    v = v.astype(np.float32).astype(np.float64)
    if kind in ("tiny", "huge"):  # beyond float32: squares that underflow, sums that overflow
        v *= 1e-160 if kind == "tiny" else 1e150
    r = rng.random()
    if r < 0.05:
        v[rng.integers(0, m, rng.integers(1, 3))] = np.nan
        stats["NaN value"] += 1
    elif r < 0.09:
        v[rng.integers(0, m)] = rng.choice([np.inf, -np.inf])
        stats["inf value"] += 1
    return np.sort(v)


def start(rng: np.random.Generator, K: int, G: int, za: int) -> tuple[np.ndarray, int]:
    """A random valid start: ``K + 2`` ascending boundaries whose cluster ``zc`` holds ``za``."""
    zc = int(rng.integers(0, K + 1))
    inner = np.sort(rng.integers(0, G + 1, K))
    inner[:zc] = np.minimum(inner[:zc], za)
    inner[zc:] = np.maximum(inner[zc:], za)
    return np.concatenate([[0], inner, [G]]), zc


def problem(rng: np.random.Generator, K: int, stats: collections.Counter) -> tuple:
    m = int(rng.integers(1, 400)) if rng.random() < 0.8 else int(rng.integers(400, 3000))
    s = values(rng, m, stats)
    z = int(np.searchsorted(s, 0.0))
    bnd = np.arange(m + 1) if rng.random() < 0.4 else np.union1d(rng.integers(0, m + 1, rng.integers(1, m + 2)), [0, m])
    bnd = np.union1d(bnd, [z])
    r = rng.random()
    if r < 0.1:  # a few empty atoms
        bnd = np.sort(np.concatenate([bnd, rng.choice(bnd, rng.integers(1, 4))]))
        stats["empty atoms"] += 1
    elif r < 0.2:  # every boundary repeated up to 4 times
        bnd = np.repeat(bnd, rng.integers(1, 5, bnd.size))
        stats["many empty atoms"] += 1
    G, za = bnd.size - 1, int(np.searchsorted(bnd, z))
    C, P1, P2 = bnd.astype(np.float64), np.append(0.0, np.cumsum(s))[bnd], np.append(0.0, np.cumsum(s * s))[bnd]
    if rng.random() < 0.25:  # non-finite prefix entries in the middle of a row (no prefix sum's pattern)
        X = [C, P1, P1, P2, P2][rng.integers(0, 5)]
        X[rng.integers(0, X.size, rng.integers(1, 4))] = rng.choice([np.nan, np.nan, np.inf, -np.inf])
        stats["poked"] += 1
    return (C, P1, P2, G, za, *start(rng, K, G, za))


def batch(rng: np.random.Generator, S: int, K: int, stats: collections.Counter) -> tuple:
    probs = [problem(rng, K, stats) for _ in range(S)]
    width = max(p[3] for p in probs) + 1
    C, P1, P2 = (np.stack([np.append(p[i], np.full(width - p[i].size, p[i][-1])) for p in probs]) for i in range(3))
    G, za, zc = (np.array([p[i] for p in probs]) for i in (3, 4, 6))
    return C, P1, P2, G, za, np.stack([p[5] for p in probs]), zc


def mid_row_nan(rng: np.random.Generator, it: int) -> tuple:
    """One problem, every value an atom, a NaN in the middle of ``P1`` or ``P2``: NaN at infeasible pairs."""
    m = int(rng.integers(30, 120))
    s = np.sort(rng.standard_normal(m))
    z = int(np.searchsorted(s, 0.0))
    C, P1, P2 = np.arange(m + 1.0), np.append(0.0, np.cumsum(s)), np.append(0.0, np.cumsum(s * s))
    (P1, P2)[it % 2][rng.integers(1, m, rng.integers(1, 3))] = np.nan
    B, zc = start(rng, int(rng.choice([3, 7, 15])), m, z)
    return C[None], P1[None], P2[None], np.array([m]), np.array([z]), B[None], np.array([zc])


def captured() -> dict[int, tuple]:
    """The ``refine_partition`` arguments of ``lloyd_quantize_ref(2M/30, b, method="fast")``, b = 4, 8."""
    import torch
    from atmc_triton.kernels import lloyd

    from bench.lloyd_cpu_ab import workload

    v, off = workload("2M/30")
    got, keep = {}, lloyd.refine_partition

    def spy(*args, b: int):
        got.setdefault(b, args)
        return keep(*args)

    try:
        for b in (4, 8):
            lloyd.refine_partition = functools.partial(spy, b=b)
            lloyd.lloyd_quantize_ref(v, off, torch.full((off.numel() - 1,), b, dtype=torch.int32), 20, 1e-5, "fast")
    finally:
        lloyd.refine_partition = keep
    return got


def same(x, y) -> bool:
    x, y = np.asarray(x), np.asarray(y)
    return x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f")


def check(old, new, args: tuple, W: int, max_passes: int, rtol: float, tag: str, stats: collections.Counter) -> None:
    C, P1, P2, G, za, B, zc = args
    with np.errstate(all="ignore"):
        win = old._candidates(B, G, W)
        po, pn = old._pass(C, P1, P2, za, win), new._pass(C, P1, P2, za, win)
        ro = old.refine_partition(C, P1, P2, G, za, B, zc, W, max_passes, rtol)
        rn = new.refine_partition(C, P1, P2, G, za, B, zc, W, max_passes, rtol)
    fin = ~np.isnan(po[2])
    ok = all(same(x, y) for x, y in zip(po + ro, pn + rn, strict=True))
    ok = ok and np.array_equal(po[2][fin].view(np.int64), pn[2][fin].view(np.int64))
    stats["checked"] += 1
    stats["rising counts" if np.all(np.diff(C, axis=1)[np.arange(C.shape[1] - 1) < G[:, None]] > 0) else "flat"] += 1
    stats["NaN cost"] += int(not fin.all())
    stats[f"{ro[2]} passes"] += 1
    if not ok:
        path = Path(tempfile.gettempdir()) / f"refine_mismatch_{stats['MISMATCH']}.npz"
        np.savez(path, C=C, P1=P1, P2=P2, G=G, za=za, B=B, zc=zc, W=W, max_passes=max_passes, rtol=rtol)
        print(f"MISMATCH {tag}: W={W} max_passes={max_passes} rtol={rtol}, saved to {path}")
        stats["MISMATCH"] += 1


def timings(old, new, probs: dict[int, tuple], reps: int) -> None:
    import torch

    torch.set_num_threads(1)
    for b, (C, P1, P2, G, za, B, zc, W, max_passes, rtol) in probs.items():
        win = old._candidates(B, G, W)
        out: dict[str, list[float]] = collections.defaultdict(list)
        for _ in range(reps):
            for name, mod in (("old", old), ("new", new)):
                t0 = time.process_time()
                mod._pass(C, P1, P2, za, win)
                t1 = time.process_time()
                mod.refine_partition(C, P1, P2, G, za, B, zc, W, max_passes, rtol)
                out[f"{name} _pass"].append(t1 - t0)
                out[f"{name} refine_partition"].append(time.process_time() - t1)
        med = {k: float(np.median(v)) for k, v in out.items()}
        for f in ("_pass", "refine_partition"):
            o, n = med[f"old {f}"], med[f"new {f}"]
            print(f"2M/30 b={b} S={C.shape[0]} T={B.shape[1]} {f}: old {o * 1e3:.1f} ms, new {n * 1e3:.1f} ms", end="")
            print(f", x{o / n:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev", default="2499496")
    ap.add_argument("--n", type=int, default=3000, help="random batches")
    ap.add_argument("--time", type=int, default=0, metavar="R", help="also time the 2M/30 problems, R repeats")
    ap.add_argument("--new", default="tree", help="a git revision, or 'tree' (this tree)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    old, new = at_rev(a.rev), at_rev(a.new)
    rng, stats = np.random.default_rng(a.seed), collections.Counter()
    for it in range(a.n):
        b = int(rng.integers(1, 9))
        K = 2**b - 1 if rng.random() < 0.7 else int(rng.integers(1, 2**b + 1))
        args = batch(rng, int(rng.integers(1, 7)), K, stats)
        W, mp, rtol = int(rng.integers(1, 9)), int(rng.choice([1, 2, 3, 32])), float(rng.choice([0.0, 1e-3]))
        check(old, new, args, W, mp, rtol, f"random batch {it} K={K}", stats)
    for it in range(a.n // 3):
        check(old, new, mid_row_nan(rng, it), int(rng.integers(1, 5)), 32, 0.0, f"mid-row NaN {it}", stats)
    probs = captured()
    for b, (*args, W, mp, rtol) in probs.items():
        check(old, new, tuple(args), W, mp, rtol, f"2M/30 b={b}", stats)
    print(dict(sorted(stats.items())))
    print(f"{stats['MISMATCH']} MISMATCHES" if stats["MISMATCH"] else f"IDENTICAL on {stats['checked']} problems")
    if a.time:
        timings(old, new, probs, a.time)
    return 1 if stats["MISMATCH"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Codebook quality against the exact pinned-zero optimum: ``python -m bench.quant_quality [--ckpt PT ...]``.

For every segment, the SSE over the nonzeros of each quantizer divided by the exact optimum
(:func:`atmc_triton.kernels.lloyd_optimal.optimal_sse`: ``2^b`` free centres plus a centre
pinned at 0), summed over the segments of one source before dividing:

* ``lloyd``: the legacy project default (midpoint-quantile init, 20 iterations, tol 1e-5);
* ``fast``: the default (compand init, windowed DP over atoms, then Lloyd from it and from the legacy
  init, the lower error kept; same iteration settings);
* ``optimal``: the exact DP (``method="optimal"``, float32 centres: 1.000 up to rounding);
* ``sklearn``: ``sklearn.cluster.KMeans`` (k-means++, 10 inits) with ``2^b + 1`` clusters on the
  nonzeros, the centre nearest 0 then pinned to 0 (only up to ``--sklearn-max-n`` values);
* ``kmeans1d``: the exact unconstrained 1-D k-means of the ``kmeans1d`` package (optional
  dependency) with ``2^b + 1`` clusters, the centre nearest 0 pinned to 0 likewise;
* ``uniform``: ``2^b`` levels uniform over [min, max] of the nonzeros, plus the zero.

Sources: synthetic Gaussian, Laplacian, Student-t(3), sparse top-5 % Laplacian and "outliers" (a
Gaussian bulk with 0.01 % of its values 100x out, at least one, and one 1000x out) segments of ``--sizes``
values (``--families``), and every weight (dense checkpoints) or ATMC factor ``W + u`` of the
checkpoints given with ``--ckpt`` (``atmc train`` writes them under ``atmc_runs/``). Writes
``quant_quality.json`` and ``quant_quality.md`` to ``--out`` (default ``bench/results``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from atmc_triton.kernels.lloyd import lloyd_quantize_ref
from atmc_triton.kernels.lloyd_optimal import optimal_sse

from bench.common import environment

RESULTS = Path(__file__).resolve().parent / "results"
BITS = (1, 2, 3, 4, 5, 6, 7, 8)
FAMILIES = ("gauss", "laplace", "t3", "sparse5", "outliers")
BEFORE = "6b31cda"  # --before: this commit's reference, the last before 2026-11-30's outlier fixes


def synthetic(family: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if family == "gauss":
        x = rng.standard_normal(n)
    elif family == "laplace":
        x = rng.laplace(size=n)
    elif family == "t3":
        x = rng.standard_t(3, n)
    elif family == "sparse5":
        x = rng.laplace(size=n)
        x = x * (np.abs(x) >= np.quantile(np.abs(x), 0.95))
    elif family == "outliers":  # a Gaussian bulk with a few far weights: 0.01 % at 100x (at least one), one at 1000x
        x = rng.standard_normal(n)
        x[rng.choice(n, max(1, n // 10_000), replace=False)] *= 100
        x[rng.integers(n)] *= 1000
    else:
        raise ValueError(family)
    return (x * 0.05).astype(np.float32)


def checkpoint_segments(path: Path) -> list[np.ndarray]:
    """Every conv/linear weight of a dense checkpoint, or every ATMC factor ``W + u``."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    sd = blob.get("model", blob) if isinstance(blob, dict) else blob
    segs = []
    for k, v in sd.items():
        if not torch.is_tensor(v) or not v.is_floating_point():
            continue
        head, _, leaf = k.rpartition(".")
        if leaf in ("U", "V", "C"):
            u = sd.get(f"{head}.{leaf}_u")
            segs.append((v + u if u is not None else v).float().reshape(-1).numpy())
        elif leaf == "weight" and v.dim() >= 2 and f"{head}.U" not in sd:
            segs.append(v.float().reshape(-1).numpy())
    return segs


def _pin_nearest_zero(c: np.ndarray) -> np.ndarray:
    """``K + 1`` unconstrained centres -> ``K`` free ones (the centre nearest 0 becomes the pinned zero)."""
    return np.delete(c, int(np.argmin(np.abs(c))))


def _sse_with_codebook(x: np.ndarray, free: np.ndarray) -> float:
    c = np.unique(np.concatenate([free.astype(np.float32), [np.float32(0)]]))
    nz = x[x != 0].astype(np.float64)
    mids = (c[1:].astype(np.float64) + c[:-1]) / 2
    q = c[np.searchsorted(mids, nz, side="left")].astype(np.float64)
    return float(((nz - q) ** 2).sum())


def sse_all(x: np.ndarray, b: int, sklearn_max_n: int, quantize=lloyd_quantize_ref) -> dict[str, float]:
    """SSE of every method on one segment at ``b`` bits (``nan`` where a method was skipped); ``quantize``:
    ``lloyd_quantize_ref`` or an older commit's (``--before``)."""
    v = torch.from_numpy(np.ascontiguousarray(x))
    off, bt = torch.tensor([0, x.size]), torch.tensor([b], dtype=torch.int32)
    out = {m: float(quantize(v, off, bt, 20, 1e-5, m)[3][0]) for m in ("lloyd", "fast", "optimal")}
    nz = x[x != 0]
    K = 2**b
    out["uniform"] = _sse_with_codebook(x, np.linspace(nz.min(), nz.max(), K)) if nz.size > K else 0.0
    out["sklearn"] = float("nan")
    if nz.size <= K:
        out["sklearn"] = 0.0
    elif nz.size <= sklearn_max_n:
        from sklearn.cluster import KMeans

        km = KMeans(K + 1, init="k-means++", n_init=10, random_state=0).fit(nz.reshape(-1, 1).astype(np.float64))
        out["sklearn"] = _sse_with_codebook(x, _pin_nearest_zero(km.cluster_centers_.ravel()))
    try:
        import kmeans1d

        cent = np.array(kmeans1d.cluster(nz.astype(np.float64), K + 1)[1]) if nz.size > K else None
        out["kmeans1d"] = 0.0 if cent is None else _sse_with_codebook(x, _pin_nearest_zero(cent))
    except ImportError:
        out["kmeans1d"] = float("nan")
    return out


def measure(sources: dict[str, list[np.ndarray]], bits, sklearn_max_n: int, quantize=lloyd_quantize_ref) -> list[dict]:
    rows = []
    for name, segs in sources.items():
        for b in bits:
            t0 = time.perf_counter()
            tot: dict[str, float] = {}
            opt = 0.0
            for x in segs:
                opt += optimal_sse(x, b)
                for m, e in sse_all(x, b, sklearn_max_n, quantize).items():
                    tot[m] = tot.get(m, 0.0) + e
            ratios = {m: (e / opt if opt > 0 else (1.0 if e == 0 else e * float("inf"))) for m, e in tot.items()}
            rows.append({"source": name, "b": b, "segments": len(segs), "values": int(sum(s.size for s in segs))})
            rows[-1].update({"optimal_sse": opt, **{f"ratio_{m}": r for m, r in ratios.items()}})
            print(
                f"{name:<28} b={b} "
                + " ".join(f"{m}={r:.4f}" for m, r in ratios.items())
                + f"  ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    return rows


def markdown(rows: list[dict]) -> str:
    methods = ["lloyd", "fast", "optimal", "sklearn", "kmeans1d", "uniform"]
    head = "| source | values | b | " + " | ".join(methods) + " |\n|" + "---|" * (3 + len(methods)) + "\n"
    body = ""
    for r in rows:
        cells = []
        for m in methods:
            v = r.get(f"ratio_{m}", float("nan"))
            cells.append("n/a" if v != v else f"{v:.3f}")
        body += f"| {r['source']} | {r['values']:,} | {r['b']} | " + " | ".join(cells) + " |\n"
    return head + body


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="synthetic segment sizes (comma separated)")
    ap.add_argument("--bits", default=",".join(map(str, BITS)))
    ap.add_argument("--ckpt", nargs="*", default=[], help="checkpoints (.pt) whose segments to measure")
    ap.add_argument("--sklearn-max-n", type=int, default=20_000)
    ap.add_argument("--families", default=",".join(FAMILIES), help="synthetic families (comma separated)")
    ap.add_argument("--before", action="store_true", help=f"the reference of {BEFORE}, before the outlier fixes")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    quantize = lloyd_quantize_ref
    if a.before:
        from bench.lloyd_cpu_ab import old_reference

        quantize = old_reference(BEFORE)
    bits = [int(b) for b in a.bits.split(",")]
    sources: dict[str, list[np.ndarray]] = {}
    for fam in a.families.split(","):
        for n in (int(s) for s in a.sizes.split(",")):
            sources[f"{fam} n={n:,}"] = [synthetic(fam, n, seed=n)]
    for p in a.ckpt:
        sources[f"ckpt {Path(p).parent.name}/{Path(p).stem}"] = checkpoint_segments(Path(p))
    rows = measure(sources, bits, a.sklearn_max_n, quantize)
    a.out.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu"))
    meta = {"env": env, "before": a.before, "rows": rows}
    (a.out / "quant_quality.json").write_text(json.dumps(meta, indent=1))
    which = f", the reference of {BEFORE}, before the outlier fixes (--before)" if a.before else ""
    (a.out / "quant_quality.md").write_text(
        f"Ratio of SSE to the exact pinned-zero optimum ({env['commit']}, {env['date']}{which}):\n\n" + markdown(rows)
    )
    worst = max(r["ratio_fast"] for r in rows)
    print(f"worst fast / optimal: {worst:.4f} (target <= 1.02)")


if __name__ == "__main__":
    main()

"""``"fast"`` on random segments with a few far weights: ``python -m bench.outlier_scan [--old REV] [--seeds 60]``.

Segment ``i`` (seed ``i``): 2,000, 6,000 or 20,000 Gaussian values (scale 0.05) with 1 to 6 of them
10x, 30x, 100x or 1000x out, quantized at b = 1..8 by :func:`lloyd_quantize_ref` (``"fast"``) of this
tree and, with ``--old``, of that commit's reference (``bench.lloyd_cpu_ab.old_reference``); each SSE
over the exact pinned-zero optimum. This is wider than ``bench.quant_quality``'s ``outliers`` family
(one seed per size, 0.01 % at 100x and one at 1000x): several far weights on one side, at every scale.
Prints the worst cases and the counts over 1.01 and 1.02; writes ``outlier_scan.json`` to ``--out``.

Example:
    python -m bench.outlier_scan --seeds 10 --old HEAD
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from atmc_triton.kernels.lloyd import lloyd_quantize_ref
from atmc_triton.kernels.lloyd_optimal import optimal_sse

from bench.common import environment

RESULTS = Path(__file__).resolve().parent / "results"
BITS = tuple(range(1, 9))


def segment(seed: int) -> tuple[np.ndarray, dict]:
    """Segment ``seed`` of the scan (float32) and what it holds."""
    r = np.random.default_rng(seed)
    n = int(r.choice([2000, 6000, 20000]))
    x = r.standard_normal(n)
    k = int(r.integers(1, 7))
    scale = int(r.choice([10, 30, 100, 1000]))
    x[r.choice(n, k, replace=False)] *= scale
    return (x * 0.05).astype(np.float32), {"n": n, "far": k, "scale": scale}


def ratios(quantize, seeds: int) -> list[dict]:
    """SSE of ``quantize`` (``lloyd_quantize_ref``'s signature) over the optimum, per seed and b."""
    rows = []
    for seed in range(seeds):
        x, meta = segment(seed)
        v, off = torch.from_numpy(x), torch.tensor([0, x.size])
        for b in BITS:
            err = float(quantize(v, off, torch.tensor([b], dtype=torch.int32), 20, 1e-5, "fast")[3][0])
            rows.append({"seed": seed, "b": b, **meta, "ratio": err / optimal_sse(x, b)})
    return rows


def summary(rows: list[dict]) -> dict:
    r = np.array([row["ratio"] for row in rows])
    worst = sorted(rows, key=lambda row: -row["ratio"])[:5]
    return {
        "cases": len(rows),
        "over_1.01": int((r > 1.01).sum()),
        "over_1.02": int((r > 1.02).sum()),
        "median": float(np.median(r)),
        "mean": float(r.mean()),
        "worst": [{k: row[k] for k in ("ratio", "seed", "b", "n", "far", "scale")} for row in worst],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=60)
    ap.add_argument("--old", default=None, help="also run the reference of this commit")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if a.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {a.seeds}")
    runs = {"this tree": lloyd_quantize_ref}
    if a.old:
        from bench.lloyd_cpu_ab import old_reference

        runs[a.old] = old_reference(a.old)
    out = {"env": environment(torch.device("cpu")), "seeds": a.seeds, "runs": {}}
    for name, fn in runs.items():
        s = summary(ratios(fn, a.seeds))
        out["runs"][name] = s
        worst = ", ".join(f"{w['ratio']:.4f} (seed {w['seed']}, b = {w['b']})" for w in s["worst"])
        print(
            f"{name}: {s['cases']} cases, {s['over_1.02']} over 1.02, {s['over_1.01']} over 1.01, "
            f"median {s['median']:.5f}, mean {s['mean']:.5f}; worst {worst}",
            flush=True,
        )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "outlier_scan.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

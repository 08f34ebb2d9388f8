"""CPU figure for the reference quantizer: ``python -m bench.lloyd_cpu [--n 21000000] [--threads 1]``.

Acceptance target (core issue): 21M values, 2^8 free levels, <= 20 iterations, under 5 s on
one CPU core. Prints the median of three runs (one factor, or ``--segments`` equal ones) of
``--method`` (default ``fast``) and appends it, with the CPU, commit and date, to
``bench/results/lloyd_cpu.jsonl`` (``--no-results``: don't).

``--compare-n N`` (default 100,000; 0 skips it) then times, in the same run and on the first N
of the same values: every method of :func:`lloyd_quantize_ref`, ``sklearn.cluster.KMeans``
(k-means++, 10 inits, ``2^b + 1`` clusters) and ``kmeans1d.cluster`` (if installed), median of
three (one run for sklearn), and records them in the same JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from atmc_triton.kernels import lloyd_quantize_ref

from bench.common import environment

RESULTS = Path(__file__).resolve().parent / "results" / "lloyd_cpu.jsonl"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _times(fn, reps: int = 3) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return sorted(out)


def _compare(x: torch.Tensor, b: int) -> dict[str, float]:
    """Median seconds of every method and of the external 1-D k-means on the same values ``x``."""
    n, K = x.numel(), 2**b
    off, bits = torch.tensor([0, n]), torch.tensor([b], dtype=torch.int32)
    res = {}
    for m in ("fast", "lloyd", "optimal"):
        res[m] = _times(lambda m=m: lloyd_quantize_ref(x, off, bits, 20, 1e-5, m))[1]
    xn = x.double().numpy()
    from sklearn.cluster import KMeans

    res["sklearn KMeans (k-means++, 10 inits)"] = _times(
        lambda: KMeans(K + 1, init="k-means++", n_init=10, random_state=0).fit(xn.reshape(-1, 1)), reps=1
    )[0]
    try:
        import kmeans1d

        res["kmeans1d"] = _times(lambda: kmeans1d.cluster(xn, K + 1))[1]
    except ImportError:
        print("kmeans1d is not installed (pip install kmeans1d): skipped")
    for k, v in res.items():
        print(f"  n={n:,} b={b} {k}: median {v:.3f} s")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=21_000_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--segments", type=int, default=1)
    ap.add_argument("--method", default="fast", choices=("fast", "optimal", "lloyd"))
    ap.add_argument("--compare-n", type=int, default=100_000)
    ap.add_argument("--no-results", action="store_true", help=f"do not append to {RESULTS}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, generator=g)
    bounds = torch.linspace(0, args.n, args.segments + 1).round().long()
    bits = torch.full((args.segments,), args.bits, dtype=torch.int32)
    times = _times(lambda: lloyd_quantize_ref(x, bounds, bits, 20, 1e-5, args.method))
    print(
        f"lloyd_quantize_ref({args.method}): n={args.n:,} segments={args.segments} bits={args.bits} "
        f"threads={args.threads}: median {times[1]:.2f} s (min {times[0]:.2f}, max {times[2]:.2f})"
    )
    compare = _compare(x[: args.compare_n], args.bits) if args.compare_n else {}
    if not args.no_results:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        rec = {
            **environment(torch.device("cpu")),
            "cpu": cpu_name(),
            "n": args.n,
            "segments": args.segments,
            "bits": args.bits,
            "method": args.method,
            "threads": args.threads,
            "compare_n": args.compare_n,
            "compare_median_s": compare,
            "median_s": times[1],
            "min_s": times[0],
            "max_s": times[2],
        }
        with open(RESULTS, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

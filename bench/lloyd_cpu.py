"""CPU figure for the reference Lloyd quantizer: ``python -m bench.lloyd_cpu [--n 21000000] [--threads 1]``.

Acceptance target (core issue): 21M values, 2^8 free levels, <= 20 iterations, under 5 s on
one CPU core. Prints the median of three runs (one factor, or ``--segments`` equal ones) and
appends it, with the CPU, commit and date, to ``bench/results/lloyd_cpu.jsonl`` (``--no-results``: don't).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=21_000_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--segments", type=int, default=1)
    ap.add_argument("--no-results", action="store_true", help=f"do not append to {RESULTS}")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, generator=g)
    bounds = torch.linspace(0, args.n, args.segments + 1).round().long()
    bits = torch.full((args.segments,), args.bits, dtype=torch.int32)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        lloyd_quantize_ref(x, bounds, bits, 20, 1e-5)
        times.append(time.perf_counter() - t0)
    times.sort()
    print(
        f"lloyd_quantize_ref: n={args.n:,} segments={args.segments} bits={args.bits} threads={args.threads}: "
        f"median {times[1]:.2f} s (min {times[0]:.2f}, max {times[2]:.2f})"
    )
    if not args.no_results:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        rec = {
            **environment(torch.device("cpu")),
            "cpu": cpu_name(),
            "n": args.n,
            "segments": args.segments,
            "bits": args.bits,
            "threads": args.threads,
            "median_s": times[1],
            "min_s": times[0],
            "max_s": times[2],
        }
        with open(RESULTS, "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

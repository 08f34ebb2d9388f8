"""CPU figure for the reference Lloyd quantizer: ``python -m bench.lloyd_cpu [--n 21000000] [--threads 1]``.

Acceptance target (core issue): 21M values, 2^8 free levels, <= 20 iterations, under 5 s on
one CPU core. Prints the median of three runs, split into one factor and ResNet34-like segments.
"""

from __future__ import annotations

import argparse
import time

import torch
from atmc_triton.kernels import lloyd_quantize_ref


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=21_000_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--segments", type=int, default=1)
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
    print(f"lloyd_quantize_ref: n={args.n:,} segments={args.segments} bits={args.bits} threads={args.threads}: "
          f"median {times[1]:.2f} s (min {times[0]:.2f}, max {times[2]:.2f})")


if __name__ == "__main__":
    main()

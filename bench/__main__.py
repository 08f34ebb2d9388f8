"""Run every benchmark: ``python -m bench --out DIR [--only admm,lloyd] [--quick]``.

Each module in ``MODULES`` exposes ``run(ctx) -> (rows, targets)``. On a GPU this measures
everything and ends with one summary table against the targets; the results files are rewritten after
every module, so a run cut off by a time limit keeps what the finished modules measured (``gemm`` has its
own soft budget, ``ATMC_BENCH_GEMM_BUDGET_S``; on a device with a 10-minute limit per command, run the
modules in separate calls with ``--only``). ``--only`` writes ``results_<modules>.{md,jsonl}``, so runs of
different modules into one ``--out`` do not overwrite each other. ``--quick`` runs tiny sizes on whatever
device is present (a smoke test of the code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.common import Ctx, environment, write_results

MODULES = ["bench.admm", "bench.lloyd", "bench.gemm", "bench.e2e"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for results[_<only>].md / .jsonl")
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(m[6:] for m in MODULES))
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test of the benchmark code)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        print("no CUDA GPU: the benchmarks measure GPU kernels; use --quick for a CPU smoke run", file=sys.stderr)
        return 2
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    known = [m[6:] for m in MODULES]
    if wanted - set(known):  # (a typo would otherwise run nothing and write empty results_<typo> files)
        ap.error(f"--only: unknown {', '.join(sorted(wanted - set(known)))}; choose from {', '.join(known)}")
    ctx = Ctx(device=device, quick=args.quick, out=args.out)
    env = environment(device)
    stem = "results_" + "_".join(sorted(wanted)) if wanted else "results"
    rows, targets, failed = [], [], []
    md = write_results(args.out, env, rows, targets, stem)  # rewritten after every module: a cut-off run keeps those
    for name in MODULES:
        if wanted and name[6:] not in wanted:
            continue
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                print(f"[bench] {name}: not present, skipped", flush=True)
                continue
            raise
        t0 = time.time()
        try:
            r, t = mod.run(ctx)
        except Exception:  # one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
            continue
        rows += r
        targets += t
        print(f"[bench] {name}: {len(r)} rows in {time.time() - t0:.1f}s", flush=True)
        md = write_results(args.out, env, rows, targets, stem)
    print(md)
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Instruction issue of the packed-GEMM hot loops, read from the compiled SASS (no GPU needed).

``python -m bench.gemm_issue [--out DIR] [--side PATH[,PATH...]|off]`` records the launches a 4096 x 4096
packed layer makes (ratio 0.05, b = 8: bitmap + CSR and CSR + CSR factors; dense codes + bitmap
for the low-rank layer) for M = 1 ... 128 in Triton's interpreter (kernels not executed), compiles every autotune
config for sm_90 (:mod:`bench.aot`) and counts the instructions of each kernel's longest loop body.
A warp issues that body once per iteration, so

* tile kernel: ``loop x num_warps / (BLOCK_N x BLOCK_K)`` warp instructions per decoded weight
  element and ``BLOCK_M``-row tile;
* CSR kernel: ``loop x num_warps / (BLOCK_R x BLOCK_J)`` per nonzero slot and ``BLOCK_M`` rows.

The smallest over a launch's configs (what autotuning could reach) is what
:data:`atmc_triton.kernels.lowrank_gemm.ISSUE` holds; at 132 SMs x 4 schedulers x 1.755 GHz
(9.3e11 warp instructions/s on an H100) it bounds the kernel's time from below. These are counts,
not timings; the bound assumes every scheduler issues every cycle.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

MS = (1, 2, 4, 8, 16, 32, 64, 128)
LAYERS = (  # (name, ratio, bits, structure, formats)
    ("bitmap+csr", 0.05, 8, "identity", "size"),
    ("dense+bitmap", 0.05, 8, "svd", "size"),
    ("csr+csr", 0.05, 8, "identity", "speed"),
)


def record() -> list[dict]:
    """Every tile / CSR launch of the two 4096^2 layers at each M, one spec per autotune config."""
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from atmc_triton.kernels.lowrank_gemm_triton import linear_launch

    from bench.aot import record_launches, unique_specs
    from bench.gemm import Layer
    from bench.static import _gemm_configs

    specs = []
    for name, ratio, bits, structure, formats in LAYERS:
        layer = Layer(name, 4096, 4096, ratio, bits, structure, torch.device("cpu"), formats=formats)
        for M in MS:
            with record_launches(execute=False) as got:
                linear_launch(
                    torch.zeros(M, 4096, dtype=torch.float16), None, 4096, layer.r, layer.identity, layer.factors, {}
                )
            for s in _gemm_configs(unique_specs(got), keep_m1=True):
                if s["name"] in ("_tile_kernel", "_csr_mm_kernel"):
                    specs.append({**s, "layer": name, "M": M})
    return specs


def per_unit(spec: dict, res: dict) -> tuple[str, float]:
    """``(kind, warp instructions per element or nonzero slot)`` of one compiled spec."""
    a = {k: v[1] for k, v in spec["args"].items()}
    warps, loop = res["num_warps"], res["sass"]["loop"]
    if spec["name"] == "_csr_mm_kernel":
        return f"csr BLOCK_M={a['BLOCK_M']}", loop * warps / (a["BLOCK_R"] * a["BLOCK_J"])
    kinds = {a["KIND1"], a["KIND2"]} - {0}
    kind = "bitmap" if kinds == {3} else "dense" if kinds == {1} else "mixed"
    return f"tile {kind} BLOCK_M={a['BLOCK_M']}", loop * warps / (a["BLOCK_N"] * a["BLOCK_K"])


def run(triton_path: str | None) -> dict:
    from bench.aot import compile_specs

    specs = record()
    results = compile_specs([{k: v for k, v in s.items() if k not in ("layer", "M")} for s in specs], 90, triton_path)
    best: dict[str, dict] = {}
    for s, r in zip(specs, results):
        if not r["ok"]:
            raise RuntimeError(r["error"])
        kind, cost = per_unit(s, r)
        if kind.startswith("tile mixed"):
            continue
        row = best.setdefault(kind, {"min": cost, "max": cost, "regs": r["regs"], "spill": r["spill_bytes"]})
        row["min"], row["max"] = min(row["min"], cost), max(row["max"], cost)
        row["spill"] = max(row["spill"], r["spill_bytes"])
    return {"triton": results[0]["triton"] if results else "?", "per_unit": dict(sorted(best.items()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gemm_issue", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write gemm_issue.json here")
    ap.add_argument(
        "--side", "--triton36", default="off", help="Triton `pip --target` directories (3.6.0, the newest), or 'off'"
    )
    args = ap.parse_args(argv)
    from bench.aot import side_paths

    runs = [run(None)] + [run(d) for d in side_paths(args.side)]
    for res in runs:
        print(f"triton {res['triton']}: warp instructions per element (tile) / per nonzero slot (CSR), sm_90")
        for kind, row in res["per_unit"].items():
            print(f"  {kind:28s} best {row['min']:.2f}  worst {row['max']:.2f}  spill {row['spill']} B")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gemm_issue.json").write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

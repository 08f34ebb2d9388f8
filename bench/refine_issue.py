"""Instructions of the fast quantizer's refinement loops, read from the compiled SASS (no GPU needed).

``python -m bench.refine_issue [--out DIR] [--side PATH[,PATH...]|off]`` records the launch of
``fast_refine_kernel`` (:mod:`atmc_triton.kernels.lloyd_window_triton`) in Triton's interpreter,
compiles it for sm_90 (installed Triton, and each side install: 3.6, the newest), and counts the instructions
of each innermost loop of its SASS. One warp issues a loop body once per iteration:

* ``step``: the Viterbi step without its two branches (the V0 branch, ``v0``, and the zero-cluster
  branch, ``zero``: forward branches over more than 300 instructions inside the loop);
* ``back``: a backtrack step (LLVM unrolls its loop: the body over its stored boundaries, one ``STG`` each;
  a step makes two picks, two ``REDUX``);
* ``cand``: a 32-row candidate tile.

These are the per-warp counts :data:`bench.model.REFINE_SASS` holds (the kernel runs 4 warps, one
per scheduler). Counts, not timings. Not counted: the slow paths of float64 divisions (a predicated
branch over a ``CALL`` to the fix-up routine, taken only when the quotient needs it: denormal,
huge or special operands), which are in the loop body but not issued on a normal step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path


def record() -> dict:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from atmc_triton.kernels.lloyd_triton import lloyd_quantize_triton

    from bench.aot import record_launches

    with record_launches(execute=False) as got:
        lloyd_quantize_triton(torch.randn(5000), torch.tensor([0, 5000]), torch.tensor([8]), 20, 1e-5, "fast")
    return next(s for s in got if s["name"] == "fast_refine_kernel")


def _target(op: str) -> int | None:
    """The address a branch instruction ``op`` jumps to (None: not a branch)."""
    m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", op)
    return int(m.group(1), 16) if m else None


def _forward(body: list[tuple[int, str]]):
    """``(op, skipped)`` of each forward branch in ``body``: the instructions between it and its target."""
    for a, op in body:
        t = _target(op)
        if t is not None and t > a:
            yield op, [(x, o) for x, o in body if a < x < t]


def loops(sass: str) -> list[dict]:
    """Innermost loops: size, forward-branch spans over 300 instructions, and a few opcode counts."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    spans = [(t, a) for a, op in ins if (t := _target(op)) is not None and t < a]
    out = []
    for lo, hi in spans:
        if any(lo <= x and y <= hi and (x, y) != (lo, hi) for x, y in spans):
            continue  # holds another loop
        body = [(a, op) for a, op in ins if lo <= a <= hi]
        slow = set()  # division slow paths: a predicated forward branch over a CALL
        for op, span in _forward(body):
            if op.startswith("@") and len(span) < 60 and any("CALL" in o for _, o in span):
                slow |= {x for x, _ in span}
        body = [(a, op) for a, op in body if a not in slow]
        skips = [len(span) for _, span in _forward(body) if len(span) > 300]
        ops = [re.sub(r"^@!?U?P\w+\s+", "", op).split()[0].split(".")[0] for _, op in body]
        count = {k: ops.count(k) for k in ("DFMA", "SHFL", "F2I", "REDUX", "STG", "LDG")}
        out.append({"size": len(body), "slow_path": len(slow), "branches": skips, "ops": count})
    return out


def classify(found: list[dict]) -> dict:
    """``step``/``v0``/``zero``/``back``/``cand`` from the innermost loops (see the module docstring)."""
    vit = max(found, key=lambda x: x["size"])
    v0, zero = vit["branches"]  # in code order: the V0 branch, then the zero-cluster branch
    cand = max((x for x in found if x["ops"]["F2I"]), key=lambda x: x["size"])
    back = max((x for x in found if x["ops"]["REDUX"] and not x["ops"]["DFMA"]), key=lambda x: x["size"])
    per_back = back["size"] / back["ops"]["STG"]  # one boundary stored per step (two picks, 2 REDUX): LLVM unrolls
    return {"step": vit["size"] - v0 - zero, "v0": v0, "zero": zero, "back": per_back, "cand": cand["size"]}


def compile_one(spec_path: str) -> dict:
    """Compile the recorded spec with the Triton on ``sys.path`` (run in a subprocess)."""
    import triton

    from bench import aot

    spec = json.loads(Path(spec_path).read_text())
    kernel = aot.compile_kernel(spec, 90)
    fig = aot._sass_figures(kernel.asm["cubin"], str(Path(triton.__file__).parent / "backends/nvidia/bin"))
    tools = Path(aot._tools() or Path(triton.__file__).parent / "backends/nvidia/bin")
    cubin = Path(spec_path).with_suffix(".cubin")
    cubin.write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    found = loops(sass)
    return {"triton": triton.__version__, "regs": fig["usage"]["REG"], "spill_bytes": fig["usage"]["LOCAL"],
            "num_warps": spec["options"]["num_warps"], "loops": found, "per_warp": classify(found)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--side", "--triton36", default="off", help="Triton `pip --target` directories (off: only the installed one)"
    )
    a = p.parse_args(argv)
    import tempfile

    from bench.aot import side_paths

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as d:
        spec = Path(d) / "spec.json"
        spec.write_text(json.dumps(record()))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        rows = []
        for path in [None, *side_paths(a.side)]:
            env["PYTHONPATH"] = os.pathsep.join(x for x in (path, str(root), os.environ.get("PYTHONPATH")) if x)
            cmd = [
                sys.executable,
                "-c",
                f"import json, bench.refine_issue as r; print(json.dumps(r.compile_one({str(spec)!r})))",
            ]
            res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    for r in rows:
        print(f"Triton {r['triton']}: {r['regs']} registers, {r['spill_bytes']} B spilled, {r['num_warps']} warps; "
              f"per warp: {r['per_warp']}")  # fmt: skip
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "refine_issue.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

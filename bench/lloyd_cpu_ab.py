"""CPU cost of the quantizer methods against an older commit's: ``python -m bench.lloyd_cpu_ab [--old REV]``.

Times, in one process and interleaved (three rounds, median), the reference
:func:`lloyd_quantize_ref` of ``--old`` (default ``e6302ca``, the commit before the windowed-DP
``"fast"``; its ``lloyd`` is the old default; ``--old-methods`` picks which of its methods) against
this tree's ``fast`` and ``lloyd``, on:
``2M/30`` (2M Gaussian values in 30 equal segments), ``resnet34`` (the 111 U, V, C factors of
ResNet34, 46M values, as in :mod:`bench.lloyd`) and ``21M/1``, at b = 4 and 8, one torch thread.
Reports CPU seconds of the process (user + system, ``resource.getrusage``), which a machine shared
with other jobs disturbs much less than wall time, and the user seconds alone: the system part is
mostly page faults of fresh allocations, whose cost varies several-fold on a loaded machine (0.11 to
0.79 s for the same 39k faults of a ``fast`` call on ``21M/1``). Writes
``bench/results/lloyd_cpu_ab.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from atmc_triton.kernels.lloyd import lloyd_quantize_ref

from bench.common import environment
from bench.lloyd import factor_segments, resnet34_shapes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "lloyd_cpu_ab.json"


@functools.cache
def _old_package(rev: str) -> str:
    """A package ``old_kernels_<rev>`` on ``sys.path`` holding ``kernels/lloyd.py`` at ``rev`` (its op
    registration cut off) and every sibling module it imports (transitively) at ``rev``, so no current
    module stands in for an old one."""
    pkg = f"old_kernels_{rev}"
    root = Path(tempfile.mkdtemp()) / pkg
    root.mkdir()
    (root / "__init__.py").write_text("")

    def show(name: str) -> str:
        cmd = ["git", "show", f"{rev}:kernels/{name}.py"]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout

    text = show("lloyd")
    text = text[: text.index("def _lloyd_fake(")].replace("from ._registry import HAS_TRITON, register_op\n", "")
    (root / "lloyd.py").write_text(text)
    todo = set(re.findall(r"^from \.(\w+) import", text, flags=re.M))
    while todo:  # (plain numpy modules)
        name = todo.pop()
        body = show(name)
        (root / f"{name}.py").write_text(body)
        todo |= set(re.findall(r"^from \.(\w+) import", body, flags=re.M)) - {p.stem for p in root.glob("*.py")}
    sys.path.insert(0, str(root.parent))
    return pkg


def old_module(rev: str, name: str = "lloyd"):
    """Module ``kernels/<name>.py`` at ``rev`` (``name``: ``lloyd`` or one it imports), see :func:`_old_package`."""
    return importlib.import_module(f"{_old_package(rev)}.{name}")


def old_reference(rev: str):
    """``lloyd_quantize_ref`` of ``kernels/lloyd.py`` at ``rev``."""
    return old_module(rev).lloyd_quantize_ref


def workload(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "resnet34":
        v, o = factor_segments(resnet34_shapes(), torch.device("cpu"))
        return v, torch.tensor(o)
    n, S = {"2M/30": (2_000_000, 30), "21M/1": (21_000_000, 1)}[name]
    return torch.randn(n, generator=torch.Generator().manual_seed(0)), torch.linspace(0, n, S + 1).round().long()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="e6302ca")
    ap.add_argument("--workloads", default="2M/30,resnet34,21M/1")
    ap.add_argument("--old-methods", default="lloyd", help="methods of --old to time, comma-separated")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the JSON to write")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    old = old_reference(a.old)
    runs = tuple((f"old {m}", old, m) for m in a.old_methods.split(","))
    runs += (("fast", lloyd_quantize_ref, "fast"), ("lloyd", lloyd_quantize_ref, "lloyd"))
    out: dict[str, list[float]] = {}
    user: dict[str, list[float]] = {}
    for wl in a.workloads.split(","):
        v, off = workload(wl)
        for b in (4, 8):
            bits = torch.full((off.numel() - 1,), b, dtype=torch.int32)
            for _ in range(3):
                for name, fn, method in runs:
                    gc.collect()
                    r0 = resource.getrusage(resource.RUSAGE_SELF)
                    fn(v, off, bits, 20, 1e-5, method)
                    r1 = resource.getrusage(resource.RUSAGE_SELF)
                    u, sy = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
                    out.setdefault(f"{wl} b={b} {name}", []).append(u + sy)
                    user.setdefault(f"{wl} b={b} {name}", []).append(u)
            for name, _, _ in runs:
                key = f"{wl} b={b} {name}"
                print(
                    f"{key}: median {sorted(out[key])[1]:.2f} CPU s ({', '.join(f'{t:.2f}' for t in out[key])}), "
                    f"user {sorted(user[key])[1]:.2f} s"
                )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps({"env": environment(torch.device("cpu")), "old": a.old, "cpu_s": out, "user_s": user}, indent=1)
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

"""The device fast path against the reference and the exact optimum: ``python -m bench.quant_quality_triton``.

Runs the cases of the quality tests (``tests/test_lloyd_optimal.py``: the four synthetic
families at n = 6000, the issue's heavy-ties / skewed segments at n = 3000 and one of the far-outlier
segments at n = 6000, b = 1..8)
through ``lloyd_quantize_triton(..., method="fast")``: compiled kernels on CUDA, Triton's CPU
interpreter otherwise (``TRITON_INTERPRET=1`` is set when no GPU is present; slow: about
7 CPU-minutes). Per case and b: SSE ratio to the exact optimum for the kernel and for the
reference, whether codes and codebooks equal the reference's, and the refinement passes.
Writes ``quant_quality_triton.json`` to ``--out`` (default ``bench/results``).

Example:
    python -m bench.quant_quality_triton --cases gauss --bits 1,2,3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch  # (imports no triton, so the interpreter can still be chosen)

os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

RESULTS = Path(__file__).resolve().parent / "results"


def cases() -> dict[str, np.ndarray]:
    """The inputs of the quality tests (same seeds and sizes)."""
    rng = np.random.default_rng(7)
    n = 6000
    out = {
        "gauss": rng.standard_normal(n),
        "laplace": rng.laplace(size=n),
        "t3": rng.standard_t(3, n),
        "sparse": (lambda v: v * (np.abs(v) >= np.quantile(np.abs(v), 0.95)))(rng.laplace(size=4 * n)),
    }
    r = np.random.default_rng(3)  # test_far_outliers_at_8_bits: 3 weights 100x out of a Gaussian bulk
    x = r.standard_normal(n)
    x[r.choice(n, 3, replace=False)] *= 100
    out["outliers"] = x * 0.05
    for b in (1, 2, 3, 4, 6, 8):  # test_issue_cases draws its arrays per b
        r = np.random.default_rng(b)
        ties = np.where(r.random(3000) < 0.6, 0.4, (r.integers(0, 11, 3000) - 5) * 0.37)
        skew = np.abs(r.standard_normal(3000)) + 0.2
        skew[r.random(3000) < 0.03] = -r.random(int((r.random(3000) < 0.03).sum()) or 1)[0]
        out[f"ties@{b}"], out[f"skew@{b}"] = ties, skew
    return {k: v.astype(np.float32) for k, v in out.items()}


def run(names: list[str], bits: list[int]) -> list[dict]:
    from atmc_triton.kernels import lloyd_triton as lt
    from atmc_triton.kernels.lloyd import lloyd_quantize_ref
    from atmc_triton.kernels.lloyd_optimal import optimal_sse

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name, x in cases().items():
        if name.split("@")[0] not in names:
            continue
        bs = [int(name.split("@")[1])] if "@" in name else bits
        v = torch.from_numpy(np.tile(x, len(bs)))
        off = torch.arange(len(bs) + 1, dtype=torch.int64) * x.size
        bt = torch.tensor(bs, dtype=torch.int32)
        seen = []
        fast_init = lt._fast_init

        def keep(*args, seen=seen, fast_init=fast_init):  # keep the pass counts
            seen.append(fast_init(*args))
            return seen[-1]

        lt._fast_init = keep
        t0 = time.process_time()
        try:
            out = lt.lloyd_quantize_triton(v.to(dev), off.to(dev), bt.to(dev), 20, 1e-5)
        finally:
            lt._fast_init = fast_init
        book, codes, q, err = (t.cpu() for t in out)
        cpu_s = time.process_time() - t0
        passes = seen[0][3].cpu()
        ref = lloyd_quantize_ref(v, off, bt, 20, 1e-5, "fast")
        for i, b in enumerate(bs):
            sl = slice(i * x.size, (i + 1) * x.size)
            opt = optimal_sse(x, b)
            got = float(((x.astype(np.float64) - q[sl].double().numpy()) ** 2).sum())
            want = float(((x.astype(np.float64) - ref[2][sl].double().numpy()) ** 2).sum())
            rows.append(
                {
                    "case": name,
                    "b": b,
                    "triton_over_opt": got / opt if opt > 0 else 1.0,
                    "ref_over_opt": want / opt if opt > 0 else 1.0,
                    "codes_equal": bool(torch.equal(codes[sl], ref[1][sl])),
                    "book_equal": bool(torch.equal(book[i], ref[0][i])),
                    "passes": int(passes[i]),
                    "cpu_s_case": round(cpu_s, 1),
                    "device": dev,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="gauss,laplace,t3,sparse,ties,skew,outliers")
    ap.add_argument("--bits", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    rows = run(a.cases.split(","), [int(b) for b in a.bits.split(",")])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "quant_quality_triton.json").write_text(json.dumps(rows, indent=1) + "\n")
    worst = max(r["triton_over_opt"] for r in rows)
    print(f"worst triton/optimal: {worst:.4f}; codes equal in {sum(r['codes_equal'] for r in rows)}/{len(rows)}")


if __name__ == "__main__":
    main()

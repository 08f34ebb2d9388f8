"""Smoke test of the benchmark harness: ``python -m bench --quick`` runs every module on the CPU."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from procwatch import run_watched

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("admm", "lloyd", "gemm", "e2e")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; on a GPU run python -m bench")
def test_bench_quick_runs_every_module(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "bench.log"
    run_watched([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], log, cwd=ROOT, env=env)
    stdout = log.read_text()
    for m in MODULES:
        assert f"[bench] bench.{m}:" in stdout, f"module {m} did not report"
    recs = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()]
    rows = [r for r in recs if "bench" in r]
    assert {r["bench"] for r in rows} >= set(MODULES)
    md = (tmp_path / "results.md").read_text()
    assert "### Timings (medians)" in md
    e2e = [r for r in rows if r["bench"] == "e2e"]
    assert len(e2e) == 4
    assert all(r["median_ms"] > 0 and r["extra"]["images_per_s"] > 0 for r in e2e)
    assert e2e[0]["extra"]["vs_dense"] == 1.0
    assert "compile_s" in e2e[3]["extra"]


def test_e2e_train_step_is_fits_step():
    """The benchmarked step equals one step of atmc_triton.train.fit's loop (same loss, same update)."""
    import copy

    from atmc_triton.attacks import pgd
    from bench.e2e import _tiny_cnn, train_step

    torch.manual_seed(0)
    model = _tiny_cnn().train()
    ref = copy.deepcopy(model)
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    train_step(model, opt, x, y, 0.1, 0.05, 2, 0.5, torch.Generator().manual_seed(3))
    xa = pgd(ref, x, y, 0.1, 0.05, 2, random_start=True, eval_mode=False, generator=torch.Generator().manual_seed(3))
    opt_ref.zero_grad()
    loss = 0.5 * torch.nn.functional.cross_entropy(ref(x), y) + 0.5 * torch.nn.functional.cross_entropy(ref(xa), y)
    loss.backward()
    opt_ref.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)

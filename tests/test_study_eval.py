"""bench.mnist_study's evaluation and tables on a tiny synthetic run: the worst case is the headline (labelled with
the suite), PGD a named column, the flags in every table; points cached under the old headline are re-evaluated."""

import csv
import dataclasses
import json

import pytest
import torch

from bench import mnist_study


def test_tiny_synthetic_study_reports_the_worst_case(tmp_path):
    torch.set_num_threads(1)
    cfg = dataclasses.replace(mnist_study.PRESETS["tiny"], synthetic=True, ratios=(0.05,), methods=("ATMC-8b",))
    assert (cfg.suite, cfg.apgd_steps, cfg.square_queries) == ("auto", 5, 20)
    assert (mnist_study.StudyConfig.square_queries, mnist_study.StudyConfig.apgd_steps) == (5000, 100)
    out = tmp_path / "study"
    rows = mnist_study.run(cfg, None, out, paper=mnist_study.PAPER, results=None)
    suite = "aa-torchattacks(apgd-ce-5,apgd-t-5,fab-t-5,square-20)"
    assert [r["method"] for r in rows] == ["DA", "NAT", "ATMC-8b"]
    table = list(csv.DictReader(open(out / "mnist_study.csv")))
    assert list(table[0]) == mnist_study.CSV_KEYS
    for r, t in zip(rows, table):
        assert r["suite"] == t["suite"] == suite and r["headline"] == f"worst of PGD-16, FGSM, {suite}"
        assert r["robust_acc"] <= min(r["pgd_acc"], r["fgsm_acc"]) <= r["clean_acc"]
        assert float(t["robust_acc"]) == r["robust_acc"] and t["collapse"] == (r["collapse"] or "")
        assert list(r["cascade"]) == ["PGD-16", "FGSM", "apgd-ce-5", "apgd-t-5", "fab-t-5", "square-20"]
    md = (out / "mnist_study.md").read_text()
    assert f"| ATA % (PGD-16, eps 0.3) | robust % (worst case, {suite}) | flags |" in md
    assert f"robust % = per-example worst of PGD-16, FGSM, {suite}." in md
    for line in ("gradient-masking flags", "gradient-free flags", "collapsed models"):
        assert line in md
    assert "| point | paper TA / ATA | ours TA / ATA (worst case) |" in md
    for r in rows:  # a collapsed point is marked in the table, next to its robust accuracy
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {r['method']} |"))
        assert ("(collapsed)" in row) == (r["collapse"] is not None)
    # a point cached under the old headline (no robust_acc) is evaluated again, from its stage checkpoint
    cache = out / "points" / "atmc-8b_r0.05.json"
    old = json.loads(cache.read_text())
    stale = {k: v for k, v in old.items() if k not in ("robust_acc", "suite", "headline")}
    cache.write_text(json.dumps({**stale, "apgd_acc": 0.5, "apgd_method": "apgd-ce-5"}))
    logged = (out / "metrics.jsonl").read_text()
    again = mnist_study.run(cfg, None, out, paper=mnist_study.PAPER, results=None)
    assert again[2]["robust_acc"] == old["robust_acc"] and again[2]["suite"] == suite
    assert (out / "metrics.jsonl").read_text() == logged  # nothing retrained
    # --report: the cached points only; a point never evaluated (ATMC-32b) is named, not trained
    wider = dataclasses.replace(cfg, methods=("ATMC-8b", "ATMC-32b"))
    report = mnist_study.run(wider, None, out, paper=mnist_study.PAPER, results=None, report=True)
    assert [r["method"] for r in report] == ["DA", "NAT", "ATMC-8b"] and report[2] == again[2]
    assert (out / "metrics.jsonl").read_text() == logged and not (out / "atmc-32b_r0.05.pt").exists()
    assert "| ATMC-32b |" not in (out / "mnist_study.md").read_text()
    with pytest.raises(ValueError, match="no evaluated point"):
        mnist_study.run(wider, None, tmp_path / "empty", results=None, report=True)
    with pytest.raises(ValueError, match="no-resume"):
        mnist_study.run(wider, None, out, results=None, report=True, resume=False)


def test_fast_preset_study_writes_curves_and_where_the_nonzeros_went(tmp_path):
    """The fast protocol through the study (synthetic data): per-epoch curves (a PNG from metrics.jsonl),
    CPU seconds, and the nonzeros of U, V and C per ATMC point, identity against SVD init."""
    torch.set_num_threads(1)
    fast = mnist_study.PRESETS["fast"]
    assert (fast.train_subset, fast.protocol, fast.lr_schedule) == (None, "mnist_fast", "onecycle")
    cfg = dataclasses.replace(
        mnist_study.PRESETS["tiny"],
        synthetic=True,
        protocol="mnist_fast",
        lr_schedule="onecycle",
        eval_size=8,
        ratios=(0.05,),
        methods=("ATMC-8b", "ATMC-svd"),
    )
    assert [p.method for p in mnist_study.points(cfg)] == ["DA", "NAT", "ATMC-8b", "ATMC-svd"]
    goal = dataclasses.replace(fast, ratios=(1e-3, 1e-2))  # the goal points come right after DA
    assert [p.stage for p in mnist_study.points(goal)][:4] == ["dense", "atmc-8b_r0.01", "atmc-alloc_r0.001", "natural"]
    out = tmp_path / "fast"
    rows = mnist_study.run(cfg, None, out, results=None)
    assert (out / "mnist_study_curves.png").read_bytes()[:4] == b"\x89PNG"
    logs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    dense = [r for r in logs if r["stage"] == "dense"]
    assert dense and all(r["train_attack"] in ("pgd", "fallback") and r["guard_pgd_acc"] is not None for r in dense)
    assert all(r["train_cpu_seconds"] > 0 for r in logs)
    by = {r["method"]: r for r in rows}
    ident, svd = by["ATMC-8b"], by["ATMC-svd"]
    assert ident["train_cpu_seconds"] > 0
    for r in (ident, svd):
        assert r["nnz_U"] + r["nnz_V"] + r["nnz_C"] == r["nnz"]
    # identity init: W starts in one factor (V for the first conv: in 9 < out 32) and the other is 0 (+ I)
    assert svd["nnz_U"] > 0 and svd["nnz_V"] > 0
    md = (out / "mnist_study.md").read_text()
    assert "| point | nnz U | nnz V | nnz C | train CPU s |" in md and "ATMC-svd @ 0.05" in md

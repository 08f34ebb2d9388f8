"""bench.mnist_study's evaluation and tables on a tiny synthetic run: the worst case is the headline (labelled with
the suite), PGD a named column, the flags in every table; points cached under the old headline are re-evaluated."""

import csv
import dataclasses
import json

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

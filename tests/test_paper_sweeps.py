"""The CIFAR-10 / CIFAR-100 / SVHN presets (bench.paper_sweeps) on synthetic data, and the "step" LR schedule."""

import csv
import json
import math

import pytest
import torch

from atmc_triton.baselines import nnz_for_ratio
from atmc_triton.budget import dense_bits
from atmc_triton.models import build_model
from atmc_triton.train import PROTOCOLS, Schedule
from bench import paper_sweeps
from bench.mnist_study import CSV_KEYS, points

# the real models' 32-bit sizes (atmc_triton.models docstring)
DENSE_BITS = {"cifar10": 680_482_816, "cifar100": 681_957_376, "svhn": 350_533_120}


def test_step_schedule_matches_the_reference_decreasing_lr():
    s = Schedule(epochs=200, lr=0.05, lr_schedule="step", milestones=(80, 120, 150))
    spe = 391  # steps per epoch
    lrs = {e: s.lr_at(e * spe, 200 * spe) for e in (0, 79, 80, 119, 120, 149, 150, 199)}
    assert lrs == pytest.approx({0: 0.05, 79: 0.05, 80: 5e-3, 119: 5e-3, 120: 5e-4, 149: 5e-4, 150: 5e-5, 199: 5e-5})
    assert s.lr_at(80 * spe - 1, 200 * spe) == 0.05  # the last step of epoch 79
    assert Schedule(epochs=3, lr=0.1, lr_schedule="step").lr_at(5, 9) == 0.1  # no milestones: constant
    assert Schedule(epochs=4, lr=1.0, lr_schedule="step", milestones=(2,), gamma=0.5).lr_at(2, 4) == 0.5


def test_step_schedule_validation():
    with pytest.raises(ValueError, match="ascending"):
        Schedule(epochs=10, lr=0.1, lr_schedule="step", milestones=(5, 3))
    with pytest.raises(ValueError, match="ascending"):
        Schedule(epochs=10, lr=0.1, lr_schedule="step", milestones=(0,))
    with pytest.raises(ValueError, match="gamma"):
        Schedule(epochs=10, lr=0.1, lr_schedule="step", gamma=0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        Schedule(epochs=10, lr=0.1, lr_schedule="linear")
    assert Schedule(epochs=2, lr=0.1, milestones=[1]).milestones == (1,)  # lists become tuples (hashable)


@pytest.mark.parametrize("preset", ["cifar10", "cifar100", "svhn"])
def test_presets_document_the_reference_protocol(preset):
    cfg = paper_sweeps.PRESETS[preset]
    p = PROTOCOLS[cfg.protocol]
    assert math.isclose(p.eps, 4 / 255) and p.pgd_steps == p.eval_steps == 7
    assert p.clean_weight == (0.5 if preset == "cifar10" else 0.0)
    assert cfg.lr_schedule == "step" and cfg.atmc_milestones == (40, 70, 90) and cfg.atmc_epochs == 100
    assert cfg.dense_epochs == (200 if preset != "svhn" else 100)
    assert cfg.model == ("wrn16_8" if preset == "svhn" else "resnet34")
    assert cfg.train_subset is None and cfg.test_subset is None and not cfg.synthetic
    with torch.device("meta"):
        model = build_model(cfg.model, 100 if preset == "cifar100" else 10, (3, 32, 32))
    assert dense_bits(model) == DENSE_BITS[preset]
    # the AP / NAP budget at 1e-3: 32-bit weights filling 1e-3 of the dense size
    assert nnz_for_ratio(model, 1e-3) == DENSE_BITS[preset] // 32 // 1000


def _run(tmp_path, preset, *extra):
    out = tmp_path / preset
    rc = paper_sweeps.main(["--preset", preset, "--synthetic", "--out", str(out), *extra])
    assert rc == 0
    return out


def _check_outputs(out, preset, cfg):
    name = f"sweep_{preset}"
    for ext in ("csv", "png", "md"):
        assert (out / f"{name}.{ext}").stat().st_size > 0
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / f"{name}.csv")))
    assert list(rows[0]) == CSV_KEYS
    assert [(r["method"], r["target_ratio"] or None) for r in rows] == [
        (p.method, None if p.ratio is None else str(p.ratio)) for p in points(cfg)
    ]
    dense = int(rows[0]["dense_bits"])
    for r in rows:
        assert int(r["dense_bits"]) == dense
        if r["target_ratio"]:
            target = float(r["target_ratio"])
            assert 0 < int(r["size_bits"]) <= target * dense  # every compressed point fits its budget
            if r["method"] in ("AP", "NAP", "ATMC-32b"):  # 32-bit weights fill it to the last nonzero
                assert int(r["size_bits"]) == 32 * math.floor(target * dense / 32)
            assert 0 < int(r["packed_bytes"]) < dense // 8
        else:
            assert int(r["size_bits"]) == dense
        for k in ("clean_acc", "pgd_acc", "robust_acc", "fgsm_acc", "wrm_acc"):
            assert 0.0 <= float(r[k]) <= 1.0
    logged = {json.loads(ln)["stage"] for ln in (out / "metrics.jsonl").read_text().splitlines()}
    assert logged == {"dense", "natural"} | {p.stage for p in points(cfg) if p.ratio is not None}
    meta = json.loads((out / "study.json").read_text())
    assert meta["config"]["synthetic"] and meta["config"]["dataset"] == preset
    assert "Comparison with the paper" not in (out / f"{name}.md").read_text()  # no readings for these


@pytest.mark.parametrize("preset", ["cifar10", "cifar100", "svhn"])
def test_synthetic_sweep_runs_every_stage(tmp_path, preset):
    """Every stage (DA, NAT, ATMC-8b/32b, AP, NAP) on random data of the dataset's shapes; LeNet keeps it fast."""
    torch.set_num_threads(1)
    out = _run(tmp_path, preset, "--model", "lenet", "--ratios", "0.05", "--threads", "1")
    cfg = paper_sweeps.config(preset, synthetic=True, model="lenet", ratios=(0.05,))
    _check_outputs(out, preset, cfg)
    # a second run resumes: every point comes from the cache, nothing is retrained
    before = (out / "metrics.jsonl").read_text()
    assert _run(tmp_path, preset, "--model", "lenet", "--ratios", "0.05", "--threads", "1") == out
    assert (out / "metrics.jsonl").read_text() == before
    # choosing fewer methods reuses the same study (points are cached per method and ratio)
    assert _run(tmp_path, preset, "--model", "lenet", "--ratios", "0.05", "--methods", "AP", "--threads", "1") == out
    assert (out / "metrics.jsonl").read_text() == before
    rows = list(csv.DictReader(open(out / f"sweep_{preset}.csv")))
    assert [r["method"] for r in rows] == ["DA", "NAT", "AP"]


def test_sweep_refuses_a_changed_config_in_the_same_out(tmp_path, capsys):
    _run(tmp_path, "svhn", "--model", "lenet", "--ratios", "0.05", "--threads", "1")
    rc = paper_sweeps.main(
        [
            "--preset",
            "svhn",
            "--synthetic",
            "--out",
            str(tmp_path / "svhn"),
            "--model",
            "lenet",
            "--ratios",
            "0.05",
            "--apgd-steps",
            "3",
        ]
    )  # another evaluation: refused
    assert rc == 2
    assert "another configuration" in capsys.readouterr().err


def test_sweep_needs_data_or_synthetic(tmp_path):
    with pytest.raises(SystemExit):
        paper_sweeps.main(["--preset", "cifar10", "--out", str(tmp_path)])
    rc = paper_sweeps.main(["--preset", "cifar10", "--data-root", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert rc == 2  # a clear one-line error: no CIFAR-10 under that root


@pytest.mark.gpu
@pytest.mark.slow  # (ResNet34 and WRN-16-8 through every stage: run after the quick GPU tests on a lent machine)
@pytest.mark.parametrize("preset", ["cifar10", "svhn"])
def test_synthetic_sweep_real_models_on_gpu(tmp_path, preset):
    """The presets' own models (ResNet34, WRN-16-8) through every stage on synthetic data."""
    out = _run(tmp_path, preset, "--ratios", "0.01")
    _check_outputs(out, preset, paper_sweeps.config(preset, synthetic=True, ratios=(0.01,)))

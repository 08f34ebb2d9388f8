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
    if os.environ.get("TRITON_INTERPRET") == "1":  # the default method, which the speed targets are for, is timed
        lloyd = [r for r in rows if r["bench"] == "lloyd" and r["variant"] == "triton lloyd_quantize, default 'fast'"]
        assert len(lloyd) == 2 and all(r["extra"]["err_max_rel"] <= 1e-6 for r in lloyd), lloyd
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


def test_bench_keeps_finished_modules_when_cut_off_and_only_runs_keep_their_files(tmp_path, monkeypatch):
    """A run killed in its second module keeps the first module's rows on disk (they used to be written only at
    the end), and an ``--only`` run writes its own files instead of overwriting ``results.*``."""
    import types

    import bench.__main__ as main_mod
    from bench.common import Row

    def module(name, fail):
        def run(ctx):
            if fail:
                raise KeyboardInterrupt  # what a time limit's kill looks like from inside (not caught)
            return [Row(name, "case", "variant", 1.0)], []

        return types.SimpleNamespace(run=run)

    fake = {"bench.one": module("one", False), "bench.two": module("two", True)}
    monkeypatch.setattr(main_mod, "MODULES", list(fake))
    monkeypatch.setattr(main_mod, "importlib", types.SimpleNamespace(import_module=fake.__getitem__))  # (only here)
    with pytest.raises(KeyboardInterrupt):
        main_mod.main(["--quick", "--out", str(tmp_path)])
    recs = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["bench"] for r in recs] == ["one"] and "| one" in (tmp_path / "results.md").read_text()
    assert main_mod.main(["--quick", "--out", str(tmp_path), "--only", "one"]) == 0
    assert (tmp_path / "results_one.jsonl").exists() and (tmp_path / "results.jsonl").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_only_refuses_an_unknown_module(tmp_path, capsys):
    """``--only gem`` (a typo) is refused by name before anything runs (it ran nothing and wrote empty files)."""
    import bench.__main__ as main_mod

    with pytest.raises(SystemExit) as e:
        main_mod.main(["--quick", "--out", str(tmp_path), "--only", "admm,gem"])
    assert e.value.code == 2 and "--only: unknown gem; choose from admm, lloyd, gemm, e2e" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_gemm_grid_puts_the_issue_cases_first_and_predicts_for_the_gpu_found(monkeypatch):
    """The time budget cuts the end of the grid: the big shapes at ratio 0.05 and the two structures come first
    (a sort once put 11008x4096 at ratio 0.002 first and both structures last); predictions use the found GPU's
    bandwidth and the installed Triton's counts."""
    import triton

    from bench import gemm

    cases = gemm.gemm_cases(False)
    assert len(cases) == len(set(cases)) == len(gemm.SHAPES) * len(gemm.RATIOS) * len(gemm.BITS) + 2
    assert [(c[0], c[3]) for c in cases[:6]] == [("4096x4096", 0.05)] * 2 + [("11008x4096", 0.05)] * 2 + [
        ("4096x4096 lowrank", 0.05),
        ("4096x4096 ident+V", 0.05),
    ]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    args = gemm.model_args(torch.device("cuda"), 1e12)
    assert args["hw"]["hbm"] == 4.3e12 and gemm.H100["hbm"] == 3.0e12  # (the module constant untouched)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert gemm.model_args(torch.device("cuda"), 1.5e12)["hw"]["hbm"] == 1.5e12  # another GPU: its copy bandwidth
    version = ".".join(triton.__version__.split(".")[:2])
    assert gemm.model_args(torch.device("cpu"), 1e12)["triton"] == (
        version if version in ("3.6", "3.8", "3.9") else "3.8"
    )
    from bench import model  # gpu_check's model ops take the same counts: 3.6's dense tiles issue 1.4x more

    slower = model.atmc_linear(16, 4096, 4096, 0.05, 4, triton="3.6").predict_s(model.H100)
    assert slower > 1.1 * model.atmc_linear(16, 4096, 4096, 0.05, 4).predict_s(model.H100)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert model.installed_triton() == "3.6" and gemm.model_args(torch.device("cpu"), 1e12)["triton"] == "3.6"
    monkeypatch.setattr(triton, "__version__", "3.12.0")  # a release the tables do not have: 3.8's counts
    assert model.installed_triton() == "3.8"


def test_warm_up_leaves_no_recompile_for_the_timing():
    """The compiled reference's ints change every step (ties at tau); after :func:`bench.common.warm_up` (and
    automatic dynamic) further calls compile nothing, so no compile lands in the timed calls."""
    from bench.common import dynamo_graphs, warm_up

    torch._dynamo.reset()
    step = iter(range(100))
    f = torch.compile(lambda x, n: x * n + 1, backend="eager", dynamic=None)
    x = torch.ones(4)
    graphs = warm_up(lambda: f(x, next(step)))
    for _ in range(5):
        f(x, next(step))
    assert dynamo_graphs() == graphs >= 1
    # without automatic dynamic each new int recompiles until dynamo's limit, then runs eagerly: warm_up raises
    # instead of letting a "compiled" variant time eager code (its count stops moving there too)
    torch._dynamo.reset()
    g = torch.compile(lambda x, n: x * n + 1, backend="eager", dynamic=False)
    with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
        warm_up(lambda: g(x, next(step)), calls=20)


def test_environment_marks_a_dirty_tree(tmp_path, monkeypatch):
    """A results row names the commit it measured: ``+dirty`` when tracked files differ from it (the CPU A/B
    files of 2026-12-01 were labelled with the parent of the code they measured)."""
    from bench import common

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = {"rev-parse": "abc1234\n", "status": " M kernels/x.py\n"}[cmd[1]]
        return type("R", (), {"stdout": out})()

    monkeypatch.setattr(common.subprocess, "run", fake_run)
    assert common.environment(torch.device("cpu"))["commit"] == "abc1234+dirty"
    assert calls[1][:2] == ["git", "status"] and "--untracked-files=no" in calls[1]


def test_gpu_check_reports_torch_sparse_beside_cublas():
    """The GEMM issue asks for cuBLAS and torch.sparse side by side from one run: the one-shot GPU check's table
    names both for a small-batch row, and only cuBLAS for a row past ``SPARSE_MAX_M``."""
    from bench import gpu_check

    base = {"phase": "bench", "op": "atmc_linear", "measured_ms": 0.01, "predicted_ms": 0.008, "x_pred": 1.25}
    base |= {"floor_ms": 0.0034, "target": "t", "x_cublas": 2.0, "ok": True}
    small = base | {"case": "4096x4096 M=4", "M": 4, "x_torch_sparse": 5.5}
    large = base | {"case": "4096x4096 M=1024", "M": 1024}
    table = gpu_check.summary([small, large]).splitlines()
    assert table[2].endswith("| 2.00x cuBLAS, 5.50x torch.sparse |"), table[2]
    assert table[3].endswith("| 2.00x cuBLAS |"), table[3]
    assert any(M <= gpu_check.SPARSE_MAX_M for *_, Ms in gpu_check.GEMM_BENCH for M in Ms)

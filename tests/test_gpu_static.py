"""The static GPU performance gate (``bench/static.py``) in CI: Triton 3.6.0 and the newest release.

Every kernel family's representative launches are compiled for sm_90 (and, with the newest Triton, sm_80,
sm_89, sm_121) without a GPU and checked against the family's rules: no spills, the blocks/SM the design needs,
128-bit loads in streaming kernels, tensor cores in GEMM tiles at M > 32, autotune configs pruned
before compile. A family that fails today on some Triton is ``xfail(strict=True)`` there with the
issue that fixes it (``Family.known_failures``), and only for the violations that entry names: any
other violation fails the test, and when the fix lands the test XPASSes (a failure under strict)
until the entry is removed. Triton 3.6.0 and the newest (``static.SIDE_TRITONS``) come from ``$ATMC_TRITON36`` /
``$ATMC_TRITON39`` or a cached ``pip install --target``; one that cannot be had (no package index) has its half
skipped with the reason, and a warning says so, and the installed Triton stands in for it (see ``_gate``).
"""

import os
import re
import time
import warnings

import pytest

from bench import model, static

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interp = pytest.mark.skipif(not INTERPRET, reason="records launches in Triton's CPU interpreter")
VERSIONS = ("installed", *static.SIDE_TRITONS)
_RESULTS: dict[str, dict] = {}


def _archs(version: str) -> tuple[int, ...]:
    """Every arch for the newest Triton (or the installed one standing in); sm_90 only (the H100 / H200 the targets
    are for) for Triton 3.6.0: each arch compiles its own set, and the suite's time is its compile CPU."""
    return (90,) if version == static.TRITON36 else static.ARCHS


def _gate(version: str) -> dict:
    """The gate's result for one Triton (run once per session, shared by the family tests).

    CI gates Triton 3.6.0 (the lent GPU's) and the newest; the installed Triton (3.8.0 with CI's torch) only
    stands in for one of them that cannot be had (no package index), so that some Triton is always gated.
    ``python -m bench.static`` gates all three."""
    if version in _RESULTS:
        return _RESULTS[version]
    import triton

    installed = triton.__version__
    if version == "installed":
        if installed in static.SIDE_TRITONS:
            _RESULTS[version] = {"skip": f"the installed Triton {installed} is gated as its own version"}
        elif all(static.triton_site(v, install=True)[0] for v in static.SIDE_TRITONS):
            _RESULTS[version] = {
                "skip": f"the installed Triton {installed} is neither {static.TRITON36} (the lent GPU's) nor the "
                f"newest ({static.TRITON_NEWEST}), which are gated here; `python -m bench.static` gates it too"
            }
        else:  # a side Triton cannot be had: the installed one stands in
            _RESULTS[version] = static.run_gate(None, archs=static.ARCHS)
        return _RESULTS[version]
    path = None
    if version != installed:
        path, why = static.triton_site(version, install=True)
        if path is None:
            msg = f"static gate: the Triton {version} half is SKIPPED: {why}"
            warnings.warn(msg, stacklevel=2)
            _RESULTS[version] = {"skip": msg}
            return _RESULTS[version]
    _RESULTS[version] = static.run_gate(path, archs=_archs(version))
    return _RESULTS[version]


class KnownFailure(AssertionError):
    """Only the violations a family's ``known_failures`` entry excuses (what its xfail expects)."""


def _cases():
    import triton

    for fam in static.FAMILIES.values():
        for version in VERSIONS:
            marks = [needs_interp]
            known = fam.known_failure(triton.__version__ if version == "installed" else version)
            if known:
                marks.append(pytest.mark.xfail(strict=True, raises=KnownFailure, reason=known[0]))
            yield pytest.param(fam.name, version, marks=marks, id=f"{fam.name}-triton-{version}")


@pytest.mark.parametrize("family,version", list(_cases()))
def test_static_gate(family, version):
    res = _gate(version)
    if "skip" in res:
        pytest.skip(res["skip"])
    mine = [r for r in res["rows"] if r["family"] == family]
    assert {r["arch"] for r in mine} == set(_archs(version))  # (the installed one, when it runs, on every arch)
    kernels = {r["kernel"] for r in mine}
    assert kernels == {rule.kernel for rule in static.FAMILIES[family].rules}, kernels  # every kernel is judged
    bad = res["violations"][family]
    known = static.FAMILIES[family].known_failure(res["triton"])
    new = [b for b in bad if not (known and re.search(known[1], b))]
    assert not new, f"{len(new)} violation(s) on triton {res['triton']}:\n" + "\n".join(new)
    if bad:  # only what the family's known failure excuses: the xfail (a new regression above fails for real)
        raise KnownFailure(f"{len(bad)} known violation(s) on triton {res['triton']}:\n" + "\n".join(bad))


def test_gemm_autotune_prunes_what_cannot_launch(monkeypatch):
    """Every shipped tile config fits 227 KB; one that does not (128x256x64, 3 stages) is pruned before compile."""
    lt = pytest.importorskip("atmc_triton.kernels.lowrank_gemm_triton")
    assert lt._prune_large(lt.TILE_LARGE_CONFIGS, {}) == lt.TILE_LARGE_CONFIGS
    for block_m in (16, 32):
        assert lt._prune_small(lt.TILE_SMALL_CONFIGS, {"BLOCK_M": block_m}) == lt.TILE_SMALL_CONFIGS
    too_big = lt._cfg(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, SPLIT_K=1, GROUP_M=8, num_warps=8)
    assert lt.tile_smem(too_big.kwargs, too_big.num_stages) > lt.SMEM_LIMIT == 232448
    monkeypatch.setattr(lt, "TILE_LARGE_CONFIGS", [*lt.TILE_LARGE_CONFIGS, too_big])
    assert lt._prune_large(lt.TILE_LARGE_CONFIGS, {}) == lt.TILE_LARGE_CONFIGS[:-1]
    assert lt._tile_large.early_config_prune is lt._prune_large  # the launcher really prunes
    assert lt._tile_small.early_config_prune is lt._prune_small


def test_blocks_per_sm_h100():
    """Occupancy arithmetic against hand-computed H100 figures."""
    assert static.blocks_per_sm(126, 8, 9216) == 2  # 128 regs/thread x 256 threads = 32K regs
    assert static.blocks_per_sm(195, 8, 9216) == 1  # the Triton 3.6 ADMM update
    assert static.blocks_per_sm(32, 4, 0) == 16  # thread-limited (2048 / 128)
    assert static.blocks_per_sm(16, 1, 0) == 32  # block cap
    assert static.blocks_per_sm(64, 4, 100_000) == 2  # shared-memory-limited (233472 / 101376)
    assert static.blocks_per_sm(255, 8, 263_168) == 0  # over 227 KB: cannot launch
    assert static.blocks_per_sm(32, 8, 0, arch=89) == 6  # sm_89: 1536 threads


def _row(**kw):
    sass = {"ldg": 8, "ldg128": 4, "hgmma": 4, "hmma": 0, "ffma": 0}
    base = {"ok": True, "family": "t", "kernel": "k", "what": "", "triton": "x", "arch": 90, "spec": {"name": "k"}}
    base |= {"regs": 32, "num_warps": 4, "smem": 0, "spill_bytes": 0, "blocks_sm": 16, "sass": sass}
    return base | kw


def test_rules_catch_each_regression():
    """Each rule fails with the kernel's name and the figure (the gate can fail)."""
    fam = static.Family(
        "t",
        0,
        lambda: None,
        (static.Rule("k", min_blocks=2, vector_loads=True, tensor_cores=True, smem_bound=lambda s: 100),),
    )
    assert static.check_family(fam, [_row()]) == []
    cases = {
        "spills 8 B": _row(spill_bytes=8),
        "1 blocks/SM < 2": _row(blocks_sm=1),
        "no 128-bit global loads": _row(sass={"ldg": 8, "ldg128": 0, "hgmma": 4, "hmma": 0, "ffma": 0}),
        "no tensor-core": _row(sass={"ldg": 8, "ldg128": 4, "hgmma": 0, "hmma": 0, "ffma": 64}),
        "above the launcher's estimate 100": _row(smem=4096),
        "does not compile": _row(ok=False, error="PTXASError"),
    }
    for what, row in cases.items():
        bad = static.check_family(fam, [row])
        assert len(bad) == 1 and what in bad[0] and "t/k" in bad[0], (what, bad)
    assert static.check_family(fam, [_row(arch=80, blocks_sm=1)]) == []  # thresholds are sm_90's


def test_model_counts_bytes_by_construction():
    """The model's byte counts match the kernels' documented accounting and the issue's floor ratio."""
    op = model.admm_step(45_000_000)
    assert op.floor_bytes == 29 * 45_000_000
    assert 41.5 <= op.notes["bytes_per_element"] < 41.6  # admm_triton.py: 41 + 12f, f = 0.042 (+ workspace)
    assert 65 <= model.admm_step(45_000_000, full=True).notes["bytes_per_element"] < 65.1  # the fallback path
    assert op.predict_s(model.H200) < op.predict_s(model.H100)
    for n in (45_000_000, 100_000_000):  # issue 13: <= 1.5x the floor on H100 (fp32 grads, the band path)
        blocks = {"_update_kernel": 2, "_select_kernel": 2, "_write_kernel": 2}  # the gate's minimum
        assert model.admm_step(n).predict_s(model.H100, blocks) <= 1.5 * model.admm_step(n).floor_s(model.H100)
    # the >= 3x cuBLAS target at 4 bits, ratio 0.05, M <= 16 sits above the bytes floor (2.58x)
    lin = model.atmc_linear(16, 4096, 4096, 0.05, 4)
    dense = model.cublas_linear(16, 4096, 4096)
    assert 2.5 < dense.floor_bytes / lin.floor_bytes < 2.65
    assert "2.5" in lin.target or "2.6" in lin.target
    big = model.atmc_linear(8192, 4096, 4096, 0.05, 8)
    assert big.floor_flops == 2 * 8192 * 4096 * 4096
    assert big.predict_s(model.H100) >= big.floor_s(model.H100)


# --- the one-shot GPU check (bench/gpu_check.py) -------------------------------------------------------------------


@needs_interp
def test_gpu_check_cold_estimate_fits_8_minutes():
    """Counted and timed with the CPU AOT compile (Triton 3.6, the test machine's, when the gate installed it)."""
    from bench import gpu_check

    side, why = static.triton36_site(install=False)
    if side is None:
        warnings.warn(f"gpu_check estimate with the installed Triton: {why}", stacklevel=1)
    est = gpu_check.estimate(side, per_kernel=2)  # 2 specs per kernel timed, the rest charged their mean
    print(est)
    assert not est["failures"], est["failures"]
    assert 0 < est["correctness_compiles"] <= gpu_check.MAX_CORRECTNESS_COMPILES, est
    assert est["compile_cpu_s"] > 0.1 * (est["correctness_compiles"] + est["bench_compiles"]), est  # really timed
    assert est["compiled"] < est["correctness_compiles"] + est["bench_compiles"], est  # a sample was timed
    assert est["total_s"] <= 8 * 60, est


@pytest.mark.gpu
def test_gpu_tests_run_compiled_kernels():
    """With a GPU the ``gpu`` tests must run compiled kernels: conftest chose the interpreter off (by
    ``torch.cuda.is_available()``), so no ``gpu`` test passes on kernels the interpreter ran on the host."""
    from atmc_triton.kernels import admm_triton, lloyd_triton

    assert not INTERPRET and not lloyd_triton._interpreted() and not admm_triton.interpreted()


def test_gpu_check_fails_soft_without_cuda(tmp_path):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("there is a GPU here: python -m bench.gpu_check runs for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=static.Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    assert "no CUDA GPU" in res.stderr and "--estimate" in res.stderr
    assert "Traceback" not in res.stderr


def test_gpu_check_writes_to_out_by_default_and_needs_the_install(tmp_path, monkeypatch, capsys):
    """On the lent machine a plain ``python3 -m bench.gpu_check`` writes ``$OUT/check`` (it used to exit with
    status 2 for want of ``--out``); without the install (no ``atmc_triton.kernels``) it says what to run."""
    import sys

    import torch

    from bench import gpu_check

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "run_check", lambda out, budget_s: calls.append(out) or 0)
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main([]) == 0 and calls == [tmp_path / "check"]
    assert gpu_check.main(["--out", str(tmp_path / "x")]) == 0 and calls[-1] == tmp_path / "x"
    monkeypatch.delenv("OUT")
    with pytest.raises(SystemExit):
        gpu_check.main([])
    monkeypatch.setitem(sys.modules, "atmc_triton.kernels", None)  # what a checkout without the install gives
    assert gpu_check.main(["--out", str(tmp_path)]) == 2 and len(calls) == 2
    assert "not installed" in capsys.readouterr().err


@needs_interp
@pytest.mark.parametrize(
    "case",
    [
        "n=4099 k=n (keep all)",
        "n=4099 k=0 (keep none)",
        "segments 1/7/63/1000/100003, b 8/4/1/8/4",
        "1024x768 r=0.05 b=4 M=1 fp16",
        "1024x768 r=0.05 b=4 M=16 fp32",
        "hinted, small",
        "split, small",
    ],
)
def test_gpu_check_correctness_cases_run_in_the_interpreter(case):
    """The check's own case code (small cases: keep-all / keep-none ADMM, Lloyd; GEMM at M = 1 fp16 and M = 16
    fp32, on the pinned configs; the hinted ADMM step, at 40,000 values here, which must take the band path)
    against the references."""
    import torch

    from bench import gpu_check

    cases = {c: fn for _, c, fn in gpu_check.CORRECTNESS}
    assert "n=1000003 k=10% fp32 grads, hinted (band path)" in cases
    cases["hinted, small"] = gpu_check._admm_case(40_000, 0.1, "float32", hinted=True)
    cases["split, small"] = gpu_check._split_case([0, 3, 1500, 0, 700])  # (3 blocks of 1,024: ~4 s here)
    with gpu_check.poisoned_outputs():
        res = cases[case](torch.device("cpu"))
    assert res["ok"], (case, res)


def test_gpu_check_fails_on_a_benchmarked_gemm_that_disagrees_with_cublas(tmp_path, monkeypatch):
    """The benchmarks' GEMM rows are the only run of the autotuned configs: one whose result is off from
    cuBLAS's (or NaN) makes the check fail and says so in its table; an agreeing one does not."""
    import torch

    from bench import gpu_check

    def gemm(device, scale):
        row = {"phase": "bench", "op": "atmc_linear", "case": "M=16", "measured_ms": 0.01, "predicted_ms": 0.01}
        row |= {"x_pred": 1.0, "floor_ms": 0.005, "target": "t", "x_cublas": 2.0}
        for err in errors:
            yield row | {"max_rel_vs_cublas": err, "ok": err <= gpu_check.CUBLAS_TOL}

    monkeypatch.setattr(gpu_check, "CORRECTNESS", [])
    monkeypatch.setattr(gpu_check, "BENCHMARKS", [("gemm", gemm)])
    errors = [1e-3]  # the rows the fake benchmark yields, set before each run
    assert gpu_check._run_check(tmp_path, 60.0, torch.device("cpu"), time.time()) == 0
    assert "FAILED" not in (tmp_path / "gpu_check.md").read_text()
    for bad in ([1e-3, 0.5], [float("nan")]):
        errors[:] = bad
        assert gpu_check._run_check(tmp_path, 60.0, torch.device("cpu"), time.time()) == 1
        assert "FAILED" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_log_keeps_every_row(tmp_path):
    """Rows reach the jsonl file one by one (a crash keeps what was measured) and the table shows them."""
    import json

    from bench import gpu_check

    log = gpu_check.Log(tmp_path, {"gpu": "test"})
    log.add({"phase": "correctness", "op": "admm_step", "case": "c", "ok": False, "error": "boom"})
    assert len((tmp_path / "gpu_check.jsonl").read_text().splitlines()) == 1
    row = {"phase": "bench", "op": "admm_step", "case": "n", "measured_ms": 1.0, "predicted_ms": 0.5}
    log.add(row | {"x_pred": 2.0, "floor_ms": 0.4, "target": "<= 2x", "met": False})
    recs = [json.loads(x) for x in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["gpu"] for r in recs] == ["test", "test"]
    table = gpu_check.summary(log.rows)
    assert "FAILED boom" in table and "| 2.00 |" in table and "| NO |" in table


def test_triton_site_finds_checks_and_refuses(tmp_path, monkeypatch):
    """A side Triton comes from $ATMC_TRITON<mm> (version checked), then the cache; no install when not allowed."""
    monkeypatch.setattr(static.Path, "home", lambda: tmp_path)
    monkeypatch.delenv("ATMC_TRITON39", raising=False)
    path, why = static.triton_site("3.9.0", install=False)
    assert path is None and "installing was not allowed" in why
    cached = static.side_dir("3.9.0")
    assert cached.parent == tmp_path / ".cache" / "atmc_triton" and cached.name.startswith("triton-3.9.0-cp3")
    wrong_python = cached.with_name("triton-3.9.0-cp27")  # an install for another Python is not taken
    (wrong_python / "triton").mkdir(parents=True)
    (wrong_python / "triton-3.9.0.dist-info").mkdir()
    assert static.triton_site("3.9.0", install=False)[0] is None
    (cached / "triton").mkdir(parents=True)
    (cached / "triton-3.9.0.dist-info").mkdir()
    assert static.triton_site("3.9.0", install=False) == (str(cached), f"cached side install {cached}")
    other = tmp_path / "other"
    (other / "triton").mkdir(parents=True)
    (other / "triton-3.8.0.dist-info").mkdir()
    monkeypatch.setenv("ATMC_TRITON39", str(other))  # the variable wins over the cache, and must hold 3.9.0
    path, why = static.triton_site("3.9.0", install=False)
    assert path is None and "holds no triton 3.9.0" in why and why.startswith("ATMC_TRITON39=")
    monkeypatch.setenv("ATMC_TRITON39", str(cached))
    assert static.triton_site("3.9.0")[0] == str(cached)
    assert static.triton36_site(install=False)[1].startswith(("ATMC_TRITON36", "no triton 3.6.0", "cached"))


def test_newest_tools_picks_the_highest_triton_with_a_cuobjdump(tmp_path, monkeypatch):
    """For a cubin the installed tools cannot decode, the newest Triton at hand lends its cuobjdump: side installs
    from $ATMC_TRITON<mm> and the cache count, a site without the binary or the package does not."""
    import triton

    from bench import aot

    monkeypatch.setattr(static.Path, "home", lambda: tmp_path)
    for k in [k for k in os.environ if re.fullmatch(r"ATMC_TRITON\d+", k)]:
        monkeypatch.delenv(k)
    installed = aot._newest_tools()
    assert installed == aot._tools() and installed is not None  # nothing else at hand: the installed Triton's

    def site(path, version: str, binary: bool = True):
        (path / "triton" / "backends" / "nvidia" / "bin").mkdir(parents=True)
        (path / f"triton-{version}.dist-info").mkdir()
        if binary:
            (path / "triton" / "backends" / "nvidia" / "bin" / "cuobjdump").touch()
        return str(path / "triton" / "backends" / "nvidia" / "bin")

    mine = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:3])
    site(static.side_dir("0.1.0"), "0.1.0")  # older than the installed one: not taken
    site(tmp_path / "nobin", "99.0.0", binary=False)  # the newest, but without cuobjdump: not taken
    monkeypatch.setenv("ATMC_TRITON990", str(tmp_path / "nobin"))
    assert aot._newest_tools() == installed
    newer = f"{mine[0]}.{mine[1] + 1}.0"
    cached = site(static.side_dir(newer).with_name(f"triton-{newer}-cp27"), newer)  # another Python's: tools work
    assert aot._newest_tools() == cached
    env = site(tmp_path / "env", f"{mine[0] + 1}.0.0")
    monkeypatch.setenv(static.side_env(f"{mine[0] + 1}.0.0"), str(tmp_path / "env"))
    assert aot._newest_tools() == env


def test_installed_triton_stands_in_only_for_a_side_triton_that_cannot_be_had(monkeypatch):
    import triton

    if triton.__version__ in static.SIDE_TRITONS:
        pytest.skip("the installed Triton is one of the gated versions here")
    calls = []
    monkeypatch.setattr(static, "run_gate", lambda path, archs: calls.append((path, archs)) or {"ran": path})
    saved = dict(_RESULTS)
    try:
        _RESULTS.clear()
        monkeypatch.setattr(static, "triton_site", lambda v, install=True: (f"/side/{v}", "cached"))
        assert "skip" in _gate("installed") and "neither" in _gate("installed")["skip"] and not calls
        assert _gate(static.TRITON36) == {"ran": f"/side/{static.TRITON36}"}
        assert calls[-1] == (f"/side/{static.TRITON36}", (90,))
        assert _gate(static.TRITON_NEWEST) == {"ran": f"/side/{static.TRITON_NEWEST}"}
        assert calls[-1][1] == static.ARCHS
        _RESULTS.clear()
        monkeypatch.setattr(static, "triton_site", lambda v, install=True: (None, "no package index"))
        with pytest.warns(UserWarning, match="SKIPPED"):
            assert "skip" in _gate(static.TRITON_NEWEST)
        assert _gate("installed") == {"ran": None} and calls[-1] == (None, static.ARCHS)
    finally:
        _RESULTS.clear()
        _RESULTS.update(saved)

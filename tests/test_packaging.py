"""Packaging: a NON-editable install works. The wheel is built from a copy of the sources in a temporary directory,
installed with ``pip install --target`` (no dependencies: torch and the rest come from this environment), and the
installed copy imports every module of ``atmc_triton`` and ``atmc_triton.kernels`` and runs a tiny digits pipeline.
Also: the package works without Triton."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from procwatch import run_watched

import atmc_triton

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = sorted(p.stem for p in (ROOT / "atmc_triton").glob("*.py"))
KERNELS = sorted(p.stem for p in (ROOT / "kernels").glob("*.py"))
# the digits pipeline at its smallest: one dense and one ATMC epoch of 4 steps, PGD-1, 16 evaluation images
TINY = "--subset 128 --test-subset 32 --batch-size 32 --epochs 1 --atmc-epochs 1 --pgd-steps 1 --eval-pgd-steps 1"
TINY += " --attacks pgd --eval-size 16 --no-natural-baseline --no-progress --autoattack no --device cpu --threads 1"


def _has_build_backend() -> bool:
    """Whether this environment has what pyproject's build-system asks for (setuptools >= 69 and wheel)."""
    try:
        import setuptools
        import wheel  # noqa: F401
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 69


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(wheel, site)``: the wheel built from a copy of the sources, and the directory it was installed into."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("atmc_triton", "kernels"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # offline with this environment's backend; else pip's isolated build fetches setuptools + wheel (CI has PyPI)
    isolation = ["--no-build-isolation"] if _has_build_backend() else []
    run_watched([*pip, "wheel", "--no-deps", *isolation, "-w", str(tmp / "dist"), str(src)], tmp / "build.log")
    (wheel,) = (tmp / "dist").glob("atmc_triton-*.whl")
    site = tmp / "site"
    run_watched([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], tmp / "pip.log")
    return wheel, site


def _run_installed(site: Path, args: list[str], cwd: Path, log: Path) -> str:
    """Run this Python with only the installed copy of atmc_triton importable (not the repo, not the editable
    install: ``site`` goes first on the path and cwd is outside the repo)."""
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    run_watched([sys.executable, *args], log, cwd=cwd, env=env)
    return log.read_text()


def test_wheel_holds_every_module(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert len(KERNELS) >= 10 and {"admm_triton", "lloyd_triton", "lowrank_gemm_kernels"} <= set(KERNELS)
    missing = [f"atmc_triton/{m}.py" for m in PACKAGE if f"atmc_triton/{m}.py" not in names]
    missing += [f"atmc_triton/kernels/{m}.py" for m in KERNELS if f"atmc_triton/kernels/{m}.py" not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert not any(n.startswith("kernels/") for n in names)  # installed only as atmc_triton.kernels


def test_installed_copy_imports_every_module(installed, tmp_path):
    _, site = installed
    modules = [f"atmc_triton.{m}" for m in PACKAGE if m != "__main__"]
    modules += [f"atmc_triton.kernels.{m}" for m in KERNELS if m != "__init__"]
    code = (
        "import importlib, pathlib, sys\n"
        f"site = pathlib.Path({str(site)!r}).resolve()\n"
        f"for name in {modules!r}:\n"
        "    f = pathlib.Path(importlib.import_module(name).__file__).resolve()\n"
        "    assert site in f.parents, f'{name} came from {f}, not from the installed copy'\n"
        "import atmc_triton as at\n"
        "missing = [n for n in at.__all__ if not hasattr(at, n)]\n"
        "assert not missing, missing\n"
        "print('imported', len(sys.modules))\n"
    )
    out = _run_installed(site, ["-c", code], tmp_path, tmp_path / "import.log")
    assert "imported" in out


def test_installed_copy_runs_the_digits_pipeline(installed, tmp_path):
    _, site = installed
    out = _run_installed(
        site, ["-m", "atmc_triton", "train", *TINY.split(), "--out", str(tmp_path / "run")], tmp_path, tmp_path / "log"
    )
    assert "| ATMC-compressed" in out, out[-3000:]
    for name in ("dense.pt", "atmc_final.pt", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file(), name


def test_editable_or_not_the_kernels_sit_inside_the_package():
    kernels = Path(atmc_triton.kernels.__file__).resolve().parent
    package = Path(atmc_triton.__file__).resolve().parent
    assert kernels in (ROOT / "kernels", package / "kernels")  # the repo's kernels/ (editable) or the wheel's


def test_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, atmc_triton as at\n"
        "assert not at.kernels.HAS_TRITON\n"
        "m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
        "cfg = at.ATMCConfig(ratio=0.2, bits=2, quant_interval=1)\n"
        "at.compress_(m, cfg); opt = at.ADMM(m, cfg, lr=0.1)\n"
        "for _ in range(2):\n"
        "    opt.zero_grad(); m(torch.randn(4, 16)).sum().backward(); opt.step()\n"
        "at.finalize_(m); assert at.model_size_bits(m) <= 0.2 * at.dense_bits(m); print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"

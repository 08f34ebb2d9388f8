"""Packaging: kernels/ ships as atmc_triton.kernels, and the package works without Triton."""

import subprocess
import sys
import zipfile
from pathlib import Path

import atmc_triton

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_subpackage_comes_from_repo_kernels_dir():
    assert Path(atmc_triton.kernels.__file__).resolve().parent == ROOT / "kernels"


def test_wheel_contains_kernels_as_subpackage(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("atmc_triton-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("admm.py", "lloyd.py", "lowrank_gemm.py", "__init__.py"):
        assert f"atmc_triton/kernels/{f}" in names
    assert "atmc_triton/__init__.py" in names


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

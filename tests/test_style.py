"""The tree stays ruff-clean and ruff-formatted (ruff comes with the dev extra)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return ruff


def test_ruff_clean():
    out = subprocess.run([_ruff(), "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_formatted():
    out = subprocess.run([_ruff(), "format", "--check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, "run `ruff format .`:\n" + out.stdout + out.stderr

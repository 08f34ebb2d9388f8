"""The progress watchdog of the subprocess tests: slow-but-progressing processes pass, silent ones fail fast."""

import sys
import time
from pathlib import Path

import pytest
from procwatch import HEARTBEAT_ENV, Watched, beat_on_optimizer_steps, run_watched

TICK = "import sys, time\nfor i in range({n}):\n    print(i, flush=True); time.sleep(0.3)\n"


def test_a_process_that_keeps_printing_outlives_the_idle_limit(tmp_path):
    start = time.monotonic()
    assert run_watched([sys.executable, "-c", TICK.format(n=8)], tmp_path / "log", idle=1.5) == 0
    assert time.monotonic() - start > 2.4  # ran longer than the idle limit: progress kept it alive


def test_a_heartbeat_counts_as_progress(tmp_path):
    beat = tmp_path / "beat"
    code = "import os, pathlib, time\nbeat = pathlib.Path(os.environ['ATMC_TEST_HEARTBEAT'])\n"
    code += "for _ in range(8):\n    beat.touch(); time.sleep(0.3)\n"  # silent: only the heartbeat moves
    assert run_watched([sys.executable, "-c", code], tmp_path / "log", heartbeat=beat, idle=1.5) == 0


def test_a_silent_process_fails_after_the_idle_limit_and_its_group_is_killed(tmp_path):
    code = "import subprocess, sys, time\n"
    code += "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    code += "print('started', child.pid, flush=True); time.sleep(60)\n"
    w = Watched([sys.executable, "-c", code], tmp_path / "log")
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"no output or heartbeat for 1 s(.|\n)*started"):
        w.wait(idle=1.0)
    assert time.monotonic() - start < 30 and w.proc.returncode == -9
    child = int(w.tail().split()[-1])
    time.sleep(0.5)
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z"  # the child went too (or a zombie)


def test_a_failing_process_reports_its_exit_code_and_output(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"exit code 3(.|\n)*boom"):
        run_watched([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "log")


def test_workers_beat_on_every_optimizer_step(tmp_path, monkeypatch):
    import torch

    import atmc_triton as at

    beat = tmp_path / "beat"
    monkeypatch.delenv(HEARTBEAT_ENV, raising=False)
    assert beat_on_optimizer_steps() is None
    monkeypatch.setenv(HEARTBEAT_ENV, str(beat))
    handle = beat_on_optimizer_steps()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 4))
        cfg = at.ATMCConfig(nnz=5)
        at.compress_(model, cfg)
        opt = at.ADMM(model, cfg, lr=0.1)
        model(torch.randn(2, 8)).sum().backward()
        assert not beat.exists()
        opt.step()  # the ADMM optimizer is a torch.optim.Optimizer: its steps beat too
        assert beat.exists()
    finally:
        handle.remove()

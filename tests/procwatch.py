"""Subprocesses of the tests under a progress watchdog rather than a wall-clock timeout.

A loaded 2-core machine runs the suite many times slower than an idle one, so a fixed timeout either fails
slow-but-healthy runs or is too long to catch a hang. Here a process fails only when it makes **no progress** for
``ATMC_TEST_IDLE_S`` seconds (default 300): progress is its output growing or its heartbeat file being touched
(workers touch it on every optimizer step: :func:`beat_on_optimizer_steps`). ``ATMC_TEST_CAP_S`` (default 3600)
is a generous hard cap per process. The process runs in its own session and the whole group is killed on failure
(torchrun's workers included).

Example:
    >>> import sys, tempfile
    >>> log = Path(tempfile.mkdtemp()) / "log.txt"
    >>> run_watched([sys.executable, "-c", "print('hi')"], log)
    0
    >>> log.read_text()
    'hi\\n'
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

IDLE_S = float(os.environ.get("ATMC_TEST_IDLE_S", "300"))
CAP_S = float(os.environ.get("ATMC_TEST_CAP_S", "3600"))
HEARTBEAT_ENV = "ATMC_TEST_HEARTBEAT"

__all__ = ["HEARTBEAT_ENV", "Watched", "beat_on_optimizer_steps", "run_watched"]


class Watched:
    """``cmd`` started with stdout and stderr going to ``log``; ``heartbeat`` (a file) is passed to it as
    ``$ATMC_TEST_HEARTBEAT``."""

    def __init__(
        self,
        cmd: Sequence[str],
        log: Path,
        *,
        heartbeat: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.log, self.heartbeat = Path(log), heartbeat
        env = dict(os.environ if env is None else env)
        if heartbeat is not None:
            env[HEARTBEAT_ENV] = str(heartbeat)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )
        self.cmd = " ".join(map(str, cmd))

    def _progress(self) -> tuple[int, int]:
        size = self.log.stat().st_size if self.log.exists() else 0
        beat = self.heartbeat.stat().st_mtime_ns if self.heartbeat and self.heartbeat.exists() else 0
        return size, beat

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def wait(self, until: Callable[[], bool] | None = None, idle: float = IDLE_S, cap: float = CAP_S) -> int | None:
        """Wait until the process exits (its code) or ``until()`` holds (``None``); fail on no progress."""
        start = last = time.monotonic()
        seen = self._progress()
        while True:
            if until is not None and until():
                return None
            code = self.proc.poll()
            if code is not None:
                return code
            now, cur = time.monotonic(), self._progress()
            if cur != seen:
                seen, last = cur, now
            if now - last > idle or now - start > cap:
                self.kill()
                why = f"no output or heartbeat for {idle:.0f} s" if now - last > idle else f"over the {cap:.0f} s cap"
                pytest.fail(f"{why}: {self.cmd}\n--- log tail ---\n{self.tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the process and everything it started."""
        try:  # the group outlives a leader that exited and left children (torchrun's workers) behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def run_watched(cmd: Sequence[str], log: Path, *, check: bool = True, idle: float = IDLE_S, **kw) -> int:
    """Run ``cmd`` to completion under the watchdog; with ``check``, a non-zero exit fails with the log's tail."""
    w = Watched(cmd, log, **kw)
    try:
        code = w.wait(idle=idle)
    finally:
        w.kill()
    if check and code != 0:
        pytest.fail(f"exit code {code}: {w.cmd}\n--- log tail ---\n{w.tail()}")
    return code


def beat_on_optimizer_steps():
    """In a worker: touch ``$ATMC_TEST_HEARTBEAT`` (if set) after every optimizer step of any optimizer.

    Returns the hook's removable handle, or ``None`` when the variable is not set."""
    path = os.environ.get(HEARTBEAT_ENV)
    if not path:
        return None
    from torch.optim.optimizer import register_optimizer_step_post_hook

    beat = Path(path)
    return register_optimizer_step_post_hook(lambda *_: beat.touch())

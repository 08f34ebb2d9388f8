"""``atmc train`` with test hooks: in-process (:func:`run`) or as a script, plainly or under torchrun.

Script use: ``python train_worker.py ATMC_TRAIN_ARGS...`` with hooks from the environment:

* ``ATMC_TEST_DUMP=DIR``: when ``finalize_`` is called, each rank first saves its unfinalized ATMC
  state (weights, Z, u, masks, codebooks), flat momenta and ADMM counters to ``DIR/rank{r}.pt``;
* ``ATMC_TEST_EXIT=STAGE:EPOCH:RANK``: in torchrun's first attempt that rank dies (``os._exit(17)``,
  no cleanup) after that epoch's checkpoint, leaving ``DIR/exited``;
* ``ATMC_TEST_PAUSE=NAME:N``: the N-th atomic write of checkpoint ``NAME`` writes half its bytes,
  fsyncs, leaves ``DIR/paused`` and sleeps (the test then SIGKILLs the process);
* ``ATMC_TEST_HEARTBEAT=FILE``: touched after every optimizer step (``tests/procwatch.py``'s watchdog).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

# the tiny digits pipeline of the fault and DDP tests: 4 steps per epoch (global batch 32 of 128), 2 ATMC epochs,
# the quantizer due at steps 3 and 6
ARGS = [
    "--subset",
    "128",
    "--test-subset",
    "32",
    "--batch-size",
    "32",
    "--epochs",
    "1",
    "--atmc-epochs",
    "2",
    "--quant-interval",
    "3",
    "--pgd-steps",
    "1",
    "--eval-pgd-steps",
    "1",
    "--attacks",
    "pgd",
    "--eval-size",
    "16",
    "--no-natural-baseline",
    "--no-progress",
    "--autoattack",
    "no",
    "--device",
    "cpu",
    "--threads",
    "1",
]


@contextlib.contextmanager
def hooks(dump: str | None = None, exit_at: str | None = None, pause: str | None = None):
    """Install the hooks (see the module docstring) for the duration of the block."""
    import atmc_triton.checkpoint as ckpt
    import atmc_triton.train as train
    from atmc_triton import distributed
    from atmc_triton.optim import ADMM

    optimizers: list[ADMM] = []
    real_init, real_finalize, real_fit, real_write = ADMM.__init__, train.finalize_, train.fit, ckpt.atomic_write

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        optimizers.append(self)

    def finalize_(model, **kw):
        if dump is not None:
            opt = optimizers[-1]
            torch.save(
                {
                    "model": {k: v.clone() for k, v in model.state_dict().items()},
                    "mom": opt.store.mom.clone(),
                    "admm": dict(opt.state["admm"]),
                    "rho": opt.param_groups[0]["rho"],
                },
                Path(dump) / f"rank{distributed.rank()}.pt",
            )
        return real_finalize(model, **kw)

    def fit(*a, on_epoch_end=None, **kw):
        def hook(epoch):
            if on_epoch_end is not None:
                on_epoch_end(epoch)
            if exit_at and distributed.restart_count() == 0:
                stage, e, r = exit_at.split(":")
                if (kw["stage"], epoch, distributed.rank()) == (stage, int(e), int(r)):
                    (Path(dump) / "exited").touch()
                    os._exit(17)

        return real_fit(*a, on_epoch_end=hook, **kw)

    writes: dict[str, int] = {}

    def atomic_write(path, write):
        name = Path(path).name
        writes[name] = writes.get(name, 0) + 1
        if pause is None or f"{name}:{writes[name]}" != pause:
            return real_write(path, write)

        def half(f):
            buf = io.BytesIO()
            write(buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            (Path(dump) / "paused").touch()
            time.sleep(1800)  # the test SIGKILLs us as soon as it sees the marker

        return real_write(path, half)

    with (
        mock.patch.object(ADMM, "__init__", init),
        mock.patch.object(train, "finalize_", finalize_),
        mock.patch.object(train, "fit", fit),
        mock.patch.object(ckpt, "atomic_write", atomic_write),
    ):
        yield


def run(argv: list[str], **hook_kw) -> int:
    """``atmc train ARGS + argv`` in this process with :func:`hooks`; restores torch's thread count."""
    from atmc_triton.cli import main

    threads = torch.get_num_threads()
    try:
        with hooks(**hook_kw):
            return main(["train", *ARGS, *argv])
    finally:
        torch.set_num_threads(threads)


def scratch(prefix: str) -> Path:
    """A temporary directory removed when the test process ends."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.cache
def single_run() -> Path:
    """The uninterrupted one-process run (in this process): ``out/`` checkpoints, ``rank0.pt`` dump."""
    d = scratch("atmc_single_")
    assert run(["--out", str(d / "out")], dump=str(d)) == 0
    return d


def worker_env(**extra: str) -> dict[str, str]:
    here = str(Path(__file__).resolve().parent)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    }


def torchrun_cmd(nproc: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *extra,
        str(Path(__file__).resolve()),
    ]


if __name__ == "__main__":
    from procwatch import beat_on_optimizer_steps

    beat_on_optimizer_steps()  # progress for the test's watchdog
    env = os.environ
    with hooks(env.get("ATMC_TEST_DUMP"), env.get("ATMC_TEST_EXIT"), env.get("ATMC_TEST_PAUSE")):
        from atmc_triton.cli import main

        sys.exit(main(["train", *ARGS, *sys.argv[1:]]))

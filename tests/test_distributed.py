"""DDP on CPU (gloo): a 2-process run stays bit-identical across ranks and matches one process."""

import os
import sys
from pathlib import Path

import torch
from procwatch import run_watched

HERE = Path(__file__).resolve().parent


def run_worker(out: Path, nproc: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    if nproc == 1:
        cmd = [sys.executable, str(HERE / "dist_worker.py"), str(out), *extra]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            str(HERE / "dist_worker.py"),
            str(out),
            *extra,
        ]
    run_watched(cmd, out / f"worker{nproc}.log", heartbeat=out / "heartbeat", env=env)


def test_ddp_ranks_identical_and_match_single_process(tmp_path):
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    run_worker(tmp_path / "ddp", 2)
    run_worker(tmp_path / "one", 1)
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    assert r0["admm"] == r1["admm"] == single["admm"] and r0["admm"]["quant_steps"] == 2
    keys = list(r0["model"])
    assert any(k.endswith("codebook") for k in keys) and any(k.endswith("U_mask") for k in keys)
    for k in keys:  # every weight, mask, Z, u and codebook: bit-identical across ranks
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    assert torch.equal(r0["mom"], r1["mom"])
    for k in keys:  # and the same as one process on the same global batch, to fp32 tolerance
        a, b = r0["model"][k], single["model"][k]
        if a.dtype == torch.bool:
            assert torch.equal(a, b), k
        else:
            assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), k


def test_fit_leaves_every_rank_with_rank0s_batchnorm_statistics(tmp_path):
    """DDP broadcasts BatchNorm statistics at each forward's start and each rank's forward then updates its own:
    ``fit`` syncs them before the guard, evaluation and checkpoint, so every rank ends with rank 0's; a buffer DDP
    is told to ignore stays each rank's own."""
    run_worker(tmp_path, 2, "bn")
    r0, r1 = (torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in (0, 1))
    mine = (r0.pop("mine"), r1.pop("mine"))  # a buffer in _ddp_params_and_buffers_to_ignore: each rank's own
    assert mine[0].tolist() == [0.0, 0.0] and mine[1].tolist() == [1.0, 1.0]
    assert set(r0) == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert int(r0["1.num_batches_tracked"]) > 0 and float(r0["1.running_mean"].abs().sum()) > 0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_the_guard_decision_is_rank0s_on_every_rank(tmp_path):
    """Each rank computed the guard's accuracy itself, so ranks whose figures differed (in the last bit, or more)
    could disagree on a rollback, one rolling back while the other waited in a collective. Every rank gets rank
    0's figures now; here rank 1's model is zeroed, so its own figures differ."""
    run_worker(tmp_path, 2, "guard")
    r0, r1 = (torch.load(tmp_path / f"guard{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["own"] != r1["own"] and r0["own"][0] > 0.9  # (the trained model; rank 1 predicts one class)
    assert r0["got"] == r1["got"] == r0["own"]


def test_a_resumed_ddp_run_restores_every_ranks_own_generators(tmp_path):
    """Rank 0 alone writes the checkpoint; a model's dropout draws from each rank's own global generator (on a GPU:
    each process's own device, which rank 0's process sees untouched). Killed after epoch 1 and resumed, a run whose
    ranks' generators differ ends with the uninterrupted run's weights on both ranks."""
    run_worker(tmp_path, 2, "resume")
    assert [torch.load(tmp_path / f"resume{r}.pt", weights_only=True)["same"] for r in (0, 1)] == [True, True]


def test_sync_quantizer_gives_every_rank_rank0s_codebooks(tmp_path):
    run_worker(tmp_path, 2, "sync")
    r0, r1 = (torch.load(tmp_path / f"sync{r}.pt", weights_only=True) for r in (0, 1))
    for k in ("z", "codebook"):  # default (None: on under a process group): rank 0's quantizer output everywhere
        assert torch.equal(r0["None"][k], r1["None"][k]), k
        assert not torch.equal(r0["False"][k], r1["False"][k]), k  # off: rank 1 quantized its own W + u
    assert not torch.equal(r0["None"]["u"], r1["None"]["u"])  # u = u_own + W - Z: the perturbation stays visible


FSDP_SCRIPT = r"""
import sys, tempfile, torch, torch.distributed as dist
from torch import nn
import atmc_triton as at
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
cfg = at.ATMCConfig(nnz=20)
make = lambda: at.compress_(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), cfg)
msgs = []
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
m = make()
fully_shard(m, mesh=init_device_mesh("cpu", (1,)))
try:
    at.ADMM(m, cfg)
except ValueError as e:
    msgs.append(str(e))
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
try:
    at.ADMM(FSDP(make(), device_id=torch.device("cpu")), cfg)
except ValueError as e:
    msgs.append(str(e))
dist.destroy_process_group()
print("\n".join("MSG " + m.replace("\n", " ") for m in msgs))
"""


def test_fsdp_is_refused_with_a_clear_error(tmp_path):
    """FSDP is documented as unsupported (the projection and k-means need whole factors): say so clearly."""
    log = tmp_path / "fsdp.log"
    run_watched([sys.executable, "-c", FSDP_SCRIPT], log, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln[len("MSG ") :] for ln in log.read_text().splitlines() if ln.startswith("MSG ")]
    assert len(lines) == 2
    assert "FSDP2 fully_shard" in lines[0] and "use DDP" in lines[0]
    assert "FSDP" in lines[1] and "DistributedDataParallel" in lines[1]


def test_evaluate_on_more_ranks_than_examples_returns_on_every_rank(tmp_path):
    """A rank with an empty share learned no class count, kept no histograms and skipped their all-reduce, which
    the other rank waited in (a hang). The class count now comes from the whole split, so every rank sums [2, C]."""
    run_worker(tmp_path, 2, "tiny")
    r0, r1 = (torch.load(tmp_path / f"tiny{r}.pt", weights_only=True) for r in (0, 1))
    assert r0 == r1 and r0["n"] == 1
    assert [sum(h) for h in r0["hists"]] == [1, 1, 1] and len(r0["hists"][0]) == 10

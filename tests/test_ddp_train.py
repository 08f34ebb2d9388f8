"""``atmc train`` under torchrun (2 processes, gloo on CPU): rank-identical ADMM state, equal to one process on the
same global batch, only rank 0 writes, and an elastic restart (``--max-restarts 1``) resumes from the checkpoint."""

import json
import socket
import sys

import pytest
import torch
from procwatch import Watched, run_watched
from train_worker import scratch, single_run, torchrun_cmd, worker_env

from atmc_triton.checkpoint import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _torchrun(out, *extra, **env) -> str:
    """Run the 2-process job under the progress watchdog; returns its combined output."""
    log = out / "torchrun.log"
    cmd = [*torchrun_cmd(2, *extra), "--out", str(out / "out")]
    run_watched(cmd, log, heartbeat=out / "heartbeat", env=worker_env(ATMC_TEST_DUMP=str(out), **env))
    return log.read_text()


@pytest.fixture(scope="module")
def ddp_run():
    d = scratch("atmc_ddp_")
    return d, _torchrun(d)


def _dumps(d):
    return [torch.load(d / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_ranks_bit_identical_and_equal_to_one_process(ddp_run):
    d, res = ddp_run
    r0, r1 = _dumps(d)
    single = torch.load(single_run() / "rank0.pt", weights_only=True)
    assert r0["admm"] == r1["admm"] == single["admm"] == {"step": 8, "quant_steps": 2}
    keys = list(r0["model"])
    for suffix in ("U", "V", "C", "U_z", "V_u", "C_mask", "codebook"):
        assert any(k.endswith("." + suffix) for k in keys), suffix
    for k in keys:  # every weight, mask, Z, u and codebook: bit-identical across ranks
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    assert torch.equal(r0["mom"], r1["mom"]) and r0["rho"] == r1["rho"]
    for k in keys:  # and equal to one process on the same global batches and attack starts, to fp32 tolerance
        a, b = r0["model"][k], single["model"][k]
        if a.dtype == torch.bool:
            assert torch.equal(a, b), k
        else:
            assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), k
    assert torch.allclose(r0["mom"], single["mom"], rtol=1e-4, atol=1e-5)
    # the checkpoints rank 0 wrote hold the same state; the metrics are those of the whole global batch
    ck = load_checkpoint(d / "out" / "atmc.pt")
    for k in keys:
        assert torch.equal(ck["model"][k], r0["model"][k]), k
    logs = [json.loads(ln) for ln in (d / "out" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(ln) for ln in (single_run() / "out" / "metrics.jsonl").read_text().splitlines()]
    assert (
        [(r["stage"], r["epoch"]) for r in logs]
        == [(r["stage"], r["epoch"]) for r in ref]
        == [("dense", 1), ("atmc", 1), ("atmc", 2)]
    )  # one record per epoch: rank 1 wrote nothing
    for a, b in zip(logs, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["train_adv_acc"] == b["train_adv_acc"]
        assert a["test_n"] == b["test_n"] == 16 and a["nnz"] == b["nnz"]
    assert res.count("| ATMC-compressed |") == 1  # the table is printed once, by rank 0


def test_elastic_restart_resumes_from_the_checkpoint(ddp_run):
    """Rank 1 dies after ATMC epoch 1; torchrun restarts the group, which resumes and ends bit-identical."""
    ref, _ = ddp_run
    d = scratch("atmc_elastic_")
    res = _torchrun(d, "--max-restarts=1", ATMC_TEST_EXIT="atmc:1:1")
    assert (d / "exited").is_file()  # the first attempt really died ...
    assert "resuming atmc from" in res and "after epoch 1" in res  # ... and the restart resumed
    assert "resuming dense" in res  # (a finished stage resumes as a no-op)
    for got, want in zip(_dumps(d), _dumps(ref)):
        for k in want["model"]:
            assert torch.equal(got["model"][k], want["model"][k]), k
        assert torch.equal(got["mom"], want["mom"]) and got["admm"] == want["admm"]
    a, b = (load_checkpoint(x / "out" / "atmc_final.pt")["model"] for x in (d, ref))
    assert all(torch.equal(a[k], b[k]) for k in b)
    logs = [json.loads(ln) for ln in (d / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in logs] == [("dense", 1), ("atmc", 1), ("atmc", 2)]


def test_two_nodes_with_c10d_rendezvous_match_the_one_node_run(ddp_run):
    """``--nnodes 2`` (two torchrun agents on this host, one process each, c10d rendezvous) trains exactly as
    ``--nproc-per-node 2`` on one node."""
    ref, _ = ddp_run
    d = scratch("atmc_nodes_")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=atmc_test",
        torchrun_cmd(1)[-1],
        "--out",
        str(d / "out"),
    ]
    env = worker_env(ATMC_TEST_DUMP=str(d))
    nodes = [Watched(cmd, d / f"node{i}.log", heartbeat=d / "heartbeat", env=env) for i in range(2)]
    try:
        codes = [node.wait() for node in nodes]  # one heartbeat file: either node's steps are progress
    finally:
        for node in nodes:
            node.kill()
    logs = [node.tail(10**7) for node in nodes]
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    for got, want in zip(_dumps(d), _dumps(ref)):
        for k in want["model"]:
            assert torch.equal(got["model"][k], want["model"][k]), k
        assert torch.equal(got["mom"], want["mom"]) and got["admm"] == want["admm"]
    assert sum(log.count("| ATMC-compressed |") for log in logs) == 1  # only global rank 0 prints

"""Worker for tests/test_distributed.py: a user's own loop with compress_ -> ADMM -> DDP.

Run under ``torchrun --nproc-per-node N tests/dist_worker.py OUT_DIR`` (or plainly for world size 1).
Every rank sees the same global batch per step and trains on its shard; each rank saves its final
model state (weights, Z, u, masks, codebooks) and flat momenta to ``OUT_DIR/rank{r}.pt``.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import atmc_triton as at

STEPS, GLOBAL_BATCH = 7, 8


def model_fn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def sync_check(out: str) -> None:
    """Ranks whose ``W + u`` differ (rank 1's u perturbed): with ``sync_quantizer`` (the default under a
    process group) both end with rank 0's Z and codebooks; with ``sync_quantizer=False`` rank 1 keeps its own."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    got = {}
    for sync in (None, False):
        torch.manual_seed(0)
        cfg = at.ATMCConfig(ratio=0.5, bits=2)
        model = at.compress_(model_fn(), cfg)
        opt = at.ADMM(model, cfg, sync_quantizer=sync)
        if rank == 1:
            opt.store.u.add_(0.01 * torch.randn_like(opt.store.u))
        opt.quantize_()
        got[str(sync)] = {"z": opt.store.z.clone(), "codebook": opt.store.codebook.clone(), "u": opt.store.u.clone()}
    torch.save(got, os.path.join(out, f"sync{rank}.pt"))
    dist.destroy_process_group()


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = at.ATMCConfig(ratio=0.1, bits=3, quant_interval=3)  # quantizer due at steps 3 and 6
    model = at.compress_(model_fn(), cfg)
    opt = at.ADMM(model, cfg, lr=0.05)
    net = DDP(model) if world > 1 else model
    data = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.rand(GLOBAL_BATCH, 1, 8, 8, generator=data)
        y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=data)
        shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[shard]), y[shard]).backward()
        opt.step()
    torch.save(
        {"model": model.state_dict(), "mom": opt.store.mom.clone(), "admm": opt.state["admm"]},
        os.path.join(out, f"rank{rank}.pt"),
    )
    if world > 1:
        dist.destroy_process_group()


def batchnorm_fit(out: str) -> None:
    """``at.fit`` of a model with BatchNorm (ATMC layers, adversarial, with the guard and the per-epoch evaluation)
    on two ranks: each saves its BatchNorm statistics after the stage, which must be rank 0's on both."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 10))
    cfg = at.ATMCConfig(ratio=0.5, bits=4)
    at.compress_(model, cfg)
    model.register_buffer("mine", torch.full((2,), float(rank)))  # a buffer DDP is told to leave alone
    model._ddp_params_and_buffers_to_ignore = ["mine"]
    data = at.load_dataset("digits", subset=128, test_subset=32)
    proto = at.Protocol(eps=0.1, pgd_steps=1, guard_size=16, guard_drop=0.5, fallback_steps=2)
    at.fit(model, at.ADMM(model, cfg, lr=0.02), data, proto, at.Schedule(epochs=2, lr=0.02, batch_size=32),
           stage="bn", eval_size=32)  # fmt: skip
    bn = {k: v for k, v in model.state_dict().items() if k.startswith("1.") or k == "mine"}
    torch.save(bn, os.path.join(out, f"bn{rank}.pt"))
    dist.destroy_process_group()


class Killed(Exception):
    pass


def dropout_resume(out: str) -> None:
    """``at.fit`` of a model with dropout on two ranks whose CPU generators differ (rank 1 draws once more per
    forward): an uninterrupted run, and one killed after epoch 1 and resumed (the generators reseeded in between).
    Each rank saves whether the two end with equal weights: only when every rank resumes its own generator."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = at.load_dataset("digits", subset=128, test_subset=16)
    proto, sched = at.Protocol(eps=0.1, pgd_steps=1), at.Schedule(epochs=2, lr=0.05, batch_size=32)

    def run(ck: str, kill: bool, resume: bool) -> dict:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
        if rank == 1:
            model.register_forward_pre_hook(lambda m, a: torch.rand(1) and None)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        if resume:
            torch.manual_seed(1234)  # whatever the generators hold now: the checkpoint's states must come back

        def stop(epoch: int) -> None:  # a kill after the first saved epoch
            raise Killed()

        at.fit(model, opt, data, proto, sched, stage="d", adversarial=False, eval_size=0, checkpoint=ck,
               resume=resume, on_epoch_end=stop if kill else None)  # fmt: skip
        return model.state_dict()

    whole = run(os.path.join(out, "whole.pt"), False, False)
    ck = os.path.join(out, "killed.pt")
    try:
        run(ck, True, False)
    except Killed:
        pass
    resumed = run(ck, False, True)
    same = all(torch.equal(whole[k], resumed[k]) for k in whole)
    torch.save({"same": same}, os.path.join(out, f"resume{rank}.pt"))
    dist.destroy_process_group()


def guard_check(out: str) -> None:
    """The guard's figures on ranks whose models differ (rank 1's weights zeroed): each rank's own (the broadcast
    turned off) and what ``_guard_accuracy`` returns (rank 0's on every rank)."""
    from pipeline_helpers import trained_digits_model

    import atmc_triton.train as train_mod

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = trained_digits_model()
    if rank == 1:
        with torch.no_grad():
            for q in model.parameters():
                q.zero_()
    x, y = at.load_dataset("digits", subset=64).train.take(torch.arange(64))
    proto = at.Protocol(eps=0.1, pgd_steps=1, guard_steps=2)
    got = train_mod._guard_accuracy(model, x, y, proto, 0, "t")
    real, train_mod.broadcast_ = train_mod.broadcast_, lambda ts: None
    own = train_mod._guard_accuracy(model, x, y, proto, 0, "t")
    train_mod.broadcast_ = real
    torch.save({"got": got, "own": own}, os.path.join(out, f"guard{rank}.pt"))
    dist.destroy_process_group()


def tiny_eval(out: str) -> None:
    """``evaluate`` on two ranks of a one-example split: rank 1's share is empty. Each rank saves its result's
    counts and histograms (a short collective timeout turns a rank left waiting into an error)."""
    from datetime import timedelta

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    test = at.load_dataset("digits", subset=8, test_subset=1).test
    proto = at.Protocol(eps=0.1, pgd_steps=1, eval_pgd_steps=2, apgd_steps=2)
    r = at.evaluate(model, test, proto, attacks=("pgd", "apgd"), suite="apgd", distributed=True)
    got = {"n": r.n, "clean": r.clean_acc, "robust": r.robust_acc, "hists": [r.label_hist, r.clean_hist, r.adv_hist]}
    torch.save(got, os.path.join(out, f"tiny{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    from procwatch import beat_on_optimizer_steps

    beat_on_optimizer_steps()  # progress for the test's watchdog
    modes = {"sync": sync_check, "bn": batchnorm_fit, "resume": dropout_resume, "guard": guard_check, "tiny": tiny_eval}
    modes.get(sys.argv[2] if len(sys.argv) > 2 else "", main)(sys.argv[1])

"""Faults: SIGKILL in the middle of a checkpoint write (the previous checkpoint loads, the resumed run ends
bit-identical), and the NaN/Inf policy of the training loop (skip + warning + counter, abort after N in a row,
model / ADMM / BatchNorm state untouched by a skipped step)."""

import json
import math
import sys
import warnings

import pytest
import torch
import train_worker
from pipeline_helpers import one_thread
from procwatch import Watched
from torch import nn
from train_worker import ARGS, run, scratch, single_run, worker_env

import atmc_triton as at
from atmc_triton.checkpoint import CheckpointError, load_checkpoint
from atmc_triton.cli import main
from atmc_triton.data import DataBundle, DataSpec, Split
from atmc_triton.train import NonFiniteError, NonFiniteWarning, Protocol, Schedule, fit


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# --- SIGKILL mid-write ---------------------------------------------------------------------------------------------


def test_sigkill_during_a_checkpoint_write_then_resume_is_bit_identical():
    d = scratch("atmc_kill_")
    out = d / "out"
    worker = Watched(
        [sys.executable, train_worker.__file__, "--out", str(out)],
        d / "log.txt",
        heartbeat=d / "heartbeat",
        env=worker_env(ATMC_TEST_DUMP=str(d), ATMC_TEST_PAUSE="atmc.pt:2"),
    )
    try:  # until the second ATMC checkpoint is half written and fsynced (failing if the worker stops progressing)
        code = worker.wait(until=(d / "paused").exists)
        assert code is None, f"the worker exited ({code}) before the paused write:\n{worker.tail()}"
    finally:
        worker.kill()  # SIGKILL: no handler, no cleanup
    assert worker.proc.returncode == -9
    partial = list(out.glob(".atmc.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(partial[0])
    ck = load_checkpoint(out / "atmc.pt")  # the previous checkpoint is intact ...
    assert ck["epoch"] == 1 and ck["meta"]["stage"] == "atmc" and not (out / "atmc_final.pt").exists()
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in recs] == [("dense", 1), ("atmc", 1), ("atmc", 2)]

    assert run(["--out", str(out), "--resume"], dump=str(d)) == 0  # ... and the run resumes from it
    assert not list(out.glob(".*.tmp"))  # the partial write is cleaned up
    ref = single_run()
    got, want = (torch.load(x / "rank0.pt", weights_only=True) for x in (d, ref))
    assert got["admm"] == want["admm"] == {"step": 8, "quant_steps": 2}
    for k in want["model"]:  # weights, Z, u, masks, codebooks before finalize_: bit-identical
        assert torch.equal(got["model"][k], want["model"][k]), k
    assert torch.equal(got["mom"], want["mom"])
    a, b = (load_checkpoint(x / "out" / "atmc_final.pt")["model"] for x in (d, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    ref_recs = [json.loads(ln) for ln in (ref / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"], r["loss"]) for r in recs] == [
        (r["stage"], r["epoch"], r["loss"]) for r in ref_recs
    ]
    rows, ref_rows = (json.loads((x / "out" / "results.json").read_text()) for x in (d, ref))
    assert [(r["clean_acc"], r["pgd_acc"], r["size_bits"]) for r in rows] == [
        (r["clean_acc"], r["pgd_acc"], r["size_bits"]) for r in ref_rows
    ]


def test_truncated_metrics_line_from_a_kill_is_dropped_on_resume(tmp_path):
    """A kill while appending to metrics.jsonl leaves half a line; the resumed stage drops it and goes on."""
    d = single_run()
    out = tmp_path / "out"
    out.mkdir()
    for name in ("dense.pt", "atmc.pt", "atmc_final.pt"):
        (out / name).write_bytes((d / "out" / name).read_bytes())
    text = (d / "out" / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text + '{"stage": "atmc", "epo')
    assert run(["--out", str(out), "--resume"]) == 0
    assert (out / "metrics.jsonl").read_text() == text


# --- the NaN / Inf policy ------------------------------------------------------------------------------------------


def _toy():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    spec = DataSpec(3, (1, 8, 8))
    return DataBundle("toy", spec, Split(x, y), Split(x[:8], y[:8]))


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    cfg = at.ATMCConfig(ratio=0.3, bits=3, quant_interval=2)
    at.compress_(model, cfg)
    return model, at.ADMM(model, cfg, lr=0.05)


def _state(model, opt):
    """Everything a step may change: weights, Z, u, masks, codebooks, momenta (flat and dense), counters, BN."""
    s = opt.store
    flat = {n: getattr(s, n).clone() for n in ("w", "mom", "z", "u", "mask", "codebook")}
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    moms = [opt.state[p].get("momentum_buffer") for g in opt.param_groups[1:] for p in g["params"]]
    return (
        flat,
        dense,
        [None if m is None else m.clone() for m in moms],
        dict(opt.state["admm"]),
        opt.param_groups[0]["rho"],
    )


def _equal(a, b):
    fa, da, ma, ca, ra = a
    fb, db, mb, cb, rb = b
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da), [
        k for k in da if not torch.equal(da[k], db[k])
    ]
    assert len(ma) == len(mb) and all((x is None and y is None) or torch.equal(x, y) for x, y in zip(ma, mb))
    assert (ca, ra) == (cb, rb)


class Injector:
    """Poisons the training forward passes (or the grads) of the given 1-based steps; snapshots the model and
    optimizer state at a poisoned step and checks, at the next forward pass, that the step changed nothing."""

    def __init__(self, model, opt, steps, where="loss", value=math.nan):
        self.model, self.opt, self.steps, self.where, self.value = model, opt, set(steps), where, value
        self.calls, self.snap, self.checked = 0, None, 0
        model.register_forward_pre_hook(self.before)
        model.register_forward_hook(self.after)
        self.param = model[-1].C  # a factor of the last layer
        self.param.register_hook(self.grad)

    def before(self, module, args):
        if not module.training:
            return
        self.calls += 1
        if self.snap is not None:  # the previous (poisoned) step must have changed nothing
            _equal(_state(self.model, self.opt), self.snap)
            self.snap, self.checked = None, self.checked + 1
        if self.calls in self.steps:
            self.snap = _state(self.model, self.opt)  # before the forward pass updates BatchNorm statistics

    def after(self, module, args, out):
        if module.training and self.where == "loss" and self.calls in self.steps:
            return out * self.value
        return None

    def grad(self, g):
        return g * self.value if self.where == "grad" and self.calls in self.steps else None


def _fit(model, opt, epochs=2, **kw):
    sched = Schedule(epochs=epochs, lr=0.05, batch_size=16, lr_schedule="constant")
    return fit(
        model,
        opt,
        _toy(),
        Protocol(eps=0.1, pgd_steps=1),
        sched,
        stage="t",
        adversarial=False,
        eval_size=0,
        device="cpu",
        **kw,
    )


@pytest.mark.parametrize(
    "where, value", [("loss", math.nan), ("loss", math.inf), ("grad", math.nan), ("grad", -math.inf)]
)
def test_a_nonfinite_step_is_skipped_and_changes_nothing(tmp_path, where, value):
    model, opt = _model()
    inj = Injector(model, opt, steps=[2, 6], where=where, value=value)  # 4 steps per epoch: one in each epoch
    with pytest.warns(NonFiniteWarning, match=r"step skipped \(1 in a row; 5 stop the run\)") as rec:
        _fit(model, opt, log=tmp_path / "m.jsonl", checkpoint=tmp_path / "c.pt")
    assert len([w for w in rec if w.category is NonFiniteWarning]) == 2
    assert inj.checked == 2  # both skipped steps were checked to have changed nothing
    assert opt.steps == 6 and opt.state["admm"]["quant_steps"] == 3  # 8 batches, 6 real steps
    logs = [json.loads(ln) for ln in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in logs] == [1, 1] and all(math.isfinite(r["loss"]) for r in logs)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.dtype.is_floating_point)
    assert torch.isfinite(opt.store.mom).all()


def test_abort_after_n_nonfinite_steps_in_a_row_keeps_the_last_checkpoint(tmp_path):
    model, opt = _model()
    inj = Injector(model, opt, steps=range(5, 100))  # every step of epoch 2
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(
            NonFiniteError,
            match=r"3 training steps in a row had a NaN/Inf loss .*t epoch 2, step 7"
            r".*last complete checkpoint is .*c\.pt",
        ):
            _fit(model, opt, checkpoint=tmp_path / "c.pt", max_nonfinite=3)
    assert len([w for w in rec if w.category is NonFiniteWarning]) == 2  # the third one raises instead
    assert inj.calls == 7 and opt.steps == 4
    _equal(_state(model, opt), inj.snap)  # the state when the bad steps began: nothing changed since
    ck = load_checkpoint(tmp_path / "c.pt")  # which is the last complete checkpoint, epoch 1
    assert ck["epoch"] == 1 and ck["extra"]["nonfinite_run"] == 0
    assert all(torch.equal(v, ck["model"][k]) for k, v in model.state_dict().items())


def test_bad_steps_apart_do_not_abort_and_the_run_count_survives_resume(tmp_path):
    model, opt = _model()
    Injector(model, opt, steps=[3, 4, 6, 7])  # 2 in a row, twice: max_nonfinite=3 is never reached
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        _fit(model, opt, max_nonfinite=3)
    assert opt.steps == 4

    class Stop(Exception):
        pass

    def stop(epoch):
        raise Stop

    model, opt = _model()  # epoch 1 ends with 2 bad steps in a row, then the run is killed ...
    Injector(model, opt, steps=[3, 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        with pytest.raises(Stop):
            _fit(model, opt, checkpoint=tmp_path / "c.pt", max_nonfinite=3, on_epoch_end=stop)
    assert load_checkpoint(tmp_path / "c.pt")["extra"]["nonfinite_run"] == 2
    model, opt = _model()  # ... and one more bad step after the resume makes 3 in a row
    Injector(model, opt, steps=[1])
    with pytest.raises(NonFiniteError, match="3 training steps in a row .*t epoch 2, step 5"):
        _fit(model, opt, checkpoint=tmp_path / "c.pt", resume=True, max_nonfinite=3)


def test_admm_refusing_an_update_counts_as_a_skipped_step():
    model, opt = _model()
    real, calls = opt.step, []

    def step(closure=None):
        calls.append(1)
        if len(calls) == 3:  # what ADMM(check_finite=True) raises for a non-finite update, with nothing written
            raise FloatingPointError("ADMM.step: a gradient (or the factor update) has NaN or Inf")
        return real(closure)

    opt.step = step
    with pytest.warns(NonFiniteWarning):
        _fit(model, opt, epochs=1)
    assert len(calls) == 4 and opt.steps == 3
    with pytest.raises(ValueError, match="max_nonfinite must be an int >= 1"):
        _fit(model, opt, max_nonfinite=0)


def test_cli_stops_a_diverging_run_with_exit_code_3(tmp_path, capsys):
    rc = main(["train", *ARGS, "--out", str(tmp_path), "--lr", "1e30", "--max-nonfinite", "2"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "atmc: error: 2 training steps in a row had a NaN/Inf loss or gradient (dense epoch 1" in err
    assert not (tmp_path / "dense.pt").exists()


def test_all_finite_skips_none_and_empty_and_finds_any_nan_or_inf():
    from atmc_triton.optim import all_finite

    ok = [torch.ones(3), None, torch.empty(0), torch.zeros(2, 2, dtype=torch.float16)]
    assert all_finite([]) is None and all_finite([None, torch.empty(0, 4)]) is None
    assert all_finite(ok).dtype == torch.bool and all_finite(ok).dim() == 0 and bool(all_finite(ok))
    for bad in (math.nan, math.inf, -math.inf):
        t = torch.zeros(7)
        t[6] = bad
        assert not bool(all_finite([*ok, t])) and not bool(all_finite(iter([t.half(), torch.ones(1)])))

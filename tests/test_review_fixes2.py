"""Defects a second review of the training loop and the ``atmc`` command found (2026-12-02), each pinned by value.
Every test here failed on the code before its fix (each fix was planted out once and the test re-run); the hang of
``evaluate`` on more ranks than examples is pinned in tests/test_distributed.py."""

import dataclasses
import logging

import pytest
import torch
from pipeline_helpers import one_thread
from torch import nn

import atmc_triton as at
import atmc_triton.train as train_mod
from atmc_triton import cli
from atmc_triton.checkpoint import CheckpointError, save_checkpoint
from atmc_triton.data import load_dataset
from atmc_triton.models import build_model
from atmc_triton.train import Protocol, Schedule


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class _Stop(Exception):
    pass


def _stop(epoch: int) -> None:
    raise _Stop


def test_a_checkpoint_from_before_the_dense_digest_resumes_and_says_so(tmp_path, caplog):
    """The ATMC stage records its dense model's digest since 2026-12-01: resuming a checkpoint written before
    then was refused (``dense_model=None``) although nothing had changed. It resumes now, with a warning; any
    other changed setting is still refused."""
    data = load_dataset("digits", subset=64, test_subset=16)
    proto, sched, ck = Protocol(eps=0.1, pgd_steps=1), Schedule(epochs=2, lr=0.05, batch_size=32), tmp_path / "s.pt"

    def fit(meta, **kw):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        at.fit(model, opt, data, proto, sched, stage="s", eval_size=0, checkpoint=ck, meta=meta, **kw)

    with pytest.raises(_Stop):
        fit({"model": "m"}, on_epoch_end=_stop)  # the old checkpoint: no dense_model
    with pytest.raises(CheckpointError, match=r"model='m' \(expected 'n'\)"):
        fit({"model": "n", "dense_model": "sha256:0123"}, resume=True)
    with caplog.at_level(logging.WARNING, logger="atmc_triton"):
        fit({"model": "m", "dense_model": "sha256:0123"}, resume=True, on_epoch_end=lambda e: None)
    assert "written before checkpoints recorded dense_model: not verified" in caplog.text
    assert at.load_checkpoint(ck)["epoch"] == 2  # it resumed and finished


def test_eval_takes_a_checkpoint_whose_guard_settings_a_later_check_refuses(tmp_path, monkeypatch, capsys):
    """``atmc eval`` rebuilt the stored protocol, so a checkpoint trained with a PGD guard falling back to PGD of
    the training's strength (refused since 2026-12-01, it only trains) could not be evaluated: a ValueError. The
    guard is dropped for evaluation; a protocol that is bad otherwise is a CheckpointError naming the file."""
    path = tmp_path / "dense.pt"
    meta = {"model": "digits_cnn", "dataset": "digits", "num_classes": 10, "in_shape": [1, 8, 8], "stage": "dense"}
    proto = dataclasses.asdict(Protocol(eps=0.2, pgd_steps=10))
    model = build_model("digits_cnn", 10, (1, 8, 8))
    save_checkpoint(path, model=model, meta={**meta, "atmc": None, "seed": 0, "protocol": {**proto, "guard_drop": 0.2}})
    with pytest.raises(ValueError, match="fallback_steps > pgd_steps"):
        Protocol(**{**proto, "guard_drop": 0.2})  # (what the stored protocol is)
    seen = []

    def load(name, root, *, download, **kw):
        seen.append(name)
        raise _Stop

    monkeypatch.setattr(cli, "_load", load)
    with pytest.raises(_Stop):
        cli.main(["eval", str(path)])
    assert seen == ["digits"]
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, model=model, meta={**meta, "atmc": None, "seed": 0, "protocol": {**proto, "eps": -1.0}})
    assert cli.main(["eval", str(bad)]) == 2
    assert f"checkpoint {str(bad)!r} has a bad protocol: eps" in capsys.readouterr().err


def test_bincount_drops_negative_labels():
    """Values below 0 reached ``scatter_add_`` as indices (out of range: an error on the CPU, a device assert on
    a GPU); they are dropped, as values >= c are."""
    v = torch.tensor([-1, 0, 2, 5, 3, -7, 2])
    assert train_mod._bincount(v, 3).tolist() == [1, 0, 2]
    assert train_mod._bincount(torch.zeros(0, dtype=torch.int64), 2).tolist() == [0, 0]


def _setup(cmd, *argv):
    return cli._setup(cli._parser().parse_args([cmd, "--dataset", "digits", "--no-progress", *argv]))


def test_the_dense_milestones_are_asked_for_only_when_a_dense_model_trains():
    """With ``--dense-checkpoint`` no dense model trains, yet ``--lr-schedule step`` demanded ``--milestones``.
    The natural baseline (train, on by default for digits) trains on the dense schedule, so it still needs them."""
    step = ("--lr-schedule", "step", "--atmc-milestones", "5", "--dense-checkpoint", "d.pt")
    assert _setup("sweep", *step).atmc.milestones == (5,)
    assert _setup("train", *step, "--no-natural-baseline").dense.milestones == ()
    with pytest.raises(ValueError, match="needs --milestones"):
        _setup("train", *step)
    with pytest.raises(ValueError, match="needs --milestones"):
        _setup("sweep", *step[:4])


def test_gamma_and_fallback_steps_are_refused_where_nothing_reads_them():
    """``--gamma`` with a schedule other than step, and ``--fallback-steps`` with the guard off, were stored and
    ignored; Protocol's refusals named its fields, not the flags a user typed."""
    assert _setup("train").dense.gamma == Schedule(epochs=1, lr=1).gamma
    with pytest.raises(ValueError, match="--gamma need --lr-schedule step"):
        _setup("train", "--gamma", "0.5")
    with pytest.raises(ValueError, match="--fallback-steps sets the guard's fallback, but the guard is off"):
        _setup("train", "--fallback-steps", "12")  # the paper protocol: no guard
    with pytest.raises(ValueError, match="--fallback-steps sets the guard's fallback, but the guard is off"):
        _setup("train", "--protocol", "fast", "--guard-drop", "0", "--fallback-steps", "12")
    assert _setup("train", "--protocol", "fast", "--fallback-steps", "12").exp.protocol.fallback_steps == 12
    msg = r"--guard-drop with --train-attack='pgd' needs --fallback-steps > --pgd-steps .*, got --fallback-steps=10 and"
    with pytest.raises(ValueError, match=msg):
        _setup("train", "--protocol", "fast", "--pgd-steps", "10")


def test_a_repeated_milestone_multiplies_again():
    """As PyTorch's ``MultiStepLR``: (5, 5) with gamma 0.5 quarters the rate from epoch 5."""
    s = Schedule(epochs=10, lr=1.0, lr_schedule="step", milestones=(5, 5), gamma=0.5)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[5, 5], gamma=0.5)
    got = []
    for epoch in range(10):
        got.append((s.lr_at(epoch, 10), opt.param_groups[0]["lr"]))
        opt.step()
        ref.step()
    assert [a for a, _ in got] == [b for _, b in got] == [1.0] * 5 + [0.25] * 5

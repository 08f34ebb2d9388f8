"""Defects a review of the training loop, the ``atmc`` command and the model builders found (2026-12-01), each
pinned by value. Every test here failed on the code before its fix (each fix was planted out once and the test
re-run)."""

import json

import pytest
import torch
from pipeline_helpers import one_thread
from torch import nn

import atmc_triton as at
import atmc_triton.train as train_mod
from atmc_triton import cli
from atmc_triton.checkpoint import save_checkpoint
from atmc_triton.data import load_dataset
from atmc_triton.models import build_model
from atmc_triton.train import Protocol, Schedule


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("digits", subset=64, test_subset=16)


def _fit(model, data, proto, sched, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=sched.lr)
    return at.fit(model, opt, data, proto, sched, stage="s", eval_size=0, seed=0, **kw)


def test_the_trades_attack_target_carries_no_graph(tiny, monkeypatch):
    """TRADES' clean probabilities (the attack's KL target) were computed with grad on (``attack_context``
    re-enabled it inside the outer ``no_grad``): a whole forward graph kept alive through every attack."""
    seen = []
    real = train_mod._train_attack

    def spy(model, x, y, p, attack, eps, noise, loss_fn):
        seen.append(loss_fn.__defaults__[0])  # the q the KL compares with
        return real(model, x, y, p, attack, eps, noise, loss_fn)

    monkeypatch.setattr(train_mod, "_train_attack", spy)
    model = build_model("digits_cnn", 10, (1, 8, 8))
    _fit(model, tiny, Protocol(eps=0.1, pgd_steps=1, loss="trades"), Schedule(epochs=1, lr=0.01, batch_size=32))
    assert len(seen) == 2 and all(q.grad_fn is None and not q.requires_grad for q in seen)
    assert all(torch.allclose(q.sum(1), torch.ones(32)) for q in seen)  # still the softmax of the clean pass


def test_the_logged_lr_is_the_one_the_epochs_last_step_used(tiny, tmp_path):
    """``metrics.jsonl``'s ``lr`` was the next step's: 0.0 for every cosine run's last epoch."""
    sched = Schedule(epochs=2, lr=0.1, batch_size=32)  # cosine, 2 steps per epoch, 4 in all
    _fit(build_model("digits_cnn", 10, (1, 8, 8)), tiny, Protocol(eps=0.1, pgd_steps=1), sched, log=tmp_path / "m")
    lrs = [json.loads(ln)["lr"] for ln in (tmp_path / "m").read_text().splitlines()]
    # steps 1 and 3 (0-based) end the epochs: 0.1 * (1 + cos(pi * t / 4)) / 2
    assert lrs == pytest.approx([0.1 * (1 + 2**-0.5) / 2, 0.1 * (1 - 2**-0.5) / 2])


class _Aux(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = build_model("digits_cnn", 10, (1, 8, 8))

    def forward(self, x):
        y = self.f(x)
        return (y, y) if self.training else y


def test_a_model_with_auxiliary_outputs_is_refused_by_name(tiny):
    """torchvision's GoogLeNet / Inception v3 return a tuple in train mode: the first training step failed inside
    cross-entropy with a TypeError about its argument. They are built without the auxiliary heads now, and any
    other such model gets a ValueError (one line from the CLI) that says what to do."""
    with pytest.raises(ValueError, match="returned a tuple, not a logits tensor.*aux_logits=False"):
        _fit(_Aux(), tiny, Protocol(eps=0.1, pgd_steps=1), Schedule(epochs=1, lr=0.01, batch_size=32))
    pytest.importorskip("torchvision")
    for name, shape in (("tv:googlenet", (3, 32, 32)), ("tv:inception_v3", (3, 80, 80))):
        with pytest.warns(FutureWarning) if name.endswith("v3") else _nothing():
            model = build_model(name, 10, shape).train()
        out = model(torch.rand(2, *shape))
        assert isinstance(out, torch.Tensor) and out.shape == (2, 10), name


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _setup(*argv):
    return cli._setup(cli._parser().parse_args(["train", "--dataset", "digits", "--no-progress", *argv]))


def test_the_step_schedule_takes_its_milestones_from_the_cli():
    """``--lr-schedule step`` was offered with no way to give milestones: a constant LR under another name."""
    s = _setup("--lr-schedule", "step", "--milestones", "20,30", "--atmc-milestones", "10", "--gamma", "0.5")
    assert (s.dense.milestones, s.atmc.milestones, s.dense.gamma, s.atmc.gamma) == ((20, 30), (10,), 0.5, 0.5)
    assert s.dense.lr_at(0, 40) == s.dense.lr and s.dense.lr_at(39, 40) == pytest.approx(s.dense.lr / 4)
    for argv, msg in (
        (("--lr-schedule", "step"), "needs --milestones"),
        (("--lr-schedule", "step", "--milestones", "5"), "needs --atmc-milestones"),
        (("--lr-schedule", "step", "--milestones", "40", "--atmc-milestones", "5"), "below the stage's 40 epochs"),
        (("--milestones", "5"), "need --lr-schedule step"),
    ):
        with pytest.raises(ValueError, match=msg):
            _setup(*argv)


def test_sweep_refuses_ratio_and_nnz(capsys):
    """``atmc sweep --ratio 0.1`` swept the default ratios without a word; ``--nnz`` said "not both"."""
    for flag, value in (("--ratio", "0.1"), ("--nnz", "1000")):
        assert cli.main(["sweep", "--dataset", "digits", flag, value]) == 2
        assert f"takes its budgets from --ratios (a comma list), not {flag}" in capsys.readouterr().err


class _Stop(Exception):
    pass


def test_eval_defaults_to_the_checkpoints_seed(tmp_path, monkeypatch):
    """``atmc eval --test-subset N`` drew its subset (and attack starts) from seed 0, not the training run's, so
    it reported other examples than training's evaluation did."""
    path = tmp_path / "dense.pt"
    meta = {"model": "digits_cnn", "dataset": "digits", "num_classes": 10, "in_shape": [1, 8, 8], "stage": "dense"}
    save_checkpoint(path, model=build_model("digits_cnn", 10, (1, 8, 8)), meta={**meta, "atmc": None, "seed": 3})
    seeds = []

    def load(name, root, *, download, **kw):
        seeds.append(kw["seed"])
        raise _Stop

    monkeypatch.setattr(cli, "_load", load)
    for extra, want in (((), 3), (("--seed", "5"), 5)):
        with pytest.raises(_Stop):
            cli.main(["eval", str(path), "--test-subset", "8", *extra])
        assert seeds.pop() == want

"""Fast adversarial training: FGSM-RS / N-FGSM against hand-written references, the eps warm-up and one-cycle
schedule, TRADES, the catastrophic-overfitting guard (rollback on a planted collapse, exact resume after it),
and the ``--protocol fast`` presets."""

import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from pipeline_helpers import one_thread
from torch import nn

import atmc_triton as at
import atmc_triton.train as train_mod
from atmc_triton.cli import FAST_RECIPES, RECIPES, _base_protocol, recipe_for
from atmc_triton.data import load_dataset
from atmc_triton.train import PROTOCOLS, Experiment, Protocol, Schedule


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset("digits", subset=128, test_subset=32)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3))


def _input_grad(m, x, y):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(m(x), y), x)
    return g


@pytest.mark.parametrize("n", [1, 7, 63])
def test_fgsm_rs_and_n_fgsm_match_hand_written_references(n):
    torch.manual_seed(n)
    m, x, y = _net(), torch.rand(n, 1, 4, 4), torch.randint(0, 3, (n,))
    noise, eps = torch.rand_like(x), 0.1
    # FGSM-RS (Wong et al.): uniform start in the eps-ball, one step, back into the ball and [0, 1]
    start = (x + (2 * noise - 1) * eps).clamp(0, 1)
    ref = (x + (start + 0.125 * _input_grad(m, start, y).sign() - x).clamp(-eps, eps)).clamp(0, 1)
    got = at.fgsm_rs(m, x, y, eps, 0.125, noise=noise)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert (got - x).abs().max() <= eps + 1e-7
    # N-FGSM (de Jorge et al.): start in the 2 eps-ball, one step of eps, no projection to the eps-ball
    start = (x + (2 * noise - 1) * 2 * eps).clamp(0, 1)
    ref = (start + eps * _input_grad(m, start, y).sign()).clamp(0, 1)
    got = at.n_fgsm(m, x, y, eps, noise=noise)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert (got - x).abs().max() <= 3 * eps + 1e-6
    if n == 63:
        assert (got - x).abs().max() > eps  # it does leave the eps-ball (that is the method)
    # a generator gives the same as the noise it draws; the model is left as it was
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = at.fgsm_rs(m, x, y, eps, 0.125, generator=g1)
    torch.testing.assert_close(a, at.fgsm_rs(m, x, y, eps, 0.125, noise=torch.rand(x.shape, generator=g2)))
    assert m.training and all(p.grad is None for p in m.parameters())


def test_single_step_attacks_refuse_bad_input():
    m, x, y = _net(), torch.rand(2, 1, 4, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="alpha"):
        at.fgsm_rs(m, x, y, 0.1, -1.0)
    with pytest.raises(ValueError, match="k >= 0"):
        at.n_fgsm(m, x, y, 0.1, k=-1)
    with pytest.raises(ValueError, match="shape"):
        at.n_fgsm(m, x, y, 0.1, noise=torch.rand(3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        at.fgsm_rs(m, x * 3, y, 0.1)


def test_the_guard_needs_a_stronger_pgd_to_fall_back_to():
    """With PGD training, a fallback of the same PGD re-ran the collapsed epoch with the same seeds to the same
    weights (a review reproduced it bit for bit) and then accepted it: refused now, in Python and from the CLI."""
    from atmc_triton import cli

    for fallback in (None, 2, 3):
        with pytest.raises(ValueError, match=r"fallback_steps > pgd_steps .* pgd_steps=3"):
            Protocol(eps=0.3, pgd_steps=3, guard_drop=0.2, fallback_steps=fallback)
    assert Protocol(eps=0.3, pgd_steps=3, guard_drop=0.2, fallback_steps=4).fallback_steps == 4
    assert Protocol(eps=0.3, pgd_steps=3, guard_drop=0.2, train_attack="fgsm_rs").fallback_steps is None
    assert Protocol(eps=0.3, pgd_steps=3, fallback_steps=3).guard_drop is None  # no guard: nothing to fall back from
    parser = cli._parser()
    base = ["train", "--dataset", "digits", "--protocol", "fast", "--no-progress"]
    with pytest.raises(ValueError, match="--fallback-steps=10 and --pgd-steps=10"):  # the preset's fallback, PGD-10 now
        cli._setup(parser.parse_args([*base, "--pgd-steps", "10"]))
    assert cli._setup(parser.parse_args([*base, "--pgd-steps", "10", "--fallback-steps", "12"])).exp.protocol == (
        dataclasses.replace(PROTOCOLS["digits_fast"], pgd_steps=10, fallback_steps=12)
    )


def test_protocol_fields_are_validated_and_eps_ramps():
    for bad in (
        {"train_attack": "fgsm"},
        {"loss": "mse"},
        {"fgsm_step": -1.0},
        {"fgsm_noise": float("nan")},
        {"eps_warmup_epochs": -1},
        {"trades_beta": -1},
        {"guard_drop": 0.0},
        {"guard_drop": 1.5},
        {"guard_size": 0},
    ):
        with pytest.raises(ValueError):
            Protocol(eps=0.3, pgd_steps=1, **bad)
    p = Protocol(eps=0.3, pgd_steps=1, eps_warmup_epochs=2)
    assert [round(p.train_eps(s, 10), 6) for s in (0, 9, 19, 20, 500)] == [0.015, 0.15, 0.3, 0.3, 0.3]
    assert Protocol(eps=0.3, pgd_steps=1).train_eps(0, 10) == 0.3
    assert p.training_attack() == "pgd" and Protocol(0.3, 1, train_attack="n_fgsm").training_attack(True) == "fallback"
    s = Schedule(epochs=1, lr=1.0, lr_schedule="onecycle")
    lrs = [s.lr_at(t, 10) for t in range(10)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    with pytest.raises(ValueError, match="lr_schedule"):
        Schedule(epochs=1, lr=1.0, lr_schedule="cyclic")


def test_trades_term_is_the_batch_mean_kl():
    torch.manual_seed(0)
    la, lc = torch.randn(5, 4), torch.randn(5, 4)
    pc = F.softmax(lc, 1)
    ref = (pc * (pc.log() - F.log_softmax(la, 1))).sum(1).mean()
    torch.testing.assert_close(train_mod._trades_kl(la, pc), ref)
    assert train_mod._trades_kl(lc, pc).abs() < 1e-6


def _fast(**kw):
    return Protocol(
        **{"eps": 0.2, "pgd_steps": 2, "apgd_steps": 3, "train_attack": "fgsm_rs", "eps_warmup_epochs": 1, **kw}
    )


def test_trades_and_n_fgsm_train(tmp_path, small_digits):
    for proto in (_fast(loss="trades", trades_beta=3.0), _fast(train_attack="n_fgsm")):
        exp = Experiment(
            "digits_cnn", small_digits, proto, out=tmp_path / proto.train_attack, device="cpu", eval_size=0
        )
        exp.pretrain(Schedule(epochs=1, lr=0.05, batch_size=32, lr_schedule="onecycle"))
        (rec,) = [json.loads(ln) for ln in (tmp_path / proto.train_attack / "metrics.jsonl").read_text().splitlines()]
        assert rec["train_acc"] is not None and rec["train_adv_acc"] is not None
        assert rec["train_attack"] == proto.train_attack and rec["train_eps"] == pytest.approx(0.2)


def _planted(collapse_at):
    """A guard whose PGD accuracy rises, except a collapse after epoch ``collapse_at`` (1-based)."""

    def guard(model, x, y, p, seed, tag):
        epoch = int(tag.rsplit("/", 1)[1]) + 1
        return 0.9, (0.05 if epoch == collapse_at else 0.3 + 0.1 * epoch)

    return guard


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Killed(Exception):
    pass


def test_guard_rolls_back_a_planted_collapse_and_resumes_exactly(tmp_path, small_digits, monkeypatch):
    proto = _fast(guard_drop=0.2, guard_size=16)
    sched = Schedule(epochs=4, lr=0.05, batch_size=32)

    def exp(out, **kw):
        return Experiment("digits_cnn", small_digits, proto, out=tmp_path / out, device="cpu", eval_size=0, **kw)

    monkeypatch.setattr(train_mod, "_guard_accuracy", _planted(collapse_at=99))
    clean, _ = exp("clean").pretrain(sched)  # no collapse: FGSM-RS all the way

    monkeypatch.setattr(train_mod, "_guard_accuracy", _planted(collapse_at=2))
    with pytest.warns(RuntimeWarning, match="catastrophic overfitting"):
        rolled, _ = exp("a").pretrain(sched)
    logs = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r.get("event"), r["train_attack"]) for r in logs] == [
        (1, None, "fgsm_rs"),
        (2, "rollback", "fgsm_rs"),
        (2, None, "fallback"),
        (3, None, "fallback"),
        (4, None, "fallback"),
    ]
    assert logs[1]["guard_pgd_acc"] == 0.05 and logs[1]["guard_best"] == pytest.approx(0.4)
    ck = torch.load(tmp_path / "a" / "dense.pt", weights_only=False)
    assert ck["extra"]["fallback"] is True
    # the re-run epoch 2 started from epoch 1's weights: the rolled-back run differs from the clean one only
    # because it trained with PGD from epoch 2 on
    assert not torch.equal(clean.state_dict()["features.0.weight"], rolled.state_dict()["features.0.weight"])

    def kill_after_3(stage, epoch):
        if epoch == 3:
            raise Killed

    with pytest.raises(Killed), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        exp("b", on_epoch_end=kill_after_3).pretrain(sched)
    torch.manual_seed(4321)
    resumed, _ = exp("b", resume=True).pretrain(sched)  # the fallback is in the checkpoint: PGD for epoch 4 too
    _states_equal(rolled, resumed)


def test_guard_rollback_restores_the_last_accepted_epoch(small_digits, monkeypatch):
    """Epochs 1 and (re-run) 2 of a rolled-back run equal epoch 1 of a run without collapse + a PGD epoch 2."""
    monkeypatch.setattr(train_mod, "_guard_accuracy", _planted(collapse_at=2))
    snaps = {}
    proto = _fast(guard_drop=0.2, guard_size=16)
    sched = Schedule(epochs=2, lr=0.05, batch_size=32, lr_schedule="constant")

    def grab(tag, model):
        def hook(epoch):
            snaps[(tag, epoch)] = {k: v.clone() for k, v in model.state_dict().items()}

        return hook

    torch.manual_seed(0)
    model = Experiment("digits_cnn", small_digits, proto, device="cpu", eval_size=0).new_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    with pytest.warns(RuntimeWarning):
        train_mod.fit(model, opt, small_digits, proto, sched, stage="s", on_epoch_end=grab("a", model))
    ref = Experiment("digits_cnn", small_digits, proto, device="cpu", eval_size=0).new_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    monkeypatch.setattr(train_mod, "_guard_accuracy", _planted(collapse_at=99))
    one = Schedule(epochs=2, lr=0.05, batch_size=32, lr_schedule="constant")
    # epoch 1 with FGSM-RS, then epoch 2 with PGD: the same as fit() with the fallback already set
    real_attack = train_mod.Protocol.training_attack
    monkeypatch.setattr(
        train_mod.Protocol,
        "training_attack",
        lambda self, fb=False: "pgd" if state["epoch"] >= 1 else real_attack(self),
    )
    state = {"epoch": 0}

    def bump(epoch):
        state["epoch"] = epoch
        snaps[("b", epoch)] = {k: v.clone() for k, v in ref.state_dict().items()}

    train_mod.fit(ref, opt, small_digits, proto, one, stage="s", on_epoch_end=bump)
    for k in snaps[("a", 1)]:
        assert torch.equal(snaps[("a", 1)][k], snaps[("b", 1)][k])
        assert torch.equal(snaps[("a", 2)][k], snaps[("b", 2)][k]), k


def test_fast_presets_and_cli_protocol():
    assert recipe_for("mnist") is RECIPES["mnist"] and recipe_for("mnist", "fast") is FAST_RECIPES["mnist"]
    assert _base_protocol("mnist") == PROTOCOLS["mnist"] and PROTOCOLS["mnist"].train_attack == "pgd"
    for ds in ("mnist", "digits"):
        p = _base_protocol(ds, "fast")
        assert p.guard_drop is not None and p.eps == PROTOCOLS[ds].eps and p.eps_warmup_epochs > 0
        assert p.train_attack == "pgd" and p.fallback_steps > p.pgd_steps < PROTOCOLS[ds].pgd_steps
        assert FAST_RECIPES[ds].lr_schedule == "onecycle"
    with pytest.raises(ValueError, match="mnist"):
        recipe_for("cifar10", "fast")
    with pytest.raises(ValueError, match="paper"):
        recipe_for("mnist", "slow")


def test_train_throughput_bench_runs_and_refuses_bad_variants(capsys):
    from bench import train_throughput

    assert train_throughput.main(["--threads", "1", "--steps", "1", "--variants", "pgd3,n_fgsm", "--no-results"]) == 0
    out = capsys.readouterr().out
    assert "| pgd3 | 1 |" in out and "| n_fgsm | 1 |" in out
    with pytest.raises(SystemExit):
        train_throughput.main(["--variants", "fgsm", "--no-results"])


def test_fewer_target_classes_are_labelled():
    from atmc_triton.attacks import suite_stages

    m, x = _net(), torch.rand(2, 1, 4, 4)
    m10 = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    assert suite_stages(m10, x, "apgd", 0.1)[0] == "apgd-ce-100+apgd-t-100"
    assert suite_stages(m10, x, "apgd", 0.1, n_target_classes=3)[0] == "apgd-ce-100+apgd-t-100-3targets"
    label, stages = suite_stages(m10, x, "torchattacks", 0.1, n_target_classes=3)
    assert [n for n, _ in stages][1:3] == ["apgd-t-100-3targets", "fab-t-100-3targets"] and "3targets" in label
    assert suite_stages(m, x, "apgd", 0.1)[0] == "apgd-ce-100"  # 3 classes: no targeted stage


def test_channels_last_models_compute_the_same(small_digits):
    plain = Experiment("digits_cnn", small_digits, _fast(), device="cpu").new_model()
    cl = Experiment("digits_cnn", small_digits, _fast(), device="cpu", channels_last=True).new_model()
    w = next(p for p in cl.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    x = torch.rand(7, 1, 8, 8)
    torch.testing.assert_close(cl(x), plain(x), rtol=1e-5, atol=1e-5)
    plain.load_state_dict(cl.state_dict())  # checkpoints do not depend on the memory format

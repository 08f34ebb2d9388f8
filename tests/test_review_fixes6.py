"""Defects a review of the attacks (atmc_triton/attacks.py) found (2026-12-02), each pinned by value. Every test here
failed on the code before its fix (each fix was planted out once and the test re-run): an empty batch's suite label,
fra31's AutoAttack unseeded and run at its own settings whatever the suite's, Square's schedule at 5000 queries,
torchattacks / AutoAttack picked for inputs that are not float32, an APGD restart overwriting a better one, and
buffers a forward pass touched left changed."""

import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F
from pipeline_helpers import digits, one_thread, trained_digits_model
from torch import nn

import atmc_triton as at
from atmc_triton.attacks import _apgd_run, attack_context, dlr_loss_targeted, resolve_suite, suite_stages

torchattacks = pytest.importorskip("torchattacks")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class FakeAutoAttack:
    """fra31's ``AutoAttack`` as far as the suite uses it: the constructor's signature, the sub-attacks' settings its
    constructor sets (``set_version('standard')``), and its seeding (``get_seed``: the time when ``seed`` is None;
    each sub-attack reseeds the global RNG from it)."""

    made: list = []

    def __init__(
        self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(), version="standard", device="cuda"
    ):
        self.model, self.norm, self.epsilon, self.seed, self.version = model, norm, eps, seed, version
        self.apgd = types.SimpleNamespace(n_iter=100, n_restarts=1)
        self.apgd_targeted = types.SimpleNamespace(n_iter=100, n_restarts=1, n_target_classes=9)
        self.fab = types.SimpleNamespace(n_iter=100, n_restarts=1, n_target_classes=9)
        self.square = types.SimpleNamespace(n_queries=5000, rescale_schedule=False)
        self.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t", "square"]
        FakeAutoAttack.made.append(self)

    def get_seed(self):
        return time.time() if self.seed is None else self.seed

    def run_standard_evaluation(self, x, y, bs=250):
        torch.random.manual_seed(int(self.get_seed() * 1e6) % 2**31)
        self.last = (x + self.epsilon * torch.randn_like(x).sign()).clamp(0, 1)
        return self.last


@pytest.fixture
def fake_autoattack(monkeypatch):
    FakeAutoAttack.made = []
    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=FakeAutoAttack))
    return FakeAutoAttack


def _linear(classes: int) -> nn.Module:
    torch.manual_seed(classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, classes)).eval()


SHORT = dict(steps=2, n_target_classes=3, square_queries=5)


@pytest.mark.parametrize("suite", ["apgd", "torchattacks", "autoattack"])
@pytest.mark.parametrize("classes", [3, 5])
def test_an_empty_batch_gets_the_label_of_a_full_one(fake_autoattack, suite, classes):
    """An empty batch was labelled as if the model had 10 classes: a 3-class model's empty batch ran (and named)
    APGD-T over 3 targets, ``apgd-ce-2+apgd-t-2-3targets`` against ``apgd-ce-2`` for any other batch."""
    model = _linear(classes)
    x = torch.rand(4, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    full = at.robust_suite(model, x, y, 0.1, suite=suite, **SHORT)
    empty = at.robust_suite(model, x[:0], y[:0], 0.1, suite=suite, **SHORT)
    assert empty.suite == full.suite
    assert empty.x_adv.shape == (0, 1, 4, 4) and empty.robust.shape == empty.pred.shape == (0,)
    assert list(empty.broken) == list(full.broken) and not any(empty.broken.values())
    assert at.robust_attack(model, x[:0], y[:0], 0.1, suite=suite, **SHORT)[1] == full.suite


def test_fra31_autoattack_is_seeded_and_runs_the_suites_settings(fake_autoattack):
    """AutoAttack was built without a seed (fra31's then seeds from the clock: two runs with one generator differed
    by eps) and kept its constructor's 100 steps / 9 targets / 5000 queries whatever the suite asked for, under the
    label ``autoattack-standard``."""
    model = _linear(10)
    x = torch.rand(16, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    runs = [
        at.robust_suite(
            model, x, y, 0.1, suite="autoattack", steps=5, n_target_classes=3, square_queries=20, generator=g
        )
        for g in (torch.Generator().manual_seed(0), torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    ]
    assert runs[0].suite == "autoattack-standard(steps-5,3targets,square-20)"
    a, again, other = fake_autoattack.made
    assert torch.equal(a.last, again.last) and not torch.equal(a.last, other.last)
    assert torch.equal(runs[0].x_adv, runs[1].x_adv)
    assert isinstance(a.seed, int) and a.seed == again.seed != other.seed
    assert (a.apgd.n_iter, a.apgd_targeted.n_iter, a.fab.n_iter) == (5, 5, 5)
    assert (a.apgd_targeted.n_target_classes, a.fab.n_target_classes) == (3, 3)
    assert (a.square.n_queries, a.square.rescale_schedule) == (20, True)
    # AutoAttack's standard settings keep the plain label and the constructor's settings
    r = at.robust_suite(model, x, y, 0.1, suite="autoattack")
    a = fake_autoattack.made[-1]
    assert r.suite == "autoattack-standard"
    assert (a.apgd.n_iter, a.apgd_targeted.n_target_classes, a.fab.n_target_classes) == (100, 9, 9)
    assert (a.square.n_queries, a.square.rescale_schedule) == (5000, False)
    assert a.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    # 3 classes: targeted DLR cannot run (fra31's would fail); 2 targets for FAB-T, and the label says so
    three = _linear(3)
    with torch.no_grad():
        y3 = three(x).argmax(1)
    r = at.robust_suite(three, x, y3, 0.1, suite="autoattack")
    a = fake_autoattack.made[-1]
    assert r.suite == "autoattack-standard(steps-100,2targets,square-5000,no-apgd-t)"
    assert a.attacks_to_run == ["apgd-ce", "fab-t", "square"] and a.fab.n_target_classes == 2
    # torchattacks' suite drops APGD-T there too: its label names the stages instead of claiming the standard suite
    assert suite_stages(three, x, "torchattacks", 0.1)[0] == "aa-torchattacks(apgd-ce-100,fab-t-100,square-5000)"


def test_square_runs_autoattacks_schedule_at_5000_queries_and_a_rescaled_one_otherwise(fake_autoattack):
    """torchattacks' Square rescales its schedule of square sizes to ``n_queries`` by default
    (``it -> it / n_queries * 10000``); AutoAttack's standard Square runs 5000 queries with ``resc_schedule=False``.
    The suite's 5000-query Square ran the rescaled schedule: its squares shrank twice as fast (p = p_init / 32 at
    query 1001, p_init / 512 at the end, against AutoAttack's p_init / 32 ... / 128)."""
    model = _linear(10)
    x = torch.rand(2, 1, 4, 4)
    standard = types.SimpleNamespace(rescale_schedule=False, n_queries=5000, p_init=0.8)  # fra31's AutoAttack
    its = [0, 11, 51, 201, 501, 1001, 2001, 4001, 4999]
    for q, rescaled in ((5000, False), (1000, True), (20, True)):
        sq = dict(suite_stages(model, x, "torchattacks", 0.1, square_queries=q)[1])[f"square-{q}"]
        assert isinstance(sq, torchattacks.Square) and (sq.n_queries, sq.rescale_schedule) == (q, rescaled)
    sq = dict(suite_stages(model, x, "torchattacks", 0.1)[1])["square-5000"]
    assert [sq.p_selection(i) for i in its] == [torchattacks.Square.p_selection(standard, i) for i in its]
    assert sq.p_selection(4999) == 0.8 / 128
    short = dict(suite_stages(model, x, "torchattacks", 0.1, square_queries=20)[1])["square-20"]
    assert short.p_selection(19) == 0.8 / 512  # a short run still goes through the whole schedule
    suite_stages(model, x, "autoattack", 0.1, square_queries=20)
    assert fake_autoattack.made[-1].square.rescale_schedule


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fra31", [False, True])
def test_auto_runs_the_own_suite_for_inputs_that_are_not_float32(monkeypatch, dtype, fra31):
    """torchattacks' and fra31's attacks draw float32 noise: on a float64 or bfloat16 model ``suite="auto"`` (which
    picked them) failed with ``Input type (float) and bias type (double) should be the same``."""
    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=FakeAutoAttack) if fra31 else None)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 5)).to(dtype).eval()
    x = torch.rand(6, 1, 4, 4).to(dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    assert resolve_suite("auto", None, x) == "apgd"
    assert resolve_suite("auto", None, x.float()) == ("autoattack" if fra31 else "torchattacks")
    r = at.robust_suite(model, x, y, 0.1, steps=2, n_target_classes=3, generator=torch.Generator().manual_seed(0))
    assert r.suite == "apgd-ce-2+apgd-t-2-3targets" and r.x_adv.dtype == dtype
    for suite in ("torchattacks", "autoattack") if fra31 else ("torchattacks",):
        with pytest.raises(ValueError, match=f"the {suite} suite needs float32 inputs"):
            at.robust_suite(model, x, y, 0.1, suite=suite, steps=2)
        with pytest.raises(ValueError, match="float32"):
            resolve_suite(suite, None, x)


def _never_fooled(model, x, y, runs):
    """The points no restart of ``runs(x, y)`` fools, and those runs on them alone (the draws depend on the batch)."""
    for _ in range(3):
        outs = runs(x, y)
        with torch.no_grad():
            fooled = torch.stack([model(a).argmax(1) != y for a, _ in outs]).any(0)
        if not fooled.any():
            return x, y, outs
        x, y = x[~fooled], y[~fooled]
    raise AssertionError("no stable set of never-fooled points")


def _correct_digits():
    model = trained_digits_model()
    x, y = digits().test.take(torch.arange(120))
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    return model, x[ok], y[ok]


def test_apgd_restarts_keep_the_highest_loss_point():
    """A point no restart fools kept the last restart's best point, not the best restart's: at eps 0.06, 4 steps,
    3 restarts, 36 of 96 points ended below their best restart (mean CE 0.0574 against 0.0615)."""
    model, x, y = _correct_digits()
    eps, steps, restarts = 0.06, 4, 3
    ce = nn.CrossEntropyLoss(reduction="none")

    def ce_runs(xs, ys):  # the restarts of apgd_ce(..., n_restarts=3), each on every point
        g = torch.Generator().manual_seed(0)
        return [(_apgd_run(model, xs, ys, eps, steps, 0.75, g, ce)[0], None) for _ in range(restarts)]

    xs, ys, runs = _never_fooled(model, x, y, ce_runs)
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(model(a), ys, reduction="none") for a, _ in runs])
        adv = at.apgd_ce(model, xs, ys, eps, steps, n_restarts=restarts, generator=torch.Generator().manual_seed(0))
        kept = F.cross_entropy(model(adv), ys, reduction="none")
    assert int((losses[-1] < losses.max(0).values).sum()) >= 10  # the last restart is often not the best
    assert torch.equal(kept, losses.max(0).values)


def test_apgd_t_restarts_keep_the_highest_loss_point_per_target():
    """APGD-T, 2 targets x 3 restarts: per target the best of its restarts (the targets' losses differ); the last
    target's is returned. Its last restart overwrote the best one as APGD-CE's did."""
    model, x, y = _correct_digits()
    eps, steps, restarts = 0.06, 4, 3

    def t_runs(xs, ys):
        g, out = torch.Generator().manual_seed(0), []
        with torch.no_grad():
            o = model(xs).sort(dim=1)[1]
        for t in (2, 3):
            target = o[:, -t]
            fn = lambda logits, yy, tg=target: dlr_loss_targeted(logits, yy, tg)  # noqa: E731
            out += [(_apgd_run(model, xs, ys, eps, steps, 0.75, g, fn)[0], target) for _ in range(restarts)]
        return out

    xs, ys, runs = _never_fooled(model, x, y, t_runs)
    last = runs[restarts:]  # the third most likely class's restarts
    with torch.no_grad():
        losses = torch.stack([dlr_loss_targeted(model(a), ys, t) for a, t in last])
        g = torch.Generator().manual_seed(0)
        adv = at.apgd_dlr(model, xs, ys, eps, steps, n_target_classes=2, n_restarts=restarts, generator=g)
        kept = dlr_loss_targeted(model(adv), ys, last[0][1])
    assert int((losses[-1] < losses.max(0).values).sum()) >= 5
    assert torch.equal(kept, losses.max(0).values)


class _Counter(nn.Module):
    """A buffer every forward pass moves, in either mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return x


@pytest.mark.parametrize("mode", ["eval", "train", "mixed"])
@pytest.mark.parametrize("eval_mode", [True, False])
def test_attack_context_puts_back_every_buffer_a_forward_pass_moved(mode, eval_mode):
    """Buffers were saved only for ``eval_mode=False`` and only of modules in train mode: a counter moved by the
    forward pass stayed moved (0 -> 3 after a 3-step PGD) in eval mode, and in train mode when its module was in eval
    mode (a frozen part of a model in train mode)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), _Counter(), nn.Linear(8, 3))
    model.train()
    model(torch.rand(8, 1, 4, 4))  # BatchNorm's statistics and the counter away from their initial values
    if mode == "eval":
        model.eval()
    elif mode == "mixed":
        model[3].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    at.pgd(model, x, y, 0.1, 0.02, 3, eval_mode=eval_mode)
    with attack_context(model, eval_mode):
        model(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), [
        k for k, v in model.state_dict().items() if not torch.equal(v, before[k])
    ]
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize(
    ("label", "hint"),
    [
        ("autoattack-standard", None),
        ("aa-torchattacks", None),
        ("autoattack-standard(steps-5,3targets,square-20)", "lighter than AutoAttack's standard"),
        ("aa-torchattacks(apgd-ce-5,apgd-t-5,fab-t-5,square-20)", "lighter than AutoAttack's standard"),
        ("apgd-ce-5+apgd-t-5-3targets", "has no FAB-T and no Square"),
    ],
)
def test_the_cli_names_a_shortened_autoattack_as_lighter(label, hint):
    """A shortened fra31 AutoAttack (labelled since its sub-attacks run the suite's settings) was taken for the
    full suite: the CLI printed no hint for ``autoattack-standard(steps-5,...)``."""
    from atmc_triton.cli import _suite_hint

    got = _suite_hint([{"suite": label}])
    assert (got is None) if hint is None else (hint in got and label in got)

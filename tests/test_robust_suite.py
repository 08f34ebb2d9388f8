"""The robustness suite (atmc_triton.attacks.robust_suite): the torchattacks AutoAttack-grade cascade on a real
model, the worst-case headline of evaluate(), the gradient-free (Square) flag on a gradient-masking model, the
collapse check, and which suite runs when."""

import sys

import pytest
import torch
from pipeline_helpers import digits, one_thread, trained_digits_model
from torch import nn

from atmc_triton.attacks import apgd_ce, apgd_dlr, cascade, fgsm, pgd, robust_suite, suite_stages
from atmc_triton.train import EvalResult, Protocol, collapse_reason, evaluate

torchattacks = pytest.importorskip("torchattacks")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def batch():
    return digits().test.take(torch.arange(48))


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# small step counts keep CI fast; the defaults stay AutoAttack's (tested below)
FAST = dict(steps=4, n_target_classes=3, square_queries=40)


def test_torchattacks_suite_defaults_are_autoattack_standard(batch):
    model = trained_digits_model()
    label, stages = suite_stages(model, batch[0], "torchattacks", 8 / 255)
    assert label == "aa-torchattacks"
    assert [n for n, _ in stages] == ["apgd-ce-100", "apgd-t-100", "fab-t-100", "square-5000"]
    apgd, apgdt, fab, square = (a for _, a in stages)
    assert isinstance(apgd, torchattacks.APGD) and (apgd.loss, apgd.steps, apgd.n_restarts) == ("ce", 100, 1)
    assert isinstance(apgdt, torchattacks.APGDT) and (apgdt.steps, apgdt.n_target_classes) == (100, 9)
    assert isinstance(fab, torchattacks.FAB) and fab.multi_targeted and (fab.steps, fab.n_target_classes) == (100, 9)
    assert isinstance(square, torchattacks.Square) and square.n_queries == 5000
    assert all(a.eps == 8 / 255 for a in (apgd, apgdt, fab, square))
    label, stages = suite_stages(model, batch[0], "apgd", 0.1)
    assert label == "apgd-ce-100+apgd-t-100" and len(stages) == 2


def test_each_torchattacks_stage_is_a_real_attack(batch):
    """Alone, on every point, each stage of the suite breaks a natural model at eps 0.2."""
    model = trained_digits_model()
    x, y = batch
    _, stages = suite_stages(model, x, "torchattacks", 0.2, **FAST)
    clean = _acc(model, x, y)
    for name, attack in stages:
        adv = attack(x, y).detach()
        assert float((adv - x).abs().max()) <= 0.2 + 1e-6, name
        assert _acc(model, adv, y) < clean - 0.2, name


def test_cascade_only_lowers_accuracy_and_the_worst_case_bounds_every_attack(batch):
    model = trained_digits_model()
    x, y = batch
    eps = 0.07
    seen = []
    r = robust_suite(
        model,
        x,
        y,
        eps,
        suite="torchattacks",
        generator=torch.Generator().manual_seed(0),
        on_stage=lambda name, n: seen.append((name, n)),
        **FAST,
    )
    assert r.suite == "aa-torchattacks(apgd-ce-4,apgd-t-4-3targets,fab-t-4-3targets,square-40)"
    # every stage ran, each on the points the earlier ones missed: the attacked counts never grow
    assert [n for n, _ in seen] == list(r.broken) == ["apgd-ce-4", "apgd-t-4-3targets", "fab-t-4-3targets", "square-40"]
    counts = [k for _, k in seen]
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    assert counts[0] == int(clean_ok.sum())
    for i in range(1, len(counts)):
        assert counts[i] == counts[i - 1] - r.broken[seen[i - 1][0]]
    assert int(r.robust.sum()) == counts[-1] - r.broken["square-40"] < counts[0]
    assert not bool((r.robust & ~clean_ok).any())
    # the reported worst case is real: x_adv is in the ball and the model errs exactly on the broken points
    assert float((r.x_adv - x).abs().max()) <= eps + 1e-6 and float(r.x_adv.min()) >= 0 and float(r.x_adv.max()) <= 1
    with torch.no_grad():
        pred = model(r.x_adv).argmax(1)
    assert torch.equal(pred, r.pred) and torch.equal(pred == y, r.robust)
    worst = float(r.robust.float().mean())
    _, stages = suite_stages(model, x, "torchattacks", eps, generator=torch.Generator().manual_seed(0), **FAST)
    for name, attack in stages:  # each attack alone, on every point
        assert worst <= _acc(model, attack(x, y), y), name
    # starting from a mask (e.g. after PGD): nothing outside it is called robust
    start = torch.zeros_like(clean_ok)
    start[:10] = True
    r2 = robust_suite(model, x, y, eps, suite="apgd", robust=start, steps=3)
    assert not bool((r2.robust & ~start).any())


def test_suite_leaves_the_global_rng_alone(batch):
    model = trained_digits_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    robust_suite(model, batch[0][:8], batch[1][:8], 0.05, suite="torchattacks", **FAST)  # torchattacks reseeds
    assert torch.equal(torch.rand(3), expected)


def test_evaluate_headline_is_the_per_example_worst_case():
    model = trained_digits_model()
    test = digits().test.subset(64, 0)
    proto = Protocol(eps=0.1, pgd_steps=3, apgd_steps=3)
    r = evaluate(
        model, test, proto, attacks=("pgd", "fgsm", "apgd"), suite="torchattacks", square_queries=30, batch_size=40
    )
    assert r.suite == "aa-torchattacks(apgd-ce-3,apgd-t-3,fab-t-3,square-30)"
    assert r.headline == f"worst of PGD-3, FGSM, {r.suite}"
    assert r.robust_acc <= min(r.pgd_acc, r.fgsm_acc) <= r.clean_acc
    assert list(r.cascade) == ["PGD-3", "FGSM", "apgd-ce-3", "apgd-t-3", "fab-t-3", "square-30"]
    assert round(r.clean_acc * 64) - sum(r.cascade.values()) == round(r.robust_acc * 64)
    assert r.gradient_free_broken == r.cascade["square-30"]
    assert sum(r.label_hist) == sum(r.clean_hist) == sum(r.adv_hist) == 64 and len(r.label_hist) == 10
    assert r.collapse is None and not r.collapsed
    d = r.as_dict()
    assert d["headline"] == r.headline and d["collapse"] is None and "gradient_free_flag" in d
    # the own suite, and PGD alone (no suite: the worst case is PGD's)
    own = evaluate(model, test, proto, attacks=("pgd", "apgd"), suite="apgd")
    assert own.suite == "apgd-ce-3+apgd-t-3" and own.gradient_free_broken is None and own.robust_acc <= own.pgd_acc
    only = evaluate(model, test, proto, attacks=("pgd",))
    assert only.robust_acc == only.pgd_acc and only.suite is None and only.headline == "worst of PGD-3"


class _Quantized(nn.Module):
    """Rounds its input to the 17 grey levels of the digits before a trained model: every input gradient is 0."""

    def __init__(self):
        super().__init__()
        self.inner = trained_digits_model()

    def forward(self, x):
        return self.inner(torch.round(x * 16) / 16)


def test_square_flag_fires_on_a_gradient_masking_model():
    model = _Quantized().eval()
    test = digits().test.subset(48, 1)
    x, y = test.x, test.y
    xg = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(xg), y).backward()
    assert float(xg.grad.abs().max()) == 0.0  # obfuscated: no gradient signal at all
    proto = Protocol(eps=0.2, pgd_steps=5, apgd_steps=5)
    r = evaluate(model, test, proto, attacks=("pgd", "apgd"), suite="torchattacks", square_queries=300)
    assert r.gradient_free_broken is not None and r.gradient_free_broken >= 5
    assert r.gradient_free_flag and any(f.startswith("square+") for f in r.flags)
    assert r.gradient_masking  # PGD alone looks far more robust than the worst case
    # the same model without the rounding: gradients work, Square has nothing left
    plain = evaluate(model.inner, test, proto, attacks=("pgd", "apgd"), suite="torchattacks", square_queries=300)
    assert plain.gradient_free_broken < r.gradient_free_broken


class _Constant(nn.Module):
    def __init__(self, cls: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.cls = cls

    def forward(self, x):
        out = torch.zeros(x.shape[0], 10) + self.w * x.flatten(1).sum(1, keepdim=True)
        out[:, self.cls] += 5.0
        return out


class _MostlyOne(nn.Module):
    """Class 1 for about 90 % of the inputs (the darker ones), the trained model's answer for the rest."""

    def __init__(self, threshold: float):
        super().__init__()
        self.inner, self.threshold = trained_digits_model(), threshold

    def forward(self, x):
        out = self.inner(x)
        one = torch.full_like(out, -10.0)
        one[:, 1] = 10.0
        dark = (x.flatten(1).mean(1) <= self.threshold).unsqueeze(1)
        return torch.where(dark, one, out)


def test_collapse_flag():
    test = digits().test
    proto = Protocol(eps=0.05, pgd_steps=2, apgd_steps=2)
    const = evaluate(_Constant(3), test, proto, attacks=("pgd",))
    assert const.collapsed and const.collapse.startswith("clean: 100% class 3")
    assert any(f.startswith("collapsed") for f in const.flags)
    t = float(test.x.flatten(1).mean(1).quantile(0.9))
    mostly = evaluate(_MostlyOne(t), test, proto, attacks=("pgd",))
    share = mostly.clean_hist[1] / mostly.n
    assert 0.85 < share < 0.95 and mostly.collapsed and "class 1" in mostly.collapse
    balanced = evaluate(trained_digits_model(), test, proto, attacks=("pgd",))
    assert balanced.clean_acc > 0.9 and not balanced.collapsed and balanced.collapse is None
    # the two thresholds: > 50 % of the predictions, or > 2x the class's share of the labels
    assert collapse_reason([50, 50], [49, 51]) == "clean: 51% class 1"  # 51 % > 50 %
    assert collapse_reason([50, 50], [50, 50]) is None
    assert collapse_reason([10] * 10, [21] + [9] * 7 + [8] * 2) == "clean: 21% class 0"  # 21 % > 2 x 10 %
    assert collapse_reason([10] * 10, [20] + [9] * 8 + [8]) is None
    assert collapse_reason([10] * 10, [10] * 10, [55] + [5] * 9).startswith("attacked: 55% class 0")
    assert collapse_reason([], []) is None


def test_collapsed_flags_in_the_result():
    base = dict(n=100, clean_acc=0.9, pgd_acc=0.6, robust_acc=0.5, label_hist=[50, 50])
    assert EvalResult(**base, clean_hist=[45, 55]).flags == ["masking?", "collapsed (clean: 55% class 1)"]
    assert EvalResult(**base, clean_hist=[50, 50], gradient_free_broken=2).flags == ["masking?", "square+2"]
    assert EvalResult(**{**base, "robust_acc": 0.58}, clean_hist=[50, 50], gradient_free_broken=0).flags == []


def test_suite_choice(batch, monkeypatch):
    model = trained_digits_model()
    x, y = batch[0][:4], batch[1][:4]
    monkeypatch.setitem(sys.modules, "autoattack", None)  # fra31's package absent
    assert robust_suite(model, x, y, 0.05, suite="auto", **FAST).suite.startswith("aa-torchattacks(")
    flat = x.flatten(1)  # not an image batch: torchattacks cannot run it, auto falls back to the own suite

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = trained_digits_model()

        def forward(self, v):
            return self.inner(v.view(-1, 1, 8, 8))

    assert robust_suite(Flat(), flat, y, 0.05, **FAST).suite == "apgd-ce-4+apgd-t-4-3targets"
    with pytest.raises(ValueError, match="image batches"):
        robust_suite(Flat(), flat, y, 0.05, suite="torchattacks")
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    assert robust_suite(model, x, y, 0.05, **FAST).suite == "apgd-ce-4+apgd-t-4-3targets"
    with pytest.raises(ValueError, match=r"pip install 'torchattacks>=3.5'"):
        robust_suite(model, x, y, 0.05, suite="torchattacks")
    with pytest.raises(ValueError, match="torchattacks is not installed"):  # before any attack runs
        evaluate(model, digits().test.subset(8, 0), Protocol(eps=0.1, pgd_steps=2), suite="torchattacks")
    with pytest.raises(ValueError, match="unknown suite"):
        robust_suite(model, x, y, 0.05, suite="cw")


def test_dlr_needs_enough_classes(batch):
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x, y = batch[0][:4], batch[1][:4] % 3
    with pytest.raises(ValueError, match="needs >= 4 classes"):
        apgd_dlr(three, x, y, 0.1, steps=2)
    apgd_dlr(three, x, y, 0.1, steps=2, n_target_classes=None)  # untargeted: 3 are enough
    # the suites drop APGD-T for such a model instead of failing
    assert robust_suite(three, x, y, 0.1, suite="apgd", steps=2).suite == "apgd-ce-2"
    assert [n for n, _ in suite_stages(three, x, "torchattacks", 0.1, **FAST)[1]] == [
        "apgd-ce-4",
        "fab-t-4",
        "square-40",
    ]


def test_cascade_with_plain_attacks(batch):
    model = trained_digits_model()
    x, y = batch
    stages = [
        ("fgsm", lambda a, b: fgsm(model, a, b, 0.1)),
        ("pgd", lambda a, b: pgd(model, a, b, 0.1, 0.025, 10)),
        ("apgd", lambda a, b: apgd_ce(model, a, b, 0.1, steps=10)),
    ]
    r = cascade(model, x, y, 0.1, stages, suite="mine")
    assert r.suite == "mine" and r.gradient_free == () and r.gradient_free_broken is None
    assert float(r.robust.float().mean()) <= min(_acc(model, s(x, y), y) for _, s in stages)

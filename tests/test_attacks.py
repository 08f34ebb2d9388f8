"""Attacks: eps-ball and [0, 1] bounds, a real random start inside the box, strength order, no side effects on
the model, torchattacks-style defaults, and exact agreement with torchattacks' PGD, FGSM, APGD (CE, DLR) and
APGDT."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from pipeline_helpers import digits, one_thread, trained_digits_model
from torch import nn

import atmc_triton as at
from atmc_triton.attacks import apgd_ce, apgd_dlr, attack_context, cascade, fgsm, pgd, robust_attack, wrm


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def batch():
    d = digits()
    idx = torch.arange(120)
    return d.test.take(idx)


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


ATTACKS = {
    "pgd": lambda m, x, y, eps: pgd(m, x, y, eps, eps / 4, 5),
    "pgd_no_start": lambda m, x, y, eps: pgd(m, x, y, eps, eps / 4, 5, random_start=False),
    "fgsm": lambda m, x, y, eps: fgsm(m, x, y, eps),
    "apgd": lambda m, x, y, eps: apgd_ce(m, x, y, eps, steps=10),
    "apgd_t": lambda m, x, y, eps: apgd_dlr(m, x, y, eps, steps=4, n_target_classes=3),
    "apgd_dlr": lambda m, x, y, eps: apgd_dlr(m, x, y, eps, steps=4, n_target_classes=None),
    "robust": lambda m, x, y, eps: robust_attack(m, x, y, eps, steps=10, use_autoattack=False)[0],
}


@pytest.mark.parametrize("name", list(ATTACKS))
@given(eps=st.sampled_from([0.0, 1e-3, 0.07, 0.3]), seed=st.integers(0, 2**16))
def test_adversarial_examples_stay_in_ball_and_unit_box(batch, name, eps, seed):
    model = trained_digits_model()
    x, y = batch[0][:24], batch[1][:24]  # digits hold many exact 0s and 1s: the box clamp matters
    torch.manual_seed(seed)
    adv = ATTACKS[name](model, x, y, eps)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_wrm_stays_in_unit_box_and_moves(batch):
    model = trained_digits_model()
    x, y = batch
    adv = wrm(model, x, y, gamma=0.4, steps=10, lr=1.0)
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float((adv - x).abs().max()) > 0.05
    # the penalty sets the size: a larger gamma keeps the points closer
    near = wrm(model, x, y, gamma=50.0, steps=10, lr=0.01)
    assert (near - x).norm() < (adv - x).norm()
    assert _acc(model, adv, y) < _acc(model, x, y)


def test_random_start_really_happens(batch):
    model = trained_digits_model()
    x, y = batch
    eps = 0.1
    interior = (x > eps) & (x < 1 - eps)
    start = pgd(model, x, y, eps, alpha=0.01, steps=0, random_start=True)
    d = (start - x)[interior]
    assert float((d != 0).float().mean()) > 0.99  # every interior pixel moved ...
    assert float(d.abs().max()) <= eps + 1e-7 and float(d.abs().max()) > 0.95 * eps  # ... uniformly in the ball
    assert abs(float(d.mean())) < 0.01 and abs(float(d.abs().mean()) - eps / 2) < 0.01
    assert torch.equal(pgd(model, x, y, eps, 0.01, 0, random_start=False), x)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = pgd(model, x, y, eps, 0.01, 3, generator=g1)
    assert torch.equal(a, pgd(model, x, y, eps, 0.01, 3, generator=g2))
    assert not torch.equal(a, pgd(model, x, y, eps, 0.01, 3, generator=torch.Generator().manual_seed(2)))
    # given noise, the start is x + (2 noise - 1) eps: the draws of the same generator give the same attack
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, pgd(model, x, y, eps, 0.01, 3, noise=noise))


class _BoxWatcher(nn.Module):
    """Records the range of every input the model is queried on (a start outside [0, 1] shows up here)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.lo, self.hi = inner, 0.0, 1.0

    def forward(self, x):
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        return self.inner(x)


@pytest.mark.parametrize("name", ["pgd", "apgd", "apgd_t", "apgd_dlr"])
def test_random_start_stays_in_the_unit_box(batch, name):
    """Digits hold many exact 0s and 1s: an unclamped start would query the model outside [0, 1]."""
    x, y = batch
    assert float((x == 0).float().mean()) > 0.3 and bool((x == 1).any())
    model = _BoxWatcher(trained_digits_model())
    torch.manual_seed(0)
    ATTACKS[name](model, x, y, 0.2)
    assert (model.lo, model.hi) == (0.0, 1.0)
    # the start itself (steps=0): boxed, pixels at 0 only move up and pixels at 1 only down
    start = pgd(model.inner, x, y, 0.2, 0.01, 0, generator=torch.Generator().manual_seed(3))
    assert float(start.min()) >= 0.0 and float(start.max()) <= 1.0
    d = start - x
    assert float(d[x == 0].min()) >= 0 and float(d[x == 1].max()) <= 0
    assert 0.3 < float((d[x == 0] == 0).float().mean()) < 0.7  # about half clamped back to 0


def test_torchattacks_style_defaults(batch):
    model = trained_digits_model()
    x, y = batch[0][:16], batch[1][:16]
    g = torch.Generator().manual_seed(0)
    ours = pgd(model, x, y, generator=g)  # eps 8/255, alpha 2/255, 10 steps, random start
    assert torch.equal(ours, pgd(model, x, y, 8 / 255, 2 / 255, 10, True, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(ours, pgd(model, x, y, random_start=False))
    assert float((ours - x).abs().max()) <= 8 / 255 + 1e-7
    assert torch.equal(fgsm(model, x, y), fgsm(model, x, y, 8 / 255))
    a = apgd_ce(model, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, apgd_ce(model, x, y, 8 / 255, 100, generator=torch.Generator().manual_seed(0)))


def test_strength_order_on_a_trained_model(batch):
    model = trained_digits_model()
    x, y = batch
    eps = 0.1
    clean = _acc(model, x, y)
    acc_fgsm = _acc(model, fgsm(model, x, y, eps), y)
    acc_pgd = _acc(model, pgd(model, x, y, eps, 2.5 * eps / 10, 10), y)
    acc_apgd = _acc(model, apgd_ce(model, x, y, eps, steps=20), y)
    assert clean > 0.9
    assert acc_pgd <= acc_fgsm <= clean
    assert acc_pgd < clean - 0.2  # a natural model is far from robust at eps 0.1
    assert acc_apgd <= acc_pgd + 0.02


class _Stateful(nn.Module):
    """BatchNorm (running stats), dropout, a frozen layer, and a parameter with a live .grad."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 8 * 8, 10)
        self.frozen = nn.Linear(10, 10)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = self.drop(F.relu(self.bn(self.conv(x))))
        return self.frozen(self.fc(h.flatten(1)))


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
        {n: m.training for n, m in model.named_modules()},
    )


def _assert_same(model, snap):
    state, grads, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for n, p in model.named_parameters():
        rg, g = grads[n]
        assert p.requires_grad == rg, n
        assert (p.grad is None and g is None) or torch.equal(p.grad, g), n
    assert {n: m.training for n, m in model.named_modules()} == modes


ALL = {
    **ATTACKS,
    "wrm": lambda m, x, y, eps: wrm(m, x, y, 0.4, 3, 0.5),
    "pgd_train_mode": lambda m, x, y, eps: pgd(m, x, y, eps, eps / 4, 3, eval_mode=False),
    "fgsm_train_mode": lambda m, x, y, eps: fgsm(m, x, y, eps, eval_mode=False),
    # torchattacks' FAB calls backward: it left grads on the parameters (966 summed |g| on a linear model)
    "suite_torchattacks": lambda m, x, y, eps: at.robust_suite(
        m, x, y, eps, suite="torchattacks", steps=2, square_queries=5
    ),
}


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_attacks_leave_the_model_unchanged(batch, name, mode):
    torch.manual_seed(0)
    model = _Stateful()
    x, y = batch[0][:16], batch[1][:16]
    model.train()
    F.cross_entropy(model(x), y).backward()  # BN stats moved away from init, grads present
    model.fc.bias.grad = None  # ... and one grad is None
    if mode == "eval":
        model.eval()
    elif mode == "mixed":
        model.bn.eval()
    snap = _snapshot(model)
    ALL[name](model, x, y, 0.1)
    _assert_same(model, snap)


def test_evaluate_restores_each_modules_own_mode(batch):
    """A frozen BatchNorm in a model in train mode stays frozen (evaluate set every module to the model's mode)."""
    from atmc_triton.data import Split
    from atmc_triton.train import Protocol, evaluate

    model = _Stateful().train()
    model.bn.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    evaluate(model, Split(batch[0][:16], batch[1][:16]), Protocol(eps=0.1, pgd_steps=2), attacks=("pgd",))
    assert {n: m.training for n, m in model.named_modules()} == modes


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, x, y: apgd_ce(m, x, y, 0.1, steps=2, rho=5.0), ValueError, r"rho must be a number in \(0, 1\]"),
        (lambda m, x, y: apgd_ce(m, x, y, 0.1, steps=2, rho=float("nan")), ValueError, "rho must be"),
        (lambda m, x, y: apgd_dlr(m, x, y, 0.1, steps=2, n_target_classes=2.5), ValueError, "an int >= 1 or None"),
        (lambda m, x, y: apgd_dlr(m, x, y, 0.1, steps=2, n_target_classes=True), ValueError, "an int >= 1 or None"),
        (lambda m, x, y: pgd(m, x, y, 0.1, 0.05, 0, noise=torch.full_like(x, 5.0)), ValueError, "uniform draws in"),
        (
            lambda m, x, y: pgd(m, x, y, 0.1, 0.05, 2, noise=torch.rand_like(x).double()),
            ValueError,
            "noise must have x's shape, dtype",
        ),
        (
            lambda m, x, y: cascade(m, x, y, 0.1, [], robust=torch.ones_like(y)),
            ValueError,
            "robust must be a bool mask",
        ),
        (lambda m, x, y: cascade(m, x, y, 0.1, [], robust=torch.tensor([True])), ValueError, "robust must be a bool"),
    ],
)
def test_attack_settings_are_checked(batch, call, error, match):
    """Each was accepted and silently weakened the attack (rho, noise out of range: 0.9 from x at eps 0.1), or
    failed late with an unrelated TypeError / dtype error, or broadcast a mask of the wrong shape."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = batch[0][:8], batch[1][:8]
    with pytest.raises(error, match=match):
        call(model, x, y)


def test_attacks_under_inference_mode_say_why(batch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        pgd(model, batch[0][:4], batch[1][:4], 0.1, 0.05, 2)


def test_attacks_leave_an_atmc_model_unchanged(batch):
    x, y = batch[0][:16], batch[1][:16]
    model = trained_digits_model()
    cfg = at.ATMCConfig(ratio=0.05, bits=4, quant_interval=1)
    at.compress_(model, cfg)
    opt = at.ADMM(model, cfg, lr=0.01)
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    snap = _snapshot(model)
    for name, atk in ALL.items():
        atk(model, x, y, 0.1)
        _assert_same(model, snap)
        assert all(layer._cached_w is None for _, layer in at.atmc_layers(model)), name


def test_attack_context_restores_after_an_exception():
    model = _Stateful().train()
    with pytest.raises(RuntimeError), attack_context(model):
        assert not model.training
        raise RuntimeError("boom")
    assert model.training and model.bn.training


def test_pgd_matches_torchattacks(batch):
    torchattacks = pytest.importorskip("torchattacks")
    model = trained_digits_model()
    x, y = batch
    for eps, alpha, steps in ((0.1, 0.025, 10), (0.3, 0.05, 7), (8 / 255, 2 / 255, 5)):
        ref = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
        ours = pgd(model, x, y, eps, alpha, steps, random_start=False)
        assert torch.equal(ours, ref), (eps, float((ours - ref).abs().max()))
    assert torch.equal(fgsm(model, x, y, 0.1), torchattacks.FGSM(model, eps=0.1)(x, y))


def test_apgd_matches_torchattacks(batch):
    torchattacks = pytest.importorskip("torchattacks")
    model = trained_digits_model()
    x, y = batch
    for eps, steps in ((0.1, 20), (0.2, 37)):
        ref = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=0, loss="ce")(x, y)
        ours = apgd_ce(model, x, y, eps, steps=steps, generator=torch.Generator().manual_seed(0))
        _assert_same_attack(model, x, y, ours, ref)


def _assert_same_attack(model, x, y, ours, ref):
    with torch.no_grad():
        fooled_ref, fooled = model(ref).argmax(1) != y, model(ours).argmax(1) != y
    assert torch.equal(fooled, fooled_ref) and int(fooled.sum()) > 20
    assert torch.equal(ours[fooled], ref[fooled].detach())  # the same adversarial examples, bit for bit


def test_apgd_dlr_matches_torchattacks(batch):
    """Untargeted DLR = APGD(loss='dlr'); targeted DLR over k classes = APGDT(n_classes=k + 1): same start, same
    examples."""
    torchattacks = pytest.importorskip("torchattacks")
    model = trained_digits_model()
    x, y = batch
    for eps, steps in ((0.1, 20), (0.2, 13)):
        ref = torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=0, loss="dlr")(x, y)
        ours = apgd_dlr(model, x, y, eps, steps, n_target_classes=None, generator=torch.Generator().manual_seed(0))
        _assert_same_attack(model, x, y, ours, ref)
    for eps, steps, k in ((0.07, 10, 9), (0.1, 7, 3)):
        ref = torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=0, n_classes=k + 1)(x, y)
        ours = apgd_dlr(model, x, y, eps, steps, n_target_classes=k, generator=torch.Generator().manual_seed(0))
        _assert_same_attack(model, x, y, ours, ref)


def test_apgd_t_breaks_what_cross_entropy_misses():
    """CE saturates on a model with huge logits (gradients underflow to 0); DLR is scale-invariant."""

    class Loud(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = trained_digits_model()

        def forward(self, x):
            return 1e4 * self.inner(x)

    model = Loud().eval()
    d = digits()
    x, y = d.test.take(torch.arange(64))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ce = _acc(model, apgd_ce(model, x, y, 0.1, steps=10, generator=g()), y)
    t = _acc(model, apgd_dlr(model, x, y, 0.1, steps=10, n_target_classes=3, generator=g()), y)
    assert t < ce - 0.2, (ce, t)


def test_apgd_restarts_only_attack_robust_points(batch):
    model = trained_digits_model()
    x, y = batch
    one = _acc(model, apgd_ce(model, x, y, 0.1, steps=10, generator=torch.Generator().manual_seed(0)), y)
    adv = apgd_ce(model, x, y, 0.1, steps=10, n_restarts=3, generator=torch.Generator().manual_seed(0))
    three = _acc(model, adv, y)
    assert three <= one


def test_robust_attack_uses_autoattack_when_installed(batch, monkeypatch):
    calls = {}

    class FakeAutoAttack:  # fra31's constructor and the sub-attack settings the suite sets
        def __init__(self, model, norm, eps, seed, version, verbose, device):
            calls.update(norm=norm, eps=eps, version=version)
            self.model, self.seed = model, seed
            self.apgd = types.SimpleNamespace(n_iter=100)
            self.apgd_targeted = types.SimpleNamespace(n_iter=100, n_target_classes=9)
            self.fab = types.SimpleNamespace(n_iter=100, n_target_classes=9)
            self.square = types.SimpleNamespace(n_queries=5000, rescale_schedule=False)
            self.attacks_to_run = ["apgd-ce", "apgd-t", "fab-t", "square"]

        def run_standard_evaluation(self, x, y, bs):
            calls["training"] = self.model.training
            return (x + 1.0).clamp(0, 1)  # out of the ball on purpose: the helper must project

    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=FakeAutoAttack))
    model = trained_digits_model().train()
    x, y = batch[0][:8], batch[1][:8]
    adv, how = robust_attack(model, x, y, 0.05)
    assert how == "autoattack-standard" and calls == {
        "norm": "Linf",
        "eps": 0.05,
        "version": "standard",
        "training": False,
    }
    assert float((adv - x).abs().max()) <= 0.05 + 1e-6 and model.training
    assert robust_attack(model, x, y, 0.05, steps=3, use_autoattack=False)[1] == "apgd-ce-3+apgd-t-3"


def test_robust_attack_without_autoattack(batch, monkeypatch):
    monkeypatch.setitem(sys.modules, "autoattack", None)  # import fails
    model = trained_digits_model()
    x, y = batch[0][:8], batch[1][:8]
    assert robust_attack(model, x, y, 0.05, steps=3, suite="apgd")[1] == "apgd-ce-3+apgd-t-3"
    with pytest.raises(ValueError, match="AutoAttack is not installed"):
        robust_attack(model, x, y, 0.05, use_autoattack=True)


@pytest.mark.parametrize(
    "bad",
    [
        lambda m, x, y: pgd(m, x * 2, y, 0.1, 0.01, 1),  # outside [0, 1]
        lambda m, x, y: pgd(m, x, y[:-1], 0.1, 0.01, 1),  # label count
        lambda m, x, y: pgd(m, x, y, -0.1, 0.01, 1),  # eps
        lambda m, x, y: pgd(m, x, y, 0.1, 0.01, -1),  # steps
        lambda m, x, y: pgd(m, (x * 255).to(torch.uint8), y, 0.1, 0.01, 1),  # dtype
        lambda m, x, y: pgd(m, x, y, 0.1, 0.01, 1, noise=torch.rand(x[1:].shape)),  # noise shape
        lambda m, x, y: pgd(m, x, y, 0.1, 0.01, 1, random_start=False, noise=torch.rand(x.shape)),  # noise, no start
        lambda m, x, y: apgd_ce(m, x, y, 0.1, steps=0),
        lambda m, x, y: apgd_dlr(m, x, y, 0.1, n_target_classes=0),
        lambda m, x, y: apgd_dlr(m, x, y, 0.1, steps=0),
        lambda m, x, y: robust_attack(m, x, y, 0.1, suite="pgd"),
        lambda m, x, y: robust_attack(m, x, y, 0.1, suite="apgd", use_autoattack=True),
        lambda m, x, y: robust_attack(m, x, y, 0.1, suite="apgd", square_queries=0),
        lambda m, x, y: wrm(m, x, y, gamma=0.0),
    ],
)
def test_attacks_validate_inputs(batch, bad):
    model = trained_digits_model()
    with pytest.raises(ValueError):
        bad(model, batch[0][:4], batch[1][:4])


def test_an_attack_reads_the_device_once_whatever_its_steps(monkeypatch):
    """Each host read of a tensor is a device sync on a GPU, and ``fit`` attacks every step: the input checks
    (labels' range for the class-count guard and cross-entropy, range of x, the noise's) are one read together,
    none per step (six reads before 2026-12-01, three until a review the same day)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 4, (8,))
    reads = []
    for name in ("tolist", "item", "__float__", "__int__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _r=real, _n=name, **k: reads.append(_n) or _r(t, *a, **k))
    for steps in (1, 5):
        reads.clear()
        at.pgd(model, x, y, eps=0.1, alpha=0.02, steps=steps, noise=torch.rand_like(x))
        assert len(reads) == 1, reads
    for attack in (at.fgsm_rs, at.n_fgsm, at.fgsm, at.wrm):
        reads.clear()
        attack(model, x, y, **({"noise": torch.rand_like(x)} if attack in (at.fgsm_rs, at.n_fgsm) else {}))
        assert reads == ["tolist"], (attack.__name__, reads)
    monkeypatch.undo()
    for bad_x, bad_y, match in (
        (x * 2, y, r"\[0, 1\]"),
        (x, y - 1, ">= 0"),
        (x.masked_fill(x > 0.5, float("nan")), y, "NaN"),
    ):
        with pytest.raises(ValueError, match=match):
            at.pgd(model, bad_x, bad_y, eps=0.1, alpha=0.02, steps=1)
    with pytest.raises(ValueError, match="< the model's 4 outputs, got 4"):  # the class check, from the same read
        at.pgd(model, x, y.clamp(max=3) + (y == 3).long(), eps=0.1, alpha=0.02, steps=1)
    for attack in (at.pgd, at.fgsm_rs, at.n_fgsm):
        with pytest.raises(ValueError, match="noise must be uniform draws in"):
            attack(model, x, y, 0.1, noise=torch.rand_like(x) + 1)


def test_the_suite_forks_the_generators_of_xs_gpu_and_the_current_one(monkeypatch):
    """torchattacks reseeds the *current* GPU's generator, which need not be the inputs' GPU: the suite forks
    both (it forked only ``x.device.index or 0``: device 0 for ``cuda`` with another current). A stand-in
    tensor on ``cuda:1`` with GPU 2 current (no GPU here)."""
    from atmc_triton.attacks import _seeded_gpus

    class OnGpu:
        device = torch.device("cuda", 1)

        def get_device(self):
            return 1

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert _seeded_gpus(OnGpu()) == [1, 2]
    OnGpu.device = torch.device("cuda")  # an unindexed device: the tensor still knows its GPU
    assert _seeded_gpus(OnGpu()) == [1, 2]
    assert _seeded_gpus(torch.zeros(1)) == []

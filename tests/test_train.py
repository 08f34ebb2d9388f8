"""Training and evaluation: exact resume after a kill, the loss parameter, protocols, schedules, evaluation."""

import copy
import json
import random

import pytest
import torch
from pipeline_helpers import one_thread, trained_digits_model

import atmc_triton as at
from atmc_triton.checkpoint import CheckpointError
from atmc_triton.data import load_dataset
from atmc_triton.train import EvalResult, Experiment, Protocol, Schedule, evaluate


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset("digits", subset=192, test_subset=48)


class Killed(Exception):
    pass


def _kill_after_first(stage, epoch):
    if epoch == 1:
        raise Killed(stage)


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_after_a_kill_is_bit_identical(tmp_path, small_digits):
    proto = Protocol(eps=0.2, pgd_steps=2, apgd_steps=3)
    dense_s, atmc_s = Schedule(epochs=2, lr=0.05, batch_size=32), Schedule(epochs=3, lr=0.01, batch_size=32)
    cfg = at.ATMCConfig(ratio=0.05, bits=4, quant_interval=4)  # 6 steps per epoch: quantizer state crosses epochs

    def exp(out, **kw):
        return Experiment("digits_cnn", small_digits, proto, out=tmp_path / out, device="cpu", eval_size=16, **kw)

    dense_a, _ = exp("a").pretrain(dense_s)
    final_a, _ = exp("a").compress(dense_a, cfg, atmc_s)

    with pytest.raises(Killed):
        exp("b", on_epoch_end=_kill_after_first).pretrain(dense_s)
    torch.manual_seed(1234)  # whatever the global RNGs hold when the new process starts ...
    random.seed(99)
    dense_b, _ = exp("b", resume=True).pretrain(dense_s)
    _states_equal(dense_a, dense_b)
    with pytest.raises(Killed):
        exp("b", on_epoch_end=_kill_after_first).compress(dense_b, cfg, atmc_s)
    torch.rand(7)
    final_b, _ = exp("b", resume=True).compress(dense_b, cfg, atmc_s)
    _states_equal(final_a, final_b)  # ... the resumed run ends with bit-identical weights
    assert at.is_finalized(final_b)

    logs = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in logs] == [
        ("dense", 1),
        ("dense", 2),
        ("atmc", 1),
        ("atmc", 2),
        ("atmc", 3),
    ]
    ref = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logs] == [r["loss"] for r in ref]
    assert all(r["nnz"] <= int(final_b.atmc_nnz_budget) for r in logs if r["stage"] == "atmc")

    # a finished stage resumes as a no-op; a different config refuses the checkpoint with one line
    again, _ = exp("b", resume=True).pretrain(dense_s)
    _states_equal(dense_a, again)
    with pytest.raises(CheckpointError, match="schedule") as e:
        exp("b", resume=True).pretrain(Schedule(epochs=3, lr=0.05, batch_size=32))
    assert "\n" not in str(e.value)
    # the ATMC stage from another dense model (a changed --dense-checkpoint) is refused, naming it; it used to
    # continue the old stage silently and report it beside the new dense model
    other = copy.deepcopy(dense_b)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(CheckpointError, match=r"dense_model='sha256:[0-9a-f]{16}' \(expected 'sha256:[0-9a-f]{16}'\)"):
        exp("b", resume=True).compress(other, cfg, atmc_s)


def test_resume_accepts_changed_evaluation_settings_only(tmp_path, small_digits, caplog):
    """A resumed stage may change what only evaluation reads (``EVAL_ONLY``: more APGD or PGD evaluation
    steps): it continues bit-identically and says what changed. A training setting still refuses."""
    from atmc_triton.train import EVAL_ONLY

    proto = Protocol(eps=0.2, pgd_steps=2, apgd_steps=3)
    later = Protocol(eps=0.2, pgd_steps=2, apgd_steps=7, eval_pgd_steps=3, wrm_steps=4, wrm_gamma=0.5, wrm_lr=0.5)
    assert {k for k in EVAL_ONLY if getattr(proto, k) != getattr(later, k)} == set(EVAL_ONLY)  # all five change
    s = Schedule(epochs=2, lr=0.05, batch_size=32)

    def exp(out, p, **kw):
        return Experiment("digits_cnn", small_digits, p, out=tmp_path / out, device="cpu", eval_size=16, **kw)

    whole, _ = exp("a", proto).pretrain(s)
    with pytest.raises(Killed):
        exp("b", proto, on_epoch_end=_kill_after_first).pretrain(s)
    with caplog.at_level("INFO", logger="atmc_triton"):
        resumed, _ = exp("b", later, resume=True).pretrain(s)
    _states_equal(whole, resumed)
    assert "apgd_steps 3 -> 7" in caplog.text and "eval_pgd_steps None -> 3" in caplog.text
    with pytest.raises(CheckpointError, match=r"pgd_steps.: 3") as e:
        exp("b", Protocol(eps=0.2, pgd_steps=3, apgd_steps=7), resume=True).pretrain(s)
    assert "apgd_steps" not in str(e.value)  # only the setting that blocks the resume is named


def test_clean_weight_one_is_natural_training(small_digits):
    s = Schedule(epochs=1, lr=0.05, batch_size=32)

    def run(cw, adversarial):
        exp = Experiment(
            "digits_cnn", small_digits, Protocol(eps=0.2, pgd_steps=2, clean_weight=cw), device="cpu", eval_size=0
        )
        return exp.pretrain(s, adversarial=adversarial, stage="same")[0]  # same stage: same data order

    natural = run(0.5, False)
    _states_equal(natural, run(1.0, True))
    key = "classifier.3.weight"
    assert not torch.equal(natural.state_dict()[key], run(0.5, True).state_dict()[key])


def test_loss_parameter_and_epoch_log(tmp_path, small_digits):
    for cw in (0.0, 0.5):
        exp = Experiment(
            "digits_cnn",
            small_digits,
            Protocol(eps=0.2, pgd_steps=1, clean_weight=cw),
            out=tmp_path,
            device="cpu",
            eval_size=16,
        )
        exp.pretrain(Schedule(epochs=1, lr=0.05, batch_size=32), stage=f"cw{cw}")
    recs = {r["stage"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert recs["cw0.0"]["train_acc"] is None and recs["cw0.0"]["train_adv_acc"] is not None  # CE(adv) only
    assert recs["cw0.5"]["train_acc"] is not None and recs["cw0.5"]["train_adv_acc"] is not None
    assert recs["cw0.5"]["test_n"] == 16 and 0 <= recs["cw0.5"]["test_pgd_acc"] <= recs["cw0.5"]["test_acc"]
    assert {"loss", "lr", "nnz", "step", "train_seconds"} <= set(recs["cw0.5"])


def test_protocol_and_schedule():
    p = Protocol(eps=0.3, pgd_steps=16)
    assert p.alpha == pytest.approx(2.5 * 0.3 / 16) and p.eval_steps == 16 and p.clean_weight == 0.5
    q = Protocol(eps=0.2, pgd_steps=10, eval_pgd_steps=20)
    assert q.eval_steps == 20 and q.eval_alpha == pytest.approx(0.025) and q.alpha == pytest.approx(0.05)
    assert Protocol(eps=0.1, pgd_steps=5, pgd_alpha=0.01).eval_alpha == 0.01
    for bad in (
        {"eps": 2.0},
        {"eps": 0.1, "clean_weight": 1.5},
        {"eps": 0.1, "pgd_steps": -1},
        {"eps": 0.1, "train_attack_mode": "x"},
        {"eps": 0.1, "pgd_alpha": 0.0},
    ):
        with pytest.raises(ValueError):
            Protocol(**{"pgd_steps": 3, **bad})
    s = Schedule(epochs=2, lr=0.1)
    assert s.lr_at(0, 100) == pytest.approx(0.1) and s.lr_at(50, 100) == pytest.approx(0.05)
    assert s.lr_at(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert Schedule(epochs=1, lr=0.1, lr_schedule="constant").lr_at(70, 100) == 0.1
    with pytest.raises(ValueError):
        Schedule(epochs=1, lr=0.0)


def test_evaluate_reports_accuracy_size_and_restores_mode():
    model = trained_digits_model().train()
    test = load_dataset("digits", test_subset=96).test
    proto = Protocol(eps=0.1, pgd_steps=5, apgd_steps=10, wrm_steps=3)
    r = evaluate(model, test, proto, attacks=("pgd", "fgsm", "wrm", "apgd"), batch_size=40, use_autoattack=False)
    assert model.training  # restored
    assert r.n == 96 and r.suite == "apgd-ce-10+apgd-t-10"
    assert r.pgd_acc <= r.fgsm_acc <= r.clean_acc and r.clean_acc > 0.9 and r.wrm_acc < r.clean_acc
    assert r.robust_acc <= r.pgd_acc and list(r.cascade) == ["PGD-5", "FGSM", "apgd-ce-10", "apgd-t-10"]
    assert r.size_bits == r.dense_bits == 4_834_304 and r.ratio == 1.0 and r.packed_bytes == 4_834_304 // 8
    d = r.as_dict()
    assert d["gradient_masking"] == r.gradient_masking and d["ratio"] == 1.0
    only_clean = evaluate(model, test, proto, attacks=())
    assert only_clean.pgd_acc is None and only_clean.clean_acc == r.clean_acc
    with pytest.raises(ValueError, match="unknown attack"):
        evaluate(model, test, proto, attacks=("cw",))


def test_fit_and_evaluate_run_where_the_model_is(small_digits, monkeypatch):
    """``device=None`` means the model's device, not "CUDA when present": on a GPU host a CPU model used to get
    CUDA batches (the model left on the CPU) and fail in its first forward. Faked here: CUDA reported present,
    so the old default would have built a CUDA generator. A device the model is not on is refused by name."""
    model = at.build_model("digits_cnn", 10, (1, 8, 8))
    proto, sched = Protocol(eps=0.1, pgd_steps=1), Schedule(epochs=1, lr=0.01, batch_size=64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    r = evaluate(model, small_digits.test, proto, attacks=("pgd",), batch_size=48)
    assert r.n == 48
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    at.fit(model, opt, small_digits, proto, sched, stage="s", eval_size=0)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    for call in (
        lambda: evaluate(model, small_digits.test, proto, attacks=(), device="meta"),
        lambda: at.fit(model, opt, small_digits, proto, sched, stage="s", eval_size=0, device="meta"),
    ):
        with pytest.raises(ValueError, match=r"the model is on cpu but device='meta'"):
            call()
    model.register_buffer("elsewhere", torch.zeros(1, device="meta"))
    with pytest.raises(ValueError, match="on several devices"):
        evaluate(model, small_digits.test, proto, attacks=())


def test_evaluate_learns_the_class_count_once(small_digits):
    """Clean-only evaluation runs one forward per batch, plus one single-row forward for the class count of the
    histograms (it ran once per batch before 2026-12-01)."""
    model = at.build_model("digits_cnn", 10, (1, 8, 8))
    rows = []
    model.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    r = evaluate(model, small_digits.test, Protocol(eps=0.1, pgd_steps=1), attacks=(), batch_size=16)
    assert r.n == 48 and sorted(rows) == [1, 16, 16, 16]


def test_evaluate_reads_the_device_once_not_per_batch(small_digits, monkeypatch):
    """Pass 1 of ``evaluate`` keeps its counts, outcomes and histograms on the model's device and reads them back
    once: the host reads (``item``, ``tolist``, ``int`` / ``bool`` / ``float`` of a tensor, ``.cpu()``) do not
    grow with the number of batches. Each used to cost five to seven per batch (a device sync each on a GPU). The
    attacks' own input checks are not counted: PGD and FGSM are replaced by sync-free stand-ins here."""
    import atmc_triton.train as tr

    model = at.build_model("digits_cnn", 10, (1, 8, 8))
    monkeypatch.setattr(tr, "pgd", lambda m, x, *a, **k: x.flip(0))
    monkeypatch.setattr(tr, "fgsm", lambda m, x, *a, **k: x.roll(1, 0))
    reads = []
    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__", "cpu"):
        real = getattr(torch.Tensor, name)

        def counted(t, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    proto = Protocol(eps=0.1, pgd_steps=1)
    per_run = []
    for batch in (48, 16, 6):  # 1, 3 and 8 batches
        reads.clear()
        r = evaluate(model, small_digits.test, proto, attacks=("pgd", "fgsm"), batch_size=batch)
        per_run.append(len(reads))
        assert r.n == 48
    assert per_run[0] == per_run[1] == per_run[2], per_run
    monkeypatch.undo()
    # and the counts are those of the stand-ins, worked out here: the adversarial predictions are the clean ones
    # permuted within each batch
    with torch.no_grad():
        x, y = small_digits.test.take(torch.arange(48))
        clean = model.eval()(x).argmax(1)
    for batch in (48, 16, 6):
        monkeypatch.setattr(tr, "pgd", lambda m, x, *a, **k: x.flip(0))
        monkeypatch.setattr(tr, "fgsm", lambda m, x, *a, **k: x.roll(1, 0))
        r = evaluate(model, small_digits.test, proto, attacks=("pgd", "fgsm"), batch_size=batch)
        monkeypatch.undo()
        pgd_pred = torch.cat([c.flip(0) for c in clean.split(batch)])
        fgsm_pred = torch.cat([c.roll(1, 0) for c in clean.split(batch)])
        ok = clean == y
        hit_pgd = ok & (pgd_pred != y)
        hit_fgsm = ok & ~hit_pgd & (fgsm_pred != y)
        assert r.clean_acc == ok.sum().item() / 48
        assert r.pgd_acc == (pgd_pred == y).sum().item() / 48 and r.fgsm_acc == (fgsm_pred == y).sum().item() / 48
        assert r.cascade == {"PGD-1": hit_pgd.sum().item(), "FGSM": hit_fgsm.sum().item()}
        assert r.robust_acc == (ok & ~hit_pgd & ~hit_fgsm).sum().item() / 48


def test_gradient_masking_flag():
    base = dict(n=100, clean_acc=0.9)
    assert EvalResult(**base, pgd_acc=0.60, robust_acc=0.565).gradient_masking  # worst case 3.5 points below PGD
    assert not EvalResult(**base, pgd_acc=0.60, robust_acc=0.575).gradient_masking  # 2.5 points
    assert not EvalResult(**base, pgd_acc=0.60).gradient_masking


def test_load_checks_identity_and_rebuilds_atmc_models(tmp_path, small_digits):
    proto = Protocol(eps=0.2, pgd_steps=1, apgd_steps=2)
    exp = Experiment("digits_cnn", small_digits, proto, out=tmp_path, device="cpu", eval_size=0)
    dense, _ = exp.pretrain(Schedule(epochs=1, lr=0.05, batch_size=64))
    model, _ = exp.compress(dense, at.ATMCConfig(ratio=0.05, bits=4), Schedule(epochs=1, lr=0.01, batch_size=64))
    back = exp.load(tmp_path / "atmc_final.pt")
    assert at.is_finalized(back)
    x = small_digits.test.take(torch.arange(8))[0]
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    with pytest.raises(ValueError, match="'final' checkpoint"):
        exp.load(tmp_path / "atmc_final.pt", stages=("dense",))
    other = Experiment("lenet", load_dataset("digits", subset=8), proto, device="cpu")
    with pytest.raises(CheckpointError, match="model='digits_cnn' \\(expected 'lenet'\\)"):
        other.load(tmp_path / "dense.pt")

"""Global magnitude pruning, the fixed-mask fine-tune and the pruned-size accounting (atmc_triton.baselines)."""

import copy
import json

import pytest
import torch
from atmc_triton.kernels.packed_format import FMT_CSR, FMT_DENSE, factor_nbytes
from hypothesis import given
from hypothesis import strategies as st
from pipeline_helpers import MNIST_ROOT, digits, have_mnist, one_thread, trained_digits_model
from torch import nn

import atmc_triton as at
from atmc_triton.baselines import MaskedSGD, magnitude_masks, magnitude_prune_, nnz_for_ratio, prunable, pruned_size
from atmc_triton.train import PROTOCOLS, Protocol, Schedule, fit


def _weights(model):
    return torch.cat([m.weight.detach().reshape(-1) for _, m in prunable(model)])


def small():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 7), nn.ReLU(), nn.Linear(7, 4)
    )


@given(frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_masks_keep_exactly_the_largest(frac, seed):
    torch.manual_seed(seed)
    model = small()
    w = _weights(model)
    nnz = round(frac * w.numel())
    masks = magnitude_masks(model, nnz)
    keep = torch.cat([m.reshape(-1) for m in masks.values()])
    assert int(keep.sum()) == nnz
    if 0 < nnz < w.numel():  # every kept magnitude >= every dropped one (one global threshold)
        assert w.abs()[keep].min() >= w.abs()[~keep].max()
    assert [tuple(m.shape) for m in masks.values()] == [tuple(m.weight.shape) for _, m in prunable(model)]


def test_masks_global_not_per_layer_and_ties_to_the_earlier_weight():
    a, b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    a.weight.data = torch.tensor([[1.0, 1.0], [0.1, 0.2]])
    b.weight.data = torch.tensor([[1.0, -3.0], [0.3, 1.0]])
    m = magnitude_masks(nn.Sequential(a, b), 3)
    assert m["0"].int().tolist() == [[1, 1], [0, 0]]  # the four 1.0s tie: the first two win
    assert m["1"].int().tolist() == [[0, 1], [0, 0]]


def test_prune_zeroes_in_place_and_leaves_biases():
    model = small()
    bias = model[3].bias.detach().clone()
    masks = magnitude_prune_(model, 50)
    assert int(torch.count_nonzero(_weights(model))) == 50
    for name, mask in masks.items():
        assert not dict(model.named_modules())[name].weight[~mask].any()
    assert torch.equal(model[3].bias, bias)


def test_bad_inputs():
    with pytest.raises(ValueError, match="nnz must be an int"):
        magnitude_masks(small(), 10**6)
    with pytest.raises(ValueError, match="nnz must be an int"):
        magnitude_masks(small(), -1)
    with pytest.raises(ValueError, match="no nn.Linear"):
        magnitude_masks(nn.Sequential(nn.ReLU()), 0)
    bad = small()
    bad[0].weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        magnitude_masks(bad, 3)
    with pytest.raises(ValueError, match="ratio"):
        nnz_for_ratio(small(), 0.0)
    with pytest.raises(ValueError, match="matches no weight"):
        MaskedSGD(small(), {"9": torch.ones(2, dtype=torch.bool)}, lr=0.1)
    with pytest.raises(ValueError, match="must be bool"):
        MaskedSGD(small(), {"5": torch.ones(4, 7)}, lr=0.1)
    with pytest.raises(ValueError, match="no nn.Linear"):
        pruned_size(nn.Sequential(nn.ReLU()))


def test_nnz_for_ratio_is_the_32bit_size_budget():
    model = at.build_model("lenet")
    assert nnz_for_ratio(model, 1e-3) == 430  # floor(1e-3 * 13,776,000 / 32)
    assert nnz_for_ratio(model, 5e-2) == 21525
    assert nnz_for_ratio(model, 1.0) == 430500


def test_masked_sgd_keeps_pruned_weights_zero_with_momentum_and_decay():
    model = small()
    masks = magnitude_prune_(model, 40)
    opt = MaskedSGD(model, masks, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    before = _weights(model).clone()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = _weights(model)
    keep = before != 0
    assert not after[~keep].any()  # never revived
    assert (after[keep] != before[keep]).any()  # the kept weights did train
    for p, m in opt.masks:  # momenta of pruned entries stay exactly zero
        assert not opt.state[p]["momentum_buffer"][~m].any()


def test_masked_sgd_matches_sgd_on_the_kept_weights():
    """Without decay, the kept weights follow plain SGD restricted to the mask."""
    model = small()
    masks = magnitude_prune_(model, 60)
    ref = copy.deepcopy(model)
    opt = MaskedSGD(model, masks, lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    for _ in range(3):
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
        with torch.no_grad():  # the reference: mask its grads by hand, step, re-mask
            for name, mask in masks.items():
                dict(ref.named_modules())[name].weight.grad.mul_(mask)
        opt.step()
        opt_ref.step()
        with torch.no_grad():
            for name, mask in masks.items():
                dict(ref.named_modules())[name].weight.mul_(mask)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_pruned_size_paper_bits_and_packed_bytes():
    lin = nn.Linear(100, 3, bias=False)
    nn.init.zeros_(lin.weight)
    lin.weight.data[0, :5] = 1.0
    lin.weight.data[2, 7] = -2.0
    s = pruned_size(nn.Sequential(lin))
    assert s["nnz"] == 6 and s["size_bits"] == 192 and s["dense_bits"] == 9600
    # CSR: 4 B row pointers x 4, int16 column indices, 32-bit values (+ one pad word)
    assert s["packed_bytes"] == factor_nbytes(FMT_CSR, 3, 100, 6, 0, True) == 4 * 4 + 2 * 6 + 4 * 7
    full = pruned_size(nn.Sequential(nn.Linear(4, 2, bias=False)))
    assert full["packed_bytes"] == factor_nbytes(FMT_DENSE, 2, 4, 8, 0, True)  # dense is smaller when full
    assert full["size_bits"] == full["dense_bits"] == 256


def test_pruned_size_agrees_with_packed_atmc_32bit_factor():
    """A pruned weight costs what pack_ writes for the same matrix held as a 32-bit ATMC factor C."""
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(40, 30, bias=False))
    magnitude_prune_(dense, 100)
    ours = pruned_size(dense)
    model = at.compress_(copy.deepcopy(dense), at.ATMCConfig(nnz=100, bits=None, init="svd", rank=1))
    with torch.no_grad():
        layer = model[0]
        layer.U.zero_()
        layer.V.zero_()
        layer.C.copy_(dense[0].weight)
    at.finalize_(model)
    rep = at.size_report(model)
    assert rep.total_bits == ours["size_bits"]
    assert rep.packed_bytes == ours["packed_bytes"]
    assert at.packed_nbytes(at.pack_(model)) == ours["packed_bytes"]


@pytest.mark.parametrize("adversarial", [True, False])
def test_fixed_mask_finetune_through_fit_keeps_the_budget(tmp_path, adversarial):
    """AP / NAP as the study runs them: prune a trained model, fine-tune with fit(), resume is a no-op."""
    data = at.data.with_subsets(digits(), 256, 64)
    protocol = Protocol(eps=0.1, pgd_steps=2, apgd_steps=3) if adversarial else PROTOCOLS["digits"]
    model = trained_digits_model()
    nnz = nnz_for_ratio(model, 0.05)
    masks = magnitude_prune_(model, nnz)
    sched = Schedule(epochs=2, lr=0.02, batch_size=64)
    opt = MaskedSGD(model, masks, lr=sched.lr, momentum=0.9, weight_decay=sched.weight_decay)
    with one_thread():
        last = fit(
            model,
            opt,
            data,
            protocol,
            sched,
            stage="ap",
            adversarial=adversarial,
            checkpoint=tmp_path / "ap.pt",
            eval_size=32,
        )
    assert last["nnz"] == int(torch.count_nonzero(_weights(model))) <= nnz
    assert pruned_size(model)["size_bits"] <= 0.05 * pruned_size(model)["dense_bits"]
    acc = at.evaluate(model, data.test, protocol, attacks=()).clean_acc
    assert acc > 0.5  # the pruned digits model still classifies (chance is 0.1)


@pytest.mark.skipif(not have_mnist(), reason=f"real MNIST not found under {MNIST_ROOT}/MNIST/raw")
def test_mnist_study_tiny_on_real_mnist(tmp_path):
    """bench.mnist_study end to end on real MNIST (tiny preset, one ratio): every method, sizes, outputs."""
    import csv

    from bench import mnist_study

    out = tmp_path / "study"
    rc = mnist_study.main(
        [
            "--tiny",
            "--data-root",
            str(MNIST_ROOT),
            "--out",
            str(out),
            "--ratios",
            "0.01",
            "--methods",
            "ATMC-8b,ATMC-32b,ATMC-alloc,AP,NAP",
            "--no-results",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader(open(out / "mnist_study.csv")))
    assert [r["method"] for r in rows] == [
        "DA",
        "ATMC-8b",
        "NAT",
        "ATMC-32b",
        "ATMC-alloc",
        "AP",
        "NAP",
    ]  # goal point first
    dense = 13_776_000
    assert all(int(r["dense_bits"]) == dense for r in rows)
    for r in rows:
        if r["method"] in ("DA", "NAT"):
            continue
        assert 0 < int(r["size_bits"]) <= 0.01 * dense
        assert r["suite"] == "aa-torchattacks(apgd-ce-5,apgd-t-5,fab-t-5,square-20)"
    by = {r["method"]: r for r in rows}
    assert [int(by[m]["size_bits"]) for m in ("ATMC-32b", "AP", "NAP")] == [32 * 4305] * 3  # 32-bit: filled exactly
    assert by["ATMC-8b"]["bits"] == "8" and by["AP"]["bits"] == "32"
    assert len(by["ATMC-alloc"]["bits"].split("/")) in (1, 4)
    md = (out / "mnist_study.md").read_text()
    assert "Comparison with the paper" in md and "| DA | 0.980 / 0.785 |" in md
    assert (out / "mnist_study.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((out / "study.json").read_text())
    assert meta["train_images"] == 64 and meta["test_images"] == 32 and meta["config"]["preset"] == "tiny"


# -- per-layer bit allocation (atmc_triton.bitalloc) ----------------------------------------------------------
def _lenet_like():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 12, 5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12 * 4 * 4, 120),
        nn.ReLU(),
        nn.Linear(120, 10),
    )


@pytest.mark.parametrize("ratio", [0.003, 0.05])
def test_allocation_k_matches_nnz_budget_and_beats_every_uniform_choice(ratio):
    from atmc_triton.bitalloc import allocation_report

    model = _lenet_like()
    rep = allocation_report(model, at.ATMCConfig(ratio=ratio, bits=8))
    for b in (1, 3, 8):  # the search's k is nnz_budget's k for the same bits
        k = rep.uniform[b][0]
        m = at.compress_(copy.deepcopy(model), at.ATMCConfig(ratio=ratio, bits=b))
        assert k == int(m.atmc_nnz_budget)
    assert rep.distortion <= min(d for _, d in rep.uniform.values())
    names = [n for n, _ in prunable(model)]
    assert list(rep.bits) == names and all(1 <= b <= 8 for b in rep.bits.values())


def test_allocation_spends_fewer_bits_where_codebooks_dominate():
    from atmc_triton.bitalloc import allocation_report

    model = _lenet_like()
    rep = allocation_report(model, at.ATMCConfig(ratio=0.003, bits=8))
    assert max(rep.bits.values()) < 8  # 8-bit codebooks (256 x 32 bits a factor) would eat the budget
    assert rep.k > rep.uniform[8][0]  # so it keeps more nonzeros than uniform 8 bits
    only8 = allocation_report(model, at.ATMCConfig(ratio=0.003, bits=8), candidates=[8])
    assert set(only8.bits.values()) == {8} and only8.k == rep.uniform[8][0]


def test_allocated_config_compresses_within_budget():
    import dataclasses

    from atmc_triton.bitalloc import allocate_bits

    model = _lenet_like()
    base = at.ATMCConfig(ratio=0.01, bits=8, quant_interval=2)
    cfg = dataclasses.replace(base, layer_bits=allocate_bits(model, base))
    m = at.compress_(copy.deepcopy(model), cfg)
    assert [layer.nbits for _, layer in at.atmc_layers(m)] == list(dict(cfg.layer_bits).values())
    opt = at.ADMM(m, cfg, lr=0.01)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for _ in range(cfg.quant_interval):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    at.finalize_(m)
    assert at.model_size_bits(m) <= 0.01 * at.dense_bits(m)


def test_allocation_bad_inputs():
    from atmc_triton.bitalloc import allocate_bits

    with pytest.raises(ValueError, match="ratio budget and a quantizer"):
        allocate_bits(small(), at.ATMCConfig(nnz=10, bits=8))
    with pytest.raises(ValueError, match="ratio budget and a quantizer"):
        allocate_bits(small(), at.ATMCConfig(ratio=0.1, bits=None))
    with pytest.raises(ValueError, match="candidate bits"):
        allocate_bits(small(), at.ATMCConfig(ratio=0.1, bits=8), candidates=[0, 4])


class _AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)
        return self.fc(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_pruning_baselines_refuse_attention_models():
    """Its in_proj_weight is no layer's .weight: it was neither pruned nor counted (nnz 313 reported, 3,072 held)."""
    model = _AttnNet()
    for call in (lambda: nnz_for_ratio(model, 0.05), lambda: magnitude_prune_(model, 10), lambda: pruned_size(model)):
        with pytest.raises(ValueError, match="'attn' is an nn.MultiheadAttention"):
            call()


def test_allocation_of_an_attention_model_applies_as_is():
    """One bit width per name layer_bits can address: an attention module's, not its in_proj's and out_proj's
    (compress_ refused those names: "matches no layer being compressed")."""
    import dataclasses

    from atmc_triton.bitalloc import allocation_report

    torch.manual_seed(0)
    dense = _AttnNet()
    cfg = at.ATMCConfig(ratio=0.05, bits=8)
    rep = allocation_report(dense, cfg)
    assert set(rep.bits) == {"conv", "attn", "fc"}
    model = at.compress_(copy.deepcopy(dense), dataclasses.replace(cfg, layer_bits=rep.bits))
    assert int(model.atmc_nnz_budget) == rep.k
    assert model.attn.in_proj.nbits == model.attn.out_proj.nbits == rep.bits["attn"]

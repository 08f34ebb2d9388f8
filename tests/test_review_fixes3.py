"""Defects a review of the compression API (``compress_``, ``ADMM``, ``finalize_``, the budget and the bit
allocation) found (2026-12-02), each pinned by value. Every test here failed on the code before its fix (each fix
was planted out once and the test re-run)."""

import copy
import io
import warnings

import pytest
import torch
from pipeline_helpers import one_thread
from torch import nn

import atmc_triton as at
from atmc_triton.bitalloc import allocation_report


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _mlp(seed: int, *widths: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, o in zip(widths, widths[1:]):
        layers += [nn.Linear(i, o), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_a_refused_compress_leaves_the_model_as_it_was():
    """The layers were swapped in before the budget and the floor were checked: a refused ``compress_`` left a
    half-converted model (ATMC layers, no budget) that a retry refused as already compressed."""
    model = _mlp(0, 16, 32, 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for cfg in (at.ATMCConfig(ratio=1e-4, bits=8), at.ATMCConfig(nnz=50, floor="rows")):
        with pytest.raises(ValueError, match="leaves no nonzeros|the layer floor"):
            at.compress_(model, cfg)
        assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear] and "atmc_nnz_budget" not in model._buffers
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    at.compress_(model, at.ATMCConfig(ratio=0.1, bits=8))  # a retry works
    assert int(model.atmc_nnz_budget) > 0


def test_finalize_warns_when_another_optimizer_trained_the_factors():
    """``finalize_`` commits Z, which only ADMM (and compress_, finalize_, a load) sets: training with another
    optimizer was dropped without a word. It warns now; ADMM training, a load and a reset do not."""
    cfg = at.ATMCConfig(ratio=0.3, bits=8, quant_interval=10)
    x, y = torch.rand(64, 16), torch.randint(0, 4, (64,))

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    def finalize(model):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            at.finalize_(model, check_input=False)
        return [str(w.message) for w in got if "were written since their quantized copy Z" in str(w.message)]

    model = at.compress_(_mlp(0, 16, 32, 4), cfg)
    train(model, torch.optim.Adam(model.parameters(), lr=1e-2), 5)
    assert finalize(model) == [
        "finalize_: the factors of 0, 2 were written since their quantized copy Z was last set (by compress_, an "
        "ADMM step, finalize_ or a load): trained by another optimizer? finalize_ commits Z, which drops that "
        "training. Train with atmc_triton.ADMM, or call layer.reset_admm_state() on each ATMC layer first (Z := "
        "the quantized factors)"
    ]
    assert finalize(model) == []  # finalize_ set Z := W
    model = at.compress_(_mlp(0, 16, 32, 4), cfg)
    train(model, at.ADMM(model, cfg, lr=0.1), 13)  # (3 steps past the last quantizer step)
    twin = at.compress_(_mlp(1, 16, 32, 4), cfg)
    twin.load_state_dict(model.state_dict())
    assert finalize(model) == [] and finalize(twin) == []
    model = at.compress_(_mlp(0, 16, 32, 4), cfg)
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    for _, layer in at.atmc_layers(model):
        layer.reset_admm_state()
    assert finalize(model) == []


def test_finalize_and_size_report_run_on_a_model_with_two_inputs():
    """The input-dependence probe replayed only the first tensor of the last call: a model with two inputs made
    ``finalize_`` and ``size_report`` raise a ``TypeError`` (with ``check_input`` on, the default)."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    torch.manual_seed(0)
    model = at.compress_(Two(), at.ATMCConfig(ratio=0.3, bits=4))
    model(torch.rand(2, 8), torch.rand(2, 8))
    assert at.check_input_dependence(model) is None  # no probe input is known
    at.finalize_(model)
    assert at.size_report(model) is not None
    model(torch.rand(3, 8), z=torch.rand(3, 8))  # keywords too
    assert at.check_input_dependence(model) is None


def _trained_twin_pair(cfg):
    orig, twin = _mlp(0, 256, 256, 256, 10), _mlp(1, 256, 256, 256, 10)
    with torch.no_grad():
        orig[0].weight.mul_(20)  # a trained model's budget differs from a random twin's
    at.compress_(orig, cfg)
    at.compress_(twin, cfg)
    buf = io.BytesIO()
    torch.save(orig.state_dict(), buf)
    buf.seek(0)
    return orig, twin, torch.load(buf, weights_only=True)


def test_a_loaded_twin_resolves_the_saved_models_floor():
    """``floor="auto"`` was resolved once, at ``compress_``, against that model's own k and kept as a plain
    attribute: a twin compressed from random weights resolved another floor, and after ``load_state_dict``
    ``finalize_`` pruned a whole layer away (256 units to 1) that the saved model kept."""
    cfg = at.ATMCConfig(ratio=0.0064, bits=8)
    orig, twin, sd = _trained_twin_pair(cfg)
    assert int(orig.atmc_nnz_budget) != int(twin.atmc_nnz_budget) and at.api.model_floor(orig) == "rows"
    assert at.api.model_floor(twin) != "rows"
    twin.load_state_dict(sd)
    assert at.api.model_floor(twin) == "rows"
    at.finalize_(orig, check_input=False)
    at.finalize_(twin, check_input=False)
    assert [int((layer.C != 0).any(1).sum()) for _, layer in at.atmc_layers(twin)] == [256, 256, 10]
    for k, v in orig.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k]), k


def test_admm_takes_the_budget_a_later_load_state_dict_brings():
    """ADMM copied k (and the floor) when built: a ``model.load_state_dict`` afterwards (the usual order) left it
    training to the twin's k, 1,280 nonzeros where the loaded model's budget is 2,396."""
    cfg = at.ATMCConfig(ratio=0.0064, bits=8)
    _, twin, sd = _trained_twin_pair(cfg)
    opt = at.ADMM(twin, cfg, lr=0.01)
    twin.load_state_dict(sd)
    opt.zero_grad()
    twin(torch.rand(4, 256)).sum().backward()
    opt.step()
    k = int(twin.atmc_nnz_budget)
    nnz = sum(int((p != 0).sum()) for _, layer in at.atmc_layers(twin) for _, p in layer.factors())
    assert opt.param_groups[0]["k"] == k == nnz == 2396
    state = copy.deepcopy(opt.state_dict())  # a resumed optimizer keeps its saved floor
    fresh = at.ADMM(twin, cfg, lr=0.01)
    fresh.load_state_dict(state)
    fresh.zero_grad()
    assert torch.equal(fresh._floor, opt._floor)


def test_allocate_bits_budgets_only_the_compressed_layers():
    """``allocation_report`` budgeted ``ratio`` of every conv / linear weight, excluded layers too: it planned
    k = 258 at 8 bits where ``compress_`` (which counts the compressed layers only) gives 94."""
    cfg = at.ATMCConfig(ratio=0.05, bits=8, exclude=["0"])
    rep = allocation_report(_mlp(0, 64, 64, 32, 10), cfg)
    model = at.compress_(_mlp(0, 64, 64, 32, 10), cfg)
    assert rep.uniform[8][0] == int(model.atmc_nnz_budget) == 94


def test_tied_magnitudes_do_not_empty_the_budget():
    """Entries tied at the threshold were all charged: an identity-initialized layer (256 entries of 1.0) made
    k = 0 and refused a ratio whose 1,351 bits hold 209 nonzeros at 4 bits."""
    model = _mlp(0, 64, 256, 256, 10)
    nn.init.eye_(model[2].weight)
    at.compress_(model, at.ATMCConfig(ratio=0.0005, bits=4, floor="none"))
    assert int(model.atmc_bits_budget) == 1351 and int(model.atmc_nnz_budget) == 209


def test_a_compressed_submodule_is_named_by_admm_and_finalize():
    """``compress_(net.backbone)`` put the budget on the backbone: ``ADMM(net)`` said the model was never compressed
    and ``finalize_(net)`` raised an ``AttributeError``."""
    net = nn.Sequential()
    net.add_module("backbone", _mlp(0, 8, 16, 4))
    at.compress_(net.backbone, at.ATMCConfig(ratio=0.3, bits=4))
    for call in (lambda: at.ADMM(net, at.ATMCConfig(ratio=0.3, bits=4)), lambda: at.finalize_(net)):
        with pytest.raises(ValueError, match=r"compress_ was given the submodule 'backbone'.*get_submodule"):
            call()


def test_a_layer_without_inputs_compresses():
    """``nn.Linear(0, 4)`` beside a normal layer: the floor took an argmax over no columns (an ``IndexError``)."""
    torch.manual_seed(0)
    for floor in ("auto", "rows", "last"):
        model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 32), nn.Linear(32, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the empty layer is all zeros: a CollapseWarning)
            at.compress_(model, at.ATMCConfig(ratio=0.5, bits=4, floor=floor))
            at.finalize_(model, check_input=False)
        assert at.api.model_floor(model) == ("rows" if floor == "auto" else floor)


def test_the_ratio_is_read_as_the_decimal_it_prints_as():
    """``0.57 * 3200`` is 1823.99... in floats: k was 56 where 57 nonzeros of 32 bits fill the 1,824 bits."""
    torch.manual_seed(0)
    model = at.compress_(nn.Sequential(nn.Linear(10, 10, bias=False)), at.ATMCConfig(ratio=0.57, bits=None))
    assert int(model.atmc_bits_budget) == 1824 and int(model.atmc_nnz_budget) == 57

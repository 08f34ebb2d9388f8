"""Drop-in behaviour of compress_ on arbitrary models: grouped convs, attention, what stays dense,
bad input, the layer floor, the three size ratios, export_dense and the input-dependence check."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import atmc_triton as at


class Mixed(nn.Module):
    """A grouped conv, a depthwise conv, attention, a Conv1d and an embedding."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.seq = nn.Conv1d(8, 8, 1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.pos = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.depthwise(F.relu(self.grouped(F.relu(self.stem(x)))))  # [B, 8, 4, 4]
        t = self.seq(h.flatten(2)).transpose(1, 2) + self.pos.weight  # [B, 16, 8]
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


def _x():
    return torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))


def test_grouped_depthwise_and_attention_are_compressed_and_the_rest_reported_once():
    model = Mixed().eval()
    y = model(_x())
    with pytest.warns(UserWarning) as rec:
        report = at.compress_(model, at.ATMCConfig(ratio=0.2, bits=4), return_report=True)
    msgs = [str(w.message) for w in rec if "stay dense" in str(w.message)]
    assert len(msgs) == 1 and "seq (Conv1d, 72)" in msgs[0] and "pos (Embedding, 128)" in msgs[0]
    assert {n for n, *_ in report.swapped} == {"stem", "grouped", "depthwise", "attn", "head"}
    assert isinstance(model.attn, at.ATMCMultiheadAttention) and model.grouped.groups == 4
    assert report.dense_params == sum(p.numel() for p in Mixed().parameters()) - report.compressed_weights
    assert report.training_state_bytes == 21 * report.factor_entries + 12 * report.dense_params
    assert torch.allclose(model(_x()), y, atol=1e-5)  # identity init: unchanged
    assert "skipped seq" in str(report)


def test_whole_chain_on_mixed_model_is_exact(tmp_path):
    model = Mixed().eval()
    cfg = at.ATMCConfig(ratio=0.2, bits=4, quant_interval=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        at.compress_(model, cfg)
    opt = at.ADMM(model, cfg, lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(_x()).square().mean().backward()
        opt.step()
    at.finalize_(model)
    with torch.no_grad():
        y = model(_x())
        plain = at.export_dense(model)
        assert torch.equal(plain(_x()), y)
        assert {type(plain.attn), type(plain.grouped), type(plain.head)} == {
            nn.MultiheadAttention,
            nn.Conv2d,
            nn.Linear,
        }
        assert plain.depthwise.groups == 8 and plain.depthwise.padding_mode == "reflect"
        at.pack_(model)
        yp = model(_x())
        assert torch.allclose(yp, y, atol=1e-5)
        at.save_packed(model, tmp_path / "m.safetensors")
        fresh = at.load_packed(Mixed().eval(), tmp_path / "m.safetensors")
        assert torch.equal(fresh(_x()), yp)
        assert torch.equal(at.export_dense(fresh)(_x()), y)
    assert isinstance(fresh.attn, at.ATMCMultiheadAttention) and isinstance(fresh.attn.in_proj, at.PackedLinear)


def test_bad_input_is_a_clear_value_error():
    quantized = nn.Linear(4, 4)
    quantized.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"0 has non-float weights \(torch.int8\)"):
        at.compress_(nn.Sequential(quantized), at.ATMCConfig(ratio=0.1))
    with pytest.raises(ValueError, match="nothing to compress"):
        at.compress_(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), at.ATMCConfig(ratio=0.1))
    with pytest.raises(ValueError, match=r"exclude \['nope\*'\] matches no compressible layer"):
        at.compress_(nn.Sequential(nn.Linear(4, 4)), at.ATMCConfig(ratio=0.1, exclude=["0", "nope*"]))
    with pytest.raises(ValueError, match="nothing to compress"):  # everything excluded
        at.compress_(nn.Sequential(nn.Linear(4, 4)), at.ATMCConfig(ratio=0.1, exclude="*"))
    with pytest.raises(ValueError, match="floor"):  # an explicit floor larger than half the budget
        at.compress_(nn.Sequential(nn.Linear(64, 64)), at.ATMCConfig(nnz=100, floor="rows"))


def test_save_packed_into_a_missing_directory(tmp_path):
    model = at.pack_(at.finalize_(at.compress_(nn.Sequential(nn.Linear(8, 4)), at.ATMCConfig(nnz=12, bits=2))))
    with pytest.raises(ValueError, match="does not exist"):
        at.save_packed(model, tmp_path / "missing" / "m.safetensors")


def test_exclude_keeps_layers_dense_and_out_of_the_budget():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    report = at.compress_(model, at.ATMCConfig(ratio=0.1, exclude=["2"]), return_report=True)
    assert type(model[2]) is nn.Linear and report.skipped == (("2", "Linear", 68, "excluded"),)
    assert int(model.atmc_bits_budget) == int(0.1 * 32 * 256)  # the budget counts compressed layers only


def _collapsing_model():
    """A head whose weights are 1000x smaller than the body's: the global top-k takes none of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))  # no dead hidden units
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
    return model


@pytest.mark.parametrize("floor", ["auto", "last", "rows"])
def test_the_floor_keeps_every_output_unit_alive_through_training(floor):
    model = _collapsing_model()
    cfg = at.ATMCConfig(ratio=0.05, bits=4, quant_interval=2, floor=floor)
    at.compress_(model, cfg)
    opt = at.ADMM(model, cfg, lr=0.01)
    x = torch.rand(8, 32)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(8)).backward()
        opt.step()
        nnz = sum(int((p != 0).sum()) for _, layer in at.atmc_layers(model) for _, p in layer.factors())
        assert nnz == int(model.atmc_nnz_budget)  # the floor sits inside the budget, which is used fully
        assert bool((model[2].weight_2d() != 0).any(dim=1).all())  # every logit keeps an input
    with warnings.catch_warnings():
        warnings.simplefilter("error", at.CollapseWarning)
        at.finalize_(model)
        rep = at.size_report(model)
    assert bool((model[2].weight_2d() != 0).any(dim=1).all())
    assert rep.total_bits <= 0.05 * rep.dense_bits
    assert at.check_input_dependence(model, x, warn=False) == 0


def test_without_a_floor_the_head_collapses_and_the_check_says_so():
    model = _collapsing_model()
    cfg = at.ATMCConfig(ratio=0.05, bits=4, floor="none")
    at.compress_(model, cfg)
    model(torch.rand(3, 32))  # the check reuses the shape of the last input
    with pytest.warns(at.CollapseWarning, match="10 of 10 output units"):
        at.finalize_(model)
    with pytest.warns(at.CollapseWarning):
        at.size_report(model)
    assert not bool(model[2].weight_2d().any())


def test_three_ratios():
    model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Conv1d(1, 1, 1))
    with pytest.warns(UserWarning, match="stay dense"):
        at.compress_(model, at.ATMCConfig(ratio=0.1, bits=4))
    at.finalize_(model)
    rep = at.size_report(model)
    dense_params = 32 + 64 + 2  # the Linear's bias, the LayerNorm, the Conv1d
    assert rep.dense_bits == 32 * 64 * 32 and rep.dense_params == dense_params
    assert rep.ratio == rep.total_bits / rep.dense_bits <= 0.1
    assert rep.model_ratio == pytest.approx((rep.total_bits + 32 * dense_params) / (32 * (2048 + dense_params)))
    assert rep.model_ratio <= 0.1 + rep.dense_share
    packed_tensors = sum(8 * 0 + f.packed_bits // 8 for f in rep.factors)
    assert rep.file_bytes == packed_tensors + 4 * dense_params + 16  # + the two int64 budget buffers
    assert rep.dense_file_bytes == 4 * (2048 + dense_params)
    text = str(rep)
    assert "whole model" in text and "packed file" in text


def test_export_dense_leaves_no_atmc_trace_and_exports():
    model = Mixed().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        at.compress_(model, at.ATMCConfig(ratio=0.2, bits=4))
    model(_x())
    plain = at.export_dense(model)
    assert not any(type(m).__module__.startswith("atmc_triton") for m in plain.modules())
    assert not plain._forward_pre_hooks and "atmc_config" not in plain.__dict__
    assert not any(k.startswith("atmc_") for k in plain.state_dict())
    assert isinstance(model.attn, at.ATMCMultiheadAttention)  # the original is untouched
    with torch.no_grad():
        assert torch.equal(plain(_x()), model(_x()))
    ep = torch.export.export(plain, (_x(),))
    with torch.no_grad():
        assert torch.allclose(ep.module()(_x()), plain(_x()), atol=1e-6)


def test_progress_bar_can_be_forced_and_turned_off(capsys):
    model = nn.Sequential(nn.Linear(8, 8))
    at.compress_(model, at.ATMCConfig(nnz=20), progress=True)
    assert "compress_" in capsys.readouterr().err
    at.finalize_(model, progress=False)
    assert capsys.readouterr().err == ""


def test_an_empty_batch_does_not_break_the_input_dependence_check():
    """Evaluation may call the model on zero points (a cascade with nothing left); the check keeps a real shape."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    at.compress_(model, at.ATMCConfig(ratio=0.5, bits=4), progress=False)
    model(torch.rand(4, 6))
    model(torch.rand(0, 6))
    assert at.check_input_dependence(model, warn=False) == 0


def test_the_input_dependence_probe_runs_where_the_model_is_now():
    """The check probes with inputs shaped like the last one the model saw, on the model's device now: a model
    trained on a GPU and then moved (``.cpu()``), or unpickled without a GPU, used to get its probe on the old
    device (``finalize_`` / ``size_report`` failed). The old device is faked as ``meta`` here."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    at.compress_(model, at.ATMCConfig(ratio=0.5, bits=4), progress=False)
    model(torch.rand(4, 6))
    shape, dtype, _ = model.__dict__["_atmc_input_spec"]
    model.__dict__["_atmc_input_spec"] = (shape, dtype, torch.device("meta"))  # as if seen on another device
    assert at.check_input_dependence(model, warn=False) == 0
    at.finalize_(model, progress=False)

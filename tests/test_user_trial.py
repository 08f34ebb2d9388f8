"""Defects a new user's trial of the library found (README flows on torchvision / timm models, the attacks,
the CLI), each pinned by a test that failed before its fix."""

import copy
import warnings

import pytest
import torch
from helpers import small_cnn
from torch import nn

import atmc_triton as at

LR = 0.5  # large enough that 3 steps move some rows' largest entry (the floor "model_first" would re-choose)
CFG = at.ATMCConfig(ratio=0.05, bits=3, quant_interval=2)  # k about half the weights; floor "rows"


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)


def _steps(model, opt, n, x, y):
    for _ in range(n):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _twin(seed: int):
    """A freshly built and compressed model, as a user resuming a torchvision / timm run makes it: the
    architecture's own random init (another seed than the run's), then ``compress_`` and ``ADMM``."""
    torch.manual_seed(seed)
    model = at.compress_(small_cnn(), CFG)
    return model, at.ADMM(model, CFG, lr=LR)


@pytest.mark.parametrize("order", ["optimizer_first", "model_first"])
def test_resume_into_a_fresh_random_twin_is_exact(order):
    """README: ``state_dict()``/``load_state_dict()`` resume exactly. The layer floor (one entry per output row,
    kept whatever the top-k says) was chosen from the factor values when ``ADMM`` was built and not saved, so a
    resumed optimizer took the floor of the twin's random init (or of the loaded weights) and kept other
    entries: masks differed after the first resumed step. The floor now travels in the optimizer state."""
    x, y = _batch()
    model, opt = _twin(0)
    _steps(model, opt, 3, x, y)
    ckpt_model, ckpt_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _steps(model, opt, 3, x, y)
    if order == "optimizer_first":  # the usual PyTorch order: build model and optimizer, then load both
        model2, opt2 = _twin(123)
        model2.load_state_dict(ckpt_model)
    else:  # load the weights first, then build the optimizer
        torch.manual_seed(123)
        model2 = at.compress_(small_cnn(), CFG)
        model2.load_state_dict(ckpt_model)
        opt2 = at.ADMM(model2, CFG, lr=LR)
    opt2.load_state_dict(ckpt_opt)
    assert torch.equal(opt2._floor, opt._floor)
    _steps(model2, opt2, 3, x, y)
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n


def test_admm_state_dict_carries_a_checked_floor():
    model, opt = _twin(0)
    floor = opt.state_dict()["floor"]
    assert floor.dtype == torch.int64 and floor.numel() == 5 + 6 + 7 + 9  # "rows": one per output unit
    assert torch.equal(floor, opt._floor.cpu())
    _, opt2 = _twin(1)
    for bad, match in (
        (torch.tensor([10**9]), "floor index out of range"),
        (torch.tensor([0.5]), "1-D int64"),
        (torch.zeros(2, 2, dtype=torch.int64), "1-D int64"),
        ([1, 2], "1-D int64"),
    ):
        sd = copy.deepcopy(opt.state_dict())
        sd["floor"] = bad
        before = opt2._floor.clone()
        with pytest.raises(ValueError, match=match):
            opt2.load_state_dict(sd)
        assert torch.equal(opt2._floor, before)  # nothing loaded
    sd = copy.deepcopy(opt.state_dict())
    del sd["floor"]  # a state saved before the floor was saved: the twin's own floor stays
    before = opt2._floor.clone()
    opt2.load_state_dict(sd)
    assert torch.equal(opt2._floor, before)


def test_load_state_dict_does_not_alias_the_callers_dict():
    """``load_state_dict`` kept the caller's ``state['admm']`` dict as its own: stepping one optimizer advanced
    the step count of every optimizer loaded from the same dict (and of the dict), and loading popped
    ``nonfinite_steps`` out of it."""
    x, y = _batch()
    model, opt = _twin(0)
    _steps(model, opt, 1, x, y)
    sd = opt.state_dict()
    saved = copy.deepcopy(sd["state"]["admm"])
    (ma, oa), (_, ob) = _twin(1), _twin(2)
    oa.load_state_dict(sd)
    ob.load_state_dict(sd)
    _steps(ma, oa, 1, x, y)
    assert (oa.steps, ob.steps) == (2, 1)
    assert sd["state"]["admm"].keys() == saved.keys()
    assert all(torch.equal(torch.as_tensor(sd["state"]["admm"][k]), torch.as_tensor(v)) for k, v in saved.items())


def test_attacks_take_inputs_that_require_grad_without_a_warning():
    """An input with ``requires_grad=True`` (e.g. from a differentiable augmentation) made the range check
    call ``float()`` on it: a torch UserWarning pointing into attacks.py at every call."""
    model = small_cnn().eval()
    x, y = _batch()
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adv = at.pgd(model, x, y, steps=1)
        at.fgsm(model, x, y)
    assert not adv.requires_grad and x.grad is None


@pytest.mark.parametrize("attack", [at.pgd, at.fgsm, at.fgsm_rs, at.apgd_ce])
def test_attacks_refuse_negative_labels(attack):
    """``y = -100`` (cross-entropy's ``ignore_index``, a common "no label" marker) made the loss skip those rows:
    their examples came back unattacked, with no error, and counted as robust."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(2, 3, 2, 2)
    for y in (torch.tensor([0, -100]), torch.tensor([-1, 2])):
        with pytest.raises(ValueError, match="labels must be class indices >= 0, got"):
            attack(model, x, y)
    assert attack(model, x, torch.tensor([0, 2])).shape == x.shape


@pytest.mark.parametrize("attack", [at.pgd, at.fgsm, at.fgsm_rs, at.n_fgsm, at.apgd_ce, at.apgd_dlr, at.wrm])
def test_attacks_refuse_a_label_past_the_models_classes(attack):
    """A label >= the class count reached cross-entropy: an IndexError on CPU, and on CUDA a device-side assert
    that ends the process's CUDA context. It is a ValueError at the first forward now, and the model is left
    without the check's hook."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))  # APGD-T needs >= 4 classes
    x = torch.rand(2, 3, 2, 2)
    with pytest.raises(ValueError, match="labels must be class indices < the model's 5 outputs, got 5"):
        attack(model, x, torch.tensor([0, 5]))
    assert not model._forward_hooks
    assert attack(model, x, torch.tensor([0, 4])).shape == x.shape


@pytest.mark.parametrize("attack", [at.pgd, at.fgsm, at.fgsm_rs, at.apgd_ce])
def test_an_eps_above_1_warns_that_it_covers_the_whole_box(attack):
    """``eps=8`` (torchattacks' 8/255 typed as pixel levels) attacked the whole [0, 1] box without a word."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(2, 3, 2, 2), torch.tensor([0, 2])
    with pytest.warns(UserWarning, match=r"eps=8 is above 1: .* \(meant 8/255\?\)") as got:
        attack(model, x, y, 8)
    assert got[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attack(model, x, y, 1.0)  # the largest eps that means something: no warning


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    """``atmc train --resume --out DIR`` with no checkpoint in DIR (a mistyped ``--out``) started the whole run over
    without a word; it still starts (a torchrun restart before the first checkpoint must), but says so first."""
    from types import SimpleNamespace

    from atmc_triton.cli import _check_fresh

    s = SimpleNamespace(exp=SimpleNamespace(out=tmp_path / "run", resume=True))
    _check_fresh(s, ["dense", "atmc"])
    err = capsys.readouterr().err
    assert f"--resume: no checkpoint in {tmp_path / 'run'} (dense.pt, atmc.pt, atmc_final.pt): starting from" in err
    (tmp_path / "run" / "dense.pt").write_bytes(b"")
    _check_fresh(s, ["dense", "atmc"])
    assert capsys.readouterr().err == ""  # something to resume: nothing said, nothing moved
    assert (tmp_path / "run" / "dense.pt").exists()


def test_size_report_prints_whole_layer_names():
    """The table cut names to their last 24 characters: timm's ``stages.2.blocks.1.conv_dw`` printed as
    ``tages.2.blocks.1.conv_dw``."""
    inner = nn.Sequential(nn.Linear(4, 4))
    model = nn.Sequential(nn.ModuleDict({"a_rather_long_stage_name": nn.ModuleDict({"blocks": inner})}))
    at.finalize_(at.compress_(model, at.ATMCConfig(nnz=12, bits=2, floor="none")), check_input=False)
    text = str(at.size_report(model, check_input=False))
    name = "0.a_rather_long_stage_name.blocks.0"
    rows = [r for r in text.splitlines() if r.startswith(name + " ")]
    assert len(rows) == 3  # U, V, C
    assert len({len(r) for r in text.splitlines()[:5]}) == 1  # header, rule and rows stay aligned


def test_load_packed_onto_meta_is_a_clear_error_not_a_corrupted_file(tmp_path):
    model = at.finalize_(at.compress_(small_cnn(), CFG), check_input=False)
    path = tmp_path / "m.safetensors"
    at.save_packed(at.pack_(model), path)
    with pytest.raises(ValueError, match="device 'meta' holds no data to validate; load on 'cpu' or 'cuda'"):
        at.load_packed(small_cnn(), path, device="meta")
    at.load_packed(small_cnn(), path)  # the file itself is fine


def test_a_checkpoint_of_other_settings_names_only_the_settings_that_differ():
    """Resuming with one evaluation flag changed printed both whole protocols (20 settings each, 1,200
    characters on one line) for the user to diff by eye."""
    from atmc_triton.checkpoint import CheckpointError, check_meta

    proto = {"eps": 0.2, "pgd_steps": 10, "eval_pgd_steps": 20, "apgd_steps": 100, "wrm_gamma": 0.4, "loss": "ce"}
    ck = {"meta": {"model": "digits_cnn", "dataset": "digits", "protocol": {**proto, "eval_pgd_steps": 2}}}
    with pytest.raises(CheckpointError) as e:
        check_meta(ck, "dense.pt", model="digits_cnn", protocol=proto)
    msg = str(e.value)
    assert msg.endswith("protocol={'eval_pgd_steps': 2} (expected {'eval_pgd_steps': 20})"), msg
    ck["meta"]["protocol"] = {k: v for k, v in proto.items() if k != "loss"}  # a key only one side has
    with pytest.raises(CheckpointError, match=r"protocol=\{\} \(expected \{'loss': 'ce'\}\)"):
        check_meta(ck, "dense.pt", protocol=proto)
    with pytest.raises(CheckpointError, match=r"model='digits_cnn' \(expected 'lenet'\)"):
        check_meta(ck, "dense.pt", model="lenet")


def test_an_unknown_flag_is_a_one_line_error_naming_the_subcommand(capsys):
    """README: bad arguments end with one line ``atmc train: error: ...``; a mistyped flag (``--ratoi``) printed
    ``atmc: error: ...``, argparse's top-level parser being the one that reports unrecognized arguments."""
    from atmc_triton.cli import main

    for cmd, flag in (("train", "--ratoi"), ("eval", "--bogus"), ("sweep", "--ratio-list")):
        with pytest.raises(SystemExit) as e:
            main([cmd, *(["x.pt"] if cmd == "eval" else []), flag, "0.1"])
        assert e.value.code == 2
        assert capsys.readouterr().err == f"atmc {cmd}: error: unrecognized arguments: {flag} 0.1 (see --help)\n"


def test_compress_keeps_frozen_layers_frozen():
    """A fine-tuning user freezes a backbone (``requires_grad=False``) and compresses the model: ``compress_``
    made every factor and bias trainable again, so ``ADMM`` silently trained the frozen layers. The flags now
    carry over, and ``ADMM`` refuses with its documented error (leave the layer out of ``compress_``)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.MultiheadAttention(5, 1))
    model[0].weight.requires_grad_(False)  # a frozen conv whose bias still trains
    model[2].bias.requires_grad_(False)
    for p in model[3].parameters():
        p.requires_grad_(False)
    cfg = at.ATMCConfig(ratio=0.3, bits=3)
    at.compress_(model, cfg)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.bias", "2.C", "2.U", "2.V"]
    with pytest.raises(ValueError, match=r"ADMM: factors \['0.U', '0.V', '0.C', '3.in_proj.U'\] ... have requires"):
        at.ADMM(model, cfg)
    at.finalize_(model, check_input=False)  # post-training compression (no ADMM) needs no gradient
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    at.pack_(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.bias"]  # was: 2.bias trainable again
    at.unpack(model)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")) == ["0.bias"]

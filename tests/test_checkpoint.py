"""Checkpoints: atomic writes, weights_only loads that refuse pickles, full ATMC + ADMM round trips, RNG state,
identity checks and the safetensors export of views into shared flat buffers."""

import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import small_cnn

import atmc_triton as at
from atmc_triton.checkpoint import (
    CheckpointError,
    atomic_write,
    check_meta,
    config_from_dict,
    config_to_dict,
    export_safetensors,
    get_rng_state,
    load_checkpoint,
    load_safetensors,
    save_checkpoint,
    set_rng_state,
)


class NotATensor:
    pass


def _compressed(seed=0, init="identity"):
    torch.manual_seed(seed)
    model = small_cnn()
    cfg = at.ATMCConfig(ratio=0.3, bits=3, quant_interval=2, layer_bits={"7": 2}, init=init)
    at.compress_(model, cfg)
    opt = at.ADMM(model, cfg, lr=0.05)
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 5
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, cfg


def test_atomic_write_replaces_or_leaves_the_old_file(tmp_path):
    p = tmp_path / "sub" / "f.bin"
    atomic_write(p, lambda f: f.write(b"old"))
    assert p.read_bytes() == b"old"

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, broken)
    assert p.read_bytes() == b"old"  # the target is untouched ...
    assert os.listdir(p.parent) == ["f.bin"]  # ... and no temp file is left behind
    atomic_write(p, lambda f: f.write(b"new"))
    assert p.read_bytes() == b"new" and os.listdir(p.parent) == ["f.bin"]


@pytest.mark.parametrize("init", ["identity", "sparse"])
def test_atmc_model_and_admm_state_round_trip(tmp_path, init):
    model, opt, cfg = _compressed(init=init)
    meta = {"model": "small_cnn", "dataset": "toy", "atmc": config_to_dict(cfg)}
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, meta=meta, epoch=4, step=12)
    ck = load_checkpoint(tmp_path / "c.pt")
    assert (ck["epoch"], ck["step"], ck["meta"]) == (4, 12, meta)
    assert config_from_dict(ck["meta"]["atmc"]) == cfg

    twin, _, _ = _compressed(seed=1, init=init)  # same architecture, different values
    twin_opt = at.ADMM(twin, cfg, lr=0.05)
    twin.load_state_dict(ck["model"])
    twin_opt.load_state_dict(ck["optimizer"])
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(twin_opt.store.mom, opt.store.mom) and twin_opt.steps == opt.steps == 3
    # continuing both gives identical weights (the optimizer state really came back)
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6) % 5
    for m, o in ((model, opt), (twin, twin_opt)):
        for _ in range(3):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), k


def test_rng_state_round_trip(tmp_path):
    save_checkpoint(tmp_path / "r.pt", model=torch.nn.Linear(1, 1), meta={})
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first
    state = get_rng_state()
    assert set(state) >= {"python", "numpy", "torch"}


def test_pickled_payloads_are_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": "atmc-triton-checkpoint", "version": 1, "payload": NotATensor()}, p)
    with pytest.raises(CheckpointError, match="pickled Python objects") as e:
        load_checkpoint(p)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not a checkpoint at all", "not a readable checkpoint"),
        (None, "not an atmc_triton checkpoint"),
    ],
)
def test_foreign_files_are_refused(tmp_path, content, match):
    p = tmp_path / "x.pt"
    if content is None:
        torch.save({"weight": torch.ones(2)}, p)  # a plain state dict
    else:
        p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_check_meta_names_the_mismatch():
    ck = {"meta": {"model": "lenet", "dataset": "mnist"}}
    check_meta(ck, "a.pt", model="lenet")
    with pytest.raises(CheckpointError, match=r"from model 'lenet' on 'mnist': model='lenet' \(expected 'resnet34'\)"):
        check_meta(ck, "a.pt", model="resnet34", dataset="mnist")


@pytest.mark.parametrize("init", ["identity", "sparse"])  # sparse: zero-size U, V and their buffers
def test_safetensors_export_of_shared_flat_buffers(tmp_path, init):
    model, _, cfg = _compressed(init=init)
    at.finalize_(model)
    p = export_safetensors(model, tmp_path / "m.safetensors", {"ratio": 0.3})
    tensors = load_safetensors(p)
    assert set(tensors) == set(model.state_dict())
    torch.manual_seed(5)
    fresh = at.compress_(small_cnn(), cfg)
    fresh.load_state_dict(tensors)
    x = torch.rand(4, 3, 8, 8)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert at.model_size_bits(fresh) == at.model_size_bits(model)

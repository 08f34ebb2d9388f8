"""Bad input on the public API fails early with an error that names the argument (the README audit).

Each test here failed before its fix: the call was accepted and did the wrong thing silently, or failed
late, or blamed the wrong thing.
"""

import json
import math
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

import atmc_triton as at
from atmc_triton.checkpoint import load_checkpoint, save_checkpoint
from atmc_triton.cli import SWEEP_FILES, main
from atmc_triton.distributed import init_from_env
from atmc_triton.train import PROTOCOLS, Protocol


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 10))


# --- ADMM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"ratio": 0.5},  # k comes from the model: the new ratio would be ignored
        {"bits": None},  # no quantizer and rho = 0 on layers that carry 4-bit codebooks
        {"bits": 8},
        {"layer_bits": {"0": 2}},
        {"floor": "none"},
        {"nnz": 40, "ratio": None},
    ],
)
def test_admm_refuses_a_config_other_than_the_one_compress_applied(change):
    cfg = at.ATMCConfig(ratio=0.2, bits=4)
    model = at.compress_(small(), cfg)
    other = at.ATMCConfig(**{**{"ratio": 0.2, "bits": 4}, **change})
    field = next(iter(change))
    with pytest.raises(ValueError, match=rf"ADMM: cfg differs from the config compress_ applied .* {field}="):
        at.ADMM(model, other)


def test_admm_accepts_other_optimizer_settings_and_runs_them():
    cfg = at.ATMCConfig(ratio=0.2, bits=4)
    model = at.compress_(small(), cfg)
    tuned = at.ATMCConfig(ratio=0.2, bits=4, rho=0.5, rho_factor=1.1, quant_interval=1, max_iter=5, tol=0.0)
    opt = at.ADMM(model, tuned, lr=0.05)
    torch.manual_seed(1)
    model(torch.rand(3, 1, 7, 7)).square().mean().backward()
    opt.step()
    assert opt.state["admm"]["quant_steps"] == 1  # quant_interval=1 of the tuned config ran
    assert opt.param_groups[0]["rho"] == pytest.approx(0.55)


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"lr": math.inf}, "lr"),
        ({"lr": True}, "lr"),
        ({"weight_decay": math.nan}, "weight_decay"),
        ({"momentum": math.inf}, "momentum"),
        ({"check_finite": "no"}, "check_finite"),  # a truthy string would have meant True
        ({"nesterov": 1}, "nesterov"),
    ],
)
def test_admm_hyperparameters_are_checked(kw, name):
    cfg = at.ATMCConfig(ratio=0.2, bits=4)
    model = at.compress_(small(), cfg)
    with pytest.raises(ValueError, match=rf"ADMM: {name} must be"):
        at.ADMM(model, cfg, **kw)


def test_admm_load_state_dict_of_another_model_fails_before_loading_anything():
    cfg = at.ATMCConfig(ratio=0.2, bits=4)
    x = torch.rand(2, 1, 7, 7)
    model = at.compress_(small(), cfg)
    opt = at.ADMM(model, cfg, lr=0.05)
    model(x).sum().backward()
    opt.step()
    wider = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 12))
    other = at.compress_(wider, cfg)
    other_opt = at.ADMM(other, cfg, lr=0.5)
    other(x).sum().backward()
    other_opt.step()
    mom = opt.store.mom.clone()
    with pytest.raises(
        ValueError,
        match=r"ADMM.load_state_dict: the momentum of parameter \d+ is \(12, \d+\), the parameter \(10, \d+\)",
    ):
        opt.load_state_dict(other_opt.state_dict())
    assert torch.equal(opt.store.mom, mom) and opt.param_groups[0]["lr"] == 0.05  # nothing loaded
    with pytest.raises(ValueError, match="ADMM.load_state_dict: expected an optimizer state_dict"):
        opt.load_state_dict({"a": 1})
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="ADMM.load_state_dict: the state holds parameter groups of"):
        opt.load_state_dict(sgd.state_dict())
    opt.load_state_dict(opt.state_dict())  # its own state still loads


# --- finalize_ ------------------------------------------------------------------------------------


def test_finalize_refuses_an_unknown_floor_and_leaves_the_model_alone():
    cfg = at.ATMCConfig(ratio=0.2, bits=4)
    model = at.compress_(small(), cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"finalize_: floor must be None or one of .*, got 'row'"):
        at.finalize_(model, floor="row")
    assert not at.is_finalized(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_finalize_refuses_a_floor_over_half_the_budget_and_leaves_the_model_alone():
    model = at.compress_(nn.Sequential(nn.Linear(16, 8)), at.ATMCConfig(nnz=4, floor="none", bits=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"finalize_: the layer floor \(floor='rows'\) needs 8 of the 4 nonzeros"):
        at.finalize_(model, floor="rows")  # (it used to keep all 8 row entries: twice the budget)
    assert not at.is_finalized(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    at.finalize_(model, floor="none", check_input=False)
    assert 0 < sum(int((p != 0).sum()) for n, p in model.named_parameters() if n.split(".")[-1] in "UVC") <= 4


def test_finalize_auto_floor_is_the_floor_compress_resolved():
    cfg = at.ATMCConfig(ratio=0.2, bits=4)
    a, b = at.compress_(small(), cfg), at.compress_(small(), cfg)
    assert a.atmc_floor == "rows"  # "auto" resolved by compress_ (it would be "last" if read literally)
    at.finalize_(a, floor="auto", check_input=False)
    at.finalize_(b, check_input=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- attacks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", [at.pgd, at.fgsm, at.fgsm_rs, at.n_fgsm, at.wrm, at.apgd_ce, at.robust_attack])
@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_attacks_refuse_non_finite_inputs(attack, bad):
    torch.manual_seed(0)
    model = small().eval()
    x, y = torch.rand(3, 1, 7, 7), torch.tensor([0, 1, 2])
    x[1, 0, 3, 2] = bad
    kw = {"eps": 0.1} if attack is at.robust_attack else {}
    with pytest.raises(ValueError, match="attack inputs must lie in \\[0, 1\\] and be finite"):
        attack(model, x, y, **kw)


@pytest.mark.parametrize(
    "attack, kw, match",
    [
        (at.pgd, {"steps": 2.5}, "pgd needs steps >= 0 and alpha >= 0"),  # was: TypeError from range()
        (at.pgd, {"steps": True}, "pgd needs steps >= 0"),
        (at.pgd, {"alpha": math.inf}, "pgd needs steps >= 0 and alpha >= 0"),
        (at.pgd, {"eps": "0.1"}, "eps must be a finite number >= 0, got '0.1'"),  # was: TypeError from math
        (at.fgsm, {"eps": None}, "eps must be a finite number >= 0, got None"),
        (at.wrm, {"steps": "3"}, "wrm needs gamma > 0, steps >= 0"),  # was: TypeError comparing str and int
        (at.n_fgsm, {"k": math.nan}, "n_fgsm needs alpha >= 0 and k >= 0"),
        (at.apgd_ce, {"steps": 3.0}, "apgd_ce needs steps >= 1 and n_restarts >= 1"),
        (at.robust_suite, {"eps": 0.1, "square_queries": 1.5}, "robust_suite needs steps, n_target_classes"),
    ],
)
def test_attack_arguments_of_the_wrong_type_are_value_errors(attack, kw, match):
    torch.manual_seed(0)
    x, y = torch.rand(3, 1, 7, 7), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=match):
        attack(small().eval(), x, y, **kw)


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, value",
    [
        ("meta", {"out": Path("runs")}),
        ("meta", {"cfg": at.ATMCConfig(ratio=0.1)}),  # config_to_dict(cfg) is the loadable form
        ("extra", {"ids": range(3)}),
    ],
)
def test_save_checkpoint_refuses_what_load_checkpoint_would_refuse(tmp_path, where, value):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model=small(), meta={"model": "old"}, epoch=1)
    kw = {"meta": {"model": "new"}, "extra": None, where: value}
    with pytest.raises(ValueError, match=rf"save_checkpoint: {where}\['\w+'\] is a \w+"):
        save_checkpoint(path, model=small(), epoch=2, **kw)
    assert load_checkpoint(path)["epoch"] == 1  # the previous checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"model": None}, "model must be an nn.Module"),
        ({"epoch": "3"}, "epoch must be an int >= 0"),
        ({"epoch": 1.5}, "epoch must be an int >= 0"),
        ({"step": -1}, "step must be an int >= 0"),
        ({"meta": [("model", "x")]}, "meta and extra must be dicts"),
    ],
)
def test_save_checkpoint_argument_errors(tmp_path, kw, match):
    args = {"model": small(), "meta": {}, **kw}
    with pytest.raises(ValueError, match=f"save_checkpoint: {match}"):
        save_checkpoint(tmp_path / "m.pt", **args)
    assert not list(tmp_path.iterdir())


def test_check_loadable_accepts_everything_a_training_checkpoint_holds(tmp_path):
    cfg = at.ATMCConfig(ratio=0.2, bits=4, layer_bits={"3": 2})
    model = at.compress_(small(), cfg)
    opt = at.ADMM(model, cfg)
    model(torch.rand(2, 1, 7, 7)).sum().backward()
    opt.step()
    from atmc_triton.checkpoint import check_loadable, config_to_dict

    meta = {"atmc": config_to_dict(cfg), "shape": torch.Size([1, 7, 7]), "dtype": torch.float32, "ids": {1, 2}}
    save_checkpoint(tmp_path / "m.pt", model=model, meta=meta, optimizer=opt, epoch=1, step=1)
    assert load_checkpoint(tmp_path / "m.pt")["meta"]["ids"] == {1, 2}
    check_loadable(torch.load(tmp_path / "m.pt", weights_only=True))


def test_a_set_of_strings_survives_the_checksum_and_a_frozenset_is_refused_before_writing(tmp_path):
    """A set's order changes when it is unpickled (string hashes are salted per process; here, in the same
    process, a 6-string set came back reordered): its digest was that order, so the file read as corrupted."""
    tags = {"alpha", "beta", "gamma", "delta", "eps", "zeta"}
    save_checkpoint(tmp_path / "m.pt", model=small(), meta={"model": "toy"}, extra={"tags": tags})
    assert load_checkpoint(tmp_path / "m.pt")["extra"]["tags"] == tags
    with pytest.raises(ValueError, match=r"extra\['v'\] is a frozenset"):
        save_checkpoint(tmp_path / "f.pt", model=small(), meta={}, extra={"v": frozenset({"x", "y"})})
    assert not (tmp_path / "f.pt").exists()


@pytest.mark.parametrize("where, match", [(0, "must be a torch device"), ("meta", "'meta' holds no data")])
def test_load_checkpoint_refuses_a_map_location_that_is_no_device_or_meta(tmp_path, where, match):
    save_checkpoint(tmp_path / "m.pt", model=small(), meta={})  # was: "corrupted (TypeError)" / NotImplementedError
    with pytest.raises(ValueError, match=f"load_checkpoint: map_location .*{match}"):
        load_checkpoint(tmp_path / "m.pt", map_location=where)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "where, match", [("cuda", "asks for CUDA, which is not available"), ("gpu0", "must be a torch device")]
)
def test_load_checkpoint_blames_the_device_not_the_file(tmp_path, where, match):
    save_checkpoint(tmp_path / "m.pt", model=small(), meta={})
    with pytest.raises(ValueError, match=f"load_checkpoint: map_location .*{match}") as e:  # was: "corrupted"
        load_checkpoint(tmp_path / "m.pt", map_location=where)
    assert "corrupted" not in str(e.value)
    assert load_checkpoint(tmp_path / "m.pt", map_location=torch.device("cpu"))["epoch"] == 0


# --- packed files ---------------------------------------------------------------------------------


@pytest.fixture
def packed():
    cfg = at.ATMCConfig(ratio=0.2, bits=4)
    model = at.compress_(small(), cfg)
    at.finalize_(model, check_input=False)
    return at.pack_(model)


def test_save_packed_to_a_directory_is_a_value_error(packed, tmp_path):
    with pytest.raises(ValueError, match="save_packed: .* is a directory; give a file name"):
        at.save_packed(packed, tmp_path)


def test_an_interrupted_save_packed_leaves_the_previous_file_intact(packed, tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    n = at.save_packed(packed, path)
    old = path.read_bytes()
    import safetensors.torch

    def half_then_crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(old[: n // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        at.save_packed(packed, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left
    monkeypatch.undo()
    x = torch.rand(2, 1, 7, 7)
    assert torch.equal(at.load_packed(small(1), path)(x), packed(x))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "device, match",
    [("cuda", "device 'cuda' requested but no CUDA GPU is available"), ("gpu0", "device must be a torch device")],
)
def test_load_packed_blames_the_device_not_the_file(packed, tmp_path, device, match):
    path = tmp_path / "m.safetensors"
    at.save_packed(packed, path)
    with pytest.raises(ValueError, match=f"load_packed: {match}"):
        at.load_packed(small(), path, device=device)


# --- the CLI and the protocol ------------------------------------------------------------------


@pytest.mark.parametrize("device", ["bogus", "meta", "cuda:x"])
def test_bad_device_is_a_one_line_error(device, capsys):
    with pytest.raises(ValueError, match=f"device must be 'auto', 'cpu', 'cuda' or 'cuda:INDEX', got '{device}'"):
        init_from_env(device)
    assert main(["train", "--device", device, "--epochs", "0", "--atmc-epochs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"atmc: error: device must be 'auto', 'cpu', 'cuda' or 'cuda:INDEX', got '{device}'"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"wrm_gamma": 0.0}, "wrm_gamma must be a finite number > 0"),
        ({"wrm_gamma": math.nan}, "Protocol.wrm_gamma must be a finite number, got nan"),
        ({"wrm_steps": -1}, "wrm_steps must be >= 0"),
        ({"wrm_lr": -1.0}, "wrm_lr finite and >= 0"),
    ],
)
def test_protocol_checks_wrm_settings_before_any_training(kw, match):
    with pytest.raises(ValueError, match=match):
        Protocol(**{**PROTOCOLS["digits"].__dict__, **kw})


def test_cli_refuses_a_bad_wrm_gamma_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--attacks", "pgd,wrm", "--wrm-gamma", "0", "--out", str(out), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "atmc: error: wrm_gamma must be a finite number > 0, got 0.0"
    assert not out.exists()  # nothing was trained


# --- docstring examples -------------------------------------------------------------------------

PUBLIC_MODULES = ("__init__", "api", "budget", "checkpoint", "config", "export", "layers", "optim", "packed")


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_docstring_examples_run(name):
    """The examples in the public API's docstrings print what they say (four had gone stale)."""
    import doctest
    import importlib
    import warnings

    mod = importlib.import_module("atmc_triton" if name == "__init__" else f"atmc_triton.{name}")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = doctest.DocTestFinder().find(mod, globs={"torch": torch, "nn": nn, **vars(mod)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CollapseWarnings of the tiny example models
        for t in tests:
            runner.run(t, out=lambda s: None)
    res = runner.summarize(verbose=False)
    assert res.attempted > 0 and res.failed == 0, f"{res.failed} of {res.attempted} examples in {name} failed"


# --- a rerun that forgot --resume ---------------------------------------------------------------------

TINY = ["--subset", "128", "--test-subset", "16", "--epochs", "1", "--atmc-epochs", "1", "--pgd-steps", "2"]
TINY += ["--eval-pgd-steps", "2", "--eval-size", "16", "--no-progress", "--attacks", "pgd", "--no-natural-baseline"]


def test_a_rerun_without_resume_moves_the_earlier_checkpoints_aside(tmp_path, capsys):
    from pipeline_helpers import one_thread

    out = tmp_path / "run"
    with one_thread():
        assert main(["train", *TINY, "--out", str(out)]) == 0
        saved = {p.name: p.read_bytes() for p in out.glob("*.pt")}
        assert sorted(saved) == ["atmc.pt", "atmc_final.pt", "dense.pt"]
        log, results = (out / "metrics.jsonl").read_text(), (out / "results.json").read_text()
        capsys.readouterr()
        assert main(["train", *TINY, "--out", str(out)]) == 0  # the README's main job, run twice: it starts over
        err = capsys.readouterr().err
        (aside,) = out.glob("earlier_*")
        moved = "dense.pt, atmc.pt, atmc_final.pt, results.json"
        assert f"held an earlier run ({moved}): moved to {aside} (metrics.jsonl copied)" in err
        assert {p.name: p.read_bytes() for p in aside.glob("*.pt")} == saved  # before: dense.pt rewritten at epoch 1
        # the first run's log and results too (the rerun dropped its records from metrics.jsonl: 2026-12-01)
        assert (aside / "metrics.jsonl").read_text() == log and (aside / "results.json").read_text() == results
        assert (out / "metrics.jsonl").read_text() != log and (out / "results.json").exists()
        assert sorted(p.name for p in out.glob("*.pt")) == sorted(saved)  # the new run's own
        assert main(["train", *TINY, "--out", str(out), "--resume"]) == 0
        assert len(list(out.glob("earlier_*"))) == 1  # --resume moves nothing
        # the README's sweep from the run's dense checkpoint into the same directory writes other stages: kept
        sweep = [
            "sweep",
            *TINY[:-1],
            "--ratios",
            "0.05",
            "--dense-checkpoint",
            str(out / "dense.pt"),
            "--out",
            str(out),
        ]
        assert main(sweep) == 0
        assert (out / "dense.pt").exists() and len(list(out.glob("earlier_*"))) == 1
        records = [json.loads(ln)["stage"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
        assert main(sweep) == 0
        moved = [sorted(p.name for p in d.iterdir()) for d in sorted(out.glob("earlier_*"))]
        assert len(moved) == 2
        assert sorted(["atmc_r0.05.pt", "atmc_r0.05_final.pt", "metrics.jsonl", *SWEEP_FILES]) in moved
        # the train run's records stay in the log; the sweep stage's are the new run's
        assert [st for st in records if st != "atmc_r0.05"] == [
            json.loads(ln)["stage"] for ln in (out / "metrics.jsonl").read_text().splitlines() if "atmc_r0.05" not in ln
        ]


@pytest.mark.parametrize("where", ["file", "file/sub"])
def test_an_out_path_blocked_by_a_file_is_a_one_line_error_before_training(tmp_path, capsys, where):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / where
    assert main(["train", *TINY, "--out", str(out)]) == 2  # was a FileExistsError traceback after an epoch
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"atmc: error: --out {out}: cannot create the output directory (")
    assert not any(line.startswith("stage=") for line in err)  # nothing trained


@pytest.mark.parametrize(
    "args, match",
    [
        (["--suite", "apgd", "--autoattack", "no"], "give suite= or use_autoattack=, not both"),
        (["--suite", "autoattack"], "AutoAttack is not installed"),
    ],
)
def test_a_suite_that_cannot_run_is_refused_before_training(tmp_path, capsys, args, match):
    from atmc_triton.attacks import autoattack_available

    if "autoattack" in args and autoattack_available():
        pytest.skip("fra31's autoattack is installed here")
    out = tmp_path / "run"
    tiny = [a for a in TINY if a not in ("--attacks", "pgd")]  # the suite runs with the apgd attack
    assert main(["train", *tiny, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert match in err[-1] and not any(line.startswith("stage=") for line in err)  # was: after training
    assert not (out / "natural.pt").exists() and not (out / "dense.pt").exists()


def test_eval_model_check_accepts_the_model_names_train_accepts(tmp_path, capsys):
    ck = tmp_path / "dense.pt"
    meta = {"model": "tv:resnet18", "dataset": "digits", "stage": "dense", "atmc": None}
    save_checkpoint(ck, model=small(), meta=meta)
    assert main(["eval", str(ck), "--model", "timm:convnext_atto"]) == 2  # was: argparse "invalid choice"
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"atmc: error: checkpoint {str(ck)!r} holds model 'tv:resnet18', not 'timm:convnext_atto'"


def test_a_layer_bits_key_that_matches_no_layer_is_refused():
    cfg = at.ATMCConfig(ratio=0.2, bits=4, layer_bits={"3": 2, "fc": 2})  # the Linear is "3": "fc" is a typo
    model = small()
    with pytest.raises(
        ValueError, match=r"compress_: ATMCConfig.layer_bits \['fc'\] matches no layer being compressed"
    ):
        at.compress_(model, cfg)
    assert not at.atmc_layers(model)  # refused before any swap
    at.compress_(model, at.ATMCConfig(ratio=0.2, bits=4, layer_bits={"3": 2, "[0-9]": 3}))
    assert [layer.nbits for _, layer in at.atmc_layers(model)] == [3, 2]  # exact names before patterns
    with pytest.raises(ValueError, match=r"matches no layer being compressed"):  # "0" is excluded
        at.compress_(small(), at.ATMCConfig(ratio=0.2, bits=4, layer_bits={"0": 2}, exclude=["0"]))


def test_cli_layer_bits_typo_fails_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--layer-bits", "fc=2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("atmc: error: --layer-bits fc matches no layer of digits_cnn (layers: ")
    assert not (out / "dense.pt").exists()


def test_sweep_refuses_a_repeated_ratio(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sweep", *TINY[:-1], "--ratios", "0.05,0.02,0.050", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "atmc: error: --ratios repeats a ratio (0.05, 0.02, 0.05): each one names its stage's checkpoints"
    assert not out.exists()  # was: the second 0.05 overwrote the first one's checkpoints and log records


def test_negative_eval_size_names_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--eval-size", "-1"])
    assert e.value.code == 2  # was: "atmc: error: subset size must be >= 1, got -1", after loading the data
    assert (
        capsys.readouterr().err.strip() == "atmc train: error: argument --eval-size: must be >= 0, got -1 (see --help)"
    )


@pytest.fixture(scope="module")
def digits16():
    return at.load_dataset("digits", subset=32, test_subset=16)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"model_name": "vgg"}, "Experiment: unknown model 'vgg'"),  # was: at the first new_model()
        ({"protocol": {"eps": 0.1}}, "Experiment: protocol must be a Protocol, got dict"),
        ({"attacks": ("pgd", "cw")}, r"Experiment: unknown attack\(s\) \['cw'\]"),  # was: after training
        ({"eval_size": -1}, "Experiment.eval_size must be an int >= 0, got -1"),
        ({"eval_batch_size": 0}, "Experiment.eval_batch_size must be an int >= 1, got 0"),
        ({"square_queries": 0}, "Experiment.square_queries must be an int >= 1, got 0"),
        ({"n_target_classes": 0}, "Experiment.n_target_classes must be an int >= 1, got 0"),
        ({"max_nonfinite": 0}, "Experiment.max_nonfinite must be an int >= 1, got 0"),
    ],
)
def test_experiment_checks_its_arguments_when_built(digits16, kw, match):
    args = {"model_name": "digits_cnn", "data": digits16, "protocol": PROTOCOLS["digits"], **kw}
    with pytest.raises(ValueError, match=match):
        at.Experiment(**args)


def test_evaluate_batch_size_and_schedule_hyperparameters_are_checked(digits16):
    with pytest.raises(ValueError, match="evaluate: batch_size must be an int >= 1, got 0"):  # was ZeroDivisionError
        at.evaluate(small(), digits16.test, PROTOCOLS["digits"], attacks=("pgd",), batch_size=0)
    with pytest.raises(ValueError, match="Schedule: momentum and weight_decay must be >= 0, got -1"):
        at.Schedule(epochs=1, lr=0.1, momentum=-1)


def test_no_progress_also_silences_the_compress_and_finalize_bars(digits16, monkeypatch, capsys):
    import atmc_triton.api as api

    monkeypatch.setattr(api, "PROGRESS_MIN_WEIGHTS", 0)  # every model counts as large (bars on by default)
    exp = at.Experiment("digits_cnn", digits16, PROTOCOLS["digits"], eval_size=0, progress=False, attacks=("pgd",))
    capsys.readouterr()
    exp.compress(exp.new_model(), at.ATMCConfig(ratio=0.05, bits=4), at.Schedule(epochs=0, lr=0.1))
    err = capsys.readouterr().err
    assert "compress_" not in err and "finalize_" not in err  # was: both bars drawn under --no-progress
    exp = at.Experiment("digits_cnn", digits16, PROTOCOLS["digits"], eval_size=0, progress=True, attacks=("pgd",))
    exp.compress(exp.new_model(), at.ATMCConfig(ratio=0.05, bits=4), at.Schedule(epochs=0, lr=0.1))
    assert "compress_" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["tv:vit_b_16", "timm:convnext_atto"])
def test_a_model_that_cannot_take_the_inputs_is_a_one_line_error_before_training(tmp_path, capsys, model):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--model", model, "--out", str(out)]) == 2  # was a traceback at the first step
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"atmc: error: model '{model}' cannot be built for inputs (1, 8, 8): "  # torchvision's ViT asserts
        if model == "tv:vit_b_16"
        else f"atmc: error: --model {model} cannot run on digits inputs [1, 1, 8, 8]: "
    )
    assert not (out / "dense.pt").exists()


def test_admm_state_dict_carries_the_voided_step_count():
    cfg = at.ATMCConfig(ratio=0.2, bits=4)
    model = at.compress_(small(), cfg)
    opt = at.ADMM(model, cfg, check_finite=False)
    for bad in (True, False, True):
        opt.zero_grad()
        model(torch.rand(2, 1, 7, 7)).sum().backward()
        if bad:
            opt.store.grad[0] = math.nan
        opt.step()
    assert int(opt.nonfinite_steps) == 2
    sd = opt.state_dict()
    assert opt.state["admm"] == {"step": 3, "quant_steps": 0}  # the live state is untouched
    twin = at.compress_(small(), cfg)
    twin.load_state_dict(model.state_dict())
    resumed = at.ADMM(twin, cfg, check_finite=False)
    resumed.load_state_dict(sd)
    assert int(resumed.nonfinite_steps) == 2 and resumed.state["admm"] == {"step": 3, "quant_steps": 0}  # was 0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"subset": 0}, "load_dataset: subset must be None or an int >= 1, got 0"),  # was: "subset size ..."
        ({"subset": 1.5}, "load_dataset: subset must be None or an int >= 1, got 1.5"),  # was: a slicing TypeError
        ({"test_subset": -2}, "load_dataset: test_subset must be None or an int >= 1, got -2"),
        ({"seed": "a"}, "load_dataset: seed must be an int, got 'a'"),  # was: a RuntimeError from manual_seed
    ],
)
def test_load_dataset_names_its_bad_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        at.load_dataset("digits", **kw)


def test_a_data_root_that_is_a_file_is_called_so(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"data root '.*f' is not a directory; pass --data-root DIR holding mnist"):
        at.load_dataset("mnist", tmp_path / "f")  # was: "does not exist"


# --- labels, frozen factors, unusable models (this sitting's audit leftovers) ----------------------


@pytest.mark.parametrize("attack", [at.pgd, at.fgsm, at.fgsm_rs, at.n_fgsm, at.wrm, at.apgd_ce])
@pytest.mark.parametrize("dtype", [torch.int32, torch.float32])
def test_attacks_name_labels_that_are_not_int64(attack, dtype):
    x, y = torch.rand(3, 1, 7, 7), torch.tensor([0, 1, 2], dtype=dtype)
    with pytest.raises(ValueError, match=f"labels must be int64 \\(torch.long\\) class indices, got {dtype}"):
        attack(small().eval(), x, y)  # was: cross_entropy's "expected target dtype to be Long or Byte"


def test_split_stores_integer_labels_as_int64_and_refuses_others():
    from atmc_triton.data import Split

    x = torch.rand(4, 1, 7, 7)
    s = Split(x, torch.tensor([0, 1, 2, 1], dtype=torch.int32))
    assert s.y.dtype == torch.long and s.take(torch.arange(4))[1].tolist() == [0, 1, 2, 1]
    for bad in (torch.zeros(4), torch.zeros(4, dtype=torch.bool)):
        with pytest.raises(ValueError, match="Split needs integer class labels y"):
            Split(x, bad)
    with pytest.raises(ValueError, match="Split needs uint8 or floating-point x, got torch.int64"):
        Split(x.long(), s.y)


def test_admm_refuses_frozen_factors():
    cfg = at.ATMCConfig(ratio=0.5, bits=4)
    model = at.compress_(small(), cfg)
    model[0].C.requires_grad_(False)
    with pytest.raises(ValueError, match=r"ADMM: factors \['0.C'\] have requires_grad=False"):
        at.ADMM(model, cfg)  # was: accepted, and the frozen factor moved anyway


def test_compress_refuses_meta_weights_and_a_filter_fn_that_is_not_callable():
    with torch.device("meta"):
        model = small()
    with pytest.raises(ValueError, match="compress_: 0 has meta-device weights"):
        at.compress_(model, at.ATMCConfig(ratio=0.5, bits=4))  # was: "Tensor.item() cannot be called on meta"
    with pytest.raises(TypeError, match="compress_: filter_fn must be callable"):
        at.compress_(small(), at.ATMCConfig(ratio=0.5, bits=4), filter_fn=True)  # was: "'bool' object is not callable"


class _TiedLM(nn.Module):
    """A language-model head tied to its embedding (GPT-2's ``lm_head.weight = wte.weight``), and a layer
    registered under two names (one module: not a tie), and an attention block (its own children)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mix = nn.Linear(8, 8)
        self.mix_again = self.mix
        self.lm_head = nn.Linear(8, 11, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        h = self.wte(ids)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.lm_head(self.mix_again(torch.relu(self.mix(h))))


def test_compress_refuses_tied_parameters_and_leaves_the_model_alone():
    """``compress_`` gave a head tied to an embedding factors of its own: the tie was silently gone (the
    embedding trained alone, the budget counted the matrix twice). It now names the tie and the way out."""
    model = _TiedLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"tied parameters: lm_head\.weight \(also wte\.weight\)\. .*exclude"):
        at.compress_(model, at.ATMCConfig(ratio=0.3, bits=4))
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.wte.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match=r"stay dense .*: wte \(Embedding"):
        at.compress_(model, at.ATMCConfig(ratio=0.3, bits=4, exclude=("lm_head",)))  # the way out it names
    assert model.lm_head.weight is model.wte.weight and model.mix is model.mix_again  # shared: swapped once
    assert isinstance(model.mix, at.ATMCLinear) and isinstance(model.attn, at.ATMCMultiheadAttention)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 11)
    two = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    two[1].bias = two[0].bias  # a tie between two compressible layers: both named
    with pytest.raises(ValueError, match=r"0\.bias \(also 1\.bias\); 1\.bias \(also 0\.bias\)"):
        at.compress_(two, at.ATMCConfig(ratio=0.3, bits=4))


def test_under_several_ranks_each_error_line_names_its_rank(monkeypatch, capsys):
    from atmc_triton import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    monkeypatch.setattr(distributed, "rank", lambda: 3)
    assert main(["train", "--device", "bogus", "--epochs", "0", "--atmc-epochs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # was: N identical "atmc: error: ..." lines
    assert err[-1] == "atmc [rank 3/4]: error: device must be 'auto', 'cpu', 'cuda' or 'cuda:INDEX', got 'bogus'"


def test_progress_lines_stay_on_rank_0_without_the_error_prefix(monkeypatch, capsys):
    from atmc_triton import cli, distributed

    cli._say("[atmc] a progress line")
    assert capsys.readouterr().err == "[atmc] a progress line\n"
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    monkeypatch.setattr(distributed, "rank", lambda: 3)
    cli._say("[atmc] a progress line")  # was printed by every rank as "atmc [rank 3/4]: [atmc] ..." (a shadowed _say)
    assert capsys.readouterr().err == ""


# --- numbers: numpy scalars are accepted and stored as builtins; non-integers where ints go are refused ----------


def test_numpy_numbers_are_stored_as_builtins_that_serialize(tmp_path):
    np = pytest.importorskip("numpy")
    cfg = at.ATMCConfig(ratio=np.float64(0.05), bits=np.int64(4), layer_bits={"0": np.int32(2)}, rho=np.float32(0.5))
    assert cfg == at.ATMCConfig(ratio=0.05, bits=4, layer_bits={"0": 2}, rho=0.5) and hash(cfg) == hash(
        at.ATMCConfig(ratio=0.05, bits=4, layer_bits={"0": 2}, rho=0.5)
    )
    assert (type(cfg.bits), type(cfg.rho), type(cfg.layer_bits[0][1])) == (int, float, int)
    # was: the first checkpoint after pretraining refused meta['protocol']['eps'] (a float32), json.dumps too
    p = Protocol(eps=np.float32(0.25), pgd_steps=np.int64(3), guard_drop=np.float64(0.2), fallback_steps=np.int64(7))
    s = at.Schedule(epochs=np.int64(2), lr=np.float32(0.1), lr_schedule="step", milestones=[np.int64(1)])
    assert (type(p.eps), type(p.pgd_steps), type(s.epochs), type(s.lr), type(s.milestones[0])) == (
        float,
        int,
        int,
        float,
        int,
    )
    assert json.loads(json.dumps(asdict(p)))["eps"] == float(np.float32(0.25))
    model = small()
    at.compress_(model, cfg, progress=False)
    opt = at.ADMM(model, cfg, lr=np.float32(0.01), momentum=np.float64(0.9))
    assert type(opt.param_groups[0]["lr"]) is float
    save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, meta={"protocol": asdict(p), "schedule": asdict(s)})
    assert load_checkpoint(tmp_path / "c.pt")["meta"]["protocol"]["pgd_steps"] == 3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Protocol(eps=0.1, pgd_steps=2.5), "Protocol.pgd_steps must be an int, got 2.5"),  # was: accepted
        (lambda: Protocol(eps=0.1, pgd_steps=True), "Protocol.pgd_steps must be an int, got True"),
        (lambda: Protocol(eps=0.1, pgd_steps=None), "Protocol.pgd_steps must be an int, got None"),  # not optional
        (lambda: Protocol(eps=None, pgd_steps=3), "Protocol.eps must be a finite number, got None"),
        (lambda: Protocol(eps=0.1, pgd_steps=3, apgd_steps=1.5), "Protocol.apgd_steps must be an int"),
        (lambda: Protocol(eps=0.1, pgd_steps=3, guard_size=2.5), "Protocol.guard_size must be an int"),
        (lambda: Protocol(eps=0.1, pgd_steps=3, fallback_steps=1.5), "Protocol.fallback_steps must be an int"),
        (lambda: Protocol(eps="0.1", pgd_steps=3), "Protocol.eps must be a finite number, got '0.1'"),  # TypeError
        (lambda: Protocol(eps=0.1, pgd_steps=3, pgd_alpha=math.inf), "Protocol.pgd_alpha must be a finite number"),
        (lambda: at.Schedule(epochs=2.5, lr=0.1), "Schedule.epochs must be an int, got 2.5"),
        (lambda: at.Schedule(epochs=2, lr=0.1, batch_size=1.5), "Schedule.batch_size must be an int"),
        (lambda: at.Schedule(epochs=2, lr=math.inf), "Schedule.lr must be a finite number, got inf"),
        (lambda: at.Schedule(epochs=2, lr=0.1, nesterov=1), "Schedule.nesterov must be True or False"),
        (lambda: at.Schedule(epochs=3, lr=0.1, milestones=(2.5,)), "milestones must be a sequence of int"),  # was 2
        (lambda: at.Schedule(epochs=3, lr=0.1, milestones=2), "milestones must be a sequence of int epochs, got 2"),
        (lambda: at.ATMCConfig(ratio=0.1, bits=4.0), "ATMCConfig.bits must be an int in 1..8, got 4.0"),
    ],
)
def test_numbers_of_the_wrong_kind_are_refused_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"seed": 1.5}, "Experiment.seed must be an int, got 1.5"),  # was: at the first new_model()
        ({"seed": "0"}, "Experiment.seed must be an int, got '0'"),
        ({"resume": "no"}, "Experiment.resume must be True or False, got 'no'"),  # a non-empty string resumed
    ],
)
def test_experiment_checks_seed_and_flags(digits16, kw, match):
    with pytest.raises(ValueError, match=match):
        at.Experiment("digits_cnn", digits16, PROTOCOLS["digits"], **kw)


# --- export, DDP, models, the factor store (the 2026-11-30 audit) -----------------------------------


def test_export_cleans_a_compressed_model_nested_in_another():
    """compress_'s budget buffers, config and input hook sit on the module it was given: a nested one kept them."""
    torch.manual_seed(0)
    inner = at.compress_(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), at.ATMCConfig(nnz=20))
    model = nn.Sequential(nn.Identity(), inner)
    model(torch.ones(1, 6))
    plain = at.export_dense(model)
    twin = nn.Sequential(nn.Identity(), nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)))
    twin.load_state_dict(plain.state_dict())  # (was: unexpected keys 1.atmc_nnz_budget, 1.atmc_bits_budget)
    assert not any("atmc" in k for m in plain.modules() for k in vars(m)) and not plain[1]._forward_pre_hooks
    assert torch.equal(plain(torch.ones(1, 6)), model(torch.ones(1, 6)))


def test_wrap_ddp_keeps_the_callers_ignore_list(monkeypatch):
    from atmc_triton import distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "broadcast_", lambda tensors, src=0: None)

    class FakeDDP(nn.Module):  # (one process: what matters is the model it is handed)
        def __init__(self, module, **kw):
            super().__init__()
            self.module = module

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", FakeDDP)
    model = at.compress_(small(), at.ATMCConfig(ratio=0.2, bits=4))
    model._ddp_params_and_buffers_to_ignore = ["mine"]
    distributed.wrap_ddp(model, device="cpu")
    ignored = model._ddp_params_and_buffers_to_ignore
    assert ignored[0] == "mine" and set(distributed.atmc_state_names(model)) <= set(ignored)  # (was: replaced)


def test_all_reduce_checks_its_op_in_one_process_too():
    from atmc_triton.distributed import all_reduce_

    with pytest.raises(ValueError, match="op must be 'sum', 'max' or 'min', got 'mean'"):  # (a KeyError under 2+)
        all_reduce_(torch.ones(2), "mean")


def test_build_model_checks_normalization_and_image_shape():
    from atmc_triton.models import build_model

    with pytest.raises(ValueError, match=r"one value per input channel \(1\), got 3"):  # (failed in forward)
        build_model("lenet", 10, (1, 28, 28), mean=[0.4] * 3, std=[0.2] * 3)
    vit = build_model("timm:vit_tiny_patch16_224", 10, (3, 32, 64))  # (its width was ignored: forward failed)
    assert vit(torch.rand(1, 3, 32, 64)).shape == (1, 10)


def test_factor_store_refuses_a_layer_listed_twice():
    from atmc_triton.store import FactorStore

    layer = at.ATMCLinear(4, 3)
    with pytest.raises(ValueError, match="listed twice"):
        FactorStore([layer, layer])


def test_compress_warns_about_an_all_zero_layer():
    """torchvision's ViT head starts at zero: no entry wins the top-k or the floor, so it stayed zero for good, and
    the only warning came at finalize_ (suggesting floor='rows', which does not help)."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    nn.init.zeros_(model[2].weight)
    with pytest.warns(at.CollapseWarning, match=r"the weight of '2' is all zeros.*Initialize it before compress_"):
        at.compress_(model, at.ATMCConfig(ratio=0.5, bits=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", at.CollapseWarning)  # a live model gets no such warning
        at.compress_(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), at.ATMCConfig(ratio=0.5, bits=4))

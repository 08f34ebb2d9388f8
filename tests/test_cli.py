"""The ``atmc`` command: the default pipeline's code path (reduced), real-MNIST smoke run through every stage,
``eval``, ``sweep`` (CSV + PNG), ``--help``, and one-line errors for bad arguments."""

import contextlib
import csv
import io
import json
import subprocess
import sys
import time

import pytest
import torch
from pipeline_helpers import MNIST_ROOT, ROOT, have_mnist, one_thread
from procwatch import IDLE_S

from atmc_triton.checkpoint import save_checkpoint
from atmc_triton.cli import RECIPES, _parser, main
from atmc_triton.models import build_model
from atmc_triton.train import PROTOCOLS

FAST = [
    "--epochs",
    "1",
    "--atmc-epochs",
    "1",
    "--pgd-steps",
    "2",
    "--eval-pgd-steps",
    "2",
    "--apgd-steps",
    "3",
    "--eval-size",
    "16",
    "--no-progress",
    "--autoattack",
    "no",
]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """``atmc train`` on the embedded digits, as with no arguments but tiny (the same code path)."""
    out = tmp_path_factory.mktemp("digits")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["train", "--subset", "256", "--test-subset", "64", "--out", str(out), *FAST])
    (out / "stdout.txt").write_text(printed.getvalue())
    return rc, out


def test_default_train_path_prints_the_table(digits_run, capsys):
    rc, out = digits_run
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in rows] == ["dense-natural (undefended)", "dense-adversarial", "ATMC-compressed"]
    dense, atmc = rows[1], rows[2]
    assert dense["ratio"] == 1.0 and dense["size_bits"] == 4_834_304
    assert atmc["size_bits"] <= 0.02 * 4_834_304 and atmc["ratio"] <= 1 / 20  # the default is >= 20x smaller
    assert atmc["suite"] == "apgd-ce-3+apgd-t-3" and atmc["n"] == 64
    for r in rows:
        assert 0 <= r["robust_acc"] <= r["pgd_acc"] <= r["clean_acc"] <= 1 and r["wall_seconds"] > 0
        assert r["headline"] == "worst of PGD-2, apgd-ce-3+apgd-t-3" and sum(r["adv_hist"]) == 64
    # the printed table: the suite, the worst case as the headline, PGD as a named column, the flags
    text = (out / "stdout.txt").read_text()
    head = next(ln for ln in text.splitlines() if ln.startswith("| model |"))
    assert "| PGD-2 % | robust % (worst case, apgd-ce-3+apgd-t-3) | flags |" in head
    for r in rows:
        cells = [
            c.strip() for c in next(ln for ln in text.splitlines() if ln.startswith(f"| {r['model']} |")).split("|")
        ]
        assert cells[4].split()[0] == f"{100 * r['robust_acc']:.1f}"
        flagged = r["collapse"] is not None
        assert ("collapsed" in cells[5]) == flagged and ("collapsed" in cells[4]) == flagged
    assert "robust % = per-example worst of PGD-2, apgd-ce-3+apgd-t-3" in text
    assert "no FAB-T and no Square" in text and "--suite torchattacks" in text  # how to get the full suite
    for name in ("natural.pt", "dense.pt", "atmc.pt", "atmc_final.pt", "metrics.jsonl"):
        assert (out / name).is_file(), name


def test_default_recipe_is_the_documented_one():
    a = _parser().parse_args(["train"])
    assert (a.dataset, a.model, a.ratio, a.bits, a.eps, a.resume) == ("digits", None, None, None, None, False)
    r, p = RECIPES["digits"], PROTOCOLS["digits"]
    assert (r.model, r.ratio, r.bits, r.natural_baseline) == ("digits_cnn", 0.02, 4, True) and r.ratio <= 1 / 20
    # the evaluation: the best suite available, AutoAttack's settings but Square-1000 for digits (see README)
    assert (a.suite, a.apgd_steps, a.square_queries, r.square_queries) == ("auto", 100, None, 1000)
    assert all(RECIPES[k].square_queries == 5000 for k in ("mnist", "cifar10", "cifar100", "svhn"))
    assert (p.eps, p.pgd_steps, p.eval_steps, p.clean_weight) == (0.2, 10, 20, 0.5)
    assert (PROTOCOLS["mnist"].eps, PROTOCOLS["mnist"].pgd_steps, PROTOCOLS["mnist"].clean_weight) == (0.3, 16, 0.5)
    assert PROTOCOLS["mnist"].alpha == pytest.approx(2.5 * 0.3 / 16)
    for name in ("cifar10", "cifar100", "svhn"):
        assert (PROTOCOLS[name].eps, PROTOCOLS[name].pgd_steps) == (4 / 255, 7)
    assert PROTOCOLS["cifar10"].clean_weight == 0.5
    assert PROTOCOLS["cifar100"].clean_weight == PROTOCOLS["svhn"].clean_weight == 0
    assert (RECIPES["mnist"].model, RECIPES["cifar100"].model, RECIPES["svhn"].model) == (
        "lenet",
        "resnet34",
        "wrn16_8",
    )


def test_eval_command(digits_run, capsys):
    _, out = digits_run
    capsys.readouterr()
    rc = main(
        [
            "eval",
            str(out / "atmc_final.pt"),
            "--attack",
            "pgd",
            "fgsm",
            "wrm",
            "apgd",
            "--pgd-steps",
            "2",
            "--apgd-steps",
            "2",
            "--wrm-steps",
            "2",
            "--test-subset",
            "32",
            "--autoattack",
            "no",
            "--json",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 32 and res["ratio"] <= 0.02 and res["suite"] == "apgd-ce-2+apgd-t-2"
    assert all(res[k] is not None for k in ("clean_acc", "pgd_acc", "fgsm_acc", "wrm_acc", "robust_acc"))
    assert res["robust_acc"] <= min(res["pgd_acc"], res["fgsm_acc"])
    # the torchattacks suite through the command line (short settings: the CLI names the full ones)
    rc = main(
        [
            "eval",
            str(out / "atmc_final.pt"),
            "--test-subset",
            "16",
            "--pgd-steps",
            "2",
            "--suite",
            "torchattacks",
            "--apgd-steps",
            "2",
            "--square-queries",
            "10",
        ]
    )
    text = capsys.readouterr().out
    assert (
        rc == 0 and "robust (per-example worst of PGD-2, aa-torchattacks(apgd-ce-2,apgd-t-2,fab-t-2,square-10))" in text
    )
    assert "flags:" in text and "--apgd-steps 100 --square-queries 5000" in text
    rc = main(["eval", str(out / "dense.pt"), "--attack", "pgd", "--eval-pgd-steps", "3", "--test-subset", "8"])
    assert rc == 0 and "PGD-3" in capsys.readouterr().out  # (it was ignored: PGD-20, the checkpoint's protocol)
    rc = main(["eval", str(out / "dense.pt"), "--attack", "fgsm", "--test-subset", "16"])
    text = capsys.readouterr().out
    assert rc == 0 and "FGSM:" in text and "TA" in text and "PGD" not in text
    # channels_last gives the same accuracies; fewer APGD-T targets are named in the suite label
    rc = main(["eval", str(out / "dense.pt"), "--attack", "fgsm", "--test-subset", "16", "--channels-last"])
    assert rc == 0 and capsys.readouterr().out.split("FGSM:")[1].split("\n")[0] == text.split("FGSM:")[1].split("\n")[0]
    args = ["eval", str(out / "dense.pt"), "--attack", "apgd", "--suite", "apgd", "--target-classes", "2"]
    rc = main([*args, "--test-subset", "8", "--apgd-steps", "2"])
    assert rc == 0 and "apgd-ce-2+apgd-t-2-2targets" in capsys.readouterr().out


def test_sweep_writes_csv_and_figure(digits_run, tmp_path):
    _, out = digits_run
    rc = main(
        [
            "sweep",
            "--ratios",
            "0.05,0.02",
            "--dense-checkpoint",
            str(out / "dense.pt"),
            "--subset",
            "256",
            "--test-subset",
            "64",
            "--out",
            str(tmp_path),
            *FAST,
        ]
    )
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    assert [r["model"] for r in rows] == ["dense-adversarial", "ATMC r=0.05", "ATMC r=0.02"]
    assert [float(r["target_ratio"]) for r in rows[1:]] == [0.05, 0.02]
    assert all(float(r["ratio"]) <= float(r["target_ratio"]) for r in rows[1:])
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not have_mnist(), reason=f"real MNIST not found under {MNIST_ROOT}")
def test_real_mnist_smoke_through_every_stage(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--dataset",
            "mnist",
            "--data-root",
            str(MNIST_ROOT),
            "--subset",
            "512",
            "--test-subset",
            "128",
            "--batch-size",
            "64",
            "--ratio",
            "0.01",
            "--bits",
            "4",
            "--out",
            str(tmp_path),
            *FAST,
        ]
    )
    assert rc == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in rows] == ["dense-adversarial", "ATMC-compressed"]
    assert rows[0]["dense_bits"] == 13_776_000 and rows[1]["size_bits"] <= 0.01 * 13_776_000
    assert rows[1]["nnz"] <= int(torch.load(tmp_path / "atmc.pt", weights_only=True)["model"]["atmc_nnz_budget"])
    table = capsys.readouterr().out
    assert "| ATMC-compressed |" in table and "lenet on mnist" in table
    meta = torch.load(tmp_path / "atmc_final.pt", weights_only=True)["meta"]
    assert (meta["model"], meta["dataset"], meta["stage"], meta["atmc"]["bits"]) == ("lenet", "mnist", "final", 4)


def test_help_texts(capsys):
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["sweep", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--ratio",
        "--bits",
        "--layer-bits",
        "--rho-factor",
        "--quant-interval",
        "--init",
        "--rank",
        "--eps",
        "--pgd-steps",
        "--clean-weight",
        "--data-root",
        "--resume",
        "--attack",
        "--ratios",
    ):
        assert flag in text, flag


def _error(argv, capsys) -> str:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc not in (0, None), argv
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_arguments_end_with_one_line(tmp_path, capsys, digits_run):
    _, out = digits_run
    assert "unknown model 'vgg'; choose from lenet" in _error(["train", "--model", "vgg"], capsys)
    assert "invalid choice: 'imagenet'" in _error(["train", "--dataset", "imagenet"], capsys)
    assert "does not exist" in _error(["train", "--dataset", "mnist", "--data-root", str(tmp_path / "no")], capsys)
    assert "cannot load cifar10" in _error(["train", "--dataset", "cifar10", "--data-root", str(tmp_path)], capsys)
    for ratio in ("1.5", "0", "-0.1"):
        assert "ratio must be a number in (0, 1)" in _error(["train", "--ratio", ratio], capsys)
    assert "not even one" in _error(["train", "--ratio", "1e-6", "--bits", "8"], capsys)
    assert "--ratio or --nnz" in _error(["train", "--ratio", "0.1", "--nnz", "10"], capsys)
    assert "bits must be" in _error(["train", "--bits", "9"], capsys)
    assert "unknown attack" in _error(["train", "--attacks", "pgd,cw"], capsys)
    assert "not both" in _error(["eval", str(out / "dense.pt"), "--suite", "apgd", "--autoattack", "no"], capsys)
    assert "disagree" in _error(["eval", str(out / "dense.pt"), "--pgd-steps", "2", "--eval-pgd-steps", "3"], capsys)
    # a checkpoint from another model
    fake = tmp_path / "lenet.pt"
    save_checkpoint(
        fake,
        model=build_model("lenet", 10, (1, 28, 28)),
        meta={
            "model": "lenet",
            "dataset": "mnist",
            "num_classes": 10,
            "in_shape": [1, 28, 28],
            "stage": "dense",
            "atmc": None,
        },
    )
    assert "model='lenet' (expected 'digits_cnn')" in _error(
        ["train", "--dense-checkpoint", str(fake), "--out", str(tmp_path / "o"), *FAST], capsys
    )
    assert "holds model 'digits_cnn', not 'lenet'" in _error(
        ["eval", str(out / "dense.pt"), "--model", "lenet"], capsys
    )
    assert "does not exist" in _error(["eval", str(tmp_path / "missing.pt")], capsys)
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)
    assert "refusing to load" in _error(["eval", str(evil)], capsys)


class _Evil:
    pass


def test_module_entry_point_exits_nonzero_without_traceback():
    """``python -m atmc_triton`` (what the ``atmc`` console script runs) in a real process."""
    proc = subprocess.run(
        [sys.executable, "-m", "atmc_triton", "train", "--ratio", "2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=IDLE_S,  # silent until it exits: no progress to watch, so the watchdog's idle limit
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "atmc: error: ATMCConfig.ratio must be a number in (0, 1), got 2.0"


@pytest.mark.parametrize("how, code, line", [("sigterm", 143, "terminated by SIGTERM"), ("ctrl-c", 130, "interrupted")])
def test_sigterm_and_ctrl_c_end_a_run_with_one_line_and_restore_the_handler(monkeypatch, capsys, how, code, line):
    import os
    import signal

    import atmc_triton.cli as cli

    def stopped(a):  # what arrives in the middle of a training run
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # was: the process died with no message
            time.sleep(5)  # the handler raises before this ends
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "cmd_train", stopped)
    assert cli.main(["train"]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"atmc: {line} (continue with --resume)"
    assert signal.getsignal(signal.SIGTERM) is before  # pytest's own handler is back


def test_under_torchrun_sigterm_keeps_its_default_action(monkeypatch):
    import signal

    import atmc_triton.cli as cli

    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank blocked in a collective must die at once, as the agent expects
    monkeypatch.setattr(cli, "cmd_train", lambda a: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    assert cli.main(["train"]) == 0 and seen and seen[0] is not cli._on_sigterm


def test_sigterm_during_a_checkpoint_load_is_not_read_as_a_corrupted_file(monkeypatch, capsys):
    import os
    import signal

    import torch as t

    import atmc_triton.cli as cli
    from atmc_triton.checkpoint import load_checkpoint

    def load(*a, **k):  # SIGTERM while torch.load runs
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(t, "load", load)
    monkeypatch.setattr(cli, "cmd_train", lambda a: load_checkpoint(__file__))
    assert cli.main(["train"]) == 143  # was: 'error: ... corrupted' and exit code 2 (load_checkpoint's except)
    assert capsys.readouterr().err.strip().splitlines()[-1] == "atmc: terminated by SIGTERM (continue with --resume)"

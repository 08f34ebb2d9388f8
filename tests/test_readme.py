"""The README's Python snippets run as written and its command lines parse (docs that match the code).

Each Python block runs with only its free names supplied (``model``, ``loader``) and a small stand-in for the
ViT it downloads no weights for."""

import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import atmc_triton as at
from atmc_triton.data import iterate_batches

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def _run(i: int, ns: dict) -> dict:
    exec(compile(BLOCKS[i], f"README.md python block {i}", "exec"), ns)  # noqa: S102 - our own README
    return ns


def test_the_readme_has_the_blocks_these_tests_run():
    assert len(BLOCKS) == 3, [b.splitlines()[0] for b in BLOCKS]  # a new block needs a test here


def test_quickstart_block_trains_compresses_packs_and_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes model.safetensors
    model = _toy()
    split = at.load_dataset("digits", subset=64).train
    loader = list(iterate_batches(split, 32, generator=torch.Generator().manual_seed(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 1 % budget on a toy model: floor / collapse warnings are not the point
        ns = _run(0, {"model": model, "loader": loader})
    assert isinstance(ns["opt"], torch.optim.Optimizer) and isinstance(ns["model"][0], at.PackedConv2d)
    fresh = at.load_packed(_toy().to("meta"), tmp_path / "model.safetensors")
    x = loader[0][0]
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)  # the saved file is the trained model


def _toy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def test_drop_in_block_runs_on_a_small_vit(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    tv = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    def small_vit(num_classes: int) -> nn.Module:  # vit_b_16's class with 1 layer of width 32
        torch.manual_seed(0)
        return VisionTransformer(224, 32, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=num_classes)

    monkeypatch.setattr(tv.models, "vit_b_16", small_vit)
    monkeypatch.chdir(tmp_path)  # it writes vit.onnx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # finalize_ without training: a collapse warning, as the block says
        ns = _run(1, {})
    assert ns["report"].swapped and (tmp_path / "vit.onnx").stat().st_size > 0
    assert not any(isinstance(m, at.ATMCLayer) for m in ns["plain"].modules())


def test_floor_block_builds_its_config():
    cfg = _run(2, {"at": at})["cfg"]
    assert (cfg.floor, cfg.exclude, cfg.bits) == ("rows", ("fc",), 4)


def _commands() -> list[str]:
    """The command lines of the README's bash blocks (continuations joined, comments dropped)."""
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [shlex.split(c, comments=True) for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return lines


def test_the_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    tests = [c for c in _commands() if "pytest" in c]
    assert len(tests) == 1 and shlex.split(ci) == tests[0], (ci, tests)


def test_every_readme_command_line_parses():
    from atmc_triton.cli import _parser
    from bench.mnist_study import PRESETS, config_from_args, parser, points

    seen = {"atmc": 0, "study": 0}
    for argv in _commands():
        for i, word in enumerate(argv):
            if word.endswith("atmc") or (word == "atmc_triton" and argv[i - 1] == "-m"):  # atmc ... / -m atmc_triton
                _parser().parse_args(argv[i + 1 :])  # an unknown flag or a bad value exits (SystemExit)
                seen["atmc"] += 1
                break
            if word == "bench.mnist_study":
                points(config_from_args(parser("study", "", PRESETS, "reduced").parse_args(argv[i + 1 :]), PRESETS))
                seen["study"] += 1
                break
    assert seen == {"atmc": 9, "study": 2}, seen  # every line was found (README's main job and torchrun included)

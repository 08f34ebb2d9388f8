"""``atmc train --model tv:NAME`` / ``timm:NAME``: any torchvision or timm classifier, built for the dataset."""

import pytest
import torch

import atmc_triton as at
from atmc_triton.cli import main
from atmc_triton.models import build_model

FAST = ["--epochs", "1", "--atmc-epochs", "1", "--pgd-steps", "1", "--eval-pgd-steps", "1", "--apgd-steps", "1"]


@pytest.mark.parametrize(
    ("name", "shape"),
    [("tv:resnet18", (1, 8, 8)), ("timm:convnext_atto", (1, 32, 32)), ("tv:vit_b_16", (3, 32, 32))],
)
def test_build_model_sets_classes_and_channels(name, shape):
    model = build_model(name, 7, shape, mean=[0.5] * shape[0], std=[0.25] * shape[0])
    assert model(torch.rand(2, *shape)).shape == (2, 7)
    assert isinstance(model[0], at.models.Normalize)


def test_build_model_rejects_unknown_architectures():
    with pytest.raises(ValueError, match="torchvision has no classification model 'nope'"):
        build_model("tv:nope", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="timm has no model 'nope'"):
        build_model("timm:nope", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="unknown model 'keras:x'"):
        build_model("keras:x", 10, (3, 32, 32))


@pytest.mark.slow
def test_train_runs_a_torchvision_model_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "tv:mobilenet_v3_small", "--subset", "64", "--test-subset", "16", "--out", str(out)]
    assert main([*args, *FAST, "--batch-size", "32"]) == 0
    assert (out / "atmc_final.pt").is_file()
    assert main(["eval", str(out / "atmc_final.pt"), "--attack", "fgsm", "--test-subset", "16"]) == 0


def test_bad_model_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model", "resnet18"])
    assert e.value.code == 2 and "tv:NAME" in capsys.readouterr().err

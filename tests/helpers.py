"""Small models and utilities shared by the tests."""

import torch
from torch import nn

import atmc_triton as at


def lenet() -> nn.Module:
    """Caffe-LeNet shapes (conv20 5x5, pool, conv50 5x5, pool, fc500, fc10)."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )


def small_cnn(c: int = 3, classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 7, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(28, 9), nn.ReLU(), nn.Linear(9, classes),
    )


def factor_nnz(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for _, layer in at.atmc_layers(model) for _, p in layer.factors())


def train_steps(model, opt, steps: int, x: torch.Tensor, y: torch.Tensor, check=None):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if check is not None:
            check()

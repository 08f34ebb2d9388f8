"""Small models and utilities shared by the tests."""

import numpy as np
import torch
from hypothesis import strategies as st
from torch import nn

import atmc_triton as at

SEGMENT_KINDS = ("normal", "heavy", "dups", "sparse")


@st.composite
def segment(draw, max_len: int = 300, kinds: tuple[str, ...] = SEGMENT_KINDS) -> np.ndarray:
    """A float32 1-D array for the quantizer tests: ``normal``, heavy-tailed, few repeated values,
    sparse, all ``zeros``, or ``tiny`` (around 2^b nonzeros: kept exactly or just not)."""
    n = draw(st.integers(0, max_len))
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "heavy":
        x = rng.standard_t(1.5, n)
    elif kind == "dups":
        x = rng.integers(-3, 4, n) * 0.25
    elif kind == "sparse":
        x = rng.standard_normal(n) * (rng.random(n) < 0.2)
    elif kind == "zeros":
        x = np.zeros(n)
    elif kind == "tiny":
        x = rng.standard_normal(min(n, draw(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17]))))
    else:
        raise ValueError(f"unknown segment kind {kind!r}")
    return x.astype(np.float32)


def lenet() -> nn.Module:
    """Caffe-LeNet shapes (conv20 5x5, pool, conv50 5x5, pool, fc500, fc10)."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 500),
        nn.ReLU(),
        nn.Linear(500, 10),
    )


def small_cnn(c: int = 3, classes: int = 5) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 7, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(28, 9),
        nn.ReLU(),
        nn.Linear(9, classes),
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

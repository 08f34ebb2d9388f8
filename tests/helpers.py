"""Small models and utilities shared by the tests."""

import numpy as np
import torch
from hypothesis import example
from hypothesis import strategies as st
from torch import nn

import atmc_triton as at

SEGMENT_KINDS = ("normal", "heavy", "dups", "sparse", "zeros", "tiny", "ties", "onesided", "boundary", "constant")
EDGES = ("nnz <= 2^b", "nnz = 2^b + 1", "all equal", "single nonzero", "one-sided", "heavy ties", "all zero")


@st.composite
def segment(draw, max_len: int = 300, kinds: tuple[str, ...] = SEGMENT_KINDS, b: int | None = None) -> np.ndarray:
    """A float32 1-D array for the quantizer tests: ``normal``, heavy-tailed, few repeated values
    (``dups``), ``sparse``, all ``zeros``, ``tiny`` (1..17 nonzeros), heavy ``ties`` (most of the
    mass on one value, a few others), ``onesided`` (positive with a few small negatives), or
    ``constant`` (one nonzero value and zeros), or
    ``boundary``: ``2^b - 1 .. 2^b + 1`` nonzeros, or as many distinct values with duplicates
    (``b`` drawn in 1..8 unless given). :func:`edges` tells which edge cases a draw hits."""
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
    elif kind == "ties":
        x = np.where(rng.random(n) < 0.6, 0.75, rng.integers(-5, 7, n) * 0.3)
    elif kind == "onesided":
        x = np.abs(rng.standard_normal(n)) + 0.5
        x[rng.random(n) < 0.03] *= -0.2
    elif kind == "boundary":
        K = 2 ** (b if b is not None else draw(st.integers(1, 8)))
        m = K + draw(st.sampled_from([-1, 0, 1, 1]))
        vals = rng.standard_normal(max(m, 1))[:m]
        if draw(st.booleans()):  # the same distinct values, duplicated
            vals = vals[rng.integers(0, max(m, 1), max(m, 3 * m))] if m else vals
            vals[:m] = rng.permutation(vals[:m])
        x = np.concatenate([vals, np.zeros(draw(st.integers(0, 5)))])
    elif kind == "constant":
        x = np.where(rng.random(n) < 0.8, np.float32(rng.standard_normal()), 0.0)
    else:
        raise ValueError(f"unknown segment kind {kind!r}")
    return x.astype(np.float32)


EDGE_SEGMENTS = (  # (segment, bits): the quantizer's edges, explicit examples of its hypothesis tests
    (np.array([0.5] * 40 + [0.0] * 3, np.float32), 1),  # all equal
    (np.array([0.0, 0.0, -3.0], np.float32), 2),  # a single nonzero
    (np.zeros(20, np.float32), 3),  # all zero
    (np.arange(1, 17, dtype=np.float32), 4),  # nnz = 2^b
    (np.arange(1, 18, dtype=np.float32), 4),  # nnz = 2^b + 1
    (np.repeat(np.arange(1, 17, dtype=np.float32), 7), 4),  # 2^b distinct values, duplicated
    (np.where(np.arange(200) % 5 < 3, 0.7, np.arange(200) % 12 * 0.3 - 1.5).astype(np.float32), 4),  # ties
    (np.concatenate([np.linspace(0.5, 3, 97), -np.linspace(0.05, 0.15, 3)]).astype(np.float32), 2),  # one-sided-ish
)


def edge_examples(test):
    """Add every :data:`EDGE_SEGMENTS` case as an ``@example(xb=...)`` of a ``@given(xb=...)`` test."""
    for xb in reversed(EDGE_SEGMENTS):
        test = example(xb=xb)(test)
    return test


def segment_and_bits(max_len: int = 300, max_bits: int = 8) -> st.SearchStrategy:
    """``(x, b)``: ``b`` in 1..max_bits and a :func:`segment` drawn for that ``b``."""
    return st.integers(1, max_bits).flatmap(lambda b: st.tuples(segment(max_len, b=b), st.just(b)))


def edges(x: np.ndarray, b: int) -> set[str]:
    """The edge cases of :data:`EDGES` that segment ``x`` hits at ``b`` bits."""
    nz = x[x != 0]
    K, out = 2**b, set()
    if x.size == 0 or nz.size == 0:
        out.add("all zero")
    if 0 < nz.size <= K:
        out.add("nnz <= 2^b")
    if nz.size == K + 1:
        out.add("nnz = 2^b + 1")
    if nz.size >= 2 and np.all(nz == nz[0]):
        out.add("all equal")
    if nz.size == 1:
        out.add("single nonzero")
    if nz.size >= 2 and (np.mean(nz > 0) >= 0.9 or np.mean(nz < 0) >= 0.9):
        out.add("one-sided")
    if nz.size >= 4 and np.unique(nz, return_counts=True)[1].max() >= 0.5 * nz.size:
        out.add("heavy ties")
    return out


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

"""Shared fixtures of the pipeline tests: a quickly trained digits model, one-thread torch, MNIST location."""

import contextlib
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from atmc_triton.data import iterate_batches, load_dataset
from atmc_triton.models import build_model

ROOT = Path(__file__).resolve().parents[1]
MNIST_ROOT = ROOT.parent / "shared" / "data"  # ../shared/data relative to the repo (CI has real MNIST there)


def have_mnist() -> bool:
    return (MNIST_ROOT / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) with one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.cache
def digits():
    return load_dataset("digits")


@functools.cache
def _trained_digits_state(epochs: int = 12) -> dict:
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, (1, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    d = digits()
    with one_thread():
        for e in range(epochs):
            for x, y in iterate_batches(d.train, 64, generator=torch.Generator().manual_seed(e)):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_digits_model() -> nn.Module:
    """A naturally trained digits_cnn (about 97% test accuracy), fresh copy each call, in eval mode."""
    model = build_model("digits_cnn", 10, (1, 8, 8))
    model.load_state_dict(_trained_digits_state())
    return model.eval()

"""Operator registration shared by the kernel families.

Every family registers one ``torch.library`` op per entry point. With Triton present the op
is a :func:`torch.library.triton_op` (its launcher calls kernels through ``wrap_triton``, so
``torch.compile(fullgraph=True)`` traces into it) and the pure-PyTorch reference is its CPU
kernel. Without Triton the reference is the only kernel. Nothing here probes hardware.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable

import torch

__all__ = ["HAS_TRITON", "register_op"]


def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


HAS_TRITON: bool = _has_triton()


def register_op(
    name: str,
    *,
    reference: Callable,
    fake: Callable,
    launcher: Callable | None = None,
    mutates_args: Iterable[str] = (),
):
    """Register ``atmc::<name>``; ``launcher`` (Triton) serves non-CPU devices when available.

    ``reference`` and ``launcher`` must share one annotated signature. ``fake`` computes output
    metadata only (it is used by the no-Triton op; ``triton_op`` traces the launcher instead).
    """
    qualname = f"atmc::{name}"
    mutates_args = tuple(mutates_args)
    if launcher is not None and HAS_TRITON:
        op = torch.library.triton_op(qualname, launcher, mutates_args=mutates_args)
        op.register_kernel("cpu")(reference)
    else:
        op = torch.library.custom_op(qualname, reference, mutates_args=mutates_args)
        op.register_fake(fake)
    return op

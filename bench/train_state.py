"""Training-state bytes of ATMC per factor init: ``python -m bench.train_state [--models lenet,digits_cnn,resnet34]``.

Per model (the registry's dataset shape: LeNet 1x28x28, the digits CNN 1x8x8, ResNet34 3x32x32) and per
``init`` (``identity``, the reference's ``W = U (V + I) + C``, against ``sparse``, ``W = C``), the model is
compressed (ratio 0.01, 8 bits), one ADMM step is taken on a batch of 2, and the bytes are counted from the
module and the optimizer, not estimated: parameters, buffers (Z, u, masks, codebooks, norm statistics),
gradients and momentum buffers, each tensor once. ``dense SGD`` is the same count for the dense model
under momentum SGD. Activations and the step's transient scratch are not included. Prints a Markdown
table; counts, not timings, so the machine's load does not matter.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import atmc_triton as at
from atmc_triton.models import build_model

SHAPES = {"lenet": (1, 28, 28), "digits_cnn": (1, 8, 8), "resnet34": (3, 32, 32)}


def _unique_bytes(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            n += t.nbytes
    return n


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, buffers, gradients and momenta held by ``model`` and ``opt`` (each tensor once)."""
    params = list(model.parameters())
    moms = [s.get("momentum_buffer") for p, s in opt.state.items() if isinstance(p, torch.Tensor)]
    out = {
        "params": _unique_bytes(params),
        "buffers": _unique_bytes(model.buffers()),
        "grads": _unique_bytes(p.grad for p in params),
        "momentum": _unique_bytes(moms),
    }
    out["total"] = sum(out.values())
    return out


def measure(name: str, init: str | None) -> dict[str, int]:
    """One step of ATMC (``init``) or, for ``None``, of dense momentum SGD; returns :func:`state_bytes`."""
    torch.manual_seed(0)
    model = build_model(name, 10, SHAPES[name])
    x, y = torch.rand(2, *SHAPES[name]), torch.tensor([0, 1])
    if init is None:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        cfg = at.ATMCConfig(ratio=0.01, bits=8, init=init)
        at.compress_(model, cfg, progress=False)
        opt = at.ADMM(model, cfg, lr=0.01, momentum=0.9)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return state_bytes(model, opt)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="lenet,digits_cnn,resnet34", help="comma-separated: " + ", ".join(SHAPES))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    mib = 2.0**20
    cols = ["model", "dense SGD MiB", "identity MiB", "sparse MiB", "sparse / identity"]
    cols += ["identity: params / buffers / grads / momentum MiB", "sparse: the same"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for name in a.models.split(","):
        dense, ident, sparse = (measure(name, init) for init in (None, "identity", "sparse"))
        split = [
            " / ".join(f"{s[k] / mib:.2f}" for k in ("params", "buffers", "grads", "momentum")) for s in (ident, sparse)
        ]
        print(
            f"| {name} | {dense['total'] / mib:.2f} | {ident['total'] / mib:.2f} | {sparse['total'] / mib:.2f} | "
            f"{sparse['total'] / ident['total']:.3f} | {split[0]} | {split[1]} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

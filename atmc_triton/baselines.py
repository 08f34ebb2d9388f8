"""The paper's pruning baselines: global magnitude pruning to a size budget, then fine-tuning with the mask fixed.

* **AP** (adversarial pruning): a dense adversarially trained model, pruned with
  :func:`magnitude_prune_`, fine-tuned with PGD training under :class:`MaskedSGD`;
* **NAP** (natural pruning): the same from a naturally trained model with natural fine-tuning.

Pruned weights stay 32-bit floats, so a budget of ``ratio`` times the dense 32-bit size allows
``nnz = floor(ratio * dense_bits / 32)`` nonzeros (:func:`nnz_for_ratio`; ``ratio`` read as the
decimal it prints as, like ATMC's own budget); one global magnitude threshold spans every
``nn.Linear`` / ``nn.Conv2d`` weight (biases and norms are neither pruned nor counted, as in
:mod:`atmc_triton.budget`). :func:`pruned_size` reports the
size in the same conventions as :func:`atmc_triton.size_report`. Models with an
``nn.MultiheadAttention`` are refused (``ValueError``): its ``in_proj_weight`` is no layer's
``.weight``, so it would be neither pruned nor counted (ATMC compresses it).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> masks = magnitude_prune_(model, nnz_for_ratio(model, 0.25))
    >>> opt = MaskedSGD(model, masks, lr=0.1, momentum=0.9)
    >>> model(torch.randn(3, 8)).sum().backward(); opt.step()
    >>> pruned_size(model)["nnz"] <= 10
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from atmc_triton.budget import dense_bits, ratio_bits, unwrap
from atmc_triton.config import _is_int, _is_real
from atmc_triton.kernels.packed_format import choose_format, factor_nbytes

__all__ = ["MaskedSGD", "magnitude_masks", "magnitude_prune_", "nnz_for_ratio", "prunable", "pruned_size"]

Filter = Callable[[nn.Module, str], bool]


def prunable(model: nn.Module, filter_fn: Filter | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` / ``nn.Conv2d`` that ``filter_fn(module, name)`` accepts.

    Raises ``ValueError`` for a model with an ``nn.MultiheadAttention`` (see the module docstring)."""
    attn = [n for n, m in unwrap(model).named_modules() if isinstance(m, nn.MultiheadAttention)]
    if attn:
        raise ValueError(
            f"the pruning baselines cover nn.Linear / nn.Conv2d weights only; {attn[0]!r} is an nn.MultiheadAttention "
            "whose in_proj_weight would be neither pruned nor counted"
        )
    return [
        (n, m)
        for n, m in unwrap(model).named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and (filter_fn is None or filter_fn(m, n))
    ]


def nnz_for_ratio(model: nn.Module, ratio: float) -> int:
    """Nonzero 32-bit weights that fit ``ratio`` of the dense 32-bit size: ``floor(ratio * dense_bits / 32)``,
    with ``ratio`` read as the decimal it prints as (:func:`atmc_triton.budget.ratio_bits`, ATMC's own budget).

    Example:
        >>> nnz_for_ratio(nn.Linear(100, 10), 0.01)
        10
    """
    if not (_is_real(ratio) and 0 < ratio <= 1):  # (numpy's numbers too; not a bool)
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    prunable(model)  # (refuses an attention model, whose dense size the baselines would not match)
    return ratio_bits(ratio, dense_bits(model)) // 32  # (a float product: 0.018 x LeNet's bits is 1 short)


@torch.no_grad()
def magnitude_masks(model: nn.Module, nnz: int, filter_fn: Filter | None = None) -> dict[str, Tensor]:
    """Bool masks (``{module name: mask shaped like its weight}``) keeping the ``nnz`` largest ``|w|`` over
    all prunable weights at once; ties go to the earlier weight (module order, then flat index).

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> _ = lin.weight.data.copy_(torch.tensor([[1.0, -5.0, 2.0], [0.5, 4.0, -3.0]]))
        >>> magnitude_masks(nn.Sequential(lin), 3)["0"].int().tolist()
        [[0, 1, 0], [0, 1, 1]]
    """
    layers = prunable(model, filter_fn)
    if not layers:
        raise ValueError("magnitude_masks: the model has no nn.Linear / nn.Conv2d weights to prune")
    total = sum(m.weight.numel() for _, m in layers)
    if not (_is_int(nnz) and 0 <= nnz <= total):  # (numpy's integers too; not a bool)
        raise ValueError(f"magnitude_masks: nnz must be an int in [0, {total}], got {nnz!r}")
    nnz = int(nnz)
    mags = torch.cat([m.weight.detach().abs().reshape(-1).float().cpu() for _, m in layers])  # [total]
    if not torch.isfinite(mags).all():
        raise ValueError("magnitude_masks: the weights hold NaN or Inf")
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.sort(mags, descending=True, stable=True).indices[:nnz]] = True
    masks, start = {}, 0
    for name, m in layers:
        n = m.weight.numel()
        masks[name] = keep[start : start + n].view(m.weight.shape).to(m.weight.device)
        start += n
    return masks


@torch.no_grad()
def magnitude_prune_(model: nn.Module, nnz: int, filter_fn: Filter | None = None) -> dict[str, Tensor]:
    """Zero all but the ``nnz`` largest-magnitude weights (global, see :func:`magnitude_masks`), in place.

    Returns the masks, for :class:`MaskedSGD`.
    """
    masks = magnitude_masks(model, nnz, filter_fn)
    modules = dict(unwrap(model).named_modules())
    for name, mask in masks.items():
        modules[name].weight.mul_(mask)
    return masks


class MaskedSGD(torch.optim.SGD):
    """``torch.optim.SGD`` over all of ``model``'s parameters that keeps pruned weights at exactly zero.

    Before each step the gradients of pruned entries are zeroed (so momentum and weight decay
    never revive them), after it the weights are multiplied by their masks. ``state_dict`` is
    SGD's; the masks are not saved (rebuild them with :func:`magnitude_prune_` from the same model).

    Args:
        model: the pruned model; masks: ``{module name: bool mask}`` from :func:`magnitude_prune_`.
        lr, momentum, weight_decay, nesterov: as ``torch.optim.SGD``.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: dict[str, Tensor],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        modules = dict(unwrap(model).named_modules())
        pairs = []
        for name, mask in masks.items():
            mod = modules.get(name)
            if mod is None or not hasattr(mod, "weight") or mod.weight.shape != mask.shape:
                raise ValueError(f"MaskedSGD: mask {name!r} ({tuple(mask.shape)}) matches no weight of the model")
            if mask.dtype != torch.bool:
                raise ValueError(f"MaskedSGD: mask {name!r} must be bool, got {mask.dtype}")
            pairs.append((mod.weight, mask.to(mod.weight.device)))
        super().__init__(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        self.masks = pairs

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, m in self.masks:
            if p.grad is not None:
                p.grad.mul_(m)
        super().step()
        for p, m in self.masks:
            p.mul_(m)
        return loss


@torch.no_grad()
def pruned_size(model: nn.Module, filter_fn: Filter | None = None) -> dict[str, int]:
    """Size of a pruned dense model: ``size_bits`` = 32 x nonzeros (paper convention), ``dense_bits``,
    ``nnz`` and ``packed_bytes``: each weight as ``[out, in*kh*kw]`` in the smaller of dense and CSR
    raw-float32 storage (:mod:`atmc_triton.kernels.packed_format`, what :func:`atmc_triton.pack_` would
    write for a 32-bit factor).

    Example:
        >>> lin = nn.Linear(4, 2, bias=False)
        >>> _ = lin.weight.data.zero_().index_fill_(1, torch.tensor([0]), 1.0)
        >>> pruned_size(nn.Sequential(lin))["size_bits"]
        64
    """
    layers = prunable(model, filter_fn)
    if not layers:
        raise ValueError("pruned_size: the model has no nn.Linear / nn.Conv2d weights")
    nnz = packed = 0
    for _, m in layers:
        w = m.weight.detach()
        rows, cols = w.shape[0], w[0].numel()
        n = int(torch.count_nonzero(w))
        nnz += n
        packed += factor_nbytes(choose_format(rows, cols, n, 0, True), rows, cols, n, 0, True)
    return {
        "size_bits": 32 * nnz,
        "dense_bits": 32 * sum(m.weight.numel() for _, m in layers),
        "packed_bytes": packed,
        "nnz": nnz,
    }

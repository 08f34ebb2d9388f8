"""``compress_`` (swap dense layers for ATMC layers) and ``finalize_`` (commit to Z and the budget)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from atmc_triton.budget import atmc_layers, dense_bits, fit_budget_, nnz_budget, unwrap
from atmc_triton.config import ATMCConfig
from atmc_triton.kernels import project_topk_
from atmc_triton.layers import FACTORS, ATMCConv2d, ATMCLayer, ATMCLinear

__all__ = ["compress_", "finalize_", "is_finalized"]


def _default_filter(module: nn.Module, name: str) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


def compress_(
    model: nn.Module, cfg: ATMCConfig, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> nn.Module:
    """Swap every ``nn.Linear`` / ``nn.Conv2d`` (that ``filter_fn(module, name)`` accepts) for an
    :class:`ATMCLinear` / :class:`ATMCConv2d` built from its trained weights, in place.

    Also stores the global budget on the model as buffers ``atmc_nnz_budget`` (k) and
    ``atmc_bits_budget`` (bits, -1 for an explicit ``nnz``). Returns ``model``.

    Example:
        >>> import atmc_triton as at
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> at.compress_(model, at.ATMCConfig(ratio=0.05, bits=4))[2]
        ATMCLinear(in_features=144, out_features=10, rank=10, bits=4, bias=True)
    """
    if not isinstance(cfg, ATMCConfig):
        raise ValueError(f"compress_: cfg must be an ATMCConfig, got {type(cfg).__name__}")
    model = unwrap(model)
    if isinstance(model, (nn.Linear, nn.Conv2d, ATMCLayer)):
        raise ValueError("compress_ swaps submodules in place; wrap a bare layer first, e.g. nn.Sequential(layer)")
    if atmc_layers(model):
        raise ValueError("compress_: the model already has ATMC layers")
    keep = filter_fn or _default_filter
    targets = [(n, m) for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d)) and keep(m, n)]
    if not targets:
        raise ValueError("compress_: the model has nothing to compress (no nn.Linear / nn.Conv2d matched filter_fn)")
    swaps: dict[int, ATMCLayer] = {}
    for name, m in targets:
        if not m.weight.dtype.is_floating_point:
            raise ValueError(f"compress_: {name} has non-float weights ({m.weight.dtype})")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise ValueError(
                f"compress_: {name} is a grouped conv (groups={m.groups}); ATMC needs groups=1 "
                "(exclude it with filter_fn)"
            )
        if isinstance(m, nn.Conv2d) and len(m.kernel_size) != 2:
            raise ValueError(f"compress_: {name} is not 2-D")
        cls = ATMCConv2d if isinstance(m, nn.Conv2d) else ATMCLinear
        try:
            swaps[id(m)] = cls.from_dense(m, cfg, bits=cfg.bits_for(name))
        except ValueError as e:
            raise ValueError(f"compress_: {name}: {e}") from None
    for parent in model.modules():  # every reference, so shared modules stay shared
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in swaps:
                parent._modules[child_name] = swaps[id(child)]
    layers = atmc_layers(model)
    dense = dense_bits(model)
    k, budget = nnz_budget(layers, cfg, dense)
    dev = layers[0][1].C.device
    model.register_buffer("atmc_nnz_budget", torch.tensor(k, dtype=torch.int64, device=dev))
    model.register_buffer(
        "atmc_bits_budget", torch.tensor(-1 if budget is None else budget, dtype=torch.int64, device=dev)
    )
    return model


def is_finalized(model: nn.Module) -> bool:
    """Whether every ATMC layer of ``model`` went through :func:`finalize_`."""
    layers = atmc_layers(model)
    return bool(layers) and all(bool(layer.finalized) for _, layer in layers)


@torch.no_grad()
def finalize_(model: nn.Module) -> nn.Module:
    """Commit to the compressed model: every factor := its quantized copy Z, then the global top-k
    projection, then (for a ``ratio`` budget) the smallest entries are cut until
    :func:`atmc_triton.model_size_bits` fits the budget exactly. Codebooks become each factor's
    distinct nonzero values, masks its nonzeros, Z := W and u := 0. Returns ``model``.

    Example:
        >>> import atmc_triton as at
        >>> cfg = at.ATMCConfig(ratio=0.2, bits=2)
        >>> model = at.finalize_(at.compress_(nn.Sequential(nn.Linear(16, 8)), cfg))
        >>> at.model_size_bits(model) <= 0.2 * at.dense_bits(model)
        True
    """
    model = unwrap(model)
    layers = [layer for _, layer in atmc_layers(model)]
    if not layers:
        raise ValueError("finalize_: the model has no ATMC layers")
    k = int(model.atmc_nnz_budget)
    budget = int(model.atmc_bits_budget)
    segs = [(layer, f) for layer in layers for f in FACTORS]
    vals = []
    for layer, f in segs:
        src = getattr(layer, f"{f}_z") if layer.nbits is not None else getattr(layer, f)
        vals.append(src.detach().reshape(-1).float())
    flat = torch.cat(vals)
    offsets = [0]
    for v in vals:
        offsets.append(offsets[-1] + v.numel())
    project_topk_(flat, k)
    fit_budget_(flat, offsets, [layer.nbits for layer, _ in segs], k, None if budget < 0 else budget)
    flat.add_(0.0)  # -0.0 -> +0.0: zeros are implicit in every packed format
    for s, (layer, f) in enumerate(segs):
        p = getattr(layer, f)
        v = flat[offsets[s] : offsets[s + 1]].view(p.shape).to(p.dtype)
        p.copy_(v)
        getattr(layer, f"{f}_z").copy_(v)
        getattr(layer, f"{f}_u").zero_()
        getattr(layer, f"{f}_mask").copy_(v != 0)
        row = layer.codebook[FACTORS.index(f)]
        row.zero_()
        levels = torch.unique(v[v != 0])
        if layer.nbits is not None:
            if levels.numel() > 2**layer.nbits:
                raise AssertionError(f"factor {f} has {levels.numel()} levels > 2^{layer.nbits}")
            row[1 : 1 + levels.numel()] = levels.float()
    for layer in layers:
        layer.finalized.fill_(True)
    return model

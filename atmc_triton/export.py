"""``export_dense``: a plain-PyTorch copy of a compressed model, for ``torch.export`` / ONNX / serving.

Every :class:`~atmc_triton.ATMCLinear` / :class:`~atmc_triton.PackedLinear` becomes an
``nn.Linear``, every ATMC / packed conv an ``nn.Conv2d`` (groups, padding mode and all), every
:class:`~atmc_triton.ATMCMultiheadAttention` an ``nn.MultiheadAttention``, each holding the
effective weight ``U V + C`` (plus the identity term) in the layer's dtype. The copy has no ATMC
type, buffer, attribute or hook left. Its outputs equal the compressed model's bit for bit: an
ATMC layer computes exactly this weight and calls the same functional op (a packed *linear* layer
runs a fused kernel whose summation order differs, so against a packed model the copy agrees with
the finalized model it was packed from, and with the packed one to float tolerance).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from atmc_triton.budget import unwrap
from atmc_triton.layers import ATMCConv2d, ATMCLayer, ATMCLinear, ATMCMultiheadAttention

__all__ = ["export_dense"]

_ROOT_STATE = ("atmc_nnz_budget", "atmc_bits_budget")
_ROOT_ATTRS = ("atmc_config", "atmc_floor", "_atmc_input_spec")


def _weight(layer: nn.Module) -> torch.Tensor:
    dtype = layer.C.dtype if isinstance(layer, ATMCLayer) else layer._dtype
    return layer.weight_2d().detach().to(dtype).reshape(layer.weight_shape).clone()


def _plain(layer: nn.Module) -> nn.Module:
    from atmc_triton.packed import PackedConv2d, PackedLinear

    w = _weight(layer)
    dd = {"device": w.device, "dtype": w.dtype}
    bias = layer.bias is not None
    if isinstance(layer, (ATMCLinear, PackedLinear)):
        out = nn.Linear(layer.in_features, layer.out_features, bias=bias, **dd)
    elif isinstance(layer, (ATMCConv2d, PackedConv2d)):
        out = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            bias,
            layer.padding_mode,
            **dd,
        )
    else:
        raise ValueError(f"export_dense: cannot export {type(layer).__name__}")
    with torch.no_grad():
        out.weight.copy_(w)
        if bias:
            out.bias.copy_(layer.bias.detach())
    return out.train(layer.training)


def _plain_attention(m: ATMCMultiheadAttention, memo: dict) -> nn.MultiheadAttention:
    w_in = memo[id(m.in_proj)].weight
    out = nn.MultiheadAttention(
        m.embed_dim,
        m.num_heads,
        dropout=m.dropout,
        bias=m.in_proj.bias is not None,
        add_bias_kv=m.bias_k is not None,
        add_zero_attn=m.add_zero_attn,
        batch_first=m.batch_first,
        device=w_in.device,
        dtype=w_in.dtype,
    )
    with torch.no_grad():
        out.in_proj_weight.copy_(w_in)
        if out.in_proj_bias is not None:
            out.in_proj_bias.copy_(m.in_proj.bias.detach())
        out.out_proj = memo[id(m.out_proj)]
        if m.bias_k is not None:
            out.bias_k.copy_(m.bias_k.detach())
            out.bias_v.copy_(m.bias_v.detach())
    return out.train(m.training)


def export_dense(model: nn.Module) -> nn.Module:
    """A plain-PyTorch deep copy of ``model`` with every compressed layer made dense again.

    Works on ATMC models (finalized or not) and packed ones; ``model`` is left untouched and the
    ATMC training state (Z, u, masks, codebooks) is never copied.

    Example:
        >>> import torch, atmc_triton as at
        >>> m = at.compress_(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), at.ATMCConfig(nnz=20))
        >>> plain = at.export_dense(m)
        >>> type(plain[0]).__name__, torch.equal(plain(torch.ones(1, 6)), m(torch.ones(1, 6)))
        ('Linear', True)
    """
    from atmc_triton.packed import PackedLayer

    root = unwrap(model)
    if isinstance(root, (ATMCLayer, PackedLayer, ATMCMultiheadAttention)):
        raise ValueError("export_dense: pass the model, not a bare compressed layer (wrap it in nn.Sequential)")
    memo: dict = {}
    mods = list(root.modules())
    for m in mods:
        if isinstance(m, (ATMCLayer, PackedLayer)):
            memo[id(m)] = _plain(m)
    for m in mods:
        if isinstance(m, ATMCMultiheadAttention):
            memo[id(m)] = _plain_attention(m, memo)
    # tensors of the compressed layers are reached only through them: deepcopy skips them via the memo
    out = copy.deepcopy(root, memo)
    for m in out.modules():  # compress_'s state sits on the module it was given, which may be nested
        for key in _ROOT_STATE:
            m._buffers.pop(key, None)
        for key in _ROOT_ATTRS:
            m.__dict__.pop(key, None)
        for hid, hook in list(m._forward_pre_hooks.items()):
            if getattr(hook, "__name__", "") == "_record_input":
                del m._forward_pre_hooks[hid]
                m._forward_pre_hooks_with_kwargs.pop(hid, None)
    return out

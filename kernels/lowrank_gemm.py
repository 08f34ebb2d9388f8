"""Dequantize-sparse-lowrank linear layer: the PyTorch reference.

A finalized ATMC layer stores each factor as integer codes into a small codebook (slot 0 is
the pinned zero, see :mod:`atmc_triton.kernels.lloyd`). Its forward is

    y = x W^T + bias,   W = deq(U) deq(V) + deq(C)   (+ the identity of the identity init)

computed without forming W:  t = x deq(V)^T  [M, r],  y = t deq(U)^T + x deq(C)^T + bias.
``identity`` = 1 means W = (U + I) V + C (so y gains t, r = N); 2 means W = U (V + I) + C
(so t gains x, r = K); 0 means no identity term.
"""


import torch
from torch import Tensor

from ._registry import register_op

__all__ = ["IDENTITY_NONE", "IDENTITY_U", "IDENTITY_V", "dequantize", "atmc_linear", "atmc_linear_ref"]

IDENTITY_NONE, IDENTITY_U, IDENTITY_V = 0, 1, 2


def dequantize(codes: Tensor, book: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``book[codes]`` with the shape of ``codes`` (``book [slots]``, ``codes`` any integer dtype)."""
    return book.to(dtype).index_select(0, codes.reshape(-1).long()).view(codes.shape)


def _check(x: Tensor, u_codes: Tensor, v_codes: Tensor, c_codes: Tensor, bias: Tensor | None, identity: int):
    if x.dim() != 2:
        raise ValueError(f"atmc_linear: x must be [M, K], got {tuple(x.shape)}")
    K = x.shape[1]
    N, r = u_codes.shape
    if v_codes.shape != (r, K) or c_codes.shape != (N, K):
        raise ValueError(
            f"atmc_linear: shapes disagree: x [M, {K}], U {tuple(u_codes.shape)}, "
            f"V {tuple(v_codes.shape)}, C {tuple(c_codes.shape)}"
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"atmc_linear: bias must be [{N}], got {tuple(bias.shape)}")
    if identity not in (IDENTITY_NONE, IDENTITY_U, IDENTITY_V):
        raise ValueError(f"atmc_linear: identity must be 0, 1 or 2, got {identity}")
    if (identity == IDENTITY_U and r != N) or (identity == IDENTITY_V and r != K):
        raise ValueError(f"atmc_linear: identity={identity} needs r == {'N' if identity == 1 else 'K'}")


def atmc_linear_ref(
    x: Tensor,
    u_codes: Tensor,
    u_book: Tensor,
    v_codes: Tensor,
    v_book: Tensor,
    c_codes: Tensor,
    c_book: Tensor,
    bias: Tensor | None,
    identity: int,
) -> Tensor:
    """``y [M, N]`` for ``x [M, K]`` from coded factors ``U [N, r]``, ``V [r, K]``, ``C [N, K]``.

    Accumulates in float32 (float64 if ``x`` is float64) and returns ``x.dtype``.

    Example:
        >>> book = torch.zeros(257); book[1] = 1.0
        >>> eye = torch.eye(2, dtype=torch.int16)
        >>> y = atmc_linear_ref(torch.ones(1, 2), eye, book, eye, book, 0 * eye, book, None, 0)
        >>> y.tolist()
        [[1.0, 1.0]]
    """
    _check(x, u_codes, v_codes, c_codes, bias, identity)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    t = xf @ dequantize(v_codes, v_book, acc).T  # [M, r]
    if identity == IDENTITY_V:
        t = t + xf
    y = t @ dequantize(u_codes, u_book, acc).T + xf @ dequantize(c_codes, c_book, acc).T  # [M, N]
    if identity == IDENTITY_U:
        y = y + t
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def _atmc_linear_fake(x, u_codes, u_book, v_codes, v_book, c_codes, c_book, bias, identity):
    return x.new_empty(x.shape[0], u_codes.shape[0])


atmc_linear = register_op("atmc_linear", reference=atmc_linear_ref, fake=_atmc_linear_fake)

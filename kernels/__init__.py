"""ATMC kernels: each family's pure-PyTorch reference beside its Triton kernel.

Installed as ``atmc_triton.kernels``. Each entry point is a ``torch.library`` op in the
``atmc`` namespace (``torch.ops.atmc.*``); the reference is its CPU kernel.
"""

from ._registry import HAS_TRITON
from .admm import admm_dual_update, admm_dual_update_ref, admm_step, admm_step_ref, kth_largest, project_topk_
from .lloyd import MAX_BITS, NUM_SLOTS, errors_for_bits, errors_for_bits_ref, lloyd_quantize, lloyd_quantize_ref
from .lowrank_gemm import (
    IDENTITY_NONE,
    IDENTITY_U,
    IDENTITY_V,
    atmc_decode,
    atmc_linear,
    atmc_linear_ref,
    dequantize,
)

__all__ = [
    "HAS_TRITON",
    "IDENTITY_NONE",
    "IDENTITY_U",
    "IDENTITY_V",
    "MAX_BITS",
    "NUM_SLOTS",
    "admm_dual_update",
    "admm_dual_update_ref",
    "admm_step",
    "admm_step_ref",
    "atmc_decode",
    "atmc_linear",
    "atmc_linear_ref",
    "dequantize",
    "errors_for_bits",
    "errors_for_bits_ref",
    "kth_largest",
    "lloyd_quantize",
    "lloyd_quantize_ref",
    "project_topk_",
]

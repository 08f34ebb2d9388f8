"""atmc_triton: ATMC (Gui et al., NeurIPS 2019) robust model compression, fast on NVIDIA GPUs.

Every Linear/Conv2d weight becomes ``W = U V + C``; one global nonzero budget spans all
factors of all layers, every factor is quantized to ``2^b`` levels plus a pinned zero, and
ADMM couples the two constraints during (adversarial) training.

Example:
    >>> import torch, atmc_triton as at
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> cfg = at.ATMCConfig(ratio=0.1, bits=4)
    >>> at.compress_(model, cfg)                # in place
    >>> opt = at.ADMM(model, cfg, lr=0.05)
    >>> for _ in range(3):
    ...     opt.zero_grad(); model(torch.randn(8, 32)).square().mean().backward(); opt.step()
    >>> at.finalize_(model)                     # factors := quantized sparse Z, budget exact
    >>> at.model_size_bits(model) <= 0.1 * at.dense_bits(model)
    True
"""

from atmc_triton import kernels
from atmc_triton.api import compress_, finalize_, is_finalized
from atmc_triton.budget import (
    FactorSize,
    SizeReport,
    atmc_layers,
    dense_bits,
    factor_bits,
    model_size_bits,
    nnz_budget,
    size_report,
)
from atmc_triton.config import ATMCConfig
from atmc_triton.layers import ATMCConv2d, ATMCLayer, ATMCLinear, cached_weights
from atmc_triton.optim import ADMM
from atmc_triton.store import FactorStore

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "ATMCConfig",
    "ATMCConv2d",
    "ATMCLayer",
    "ATMCLinear",
    "FactorSize",
    "FactorStore",
    "SizeReport",
    "atmc_layers",
    "cached_weights",
    "compress_",
    "dense_bits",
    "factor_bits",
    "finalize_",
    "is_finalized",
    "kernels",
    "model_size_bits",
    "nnz_budget",
    "size_report",
]

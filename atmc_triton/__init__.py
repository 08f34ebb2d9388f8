"""atmc_triton: ATMC (Gui et al., NeurIPS 2019) robust model compression, fast on NVIDIA GPUs.

Every Linear/Conv2d weight becomes ``W = U V + C``; one global nonzero budget spans all
factors of all layers, every factor is quantized to ``2^b`` levels plus a pinned zero, and
ADMM couples the two constraints during (adversarial) training.

Example:
    >>> import torch, atmc_triton as at
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> cfg = at.ATMCConfig(ratio=0.1, bits=4)
    >>> _ = at.compress_(model, cfg)            # in place (returns model)
    >>> opt = at.ADMM(model, cfg, lr=0.05)
    >>> for _ in range(3):
    ...     opt.zero_grad(); model(torch.randn(8, 32)).square().mean().backward(); opt.step()
    >>> _ = at.finalize_(model)                 # factors := quantized sparse Z, budget exact
    >>> at.model_size_bits(model) <= 0.1 * at.dense_bits(model)
    True
"""

from atmc_triton import attacks, data, kernels, models, train
from atmc_triton.api import (
    CollapseWarning,
    CompressReport,
    check_input_dependence,
    compress_,
    finalize_,
    is_finalized,
)
from atmc_triton.attacks import (
    SuiteResult,
    apgd_ce,
    apgd_dlr,
    fgsm,
    fgsm_rs,
    n_fgsm,
    pgd,
    robust_attack,
    robust_suite,
    wrm,
)
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
from atmc_triton.checkpoint import export_safetensors, load_checkpoint, save_checkpoint
from atmc_triton.config import ATMCConfig
from atmc_triton.data import load_dataset
from atmc_triton.export import export_dense
from atmc_triton.layers import ATMCConv2d, ATMCLayer, ATMCLinear, ATMCMultiheadAttention, cached_weights
from atmc_triton.models import build_model
from atmc_triton.optim import ADMM
from atmc_triton.packed import (
    PackedConv2d,
    PackedLayer,
    PackedLinear,
    load_packed,
    pack_,
    packed_layers,
    packed_nbytes,
    save_packed,
    to_dense,
    unpack,
)
from atmc_triton.store import FactorStore
from atmc_triton.train import PROTOCOLS, EvalResult, Experiment, Protocol, Schedule, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "ATMCConfig",
    "ATMCConv2d",
    "ATMCLayer",
    "ATMCLinear",
    "ATMCMultiheadAttention",
    "CollapseWarning",
    "CompressReport",
    "EvalResult",
    "Experiment",
    "FactorSize",
    "FactorStore",
    "PackedConv2d",
    "PackedLayer",
    "PackedLinear",
    "PROTOCOLS",
    "Protocol",
    "Schedule",
    "apgd_ce",
    "apgd_dlr",
    "attacks",
    "build_model",
    "SizeReport",
    "atmc_layers",
    "cached_weights",
    "check_input_dependence",
    "compress_",
    "data",
    "dense_bits",
    "evaluate",
    "export_dense",
    "export_safetensors",
    "factor_bits",
    "fgsm",
    "fgsm_rs",
    "n_fgsm",
    "finalize_",
    "fit",
    "is_finalized",
    "kernels",
    "load_checkpoint",
    "load_dataset",
    "load_packed",
    "model_size_bits",
    "models",
    "nnz_budget",
    "pack_",
    "packed_layers",
    "packed_nbytes",
    "pgd",
    "robust_attack",
    "robust_suite",
    "SuiteResult",
    "save_checkpoint",
    "save_packed",
    "size_report",
    "to_dense",
    "train",
    "unpack",
    "wrm",
]

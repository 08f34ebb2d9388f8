"""Per-layer bit allocation under one size budget (a greedy knapsack on a one-shot distortion proxy).

At a small ``ratio`` the codebooks dominate the budget: a factor with ``n`` nonzeros at ``b`` bits
costs ``n b + 32 min(2^b, n)`` bits (:mod:`atmc_triton.budget`), so 8-bit factors leave few
nonzeros (Caffe-LeNet at ratio 1e-3: 453 nonzeros at 8 bits, 3,060 at 4 bits). Fewer bits buy
more nonzeros at the price of a coarser quantizer. :func:`allocate_bits` picks each layer's
bits to minimise, over the compressed model's initial factors,

``D(b) = sum over layers l of (pruning error + Lloyd error of the kept entries)_l / ||factors_l||^2``

where the kept entries are the global top-``k(b)`` magnitudes and ``k(b)`` is the largest count
whose cost fits ``ratio`` x 32 bits per weight of the compressed layers (exactly
:func:`atmc_triton.compress_`'s rule, :func:`atmc_triton.nnz_budget`). The
relative per-layer errors add up, to first order, like the layers' perturbations of the
output. Search: the best uniform ``b``, then single-layer moves while ``D`` decreases.

Example:
    >>> import torch, atmc_triton as at
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    >>> bits = allocate_bits(model, at.ATMCConfig(ratio=0.05, bits=8))
    >>> sorted(bits) == ["0", "2"] and all(1 <= b <= 8 for b in bits.values())
    True
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from atmc_triton.api import compress_
from atmc_triton.budget import atmc_layers, factor_bits_bound, ratio_bits, topk_counts
from atmc_triton.config import ATMCConfig
from atmc_triton.kernels import lloyd_quantize_ref
from atmc_triton.layers import ATMCMultiheadAttention

__all__ = ["BitAllocation", "allocate_bits", "allocation_report"]


@dataclasses.dataclass(frozen=True)
class BitAllocation:
    """The chosen ``bits`` per layer, the nonzero budget ``k`` they give and the proxy ``distortion``."""

    bits: dict[str, int]
    k: int
    distortion: float
    uniform: dict[int, tuple[int, float]]  # b -> (k, distortion) of every uniform assignment tried


class _Problem:
    """Sorted factor magnitudes and cached Lloyd errors of one compressed model."""

    def __init__(self, model: nn.Module, budget: int, max_iter: int, tol: float, method: str = "fast"):
        self.layers = atmc_layers(model)
        self.budget, self.max_iter, self.tol, self.method = budget, max_iter, tol, method
        self.vals: list[Tensor] = []  # per factor: values sorted by |v| descending
        self.layer_of: list[int] = []
        energy = []
        for j, (_, layer) in enumerate(self.layers):
            e = 0.0
            for _, p in layer.factors():
                v = p.detach().reshape(-1).float().cpu()
                v = v[v != 0]
                self.vals.append(v[torch.argsort(v.abs(), descending=True, stable=True)])
                self.layer_of.append(j)
                e += float(v.double().square().sum())
            energy.append(max(e, 1e-30))
        self.energy = energy
        self.mags = [v.abs() for v in self.vals]
        self.tail = [
            torch.cat([v.double().square().flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
            for v in self.vals
        ]  # tail[f][n] = squared mass dropped when keeping n entries
        everything = torch.cat(self.mags)
        self.sorted_all = torch.sort(everything, descending=True).values
        self._err: dict[tuple[int, int, int], float] = {}

    def counts(self, k: int) -> list[int]:
        """Entries of each factor among the global top-``k`` (ties broken by flat index, as nnz_budget)."""
        return topk_counts(self.mags, self.sorted_all, k)

    def cost(self, k: int, fbits: Sequence[int]) -> int:
        return sum(factor_bits_bound(n, b) for n, b in zip(self.counts(k), fbits))

    def k_for(self, fbits: Sequence[int]) -> int:
        lo, hi = 0, min(self.sorted_all.numel(), self.budget // max(1, min(fbits)))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.cost(mid, fbits) <= self.budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def quant_err(self, f: int, n: int, b: int) -> float:
        """Lloyd (pinned zero, ``2^b`` free centres) squared error of factor ``f``'s ``n`` largest entries."""
        if n <= 2**b:
            return 0.0  # a factor with <= 2^b nonzeros is kept exactly
        key = (f, n, b)
        if key not in self._err:
            v = self.vals[f][:n].contiguous()
            bits = torch.tensor([b], dtype=torch.int32)
            out = lloyd_quantize_ref(v, torch.tensor([0, n]), bits, self.max_iter, self.tol, self.method)
            self._err[key] = float(out[3][0])
        return self._err[key]

    def distortion(self, lbits: Sequence[int]) -> tuple[int, float]:
        fbits = [lbits[j] for j in self.layer_of]
        k = self.k_for(fbits)
        per_layer = [0.0] * len(self.layers)
        for f, n in enumerate(self.counts(k)):
            per_layer[self.layer_of[f]] += float(self.tail[f][n]) + self.quant_err(f, n, fbits[f])
        return k, sum(e / en for e, en in zip(per_layer, self.energy))


@torch.no_grad()
def allocation_report(model: nn.Module, cfg: ATMCConfig, candidates: Sequence[int] = range(1, 9)) -> BitAllocation:
    """:func:`allocate_bits` with the details (``k``, proxy distortion, every uniform choice)."""
    if cfg.ratio is None or not cfg.quantized:
        raise ValueError("allocate_bits needs a ratio budget and a quantizer (ATMCConfig(ratio=..., bits=1..8))")
    cands = sorted(set(int(b) for b in candidates))
    if not cands or any(not 1 <= b <= 8 for b in cands):
        raise ValueError(f"candidate bits must be in 1..8, got {list(candidates)}")
    work = copy.deepcopy(model).cpu().float()
    if not atmc_layers(work):
        compress_(work, dataclasses.replace(cfg, layer_bits=None))
    # compress_'s budget: 32 bits per weight of the compressed layers (an excluded layer stays dense, outside it)
    dense = 32 * sum(layer.C.numel() for _, layer in atmc_layers(work))
    prob = _Problem(work, ratio_bits(cfg.ratio, dense), cfg.max_iter, cfg.tol, cfg.quant_method)
    # one bit width per name compress_'s layer_bits can address: an attention module's in_proj and out_proj
    # share their module's (ATMCConfig.bits_for is asked once per nn.MultiheadAttention)
    attn = {name for name, m in work.named_modules() if isinstance(m, ATMCMultiheadAttention)}
    keys = [name.rpartition(".")[0] if name.rpartition(".")[0] in attn else name for name, _ in prob.layers]
    names = list(dict.fromkeys(keys))
    of = [names.index(key) for key in keys]

    def distortion(gbits: Sequence[int]) -> tuple[int, float]:
        return prob.distortion([gbits[g] for g in of])

    L = len(names)
    uniform = {b: distortion([b] * L) for b in cands}
    best_b = min(uniform, key=lambda b: (uniform[b][1], -b))
    cur, (k, d) = [best_b] * L, uniform[best_b]
    improved = True
    while improved:
        improved = False
        best = (d, None, None, k)
        for j in range(L):
            for b in cands:
                if b == cur[j]:
                    continue
                trial = cur[:j] + [b] + cur[j + 1 :]
                kk, dd = distortion(trial)
                if dd < best[0] * (1 - 1e-9):
                    best = (dd, j, b, kk)
        if best[1] is not None:
            d, j, b, k = best
            cur[j] = b
            improved = True
    return BitAllocation(dict(zip(names, cur)), k, d, uniform)


def allocate_bits(model: nn.Module, cfg: ATMCConfig, candidates: Sequence[int] = range(1, 9)) -> dict[str, int]:
    """Bits per compressible layer of ``model`` (dense, or already compressed) for ``cfg``'s ratio budget.

    Returns ``{module name: bits}``, ready for ``dataclasses.replace(cfg, layer_bits=...)``. The
    model is not changed (a CPU copy is compressed with ``cfg``'s init to read the factors).
    """
    return allocation_report(model, cfg, candidates).bits

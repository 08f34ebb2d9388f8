"""Size accounting: the global nonzero budget k, model size in bits, and per-layer reports.

Paper convention (what ``ratio`` means): a quantized factor with ``n`` nonzeros taking ``L``
distinct nonzero values costs ``n * max(1, ceil(log2 L)) + 32 * L`` bits (codes plus a 32-bit
codebook entry per level; zeros are implicit, positions are not counted). A factor without a
quantizer costs ``32 * n``. The dense size is ``32 *`` the number of conv + linear weights.
Biases and norm layers are neither compressed nor counted.

``packed`` bits are the honest storage cost, the exact bytes :func:`atmc_triton.pack_` writes:
per factor the smaller of dense bit-packed codes (the zero is a code) and CSR (codes + 16/32-bit
column indices + 32-bit row pointers), plus a float32 codebook
(:mod:`atmc_triton.kernels.packed_format`). Packed models report the same two figures, the
packed one read off their tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor, nn

from atmc_triton.config import ATMCConfig
from atmc_triton.kernels import IDENTITY_NONE, IDENTITY_U
from atmc_triton.kernels.packed_format import choose_format, factor_nbytes
from atmc_triton.layers import FACTORS, ATMCLayer

__all__ = [
    "CODEBOOK_ENTRY_BITS",
    "FactorSize",
    "SizeReport",
    "atmc_layers",
    "dense_bits",
    "factor_bits",
    "factor_bits_bound",
    "floor_indices",
    "model_size_bits",
    "nnz_budget",
    "size_report",
    "unwrap",
]

CODEBOOK_ENTRY_BITS = 32


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers.

    Raises:
        ValueError: ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(model).__name__}")
    while True:
        inner = getattr(model, "_orig_mod", None) or (
            model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else None
        )
        if inner is None:
            return model
        model = inner


def atmc_layers(model: nn.Module) -> list[tuple[str, ATMCLayer]]:
    """``(name, layer)`` of every ATMC layer, in module order (the flat-buffer order)."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, ATMCLayer)]


def _code_bits(levels: int) -> int:
    return max(1, math.ceil(math.log2(levels))) if levels > 0 else 0


def factor_bits(nnz: int, levels: int, bits: int | None) -> int:
    """Paper-convention bits of one factor with ``nnz`` nonzeros over ``levels`` distinct values."""
    if nnz == 0:
        return 0
    if bits is None:
        return 32 * nnz
    return nnz * _code_bits(levels) + CODEBOOK_ENTRY_BITS * levels


def factor_bits_bound(nnz: int, bits: int) -> int:
    """Upper bound on :func:`factor_bits` for ``nnz`` nonzeros of a ``bits``-bit factor, before Lloyd runs.

    Every nonzero at the full ``bits`` and a codebook of ``min(2^bits, nnz)`` levels:
    ``nnz * bits + 32 * min(2^bits, nnz)`` (0 for an empty factor). The rule behind
    :func:`nnz_budget`'s ``k`` and :func:`atmc_triton.bitalloc.allocate_bits`.

    Example:
        >>> factor_bits_bound(10, 2)  # 10 codes of 2 bits + 4 codebook entries of 32 bits
        148
    """
    return nnz * bits + CODEBOOK_ENTRY_BITS * min(2**bits, nnz) if nnz else 0


def _packed_bits(nnz: int, levels: int, rows: int, cols: int, bits: int | None) -> int:
    """Bits of the factor as :func:`atmc_triton.pack_` stores it (the smaller format)."""
    raw = bits is None
    fmt = choose_format(rows, cols, nnz, levels, raw)
    return 8 * factor_nbytes(fmt, rows, cols, nnz, levels, raw)


def _packed_layer_types() -> tuple[type, ...]:
    from atmc_triton.packed import PackedLayer  # packed imports this module

    return (PackedLayer,)


def dense_bits(model: nn.Module) -> int:
    """32 x the number of conv + linear weights (ATMC layers count at their original shape)."""
    n = 0
    packed = _packed_layer_types()
    for m in unwrap(model).modules():
        if isinstance(m, ATMCLayer):
            n += m.C.numel()
        elif isinstance(m, packed):
            n += m.out_dim * m.in_dim
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            n += m.weight.numel()
    return 32 * n


def _desc(v: Tensor) -> Tensor:
    """``v`` sorted descending (numpy's SIMD sort on CPU)."""
    if v.device.type == "cpu":
        return torch.from_numpy(np.sort(v.numpy())[::-1].copy())
    return torch.sort(v, descending=True).values


def nnz_budget_of(model: nn.Module, where: str) -> Tensor:
    """``model``'s ``atmc_nnz_budget`` buffer (``compress_`` puts it on the module it was given), else a
    ``ValueError`` that names the submodule holding it, or says the model was never compressed."""
    k = unwrap(model)._buffers.get("atmc_nnz_budget")
    if k is not None:
        return k
    owner = next((n for n, m in unwrap(model).named_modules() if "atmc_nnz_budget" in m._buffers), None)
    if owner is None:
        raise ValueError(f"{where}: the model has no budget buffer; compress it with atmc_triton.compress_")
    raise ValueError(
        f"{where}: compress_ was given the submodule {owner!r}, which holds the budget: pass that module "
        f"(model.get_submodule({owner!r})), or compress the whole model with a filter_fn"
    )


def ratio_bits(ratio: float, dense: int) -> int:
    """``floor(ratio * dense)`` with ``ratio`` read as the decimal it prints as: ``0.57 * 3200`` is 1824
    (in floats 1823.99...).

    Example:
        >>> ratio_bits(0.57, 3200)
        1824
    """
    return math.floor(Fraction(repr(float(ratio))) * dense)


def topk_counts(mags: list[Tensor], everything: Tensor, k: int) -> list[int]:
    """Entries of each factor among the global top-``k`` of the flat order (``|w|`` descending, then flat index
    ascending, as :func:`atmc_triton.kernels.project_topk_`): ties at the threshold go to the earlier factors.
    ``mags``: each factor's magnitudes sorted descending; ``everything``: all of them sorted descending.

    Example:
        >>> m = [torch.tensor([1.0, 1.0]), torch.tensor([1.0])]
        >>> topk_counts(m, torch.ones(3), 2)
        [2, 0]
    """
    if k <= 0:
        return [0] * len(mags)
    tau = everything[k - 1]
    above = [int(torch.searchsorted(-m, -tau)) for m in mags]  # entries > tau
    ties = [int(torch.searchsorted(-m, -tau, right=True)) - a for m, a in zip(mags, above)]  # entries == tau
    left, out = k - sum(above), []
    for a, t in zip(above, ties):
        out.append(a + min(t, left))
        left -= min(t, left)
    return out


@torch.no_grad()
def nnz_budget(layers: list[tuple[str, ATMCLayer]], cfg: ATMCConfig, dense: int) -> tuple[int, int | None]:
    """Global nonzero budget ``k`` and size budget in bits (``None`` for an explicit ``nnz``).

    For a ``ratio``: ``k`` is the largest count such that keeping the top-``k`` magnitudes of
    the *current* factors costs at most ``ratio * dense`` bits, counting every nonzero at its
    layer's full ``b`` bits and a codebook of ``min(2^b, nnz_f)`` levels per nonzero factor
    (``32 * k`` without a quantizer). Training may move nonzeros between factors;
    :func:`atmc_triton.finalize_` then fits the real cost exactly.
    """
    factors = [(layer.nbits, p) for _, layer in layers for _, p in layer.factors()]
    total = sum(p.numel() for _, p in factors)
    if cfg.nnz is not None:
        return min(cfg.nnz, total), None
    budget = ratio_bits(cfg.ratio, dense)
    if cfg.bits is None:
        k = min(budget // 32, total)
    else:
        mags = [_desc(p.detach().abs().reshape(-1).float().cpu()) for _, p in factors]
        everything = _desc(torch.cat(mags))

        def cost(k: int) -> int:  # bound on the bits of the top-k entries
            return sum(factor_bits_bound(n, b) for (b, _), n in zip(factors, topk_counts(mags, everything, k)))

        lo, hi = 0, min(total, budget // min(b for b, _ in factors))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        k = lo
    if k <= 0:
        raise ValueError(
            f"ATMCConfig.ratio={cfg.ratio} leaves no nonzeros at bits={cfg.bits}: the budget is {budget} bits "
            f"of a {dense}-bit dense model (a nonzero costs at least {cfg.bits or 32} bits plus its codebook)"
        )
    return k, budget


@dataclass(frozen=True)
class FactorSize:
    layer: str
    factor: str
    shape: tuple[int, int]
    bits: int | None
    nnz: int
    levels: int
    paper_bits: int
    packed_bits: int


@dataclass(frozen=True)
class SizeReport:
    """Per-factor sizes plus totals and three size ratios. ``str(report)`` is a table.

    * :attr:`ratio`, the paper's: compressed bits of the ATMC layers over 32 bits per weight of
      those same layers (what ``ATMCConfig.ratio`` budgets);
    * :attr:`model_ratio`, the whole model: the same plus every parameter left dense (biases,
      norms, embeddings, layers not compressed) at 32 bits, over 32 bits per parameter;
    * :attr:`file_ratio`: the tensor bytes :func:`atmc_triton.save_packed` writes (packed factors,
      plus every other tensor of the state dict as stored) over those of the dense model's
      safetensors file (:func:`atmc_triton.export_dense` then ``state_dict``); file headers, a few
      KB, are not counted.
    """

    factors: tuple[FactorSize, ...]
    dense_bits: int
    dense_params: int = 0
    file_bytes: int = 0
    dense_file_bytes: int = 0

    @property
    def total_bits(self) -> int:
        return sum(f.paper_bits for f in self.factors)

    @property
    def packed_bits(self) -> int:
        return sum(f.packed_bits for f in self.factors)

    @property
    def packed_bytes(self) -> int:
        return math.ceil(self.packed_bits / 8)

    @property
    def nnz(self) -> int:
        return sum(f.nnz for f in self.factors)

    def per_layer(self) -> dict[str, tuple[int, int]]:
        """``{layer: (paper bits, packed bytes)}``."""
        out: dict[str, tuple[int, int]] = {}
        for f in self.factors:
            paper, packed = out.get(f.layer, (0, 0))
            out[f.layer] = (paper + f.paper_bits, packed + f.packed_bits // 8)
        return out

    @property
    def ratio(self) -> float:
        """Paper ratio: compressed bits over the 32-bit size of the compressed layers' weights."""
        return self.total_bits / self.dense_bits if self.dense_bits else 0.0

    @property
    def dense_share(self) -> float:
        """Share of the model's parameters left dense."""
        total = self.dense_bits // 32 + self.dense_params
        return self.dense_params / total if total else 0.0

    @property
    def model_ratio(self) -> float:
        """Whole-model ratio, parameters left dense at 32 bits."""
        total = self.dense_bits + 32 * self.dense_params
        return (self.total_bits + 32 * self.dense_params) / total if total else 0.0

    @property
    def file_ratio(self) -> float:
        """Packed-file tensor bytes over the dense safetensors file's."""
        return self.file_bytes / self.dense_file_bytes if self.dense_file_bytes else 0.0

    def __str__(self) -> str:
        w = max([24, *(len(f.layer) for f in self.factors)])  # whole names (timm's run past 24 characters)
        head = (
            f"{'layer':<{w}}{'f':>2}{'shape':>14}{'bits':>5}{'nnz':>10}{'levels':>7}{'paper bits':>12}{'packed B':>10}"
        )
        rows = [head, "-" * len(head)]
        for f in self.factors:
            shape = f"{f.shape[0]}x{f.shape[1]}"
            rows.append(
                f"{f.layer:<{w}}{f.factor:>2}{shape:>14}{f.bits or 32:>5}{f.nnz:>10}{f.levels:>7}"
                f"{f.paper_bits:>12}{math.ceil(f.packed_bits / 8):>10}"
            )
        rows.append(
            f"total: {self.nnz} nonzeros, {self.total_bits} bits = {self.ratio:.3e} of dense "
            f"({self.dense_bits} bits); packed {self.packed_bytes} bytes"
        )
        rows.append(
            f"ratios: paper {self.ratio:.3e} (compressed layers) | whole model {self.model_ratio:.3e} "
            f"({self.dense_params} parameters, {self.dense_share:.1%}, left dense at 32 bits) | "
            f"packed file {self.file_ratio:.3e} ({self.file_bytes} of {self.dense_file_bytes} tensor bytes)"
        )
        return "\n".join(rows)


def _other_state(root: nn.Module) -> tuple[int, int, int]:
    """``(dense parameters, bytes both files hold, bytes only the packed file holds)`` outside the factors."""
    packed = _packed_layer_types()
    seen: set[int] = set()
    params = both = only_packed = 0
    for m in root.modules():
        compressed = isinstance(m, (ATMCLayer, *packed))
        for name, p in m._parameters.items():
            if p is None or id(p) in seen or (compressed and name in FACTORS):
                continue
            seen.add(id(p))
            params += p.numel()
            both += p.nbytes
        if compressed:
            continue  # ATMC training state / packed factors (counted per factor) / caches
        for name, b in m._buffers.items():
            if b is None or id(b) in seen or name in m._non_persistent_buffers_set:
                continue
            seen.add(id(b))
            if m is root and name.startswith("atmc_"):
                only_packed += b.nbytes
            else:
                both += b.nbytes
    return params, both, only_packed


def _levels(t: Tensor) -> int:
    nz = t[t != 0]
    return int(torch.unique(nz).numel()) if nz.numel() else 0


@torch.no_grad()
def size_report(model: nn.Module, check_input: bool = True, example_input: Tensor | None = None) -> SizeReport:
    """Size of every factor of every ATMC or packed layer, in the paper's convention and as packed
    bits, and the paper, whole-model and packed-file ratios (see :class:`SizeReport`). Of an unfinalized model
    it reports the factors as they are (right after ``compress_`` every weight is still a nonzero, ratio > 1);
    the budget holds once :func:`atmc_triton.finalize_` has run.

    With ``check_input`` it also checks, like :func:`atmc_triton.finalize_`, that the model's
    output still depends on its input (:func:`atmc_triton.check_input_dependence`).

    Example:
        >>> import atmc_triton as at
        >>> m = at.finalize_(at.compress_(nn.Sequential(nn.Linear(64, 8), nn.LayerNorm(8)), at.ATMCConfig(ratio=0.1)))
        >>> r = at.size_report(m)
        >>> r.ratio <= 0.1 and r.model_ratio > r.ratio  # the LayerNorm and the bias stay dense, at 32 bits
        True
    """
    rows = []
    packed = _packed_layer_types()
    root = unwrap(model)
    weights = weight_bytes = 0
    for name, layer in root.named_modules():
        if isinstance(layer, ATMCLayer):
            weights += layer.C.numel()
            weight_bytes += layer.C.nbytes
        elif isinstance(layer, packed):
            weights += layer.out_dim * layer.in_dim
            weight_bytes += layer.out_dim * layer.in_dim * torch.empty(0, dtype=layer._dtype).element_size()
        if isinstance(layer, ATMCLayer):
            for f, p in layer.factors():
                nnz, levels = int((p != 0).sum()), _levels(p)
                rows.append(
                    FactorSize(
                        name,
                        f,
                        tuple(p.shape),
                        layer.nbits,
                        nnz,
                        levels,
                        factor_bits(nnz, levels, layer.nbits),
                        _packed_bits(nnz, levels, p.shape[0], p.shape[1], layer.nbits),
                    )
                )
        elif isinstance(layer, packed):
            for f in ("U", "V", "C"):
                nnz, levels = layer.nnz[f], layer.levels[f]
                rows.append(
                    FactorSize(
                        name,
                        f,
                        layer.shapes[f],
                        layer.bits,
                        nnz,
                        levels,
                        factor_bits(nnz, levels, layer.bits),
                        8 * layer.factor_nbytes(f),
                    )
                )
    if not rows:
        raise ValueError("size_report: the model has no ATMC layers (call atmc_triton.compress_ first)")
    params, both, only_packed = _other_state(root)
    report = SizeReport(
        tuple(rows),
        32 * weights,
        dense_params=params,
        file_bytes=sum(math.ceil(f.packed_bits / 8) for f in rows) + both + only_packed,
        dense_file_bytes=weight_bytes + both,
    )
    if check_input:
        from atmc_triton.api import check_input_dependence

        check_input_dependence(root, example_input)
    return report


def model_size_bits(model: nn.Module) -> int:
    """Compressed size in bits, paper convention (see the module docstring).

    Example:
        >>> import atmc_triton as at
        >>> m = at.compress_(nn.Sequential(nn.Linear(8, 4)), at.ATMCConfig(nnz=5))
        >>> at.model_size_bits(m) > 0
        True
    """
    return size_report(model).total_bits


@torch.no_grad()
def floor_indices(layers: list[ATMCLayer], mode: str, source: str = "") -> Tensor:
    """Flat indices (the :class:`atmc_triton.FactorStore` order) of the floor entries of ``layers``.

    ``mode`` is a resolved :attr:`atmc_triton.ATMCConfig.floor`: ``"last"``, ``"rows"`` or ``"none"``
    (``"auto"`` is resolved by :func:`atmc_triton.compress_`; anything else is a ``ValueError``). The
    floor of a row is the largest entry of that output unit's row in the factor that carries the
    weight: ``U`` when the identity init put W there (``W = U (V + I) + C``), ``V`` for
    ``W = (U + I) V + C``, ``C`` for the sparse init (``W = C``, rank 0), and for the SVD init the
    largest ``U[i, r]`` plus the largest entry of row ``r`` of ``V``. ``source`` picks the values:
    ``""`` the factors, ``"_z"`` their quantized copies. Zero entries are never part of the floor.

    Example:
        >>> from atmc_triton import ATMCConfig, ATMCLinear
        >>> lin = ATMCLinear.from_dense(nn.Linear(3, 2), ATMCConfig(nnz=4))
        >>> floor_indices([lin], "rows").numel()  # one per output unit
        2
    """
    if mode not in ("last", "rows", "none"):  # ("auto", "row", ... fell through to "last")
        raise ValueError(f"floor_indices: mode must be 'last', 'rows' or 'none', got {mode!r}")
    out: list[Tensor] = []
    base = 0
    for j, layer in enumerate(layers):
        vals = {f: getattr(layer, f + source).detach() for f in FACTORS}
        offs = {}
        for f in FACTORS:
            offs[f] = base
            base += vals[f].numel()
        if mode == "none":
            continue
        rows = mode == "rows" or j == len(layers) - 1
        ident = int(layer.identity)
        carrier = "C" if layer.rank == 0 else "V" if ident == IDENTITY_U else "U"
        a = vals[carrier].abs()  # [out, cols]
        cols = a.shape[1]
        if a.numel() == 0:  # a layer with no inputs (or outputs): no entry to keep
            continue
        if rows:
            r = torch.arange(a.shape[0], device=a.device)
            c = a.argmax(dim=1)
        else:
            flat_arg = a.reshape(-1).argmax()
            r, c = (flat_arg // cols).view(1), (flat_arg % cols).view(1)
        nz = a[r, c] != 0
        r, c = r[nz], c[nz]
        out.append(offs[carrier] + r * cols + c)
        if carrier == "U" and ident == IDENTITY_NONE and c.numel():  # U[i, r] needs a nonzero in row r of V
            v = vals["V"].abs()
            rr = torch.unique(c)
            cc = v[rr].argmax(dim=1)
            keep = v[rr, cc] != 0
            out.append(offs["V"] + rr[keep] * v.shape[1] + cc[keep])
    if not out:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([o.to(out[0].device) for o in out]).long()


def auto_floor(layers: list[ATMCLayer], k: int) -> str:
    """``ATMCConfig.floor="auto"`` made concrete: the strongest floor (``"rows"``, then ``"last"``) whose entries
    can take at most a quarter of ``k``, else ``"none"``. Counted from the factors' shapes (the most entries the
    floor can hold), so the same budget and layers always give the same floor: a model loaded into a freshly
    compressed twin resolves as the saved one did."""

    def rows(layer: ATMCLayer) -> int:  # a full rows floor of one layer: one entry per row of its carrier, and
        ident = int(layer.identity)  # for the SVD init one of V's per rank column
        carrier = layer.C if layer.rank == 0 else layer.V if ident == IDENTITY_U else layer.U
        if carrier.numel() == 0:
            return 0
        svd = layer.rank > 0 and ident == IDENTITY_NONE and layer.V.numel() > 0
        return carrier.shape[0] + (min(carrier.shape[0], layer.V.shape[0]) if svd else 0)

    full = [rows(layer) for layer in layers]
    one = [min(n, 1 + (layer.rank > 0 and int(layer.identity) == IDENTITY_NONE)) for n, layer in zip(full, layers)]
    bound = {"rows": sum(full), "last": sum(one[:-1]) + full[-1] if layers else 0}
    return next((f for f in ("rows", "last") if bound[f] <= k // 4), "none")


def fit_budget_(
    flat: Tensor,
    offsets: list[int],
    bits: list[int | None],
    k: int,
    budget: int | None,
    forced: Tensor | None = None,
) -> int:
    """Keep the largest prefix of the top-``k`` order (|w| desc, index asc) that fits ``budget``.

    ``flat`` holds every factor back to back (already projected to at most ``k`` nonzeros);
    entries beyond the prefix are zeroed in place. Returns the number of nonzeros kept.
    Cost is monotone in the prefix length, so a binary search finds the exact fit. The nonzero
    entries at ``forced`` (the layer floor) come first in the order, so they are always kept;
    ``ValueError`` if they alone exceed the budget.
    """
    idx = torch.nonzero(flat).view(-1)
    if budget is None or idx.numel() == 0:
        return idx.numel()
    a = flat[idx].abs()
    order = idx[torch.sort(-a, stable=True).indices]  # ties: lower flat index first
    n_forced = 0
    if forced is not None and forced.numel():
        fz = torch.unique(forced.to(flat.device))
        fz = fz[flat[fz] != 0]
        is_forced = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        is_forced[fz] = True
        order = torch.cat([fz, order[~is_forced[order]]])
        n_forced = fz.numel()
    off = torch.tensor(offsets, device=flat.device)
    seg = torch.searchsorted(off, order, right=True) - 1  # factor of each entry
    vals = flat[order]
    key = seg * (1 << 32) + (vals.view(torch.int32).long() & 0xFFFFFFFF)  # (factor, exact value)
    _, inv = torch.unique(key, return_inverse=True)
    pos = torch.arange(order.numel(), device=flat.device)
    first = torch.full((int(inv.max()) + 1,), order.numel(), device=flat.device).scatter_reduce(
        0, inv, pos, reduce="amin"
    )
    is_first = first[inv] == pos  # first time this factor sees this value
    S = len(bits)

    def cost(n: int) -> int:
        nnz = torch.bincount(seg[:n], minlength=S).tolist()
        lev = torch.bincount(seg[:n][is_first[:n]], minlength=S).tolist()
        return sum(factor_bits(c, lv, b) for c, lv, b in zip(nnz, lev, bits))

    lo, hi = n_forced, order.numel()  # cost(lo) fits; find the largest n with cost(n) <= budget
    if cost(hi) <= budget:
        return hi
    if cost(lo) > budget:
        raise ValueError(
            f"the layer floor alone ({n_forced} entries, {cost(lo)} bits) exceeds the budget of {budget} bits; "
            "use ATMCConfig(floor='last' or 'none') or a larger ratio"
        )
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    flat[order[lo:]] = 0
    return lo

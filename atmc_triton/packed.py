"""Packed inference: a finalized ATMC model stored as b-bit codes, codebooks and sparse indices.

:func:`pack_` swaps every finalized :class:`~atmc_triton.ATMCLinear` / :class:`~atmc_triton.ATMCConv2d`
for a :class:`PackedLinear` / :class:`PackedConv2d` holding, per factor, the smaller of dense
bit-packed codes and CSR (:mod:`atmc_triton.kernels.packed_format`) plus a float32 codebook;
:func:`unpack` is its exact inverse. A packed model's ``state_dict`` holds only those packed
tensors (and the biases); :func:`save_packed` / :func:`load_packed` write and read it as
safetensors, building the packed modules directly from the file (empty or meta tensors, no
dense intermediate), checking the file's SHA-256 (in its header) and validating every index and code
before use.

``PackedLinear`` picks a path per call from the number of rows ``M``
(:func:`~atmc_triton.kernels.lowrank_gemm.linear_path`): up to the layer's modelled crossover it
runs the packed kernels (op ``atmc::atmc_linear``: Triton on CUDA, the reference on CPU); from it
on, ``F.linear`` (cuBLAS) on the dense weight decoded once on first use and cached (reported by
:func:`cached_nbytes`, dropped by ``load_state_dict`` / ``.to()`` / in-place changes of the packed
tensors, freed by :func:`unpack`; ``layer.dense_cache = False`` never caches). Under ``torch.export`` the
same choice is a ``torch.cond`` on ``M >= crossover`` (fixed when the batch is static); its dense branch decodes
``W`` per call, as the exported program holds only the packed tensors. Every forward first
re-validates packed tensors that changed since they were last checked, so corrupt data raises
``ValueError`` before any kernel runs. ``PackedConv2d`` dequantizes its factors once into a cached dense weight and
calls cuDNN (``conv_mode="dense"``, the default), or runs the decomposed form: a conv with
``V`` as ``[r, in, kh, kw]``, a 1x1 conv with ``U``, plus a conv with ``C``
(``conv_mode="decomposed"``). Convolutions are compute-bound and their weights small: the
decomposed form costs ``r (in kh kw + out)`` MACs per output pixel against ``out in kh kw``,
more whenever ``r > out in kh kw / (in kh kw + out)`` (every identity-initialized layer, where
``r = min(out, in kh kw)``), and a nonzero ``C`` needs its own full-size conv on top (cuDNN
has no sparse conv). ``bench/gemm.py`` times both. The cached weight is a non-persistent buffer
made by the first eager forward (a graph compiled afterwards reads it; before, it decodes in the
graph) and dropped on ``load_state_dict`` / ``.to()``. A compiled graph validates nothing and does not see an edit of
the packed tensors (in place or replaced): it keeps reading the cached weight (``PackedLinear`` from the crossover on,
``PackedConv2d`` in "dense" mode) until ``layer.check_valid(force=True)`` or an eager forward drops it.

Exactness: ``unpack(pack_(m))`` reproduces every tensor of a finalized model bit for bit, except
that a factor entry stored as ``-0.0`` comes back as ``+0.0`` (zeros are not stored).
"""

from __future__ import annotations

import json
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from atmc_triton.budget import atmc_layers, unwrap
from atmc_triton.kernels import IDENTITY_U, IDENTITY_V
from atmc_triton.kernels.lowrank_gemm import (
    atmc_decode,
    atmc_linear,
    check_factor,
    check_factor_values,
    dense_crossover,
    linear_path,
)
from atmc_triton.kernels.packed_format import (
    FMT_BITMAP,
    FMT_CSR,
    FMT_DENSE,
    FMT_EMPTY,
    FORMAT_NAMES,
    SIZE_FORMATS,
    SPEED_FORMATS,
    encode_factor,
    factor_part_sizes,
)
from atmc_triton.layers import FACTORS, ATMCConv2d, ATMCLayer, ATMCLinear, attention_shells_

__all__ = [
    "PackedConv2d",
    "PackedLayer",
    "PackedLinear",
    "cached_nbytes",
    "load_packed",
    "pack_",
    "packed_layers",
    "packed_nbytes",
    "save_packed",
    "to_dense",
    "unpack",
]

_PARTS = ("codes", "book", "indptr", "indices")
_FORMAT_SETS = {"speed": SPEED_FORMATS, "size": SIZE_FORMATS}  # pack_(formats=...)
META_KEY = "atmc_packed"
FORMAT_VERSION = 2  # 2 added the bitmap factor format; version-1 files (no bitmaps) still load
_READABLE_VERSIONS = (1, 2)
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class PackedLayer(nn.Module):
    """Shared state of :class:`PackedLinear` and :class:`PackedConv2d`.

    Buffers per factor ``F`` in ``U [out, r]``, ``V [r, in]``, ``C [out, in]``: ``F_codes``
    (int32 words), ``F_book`` (float32, slot 0 the zero), ``F_indptr`` (int32) and ``F_indices``
    (int16/int32), empty where the format has no use for them. Python attributes hold the
    formats, shapes, rank, identity and bits (they are in the file's metadata, not the state dict).
    """

    def _setup(
        self,
        out: int,
        inn: int,
        rank: int,
        identity: int,
        bits: int | None,
        bias: bool,
        factors: dict[str, dict[str, Any]],
        dtype: torch.dtype,
        device,
    ) -> None:
        self.out_dim, self.in_dim, self.rank, self._identity, self.bits = out, inn, rank, identity, bits
        self.shapes = {"U": (out, rank), "V": (rank, inn), "C": (out, inn)}
        self.fmts = {f: int(factors[f]["fmt"]) for f in FACTORS}
        self.nnz = {f: int(factors[f]["nnz"]) for f in FACTORS}
        self.levels = {f: int(factors[f]["levels"]) for f in FACTORS}
        self._dtype = dtype
        self._cache: tuple | None = None
        self._valid_key: tuple | None = None  # (weakref, version) of every packed tensor when last validated
        self._crossover: dict[int, int] = {}
        self.dense_cache = True  # PackedLinear: may cache the decoded weight for M >= the crossover
        raw = bits is None
        for f in FACTORS:
            if self.fmts[f] not in FORMAT_NAMES:
                raise ValueError(f"packed layer: factor {f} has unknown format {self.fmts[f]}")
            sizes = factor_part_sizes(self.fmts[f], *self.shapes[f], self.nnz[f], self.levels[f], raw)
            for part, (n, dt) in sizes.items():
                self.register_buffer(f"{f}_{part}", torch.empty(n, dtype=dt, device=device))
        self.bias = nn.Parameter(torch.empty(out, dtype=dtype, device=device)) if bias else None
        # the decoded dense weight, made on first use; a non-persistent buffer, so a graph compiled after
        # that reads it like any other buffer (and the state dict stays packed)
        self.register_buffer("weight_cache", None, persistent=False)

    # --- factors ------------------------------------------------------------------------------------------------

    def factor(self, f: str) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
        """``(fmt, codes, book, indptr, indices)`` of factor ``f`` ("U", "V" or "C")."""
        return (self.fmts[f], *(getattr(self, f"{f}_{p}") for p in _PARTS))

    def factor_args(self) -> list:
        """The 15 factor arguments of op ``atmc_linear`` (U, V, C)."""
        return [a for f in FACTORS for a in self.factor(f)]

    def factor_nbytes(self, f: str) -> int:
        """Real bytes of factor ``f`` (its four tensors)."""
        return sum(getattr(self, f"{f}_{p}").nbytes for p in _PARTS)

    def decode(self, f: str) -> Tensor | None:
        """Dense float32 factor ``f`` (``None`` when it is all zero)."""
        if self.fmts[f] == FMT_EMPTY:
            return None
        return atmc_decode(self.fmts[f], *self.shapes[f], *self.factor(f)[1:])

    def weight_2d(self) -> Tensor:
        """Dense float32 ``W [out, in] = U V + C`` (plus the identity term), from the packed factors; float32 under
        autocast too (the cached weight must not depend on whether the first call that made it ran in autocast)."""
        U, V, C = (self.decode(f) for f in FACTORS)
        w = C if C is not None else self.U_codes.new_zeros(self.out_dim, self.in_dim, dtype=torch.float32)
        if U is not None and V is not None:
            with torch.autocast(self.U_codes.device.type, enabled=False):
                w = torch.addmm(w, U, V)
        if self._identity == IDENTITY_U and V is not None:  # (U + I) V = U V + V
            w = w + V
        if self._identity == IDENTITY_V and U is not None:  # U (V + I) = U V + U
            w = w + U
        return w

    # --- conversion ---------------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_atmc(cls, layer: ATMCLayer, formats: tuple = SPEED_FORMATS) -> PackedLayer:
        """Pack a finalized ATMC layer; each factor takes the smallest of ``formats`` (:func:`pack_`)."""
        if not bool(layer.finalized):
            raise ValueError(f"{type(layer).__name__} is not finalized: call atmc_triton.finalize_(model) first")
        raw = layer.nbits is None
        enc, factors = {}, {}
        for f in FACTORS:
            p = getattr(layer, f).detach()
            if raw and not torch.equal(p.float().to(p.dtype), p):
                raise ValueError(f"factor {f} has values float32 cannot hold exactly ({p.dtype})")
            enc[f] = encode_factor(p, raw, formats=formats)
            nz = p[p != 0]
            factors[f] = {
                "fmt": enc[f][0],
                "nnz": nz.numel(),
                "levels": int(torch.unique(nz).numel()) if nz.numel() else 0,
            }
        spec = _layer_spec(layer)
        spec["factors"] = factors
        packed = _from_spec(spec, layer.C.device, layer.C.dtype)
        for f in FACTORS:
            for part, t in zip(_PARTS, enc[f][1:]):
                getattr(packed, f"{f}_{part}").copy_(t)
        if layer.bias is not None:
            packed.bias.copy_(layer.bias.detach())
            packed.bias.requires_grad_(layer.bias.requires_grad)  # a frozen bias stays frozen
        packed.check_valid()
        return packed

    @torch.no_grad()
    def to_atmc(self) -> ATMCLayer:
        """The finalized ATMC layer this packed layer came from (exactly)."""
        dev = self.U_codes.device
        cls = ATMCConv2d if isinstance(self, PackedConv2d) else ATMCLinear
        kw = {"rank": self.rank, "identity": self._identity, "bits": self.bits, "device": dev, "dtype": self._dtype}
        if cls is ATMCLinear:
            layer = ATMCLinear(self.in_dim, self.out_dim, self.bias is not None, **kw)
        else:
            layer = ATMCConv2d(
                self.in_channels,
                self.out_channels,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                self.groups,
                self.bias is not None,
                self.padding_mode,
                **kw,
            )
        for i, f in enumerate(FACTORS):
            w = self.decode(f)
            v = torch.zeros(self.shapes[f], device=dev) if w is None else w
            v = v.to(self._dtype)
            getattr(layer, f).copy_(v)
            getattr(layer, f"{f}_z").copy_(v)
            getattr(layer, f"{f}_mask").copy_(v != 0)
            book = getattr(self, f"{f}_book")
            if book.numel():
                layer.codebook[i, 1 : book.numel()] = book[1:]
        if self.bias is not None:
            layer.bias.copy_(self.bias.detach())
            layer.bias.requires_grad_(self.bias.requires_grad)
        layer.finalized.fill_(True)
        return layer

    # --- validation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self, name: str = "") -> None:
        """Check every factor: sizes and dtypes, finite codebook levels, codes within the codebook, CSR structure
        and column ranges.

        Raises ``ValueError`` on the first problem; a validated layer never makes a kernel read out of bounds.
        """
        where = f"packed layer {name or type(self).__name__}"
        for f in FACTORS:
            fmt, codes, book, indptr, indices = self.factor(f)
            rows, cols = self.shapes[f]
            check_factor(where, f, fmt, rows, cols, codes, book, indptr, indices, codes.device)
            if fmt == FMT_EMPTY:
                if self.nnz[f]:
                    raise ValueError(f"{where}: factor {f} is empty but its metadata says {self.nnz[f]} nonzeros")
                continue
            raw = book.numel() == 0
            if raw != (self.bits is None):
                raise ValueError(f"{where}: factor {f} has {'no ' if raw else ''}codebook but bits={self.bits}")
            levels = book.numel() - 1
            if not raw:
                lv = book[1:]
                if book[0] != 0 or bool((lv == 0).any()) or bool((lv[1:] <= lv[:-1]).any()):
                    raise ValueError(
                        f"{where}: factor {f}: the codebook must be 0 then distinct nonzero levels ascending"
                    )
                if self.bits is not None and levels > 2**self.bits:
                    raise ValueError(f"{where}: factor {f} has {levels} levels, more than 2^{self.bits}")
            nnz = check_factor_values(where, f, fmt, rows, cols, codes, book, indptr, indices)
            if nnz != self.nnz[f]:
                raise ValueError(f"{where}: factor {f} holds {nnz} nonzeros, its metadata says {self.nnz[f]}")

    # --- module plumbing ----------------------------------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        """JSON-able description (shapes, formats, counts) from which :func:`load_packed` rebuilds the layer."""
        spec = _layer_spec(self)
        spec["factors"] = {f: {"fmt": self.fmts[f], "nnz": self.nnz[f], "levels": self.levels[f]} for f in FACTORS}
        return spec

    def _apply(self, fn, recurse=True):
        # Codebooks stay float32 (model.half() must not round them); only their device follows.
        books = {f: getattr(self, f"{f}_book") for f in FACTORS}
        out = super()._apply(fn, recurse)
        for f, book in books.items():
            moved = getattr(self, f"{f}_book")
            if moved.dtype != torch.float32:
                self._buffers[f"{f}_book"] = book.to(moved.device)
        self._dtype = fn(torch.empty(0, dtype=self._dtype)).dtype
        self._drop_caches()
        return out

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A plain load_state_dict must validate as load_packed does: a bad index would make a kernel read out of
        # bounds. On a failed check the previous tensors are put back and ValueError is raised.
        self._drop_caches()
        names = [f"{f}_{p}" for f in FACTORS for p in _PARTS]
        held = [(self._buffers, n) for n in names] + ([(self._parameters, "bias")] if self.bias is not None else [])
        old = [(d, n, d[n], None if d[n].is_meta else d[n].detach().clone()) for d, n in held]  # the whole layer
        errors = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if len(error_msgs) > errors or any(self._buffers[n].is_meta for n in names):
            return  # load_state_dict reports the mismatch itself; meta tensors hold nothing to check
        try:
            self.validate(prefix.rstrip("."))
            self._valid_key = self._state_key()
        except ValueError as e:
            with torch.no_grad():
                for d, n, t, value in old:  # copied into in place, or replaced (assign=True)
                    if d[n] is t and value is not None:
                        t.copy_(value)
                    else:
                        d[n] = t
            raise ValueError(
                f"{e} (a packed layer's formats and nonzero counts are fixed when it is packed: to take another "
                "packed model's weights, use at.load_packed(model, path) on a file from at.save_packed, which "
                "rebuilds the layers)"
            ) from None

    def _drop_caches(self) -> None:
        self._cache = None
        self._buffers["weight_cache"] = None

    def _packed_tensors(self) -> list[Tensor]:
        return [t for f in FACTORS for t in self.factor(f)[1:]]

    def _state_key(self) -> tuple:
        # weak references, not ids: CPython reuses a freed tensor's id for the next one
        return tuple((weakref.ref(t), t._version) for t in self._packed_tensors())

    def _unchanged(self) -> bool:
        """Every packed tensor is the one, at the version, that was last validated."""
        key, now = self._valid_key, self._packed_tensors()
        return (
            key is not None
            and len(key) == len(now)
            and all(r() is t and v == t._version for (r, v), t in zip(key, now))
        )

    def __getstate__(self) -> dict:
        """Pickle and ``copy.deepcopy`` leave out the validation key (weak references): a copy validates once."""
        state = super().__getstate__()
        state["_valid_key"] = None
        return state

    def check_valid(self, force: bool = False) -> None:
        """Validate the packed tensors if they changed since the last check (in place or replaced), and
        drop the caches made from them. Forwards call it first: corrupt data raises ``ValueError``
        before any kernel runs. Skipped inside ``torch.compile`` (a compiled graph validates nothing).

        A change is seen through each tensor's identity and autograd version counter; writes that
        bypass the counter (through ``t.data``) are not. After such writes call
        ``check_valid(force=True)``: it validates and drops the caches whatever the counters say.
        """
        if torch.compiler.is_compiling():
            return
        if force or not self._unchanged():
            key = self._state_key()
            self._drop_caches()
            self.validate()
            self._valid_key = key

    @property
    def weight(self) -> Tensor:
        """The decoded dense weight in the original layer's shape (``[out, in]``, ``[out, in / groups, kh, kw]``),
        for code that reads ``.weight`` (e.g. attention); decoded on each read, read-only."""
        return self.weight_2d().to(self._dtype).view(self.weight_shape)

    @property
    def cache_nbytes(self) -> int:
        """Bytes held by the cached decoded weight(s) (0 when nothing is cached)."""
        held = [self.weight_cache] + (list(self._cache[1]) if self._cache is not None else [])
        return sum(t.nbytes for t in held if isinstance(t, Tensor))

    def _dense_weight(self, dtype: torch.dtype) -> Tensor:
        """``W`` in ``dtype`` with this layer's weight shape: decoded once and cached (eager mode); decoded in the
        graph under ``torch.export`` (an exported program holds only the packed tensors, never the cache)."""
        if torch.compiler.is_exporting():
            return self.weight_2d().to(dtype).view(self.weight_shape)
        w = self.weight_cache
        if w is not None and w.dtype == dtype and w.device == self.U_codes.device:
            return w
        with torch.no_grad():
            w = self.weight_2d().to(dtype).view(self.weight_shape)
        if not torch.compiler.is_compiling():
            self.weight_cache = w
        return w

    def crossover(self, act_bytes: int = 2) -> int:
        """Smallest ``M`` from which the cost model prefers cuBLAS on the cached dense weight
        (:func:`~atmc_triton.kernels.lowrank_gemm.dense_crossover` of this layer's packed sizes)."""
        if act_bytes in self._crossover:
            return self._crossover[act_bytes]
        csr = sum(self.nnz[f] for f in FACTORS if self.fmts[f] == FMT_CSR)
        elems = {fmt: sum(self.shapes[f][0] * self.shapes[f][1] for f in FACTORS if self.fmts[f] == fmt)
                 for fmt in (FMT_DENSE, FMT_BITMAP)}  # fmt: skip
        nbytes = sum(self.factor_nbytes(f) for f in FACTORS)
        m = dense_crossover(self.out_dim, self.in_dim, nbytes, csr, elems[FMT_DENSE], act_bytes, elems[FMT_BITMAP])
        if not torch.compiler.is_compiling():  # a traced graph must not mutate the module (export warns)
            self._crossover[act_bytes] = m
        return m

    def _format_repr(self) -> str:
        return ", ".join(f"{f}={FORMAT_NAMES[self.fmts[f]]}" for f in FACTORS)


class PackedLinear(PackedLayer):
    """Inference ``nn.Linear`` on packed ATMC factors: ``y = x (U V + C)^T + bias`` by the fused kernel.

    Example:
        >>> import atmc_triton as at
        >>> m = at.finalize_(at.compress_(nn.Sequential(nn.Linear(8, 4)), at.ATMCConfig(nnz=12, bits=2)))
        >>> y = m(torch.ones(2, 8))
        >>> torch.allclose(pack_(m)(torch.ones(2, 8)), y, atol=1e-6)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        rank: int,
        identity: int,
        bits: int | None,
        factors: dict[str, dict[str, Any]],
        device=None,
        dtype=torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._setup(out_features, in_features, rank, identity, bits, bias, factors, dtype, device)

    def path(self, M: int, dtype: torch.dtype = torch.float16) -> str:
        """The path ``M`` rows of ``dtype`` activations take: "split_k", "tile" or "dense" (cached cuBLAS)."""
        if not self.dense_cache:
            return linear_path(M, 1 << 62)
        return linear_path(M, self.crossover(dtype.itemsize))

    def forward(self, x: Tensor) -> Tensor:
        self.check_valid()
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
            x = x.to(torch.get_autocast_dtype(dev))  # as autocast casts F.linear's input: one dtype on every path
        if x.dim() == 0 or x.shape[-1] != self.in_features:  # else reshape or the final view fails, naming no layer
            raise ValueError(
                f"PackedLinear: the input's last dimension must be in_features={self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)

        def packed(x2: Tensor) -> Tensor:  # the packed op: every M, no dense weight
            return atmc_linear(
                x2.contiguous(), self.bias, self.out_features, self.rank, self._identity, *self.factor_args()
            )

        def dense(x2: Tensor, w: Tensor | None = None) -> Tensor:  # cuBLAS on W (decoded now unless given)
            w = self.weight_2d().to(x2.dtype) if w is None else w
            return F.linear(x2, w, None if self.bias is None else self.bias.to(x2.dtype))

        if torch.compiler.is_exporting():
            # one exported graph serves every M of a dynamic batch, so the eager choice on M (a Python branch: a guard
            # on M, ConstraintViolationError) becomes a torch.cond on M >= crossover; its dense branch decodes W from
            # the packed tensors per call (an exported program holds no cache: only the packed tensors)
            if not self.dense_cache:
                return packed(x2).view(*lead, self.out_features)
            M, cross = x2.shape[0], self.crossover(x.dtype.itemsize)
            # a static batch (non-strict export) knows its branch now; dynamo sees a dynamic M as an int too, so a
            # strict export always goes through torch.cond, which specializes a static M to one branch
            if isinstance(M, int) and not torch.compiler.is_dynamo_compiling():
                y = dense(x2) if M >= cross else packed(x2)
            else:
                y = torch.cond(M >= cross, dense, packed, (x2,))
            return y.view(*lead, self.out_features)
        if x2.shape[0] and self.path(x2.shape[0], x.dtype) == "dense":
            y = dense(x2, self._dense_weight(x.dtype))
        else:
            y = packed(x2)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bits={self.bits}, {self._format_repr()}, bias={self.bias is not None}"
        )


class PackedConv2d(PackedLayer):
    """Inference ``nn.Conv2d`` on packed ATMC factors (``conv_mode``: "dense" cached weight or "decomposed")."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        rank: int,
        identity: int,
        bits: int | None,
        factors: dict[str, dict[str, Any]],
        conv_mode: str = "dense",
        groups: int = 1,
        device=None,
        dtype=torch.float32,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        if not (type(groups) is int and groups >= 1 and in_channels % groups == 0 and out_channels % groups == 0):
            raise ValueError(f"PackedConv2d: groups={groups!r} must be an int >= 1 dividing the channel counts")
        for what, v, low in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1),
                             ("dilation", self.dilation, 1), ("padding", self.padding, 0)):  # fmt: skip
            if not (what == "padding" and v in ("same", "valid")) and not (
                isinstance(v, tuple) and len(v) == 2 and all(type(i) is int and i >= low for i in v)
            ):
                raise ValueError(
                    f"PackedConv2d: {what} must be two ints >= {low}"
                    + (" or 'same' / 'valid'" if what == "padding" else "")
                    + f", got {v!r}"
                )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"PackedConv2d: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        # torch's own checks of the rest ("same" with a stride) and its padding for padding_mode != "zeros" ("same"
        # included), as ATMCConv2d takes them
        try:
            conv = nn.Conv2d(1, 1, self.kernel_size, self.stride, self.padding, self.dilation, device="meta")
        except ValueError as e:
            raise ValueError(f"PackedConv2d: {e}") from None
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        self.groups = groups
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.conv_mode = conv_mode
        if conv_mode not in ("dense", "decomposed"):
            raise ValueError(f"PackedConv2d: conv_mode must be 'dense' or 'decomposed', got {conv_mode!r}")
        if conv_mode == "decomposed" and groups != 1:
            raise ValueError("PackedConv2d: conv_mode='decomposed' needs groups=1 (U mixes channels across groups)")
        inn = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._setup(out_channels, inn, rank, identity, bits, bias, factors, dtype, device)

    def _cached(self, dtype: torch.dtype, make):
        """``make()`` once per (dtype, device) in eager mode; recomputed in a compiled or exported graph."""
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return make()
        key = (dtype, self.U_codes.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, make())
        return self._cache[1]

    def _conv(self, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
        """This layer's convolution (stride, padding, dilation, padding mode) with weight ``w``."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, bias, self.stride, _pair(0), self.dilation, self.groups)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def _decomposed_weights(self, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        def make():
            U, V, C = (self.decode(f) for f in FACTORS)
            r, cin, (kh, kw) = self.rank, self.in_channels, self.kernel_size
            eye = torch.eye(r, device=self.U_codes.device)
            if U is None and V is None:
                u = v = None
            else:
                U = torch.zeros(self.shapes["U"], device=eye.device) if U is None else U
                V = torch.zeros(self.shapes["V"], device=eye.device) if V is None else V
                U = U + eye if self._identity == IDENTITY_U else U
                V = V + eye if self._identity == IDENTITY_V else V
                u, v = U.to(dtype).view(self.out_channels, r, 1, 1), V.to(dtype).view(r, cin, kh, kw)
            c = None if C is None else C.to(dtype).view(self.weight_shape)
            return u, v, c

        return self._cached(dtype, make)

    def forward(self, x: Tensor) -> Tensor:
        self.check_valid()
        if self.conv_mode == "dense":
            return self._conv(x, self._dense_weight(x.dtype), self.bias)
        u, v, c = self._decomposed_weights(x.dtype)
        y = None
        if u is not None:
            y = F.conv2d(self._conv(x, v, None), u)
        if c is not None:
            yc = self._conv(x, c, None)
            y = yc if y is None else y + yc
        if y is None:  # all factors are zero
            y = self._conv(x, x.new_zeros(self.weight_shape), None)
        return y if self.bias is None else y + self.bias.to(y.dtype).view(-1, 1, 1)  # [C, H, W] input too

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, rank={self.rank}, "
            f"bits={self.bits}, {self._format_repr()}, conv_mode={self.conv_mode}, bias={self.bias is not None}"
        )


# --- specs: what the file's metadata says about each packed layer ---------------------------------------------------


def _layer_spec(layer: nn.Module) -> dict[str, Any]:
    bits = layer.nbits if isinstance(layer, ATMCLayer) else layer.bits
    spec = {
        "rank": layer.rank,
        "identity": int(layer._identity),
        "bits": bits,
        "bias": layer.bias is not None,
        "dtype": str(layer.C.dtype if isinstance(layer, ATMCLayer) else layer._dtype).removeprefix("torch."),
    }
    if isinstance(layer, (ATMCConv2d, PackedConv2d)):
        spec |= {
            "type": "conv2d",
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": list(layer.kernel_size),
            "stride": list(layer.stride),
            "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            "dilation": list(layer.dilation),
            "padding_mode": layer.padding_mode,
        }
        if layer.groups != 1:  # absent for groups=1: files of ungrouped models stay as they were
            spec["groups"] = layer.groups
        if isinstance(layer, PackedConv2d):
            spec["conv_mode"] = layer.conv_mode
    else:
        spec |= {"type": "linear", "in_features": layer.in_features, "out_features": layer.out_features}
    return spec


def _from_spec(spec: dict[str, Any], device, dtype: torch.dtype | None = None) -> PackedLayer:
    """An (uninitialized) packed layer of ``spec`` with buffers of the right sizes on ``device``."""
    if not isinstance(spec, dict):
        raise ValueError(f"bad packed-layer metadata {spec!r}: not a mapping")
    try:
        dtype = dtype or getattr(torch, spec["dtype"])
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype {spec['dtype']!r} is not a floating-point torch dtype")
        rank, identity, bits = spec["rank"], spec["identity"], spec["bits"]
        if not (
            type(rank) is int
            and rank >= 0
            and type(identity) is int
            and identity in (0, 1, 2)
            and (bits is None or (type(bits) is int and 1 <= bits <= 8))
        ):
            raise ValueError("rank must be an int >= 0, identity 0, 1 or 2 and bits None or 1..8")
        dims = (
            [
                spec[k]
                for k in (
                    ("in_features", "out_features") if spec["type"] == "linear" else ("in_channels", "out_channels")
                )
            ]
            if spec["type"] in ("linear", "conv2d")
            else []
        )
        if any(type(d) is not int or d < 1 for d in dims):
            raise ValueError(f"sizes must be ints >= 1, got {dims}")
        if type(spec["bias"]) is not bool:
            raise ValueError(f"bias must be true or false, got {spec['bias']!r}")
        common = {
            "rank": int(spec["rank"]),
            "identity": int(spec["identity"]),
            "bits": spec["bits"],
            "factors": spec["factors"],
            "device": device,
            "dtype": dtype,
        }
        if spec["type"] == "linear":
            return PackedLinear(int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"]), **common)
        if spec["type"] == "conv2d":
            padding = spec["padding"] if isinstance(spec["padding"], str) else tuple(spec["padding"])
            return PackedConv2d(
                int(spec["in_channels"]),
                int(spec["out_channels"]),
                tuple(spec["kernel_size"]),
                tuple(spec["stride"]),
                padding,
                tuple(spec["dilation"]),
                bool(spec["bias"]),
                spec["padding_mode"],
                conv_mode=spec.get("conv_mode", "dense"),
                groups=spec.get("groups", 1),
                **common,
            )
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ValueError(f"bad packed-layer metadata {spec!r}: {e}") from None
    raise ValueError(f"bad packed-layer metadata: unknown type {spec.get('type')!r}")


# --- model-level API -------------------------------------------------------------------------------------------------


def packed_layers(model: nn.Module) -> list[tuple[str, PackedLayer]]:
    """``(name, layer)`` of every packed layer, in module order."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, PackedLayer)]


def _swap(root: nn.Module, swaps: dict[int, nn.Module]) -> None:
    for parent in root.modules():  # every reference, so shared modules stay shared
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in swaps:
                parent._modules[child_name] = swaps[id(child)]


def pack_(model: nn.Module, *, progress: bool | None = None, formats: str = "speed") -> nn.Module:
    """Swap every finalized ATMC layer of ``model`` for its packed inference layer, in place.

    Layers that are already packed stay as they are; an unfinalized ATMC layer is refused.
    ``progress``: a tqdm bar over the layers (``None``: on for models of 5M+ weights). ``formats``:
    ``"speed"`` stores each factor as the smaller of dense codes and CSR (the fastest kernels at
    small batch, and what :func:`atmc_triton.size_report` counts); ``"size"`` also allows the bitmap
    format, the smallest storage (e.g. 10.1 -> 6.7 MB for a 4096^2 layer at ratio 0.05, b = 8) at a
    slower small-batch kernel (README, "Packed inference"). Returns ``model``.

    Example:
        >>> import atmc_triton as at
        >>> m = at.finalize_(at.compress_(nn.Sequential(nn.Linear(8, 4)), at.ATMCConfig(nnz=12, bits=2)))
        >>> pack_(m)[0]  # doctest: +ELLIPSIS
        PackedLinear(in_features=8, out_features=4, rank=0, bits=2, U=empty, V=empty, C=..., bias=True)
    """
    if formats not in _FORMAT_SETS:
        raise ValueError(f"pack_: formats must be one of {sorted(_FORMAT_SETS)}, got {formats!r}")
    root = unwrap(model)
    if isinstance(root, (ATMCLayer, PackedLayer)):
        raise ValueError("pack_ swaps submodules in place; wrap a bare layer first, e.g. nn.Sequential(layer)")
    layers = atmc_layers(root)
    if not layers and not packed_layers(root):
        raise ValueError("pack_: the model has no ATMC layers (call atmc_triton.compress_ and finalize_ first)")
    todo = [n for n, layer in layers if not bool(layer.finalized)]
    if todo:
        raise ValueError(f"pack_: {', '.join(todo)} not finalized: call atmc_triton.finalize_(model) first")
    from atmc_triton.api import _bar, progress_enabled

    show = progress_enabled(progress, sum(layer.C.numel() for _, layer in layers))
    cands = _FORMAT_SETS[formats]
    _swap(root, {id(layer): PackedLayer.from_atmc(layer, cands) for _, layer in _bar(layers, show, "pack_")})
    return model


def unpack(model: nn.Module) -> nn.Module:
    """Exact inverse of :func:`pack_`: every packed layer becomes its finalized ATMC layer again, in place."""
    root = unwrap(model)
    if isinstance(root, PackedLayer):
        raise ValueError("unpack swaps submodules in place; wrap a bare layer first, e.g. nn.Sequential(layer)")
    layers = packed_layers(root)
    if not layers:
        raise ValueError("unpack: the model has no packed layers")
    _swap(root, {id(layer): layer.to_atmc() for _, layer in layers})
    for _, layer in layers:  # the packed layers may live on elsewhere: free their decoded weights now
        layer._drop_caches()
    return model


def to_dense(model: nn.Module) -> nn.Module:
    """Another name of :func:`unpack`: packed layers back to finalized ATMC layers (``W = U V + C``, not plain
    ``nn.Linear`` / ``nn.Conv2d``: for those use :func:`atmc_triton.export_dense`)."""
    return unpack(model)


def save_packed(model: nn.Module, path: str | os.PathLike) -> int:
    """Write a packed model's ``state_dict`` as safetensors, with each packed layer's spec in the header.

    Returns the file size in bytes: the header (with a SHA-256 of itself and the tensors, which
    :func:`load_packed` checks) plus exactly the bytes of the tensors. The file is written to a temporary
    file in the same directory and renamed over ``path``, so an interrupted save leaves an existing file at
    ``path`` intact.
    """
    from safetensors.torch import save_file

    root = unwrap(model)
    layers = packed_layers(root)
    if not layers:
        raise ValueError("save_packed: the model has no packed layers (call atmc_triton.pack_ first)")
    if atmc_layers(root):
        raise ValueError("save_packed: the model still has ATMC layers (call atmc_triton.pack_ first)")
    tensors, aliases, seen = {}, {}, {}
    for k, v in root.state_dict(keep_vars=True).items():  # a shared module's tensors appear under each name
        key = (id(v), v.shape, v.dtype)
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            tensors[k] = v.detach().contiguous()
    header = {"version": FORMAT_VERSION, "layers": {n: layer.spec() for n, layer in layers}, "aliases": aliases}
    header["sha256"] = _packed_digest(header, tensors)  # load_packed refuses a file whose bytes changed since
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(parent):
        raise ValueError(f"save_packed: the directory {parent} does not exist (create it first)")
    if os.path.isdir(path):
        raise ValueError(f"save_packed: {os.fspath(path)} is a directory; give a file name such as model.safetensors")
    from atmc_triton.checkpoint import atomic_save

    # a temporary file renamed over ``path``: a crash mid-write leaves the previous file whole
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(header)}))
    return os.path.getsize(path)


def _packed_digest(header: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """SHA-256 of a packed file's header (as canonical JSON, its ``sha256`` left out) and tensors (by name)."""
    from atmc_triton.checkpoint import payload_digest

    text = json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True)
    return payload_digest({"header": text, "tensors": {k: tensors[k] for k in sorted(tensors)}})


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name) if parent_name else root
    except AttributeError:
        parent = None
    if parent is None or child not in parent._modules:
        raise ValueError(f"load_packed: the model has no submodule {name!r} to replace")
    _swap(root, {id(parent._modules[child]): module})  # every reference: a shared module stays shared


def load_packed(
    model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu", strict: bool = True
) -> nn.Module:
    """Load a file written by :func:`save_packed` into ``model`` (same architecture; may live on ``meta``).

    Every layer named in the file's header is replaced by a packed layer built straight from its
    spec (meta tensors, no dense weight), then ``load_state_dict(assign=True)`` adopts the file's
    tensors on ``device``, validating every packed layer as it fills it. Returns ``model``. A file whose bytes
    changed since :func:`save_packed` (its SHA-256 does not match) is a ``ValueError``. A layer spec that is
    not valid (a conv's stride 0, say), or a ``Linear`` / ``Conv2d`` of other sizes or conv geometry at a layer the
    file names, is a ``ValueError`` naming the layer, before anything changes; on any
    other failure (missing keys, corrupt data) every module, parameter and buffer is put back before raising.

    Example (a fresh twin on ``meta`` loads the saved file and gives the same outputs):
        >>> import os, tempfile, warnings, atmc_triton as at
        >>> def net():
        ...     torch.manual_seed(0)
        ...     return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> m = at.pack_(at.finalize_(at.compress_(net(), at.ATMCConfig(ratio=0.5, bits=4))))
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> _ = at.save_packed(m, path)
        >>> twin = at.load_packed(net().to("meta"), path)
        >>> twin[0]  # doctest: +ELLIPSIS
        PackedLinear(in_features=8, out_features=16, rank=0, bits=4, U=empty, V=empty, C=..., bias=True)
        >>> x = torch.rand(3, 8)
        >>> torch.equal(twin(x), m(x))
        True
    """
    from safetensors import safe_open

    if not isinstance(model, nn.Module) or not isinstance(path, (str, os.PathLike)):
        raise ValueError(
            f"load_packed(model, path): model must be an nn.Module and path a file path, got "
            f"{type(model).__name__} and {type(path).__name__}"
        )
    if not os.path.isfile(path):
        raise ValueError(f"load_packed: {path} does not exist or is not a file")
    try:  # a bad device is the caller's mistake, not a corrupted file
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"load_packed: device must be a torch device ('cpu', 'cuda:0'), got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load_packed: device {device!r} requested but no CUDA GPU is available")
    if dev.type == "meta":  # safetensors refuses it, which read as a corrupted file; the checks need the data
        raise ValueError("load_packed: device 'meta' holds no data to validate; load on 'cpu' or 'cuda'")
    try:
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as fh:
            meta = (fh.metadata() or {}).get(META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()} if meta is not None else {}
    except Exception as e:  # SafetensorError (truncated, bad header), OSError, ...
        msg = " ".join(str(e).split())[:160]
        raise ValueError(
            f"load_packed: {path} is not a readable safetensors file, truncated or corrupted "
            f"({type(e).__name__}: {msg})"
        ) from None
    if meta is None:
        raise ValueError(f"load_packed: {path} was not written by save_packed (no {META_KEY!r} header)")
    try:
        header = json.loads(meta)
    except json.JSONDecodeError as e:
        raise ValueError(f"load_packed: {path} has a corrupted {META_KEY!r} header ({e})") from None
    if not isinstance(header, dict) or header.get("version") not in _READABLE_VERSIONS:
        version = header.get("version") if isinstance(header, dict) else None
        raise ValueError(f"load_packed: unsupported packed format version {version}")
    digest = header.get("sha256")  # (files written before 2026-12-02 carry none)
    if digest is not None and digest != _packed_digest(header, tensors):
        raise ValueError(
            f"load_packed: {path} is corrupted: its SHA-256 does not match the one save_packed wrote (a changed "
            "byte in the tensors or the header)"
        )
    layers = header.get("layers")
    if not isinstance(layers, dict) or not layers or not all(isinstance(n, str) and n for n in layers):
        raise ValueError(f"load_packed: {path}: the header's 'layers' must map layer names to specs")
    aliases = header.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in tensors for v in aliases.values()):
        raise ValueError(f"load_packed: {path}: bad 'aliases' in the header")
    tensors |= {k: tensors[v] for k, v in aliases.items()}  # the names of shared modules' tensors
    root = unwrap(model)
    built = {}
    for name, spec in layers.items():  # before anything changes
        try:
            built[name] = _from_spec(spec, "meta")
        except ValueError as e:
            raise ValueError(f"load_packed: {path}: layer {name!r}: {e}") from None
        _check_fits(root, name, spec, path)
    # every module's children, parameters and buffers as they are: a failure below puts them all back (the
    # swaps and assign=True replace entries of these dicts, never tensors in place)
    snapshot = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers)) for m in root.modules()]
    try:
        attention_shells_(root, list(layers))  # nn.MultiheadAttention -> ATMCMultiheadAttention where compressed
        for name, layer in built.items():
            _set_module(root, name, layer)
        for key in ("atmc_nnz_budget", "atmc_bits_budget"):  # buffers compress_ put on the root
            if key in tensors and key not in root._buffers:
                root.register_buffer(key, torch.empty((), dtype=tensors[key].dtype, device="meta"))
        try:
            root.load_state_dict(tensors, strict=strict, assign=True)
        except RuntimeError as e:  # missing / unexpected keys, size or dtype mismatches
            raise ValueError(f"load_packed: {path} does not fit the model: {e}") from None
        # load_state_dict validated every layer it filled (_load_from_state_dict)
        for name, layer in packed_layers(root):
            if any(t.is_meta for t in layer.state_dict().values()):  # strict=False and the file lacks its tensors
                raise ValueError(f"load_packed: {path} holds no tensors for packed layer {name!r}")
    except BaseException:
        for m, mods, params, bufs in snapshot:
            for d, was in ((m._modules, mods), (m._parameters, params), (m._buffers, bufs)):
                d.clear()
                d.update(was)
        raise
    return model


def _check_fits(root: nn.Module, name: str, spec: object, path) -> None:
    """The model's module at ``name``, when it is a Linear / Conv2d (plain, ATMC or packed), has the sizes (and a
    conv its stride, padding, dilation, groups and padding mode) of the file's layer: ``load_packed`` replaces it, and
    a model built with other sizes (another ``num_classes``) would silently take the file's."""
    try:
        old = root.get_submodule(name)
    except AttributeError:
        return  # _set_module names the missing submodule
    if not isinstance(spec, dict) or spec.get("type") not in ("linear", "conv2d"):
        return  # _from_spec names the bad spec
    if isinstance(old, (nn.Linear, ATMCLinear, PackedLinear)):
        mine, keys = "linear", ("in_features", "out_features")
    elif isinstance(old, (nn.Conv2d, ATMCConv2d, PackedConv2d)):
        mine, keys = "conv2d", ("in_channels", "out_channels", "kernel_size")
    else:
        return  # e.g. an attention shell's placeholder

    def value(k: str) -> object:
        return list(getattr(old, k)) if isinstance(getattr(old, k), tuple) else getattr(old, k)

    have, want = {k: value(k) for k in keys}, {k: spec.get(k) for k in keys}
    if mine == "conv2d" and spec.get("type") == mine:  # the geometry too, named where it differs
        for k in ("stride", "padding", "dilation", "groups", "padding_mode"):
            if value(k) != spec.get(k, 1 if k == "groups" else None):  # "groups" is absent for 1
                have[k], want[k] = value(k), spec.get(k)
    if spec.get("type") != mine or have != want:
        raise ValueError(
            f"load_packed: {path} does not fit the model: layer {name!r} is {type(old).__name__} {have} in the model "
            f"but a {spec.get('type')} {want} in the file (build the model with the file's sizes and geometry)"
        )


def cached_nbytes(model: nn.Module) -> int:
    """Bytes of the decoded dense weights that ``model``'s packed layers hold (freed by :func:`unpack`)."""
    return sum(layer.cache_nbytes for _, layer in packed_layers(model))


def packed_nbytes(model: nn.Module) -> int:
    """Bytes of every packed factor of ``model`` (codes, codebooks, indices; not biases)."""
    return sum(layer.factor_nbytes(f) for _, layer in packed_layers(model) for f in FACTORS)

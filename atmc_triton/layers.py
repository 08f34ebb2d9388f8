"""ATMC layers: every weight is ``W = U V + C`` (plus the identity of the identity init; ``W = C`` at rank 0)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from atmc_triton.config import ATMCConfig
from atmc_triton.kernels import IDENTITY_NONE, IDENTITY_U, IDENTITY_V, NUM_SLOTS, lloyd_quantize

__all__ = [
    "ATMCLayer",
    "ATMCLinear",
    "ATMCConv2d",
    "ATMCMultiheadAttention",
    "FACTORS",
    "IDENTITY_NONE",
    "IDENTITY_U",
    "IDENTITY_V",
    "cached_weights",
]

FACTORS = ("U", "V", "C")


def _factor_init(w2d: Tensor, cfg: ATMCConfig) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(U [out, r], V [r, in], C [out, in], identity)`` reproducing ``w2d [out, in]``."""
    out, inn = w2d.shape
    if cfg.init == "sparse":  # W = C: no low-rank part, U [out, 0] and V [0, in] are empty
        empty = {"dtype": w2d.dtype, "device": w2d.device}
        return torch.zeros(out, 0, **empty), torch.zeros(0, inn, **empty), w2d.clone(), IDENTITY_NONE
    C = torch.zeros_like(w2d)
    if cfg.init == "identity":  # the reference: one factor holds W, the other is 0 (+ I)
        if inn <= out:  # r = in:  W = U (V + I) + C with U = W, V = 0
            return w2d.clone(), torch.zeros(inn, inn, dtype=w2d.dtype, device=w2d.device), C, IDENTITY_V
        return torch.zeros(out, out, dtype=w2d.dtype, device=w2d.device), w2d.clone(), C, IDENTITY_U
    r = cfg.rank_for(out, inn)
    P, S, Qh = torch.linalg.svd(w2d.double(), full_matrices=False)
    s = S[:r].sqrt()
    U = (P[:, :r] * s).to(w2d.dtype)
    V = (s[:, None] * Qh[:r]).to(w2d.dtype)
    return U, V, C, IDENTITY_NONE


class ATMCLayer(nn.Module):
    """Shared state of :class:`ATMCLinear` and :class:`ATMCConv2d`.

    Parameters ``U [out, r]``, ``V [r, in]``, ``C [out, in]`` (``in`` = in_channels * kh * kw
    for convolutions); ``r = 0`` (``init="sparse"``) leaves ``U`` and ``V`` and their buffers
    empty and ``W = C``. Buffers, updated in place by :class:`atmc_triton.ADMM`:
    ``{U,V,C}_z`` (quantized copy Z), ``{U,V,C}_u`` (dual u), ``{U,V,C}_mask`` (nonzeros),
    ``codebook [3, 257]`` (rows U, V, C; slot 0 is the pinned zero), ``bits`` (0 = no
    quantizer), ``identity`` (0 none, 1: W = (U + I) V + C, 2: W = U (V + I) + C) and
    ``finalized``.
    """

    def _setup(self, out: int, inn: int, rank: int, identity: int, bits: int | None, bias: bool, dd: dict):
        if type(identity) is not int or identity not in (IDENTITY_NONE, IDENTITY_U, IDENTITY_V):
            raise ValueError(f"identity must be {IDENTITY_NONE} (none), {IDENTITY_U} or {IDENTITY_V}, got {identity!r}")
        if bits is not None and (type(bits) is not int or not 1 <= bits <= 8):  # (not a bool, not 2.5)
            raise ValueError(f"bits must be an int in 1..8 or None, got {bits!r}")
        if identity == IDENTITY_U and rank != out or identity == IDENTITY_V and rank != inn:
            raise ValueError(f"identity={identity} needs full rank, got rank={rank} for [{out}, {inn}]")
        if not (isinstance(rank, int) and 0 <= rank <= min(out, inn)):
            raise ValueError(f"rank must be an int in 0..{min(out, inn)} for a [{out}, {inn}] weight, got {rank!r}")
        self.rank = rank
        self._identity = identity
        # the bits buffer's value, kept here too: load_state_dict checks a checkpoint against it and _identity, as
        # after model.to("meta") and to_empty(...) the buffers hold garbage until the state dict is loaded
        self._nbits = bits or 0
        shapes = {"U": (out, rank), "V": (rank, inn), "C": (out, inn)}
        for f, shape in shapes.items():
            self.register_parameter(f, nn.Parameter(torch.zeros(shape, **dd)))
            self.register_buffer(f"{f}_z", torch.zeros(shape, **dd))
            self.register_buffer(f"{f}_u", torch.zeros(shape, **dd))
            self.register_buffer(f"{f}_mask", torch.zeros(shape, dtype=torch.bool, device=dd["device"]))
        self.bias = nn.Parameter(torch.zeros(out, **dd)) if bias else None
        self.register_buffer("codebook", torch.zeros(3, NUM_SLOTS, dtype=torch.float32, device=dd["device"]))
        self.register_buffer("bits", torch.tensor(bits or 0, dtype=torch.int8, device=dd["device"]))
        self.register_buffer("identity", torch.tensor(identity, dtype=torch.int8, device=dd["device"]))
        self.register_buffer("finalized", torch.tensor(False, device=dd["device"]))

    @property
    def nbits(self) -> int | None:
        """Codebook bits of this layer, or ``None`` without a quantizer."""
        return int(self.bits) or None

    def factors(self) -> list[tuple[str, nn.Parameter]]:
        return [(f, getattr(self, f)) for f in FACTORS]

    def _factor_versions(self) -> tuple | None:
        try:  # (an inference-mode tensor keeps no version counter)
            return tuple((p.data_ptr(), p._version) for _, p in self.factors())
        except RuntimeError:
            return None

    def _mark_z(self) -> None:
        """Record the factors as they are now: Z was just set from them, or they were trained by ADMM (whose
        steps move them toward Z). :meth:`_z_stale` then tells whether anything else wrote them since."""
        self.__dict__["_z_mark"] = self._factor_versions()

    def _z_stale(self) -> bool:
        """The factors were written in place since :meth:`_mark_z` (another optimizer, a manual edit), so Z no
        longer follows them. Moved or copied factors (new storage) are not judged."""
        mark, now = self.__dict__.get("_z_mark"), self._factor_versions()
        return mark is not None and now is not None and any(a[0] == b[0] and a[1] != b[1] for a, b in zip(now, mark))

    _cached_w: Tensor | None = None

    def __getstate__(self) -> dict:
        """Pickle and ``copy.deepcopy`` leave out :func:`cached_weights`' cache: a copy taken inside the context
        would otherwise keep that weight after its own factors change."""
        state = dict(self.__dict__)
        state.pop("_cached_w", None)
        return state

    def weight_2d(self) -> Tensor:
        """The effective weight as ``[out, in]``: ``U V + C`` plus the identity term."""
        if self._cached_w is not None:
            return self._cached_w
        # at rank 0 (init="sparse") this is C plus an empty product: one copy of C, and U, V stay in the graph
        # with empty gradients (DDP requires every parameter to take part)
        w = torch.addmm(self.C, self.U, self.V)
        if self._identity == IDENTITY_U:  # (U + I) V = U V + V
            w = w + self.V
        elif self._identity == IDENTITY_V:  # U (V + I) = U V + U
            w = w + self.U
        return w

    @property
    def weight(self) -> Tensor:
        """Materialized weight in the original layer's shape (differentiable)."""
        return self.weight_2d().view(self.weight_shape)

    @torch.no_grad()
    def _load_dense(self, module: nn.Module, cfg: ATMCConfig) -> None:
        U, V, C, identity = _factor_init(module.weight.detach().reshape(self.C.shape), cfg)
        if identity != self._identity:
            raise AssertionError("identity side disagrees with the constructor")
        for f, t in zip(FACTORS, (U, V, C)):
            getattr(self, f).copy_(t)
        if self.bias is not None:
            self.bias.copy_(module.bias.detach())
        self.reset_admm_state(cfg.max_iter, cfg.tol, cfg.quant_method)

    @torch.no_grad()
    def reset_admm_state(self, max_iter: int = 20, tol: float = 1e-5, method: str = "fast") -> None:
        """Z := Quant_b(factor) (or the factor itself without a quantizer), u := 0, masks := nonzeros."""
        vals = [getattr(self, f).detach().reshape(-1).float() for f in FACTORS]
        if self.nbits is not None:
            flat = torch.cat(vals)
            n = [v.numel() for v in vals]
            offsets = torch.tensor([0, n[0], n[0] + n[1], sum(n)], dtype=torch.int64, device=flat.device)
            bits = torch.full((3,), self.nbits, dtype=torch.int32, device=flat.device)
            book, _, q, _ = lloyd_quantize(flat, offsets, bits, max_iter, tol, method)
            vals = list(torch.split(q, n))
            self.codebook.copy_(book)
        for f, v in zip(FACTORS, vals):
            p = getattr(self, f)
            getattr(self, f"{f}_z").copy_(v.view(p.shape))
            getattr(self, f"{f}_u").zero_()
            getattr(self, f"{f}_mask").copy_(p != 0)
        self.finalized.fill_(False)
        self._mark_z()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        u, ident = state_dict.get(prefix + "U"), state_dict.get(prefix + "identity")
        if isinstance(u, Tensor) and u.dim() == 2 and u.shape[1] != self.rank:  # e.g. identity or svd into sparse
            theirs = _init_name(u.shape[1], int(ident) if isinstance(ident, Tensor) else None)
            raise ValueError(
                f"{prefix or 'layer '}U: the checkpoint was saved with {theirs} (U {tuple(u.shape)}), this layer "
                f"has {_init_name(self.rank, self._identity)} (U {tuple(self.U.shape)}); build the model with "
                "the checkpoint's ATMCConfig.init / rank"
            )
        nbits = self.__dict__.get("_nbits")  # absent in layers pickled before it existed
        for name, mine in (("bits", int(self.bits) if nbits is None else nbits), ("identity", self._identity)):
            key = prefix + name
            if key in state_dict and int(state_dict[key]) != mine:
                raise ValueError(
                    f"{prefix or 'layer '}{name}: checkpoint has {int(state_dict[key])}, this layer has "
                    f"{mine}; it was saved from another ATMC config"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._mark_z()  # the factors and their Z come from the same state


def _init_name(rank: int, identity: int | None) -> str:
    """The ``ATMCConfig.init`` a layer of this rank and identity side came from, in words."""
    if rank == 0:
        return "init='sparse'"
    if identity in (IDENTITY_U, IDENTITY_V):
        return f"init='identity' (rank {rank})"
    return f"init='svd' (rank {rank})" if identity == IDENTITY_NONE else f"rank {rank}"


@contextlib.contextmanager
def cached_weights(model: nn.Module):
    """Inside this context every ATMC layer of ``model`` reuses one detached ``U V + C``.

    For attacks and evaluation: the factors do not change there and only input gradients are
    needed, so materializing W once per context instead of once per forward saves a matmul per
    layer and PGD step. Factors get no gradients inside, and must not change there; copies taken
    inside (``copy.deepcopy``, pickle) carry no cache.

    Example:
        >>> model = nn.Sequential(ATMCLinear.from_dense(nn.Linear(4, 2), ATMCConfig(nnz=8)))
        >>> with cached_weights(model):
        ...     y = model(torch.ones(1, 4))
    """
    layers = [m for m in model.modules() if isinstance(m, ATMCLayer)]
    saved = [m._cached_w for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m._cached_w = None
                m._cached_w = m.weight_2d().detach()
        yield model
    finally:
        for m, w in zip(layers, saved):
            m._cached_w = w


def _check_dense(module: nn.Module, kind: type) -> None:
    if not isinstance(module, kind):
        raise ValueError(f"from_dense expects {kind.__name__}, got {type(module).__name__}")
    if not module.weight.dtype.is_floating_point:
        raise ValueError(f"can only compress floating-point weights, got dtype {module.weight.dtype}")
    if module.weight.is_meta:
        raise ValueError(
            "from_dense: the layer's weight is on the meta device (no values to factor); materialize it first"
        )


class ATMCLinear(ATMCLayer):
    """``nn.Linear`` with ``W = U V + C``: same shapes and bias as the original.

    Example:
        >>> lin = nn.Linear(7, 5)
        >>> atmc = ATMCLinear.from_dense(lin, ATMCConfig(ratio=0.1))
        >>> torch.allclose(atmc(torch.ones(2, 7)), lin(torch.ones(2, 7)), atol=1e-6)
        True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int | None = None,
        identity: int = IDENTITY_NONE,
        bits: int | None = 8,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        rank = min(out_features, in_features) if rank is None else rank
        self._setup(out_features, in_features, rank, identity, bits, bias, {"device": device, "dtype": dtype})

    @classmethod
    def from_dense(cls, module: nn.Linear, cfg: ATMCConfig, bits: int | None = ...) -> ATMCLinear:
        """Build from a trained ``nn.Linear`` (``bits`` overrides ``cfg.bits`` for this layer)."""
        _check_dense(module, nn.Linear)
        out, inn = module.weight.shape
        identity = (IDENTITY_V if inn <= out else IDENTITY_U) if cfg.init == "identity" else IDENTITY_NONE
        layer = cls(
            inn,
            out,
            module.bias is not None,
            rank=cfg.rank_for(out, inn),
            identity=identity,
            bits=cfg.bits if bits is ... else bits,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        layer._load_dense(module, cfg)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_2d(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bits={self.nbits}, bias={self.bias is not None}"
        )


class ATMCConv2d(ATMCLayer):
    """``nn.Conv2d`` with ``W [out, in/groups*kh*kw] = U V + C``; same stride, padding, dilation,
    groups (grouped and depthwise convolutions too), padding mode and bias as the original.

    Example:
        >>> conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        >>> atmc = ATMCConv2d.from_dense(conv, ATMCConfig(ratio=0.1))
        >>> x = torch.randn(1, 3, 9, 9)
        >>> torch.allclose(atmc(x), conv(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        rank: int | None = None,
        identity: int = IDENTITY_NONE,
        bits: int | None = 8,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not (isinstance(groups, int) and groups >= 1 and in_channels % groups == 0 and out_channels % groups == 0):
            raise ValueError(
                f"ATMCConv2d: groups={groups!r} must be an int >= 1 dividing {in_channels} and {out_channels}"
            )
        # torch's own checks of the convolution's settings (padding mode, "same" with stride, ...), on no memory;
        # its normalized settings, and its padding for padding_mode != "zeros" ("same" included), are ours too
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device="meta"
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = (
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
        )
        self.groups, self.padding_mode = groups, padding_mode
        self.weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        inn = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        rank = min(out_channels, inn) if rank is None else rank
        self._setup(out_channels, inn, rank, identity, bits, bias, {"device": device, "dtype": dtype})
        if padding_mode != "zeros":
            self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, cfg: ATMCConfig, bits: int | None = ...) -> ATMCConv2d:
        """Build from a trained ``nn.Conv2d`` (``bits`` overrides ``cfg.bits`` for this layer)."""
        _check_dense(module, nn.Conv2d)
        out = module.out_channels
        inn = module.weight[0].numel()
        identity = (IDENTITY_V if inn <= out else IDENTITY_U) if cfg.init == "identity" else IDENTITY_NONE
        layer = cls(
            module.in_channels,
            out,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            rank=cfg.rank_for(out, inn),
            identity=identity,
            bits=cfg.bits if bits is ... else bits,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
        layer._load_dense(module, cfg)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_2d().view(self.weight_shape)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, _pair(0), self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, rank={self.rank}, "
            f"bits={self.nbits}, bias={self.bias is not None}"
        )


class ATMCMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose projections are compressed layers.

    ``in_proj`` (``[3E, E]``, the stacked q/k/v weight) and ``out_proj`` (``[E, E]``) are
    :class:`ATMCLinear` layers (after :func:`atmc_triton.pack_`, ``PackedLinear``) in the global
    budget. ``in_proj_weight`` / ``in_proj_bias`` are read-only properties giving the effective
    weight, and ``out_proj.weight`` is the effective weight too, so torch's own
    ``nn.MultiheadAttention.forward`` runs unchanged (its fast path included) and the outputs
    equal those of a plain ``nn.MultiheadAttention`` holding the same weights, bit for bit.
    Only self-consistent shapes are compressed (``kdim == vdim == embed_dim``).

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
        >>> atmc = ATMCMultiheadAttention.from_dense(mha, ATMCConfig(ratio=0.1))
        >>> x = torch.randn(1, 3, 8)
        >>> torch.allclose(atmc(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
        True
    """

    def __init__(self, mha: nn.MultiheadAttention, in_proj: nn.Module, out_proj: nn.Module):
        nn.Module.__init__(self)
        if not mha._qkv_same_embed_dim:
            raise ValueError("ATMCMultiheadAttention needs kdim == vdim == embed_dim")
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first"):
            setattr(self, name, getattr(mha, name))
        self.head_dim, self.add_zero_attn = mha.head_dim, mha.add_zero_attn
        self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
        self.bias_k, self.bias_v = mha.bias_k, mha.bias_v  # parameters, shared with mha until it is dropped
        self.in_proj = in_proj
        self.out_proj = out_proj
        self.train(mha.training)

    @property
    def in_proj_weight(self) -> Tensor:  # [3E, E]
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Tensor | None:  # [3E]
        return self.in_proj.bias

    @classmethod
    def from_dense(
        cls, mha: nn.MultiheadAttention, cfg: ATMCConfig, bits: int | None = ..., out_bits: int | None = ...
    ) -> ATMCMultiheadAttention:
        """Build from a trained ``nn.MultiheadAttention`` (``bits`` / ``out_bits``: per-projection overrides)."""
        if not isinstance(mha, nn.MultiheadAttention) or isinstance(mha, ATMCMultiheadAttention):
            raise ValueError(f"from_dense expects nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim:
            raise ValueError("ATMC compresses nn.MultiheadAttention with kdim == vdim == embed_dim only")
        if not mha.in_proj_weight.dtype.is_floating_point:
            raise ValueError(f"can only compress floating-point weights, got dtype {mha.in_proj_weight.dtype}")
        e = mha.embed_dim
        dd = {"device": mha.in_proj_weight.device, "dtype": mha.in_proj_weight.dtype}
        lin = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None, **dd)
        with torch.no_grad():
            lin.weight.copy_(mha.in_proj_weight)
            if lin.bias is not None:
                lin.bias.copy_(mha.in_proj_bias)
        in_proj = ATMCLinear.from_dense(lin, cfg, bits)
        out_proj = ATMCLinear.from_dense(mha.out_proj, cfg, bits if out_bits is ... else out_bits)
        return cls(mha, in_proj, out_proj)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def attention_shells_(root: nn.Module, names: list[str]) -> None:
    """Turn every ``nn.MultiheadAttention`` of ``root`` whose ``NAME.in_proj`` is in ``names`` into an
    :class:`ATMCMultiheadAttention` shell (its projections placeholders), so a packed file's
    ``NAME.in_proj`` / ``NAME.out_proj`` layers can be put in (used by ``load_packed``)."""
    wanted = {n.rpartition(".")[0] for n in names if n.rpartition(".")[2] == "in_proj"}
    swaps = {}
    for name, m in root.named_modules():
        if name in wanted and type(m) is nn.MultiheadAttention:
            swaps[id(m)] = ATMCMultiheadAttention(m, nn.Identity(), m.out_proj)
    for parent in root.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in swaps:
                parent._modules[child_name] = swaps[id(child)]

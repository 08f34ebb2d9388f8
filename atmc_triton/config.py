"""Frozen, validated configuration for ATMC compression."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["ATMCConfig", "FLOORS", "INITS"]

INITS = ("identity", "svd", "sparse")
FLOORS = ("auto", "last", "rows", "none")


def _is_int(x: object) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    """A finite real number (Python's or numpy's), not a bool."""
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int past float range
        return False


def _plain(x: object) -> object:
    """``x`` as a builtin ``int`` / ``float`` when it is another integer / real scalar (numpy's), else ``x``.

    Configs store builtins, so that they print, compare, hash and serialize (JSON, ``weights_only``
    checkpoints) the same whichever number type the caller passed.

    Example:
        >>> import numpy as np
        >>> type(_plain(np.int64(3))).__name__, type(_plain(np.float32(0.5))).__name__, _plain("x")
        ('int', 'float', 'x')
    """
    if isinstance(x, bool) or type(x) in (int, float):
        return x
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x)
    return x


def _plain_fields(obj: object) -> None:
    """Replace every numpy (or other non-builtin) number field of dataclass ``obj`` by its builtin value."""
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, _plain(getattr(obj, f.name)))


def _check_fields(obj: object, ints: tuple = (), reals: tuple = (), flags: tuple = ()) -> None:
    """Refuse a field of dataclass ``obj`` that is not an int (``ints``), a finite number (``reals``) or a bool
    (``flags``): a ``ValueError`` naming ``Class.field``. ``None`` passes where it is the field's default."""
    optional = {f.name for f in dataclasses.fields(obj) if f.default is None}
    kinds = ((ints, _is_int, "an int"), (reals, _is_real, "a finite number"), (flags, _is_bool, "True or False"))
    for names, ok, what in kinds:
        for name in names:
            v = getattr(obj, name)
            if not ok(v) and not (v is None and name in optional):
                raise ValueError(f"{type(obj).__name__}.{name} must be {what}, got {v!r}")


def _is_bool(x: object) -> bool:
    return isinstance(x, bool)


def _check_bits(name: str, b: object) -> None:
    if not (_is_int(b) and 1 <= b <= 8):
        raise ValueError(f"{name} must be an int in 1..8, got {b!r}")


@dataclass(frozen=True)
class ATMCConfig:
    """How ATMC compresses a model: budget, quantizer, ADMM penalty and factor init.

    Give exactly one budget: ``ratio`` (the paper's x-axis, compressed bits over the
    32-bit dense size of all compressed conv+linear weights) or ``nnz`` (the global
    number of nonzeros ``k`` kept across every U, V and C).

    Args:
        ratio: size ratio in (0, 1); turned into ``k`` by :func:`atmc_triton.nnz_budget`.
        nnz: explicit global nonzero budget ``k >= 0``.
        bits: codebook bits ``b`` in 1..8 (2^b free centres plus a pinned zero), or
            ``None`` for 32-bit factors with no quantizer (the paper's "ATMC-32b").
        layer_bits: per-layer override ``{module name or fnmatch pattern: bits}``;
            the first matching entry wins (exact names are tried before patterns).
        rho: ADMM penalty ``rho / 2 * ||W - Z + u||^2``.
        rho_factor, rho_every: multiply ``rho`` by ``rho_factor`` after every
            ``rho_every`` quantizer steps (the Robust-ADMM schedule; 1.0 = constant).
        quant_interval: run the quantizer + dual update every this many steps.
        max_iter, tol: Lloyd iteration cap and relative-SSE tolerance.
        quant_method: codebook method of the quantizer: ``"fast"`` (DP init + Lloyd, within
            2 % of the optimum), ``"optimal"`` (exact DP) or ``"lloyd"`` (the legacy init).
        init: ``"sparse"`` (default; W = C: no low-rank part, ``U [out, 0]`` and ``V [0, in]``
            are empty; pruning plus quantization under the same ADMM, budget and codebooks, about
            half the identity init's training state), ``"identity"`` (the reference's
            W = (B + I) A + C, full rank) or ``"svd"`` (truncated SVD, U V = best rank-r
            approximation, C = 0). The low-rank part bought no accuracy at equal size on digits
            and MNIST (README, "A lean C-only layer").
        rank: SVD rank, an int ``>= 1`` or a fraction in (0, 1] of ``min(out, in*kh*kw)``;
            only with ``init="svd"`` (``None`` = full rank).
        exclude: module names or fnmatch patterns (e.g. ``("fc", "*.head")``) that
            :func:`atmc_triton.compress_` leaves dense; a pattern that matches no compressible
            layer is a ``ValueError`` there.
        floor: per-layer floor, entries kept inside the global budget whatever their magnitude
            (the ADMM projection and ``finalize_`` spend ``k - |floor|`` on the global top-k):
            ``"last"``: the largest entry of every compressed layer (no layer ends at zero
            nonzeros) plus one entry per output unit of the last compressed layer (normally the
            classifier: no logit becomes input-independent); ``"rows"``: one entry per output
            unit of every compressed layer; ``"none"``: no floor (layers may be pruned away
            entirely); ``"auto"`` (default): ``"rows"`` if that floor can take at most a quarter of
            the budget ``k`` (counted from the layers' shapes), else ``"last"`` if it can, else
            ``"none"`` with a warning (tiny budgets); resolved from the model's current ``k``, so a
            loaded state resolves as its model did. An explicit ``"last"`` or ``"rows"`` above half
            of ``k`` is a ``ValueError``.

    Example:
        >>> cfg = ATMCConfig(ratio=0.01, bits=8)
        >>> cfg.bits_for("features.0")
        8
    """

    ratio: float | None = None
    nnz: int | None = None
    bits: int | None = 8
    layer_bits: Mapping[str, int] | None = field(default=None)
    rho: float = 0.1
    rho_factor: float = 1.0
    rho_every: int = 1
    quant_interval: int = 10
    max_iter: int = 20
    tol: float = 1e-5
    quant_method: str = "fast"
    init: str = "sparse"
    rank: int | float | None = None
    exclude: tuple[str, ...] | None = None
    floor: str = "auto"

    def __post_init__(self) -> None:
        _plain_fields(self)
        if (self.ratio is None) == (self.nnz is None):
            raise ValueError("ATMCConfig needs exactly one budget: ratio=... or nnz=...")
        if self.ratio is not None and not (_is_real(self.ratio) and 0.0 < self.ratio < 1.0):
            raise ValueError(f"ATMCConfig.ratio must be a number in (0, 1), got {self.ratio!r}")
        if self.nnz is not None and not (_is_int(self.nnz) and self.nnz >= 0):
            raise ValueError(f"ATMCConfig.nnz must be an int >= 0, got {self.nnz!r}")
        if self.bits is not None:
            _check_bits("ATMCConfig.bits", self.bits)
        lb = self.layer_bits
        pairs = isinstance(lb, tuple) and all(isinstance(e, tuple) and len(e) == 2 for e in lb)  # a frozen copy
        if lb is not None and not isinstance(lb, Mapping) and not pairs:
            raise ValueError(f"ATMCConfig.layer_bits must be a mapping {{module name or pattern: bits}}, got {lb!r}")
        lb = {k: _plain(v) for k, v in dict(lb or {}).items()}
        if lb and self.bits is None:
            raise ValueError("ATMCConfig.layer_bits needs a quantizer: set bits to 1..8, not None")
        for name, b in lb.items():
            if not isinstance(name, str):
                raise ValueError(f"ATMCConfig.layer_bits keys must be module names, got {name!r}")
            _check_bits(f"ATMCConfig.layer_bits[{name!r}]", b)
        # freeze the mapping so the dataclass stays hashable and immutable
        object.__setattr__(self, "layer_bits", tuple(lb.items()) or None)
        if not (_is_real(self.rho) and self.rho >= 0):
            raise ValueError(f"ATMCConfig.rho must be a finite number >= 0, got {self.rho!r}")
        if not (_is_real(self.rho_factor) and self.rho_factor > 0):
            raise ValueError(f"ATMCConfig.rho_factor must be > 0, got {self.rho_factor!r}")
        for name in ("rho_every", "quant_interval"):
            v = getattr(self, name)
            if not (_is_int(v) and v >= 1):
                raise ValueError(f"ATMCConfig.{name} must be an int >= 1, got {v!r}")
        if not (_is_int(self.max_iter) and self.max_iter >= 0):
            raise ValueError(f"ATMCConfig.max_iter must be an int >= 0, got {self.max_iter!r}")
        if not (_is_real(self.tol) and self.tol >= 0):
            raise ValueError(f"ATMCConfig.tol must be a finite number >= 0, got {self.tol!r}")
        if self.quant_method not in ("fast", "optimal", "lloyd"):
            raise ValueError(f"ATMCConfig.quant_method must be 'fast', 'optimal' or 'lloyd', got {self.quant_method!r}")
        if self.init not in INITS:
            raise ValueError(f"ATMCConfig.init must be one of {INITS}, got {self.init!r}")
        ex = self.exclude
        if isinstance(ex, str):
            ex = (ex,)
        if ex is not None and not (isinstance(ex, (tuple, list)) and all(isinstance(e, str) and e for e in ex)):
            raise ValueError(f"ATMCConfig.exclude must be a sequence of module names or fnmatch patterns, got {ex!r}")
        object.__setattr__(self, "exclude", tuple(ex) or None if ex is not None else None)
        if self.floor not in FLOORS:
            raise ValueError(f"ATMCConfig.floor must be one of {FLOORS}, got {self.floor!r}")
        if self.rank is not None:
            if self.init != "svd":
                what = "has no low-rank part (rank 0)" if self.init == "sparse" else "is full rank"
                raise ValueError(f"ATMCConfig.rank applies to init='svd' only; init={self.init!r} {what}")
            if _is_int(self.rank):
                if self.rank < 1:
                    raise ValueError(f"ATMCConfig.rank must be >= 1, got {self.rank!r}")
            elif not (_is_real(self.rank) and 0.0 < self.rank <= 1.0):
                raise ValueError(f"ATMCConfig.rank must be an int >= 1 or a fraction in (0, 1], got {self.rank!r}")

    @property
    def quantized(self) -> bool:
        """Whether the Lloyd quantizer (and the ADMM coupling) is on."""
        return self.bits is not None

    def bits_for(self, name: str) -> int | None:
        """Bits for the module called ``name`` (``layer_bits`` override, else ``bits``)."""
        entries = self.layer_bits or ()
        for pattern, b in entries:
            if pattern == name:
                return b
        for pattern, b in entries:
            if fnmatch.fnmatchcase(name, pattern):
                return b
        return self.bits

    def excluded(self, name: str) -> str | None:
        """The ``exclude`` entry that matches module ``name`` (exact name or fnmatch pattern), else ``None``."""
        for pattern in self.exclude or ():
            if pattern == name or fnmatch.fnmatchcase(name, pattern):
                return pattern
        return None

    def rank_for(self, out_features: int, in_features: int) -> int:
        """Rank r of ``U [out, r] V [r, in]`` for a layer of that shape (0 for ``init="sparse"``)."""
        if self.init == "sparse":
            return 0
        full = min(out_features, in_features)
        if self.rank is None:
            return full
        if _is_int(self.rank):
            if self.rank > full:
                raise ValueError(
                    f"ATMCConfig.rank={self.rank} is larger than this layer allows "
                    f"(min(out={out_features}, in={in_features}) = {full})"
                )
            return self.rank
        return max(1, min(full, round(self.rank * full)))

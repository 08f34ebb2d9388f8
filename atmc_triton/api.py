"""``compress_`` (swap dense layers for ATMC layers) and ``finalize_`` (commit to Z and the budget)."""

from __future__ import annotations

import fnmatch
import itertools
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

from atmc_triton.budget import atmc_layers, auto_floor, fit_budget_, floor_indices, nnz_budget, nnz_budget_of, unwrap
from atmc_triton.config import FLOORS, ATMCConfig
from atmc_triton.kernels import project_topk_
from atmc_triton.layers import FACTORS, ATMCConv2d, ATMCLayer, ATMCLinear, ATMCMultiheadAttention

__all__ = ["CollapseWarning", "CompressReport", "check_input_dependence", "compress_", "finalize_", "is_finalized"]

log = logging.getLogger("atmc_triton")

#: Bytes of ADMM training state per factor entry: weight, grad, momentum, Z, u (float32) and a bool mask.
STATE_BYTES_PER_ENTRY = 5 * 4 + 1
#: Bytes per parameter left dense: weight, grad and momentum (float32).
DENSE_STATE_BYTES = 3 * 4
#: Models with at least this many weights show progress bars by default (``progress=None``).
PROGRESS_MIN_WEIGHTS = 5_000_000


class CollapseWarning(UserWarning):
    """The compressed model's output no longer depends on its input (a layer pruned away)."""


def _refuse_oversized_floor(who: str, setting: str, n_floor: int, k: int) -> None:
    """``compress_`` and ``finalize_``: at most half of the budget ``k`` may go to the layer floor (more would
    crowd out every other entry, or exceed the budget)."""
    if n_floor > k // 2:
        raise ValueError(
            f"{who}: the layer floor ({setting}) needs {n_floor} of the {k} nonzeros the budget allows (at most "
            "half may go to it); use floor='last' or 'none', or a larger ratio"
        )


def model_floor(model: nn.Module, cfg: ATMCConfig | None = None) -> str:
    """The layer floor in force for ``model``: its :func:`compress_` config's (else ``cfg``'s), with ``"auto"``
    resolved by :func:`atmc_triton.budget.auto_floor` from the model's current budget (a ``load_state_dict``
    brings the saved one), or read as ``"last"`` on a model without one."""
    root = unwrap(model)
    c = root.__dict__.get("atmc_config") or cfg
    floor = c.floor if c is not None else "auto"
    k = root._buffers.get("atmc_nnz_budget")
    if floor != "auto":
        return floor
    layers = [layer for _, layer in atmc_layers(root)]
    return auto_floor(layers, int(k)) if k is not None and layers else "last"


def progress_enabled(progress: bool | None, weights: int) -> bool:
    """``progress`` if given, else on for models of at least :data:`PROGRESS_MIN_WEIGHTS` weights
    (``ATMC_PROGRESS=0`` in the environment turns the default off)."""
    if progress is not None:
        return bool(progress)
    return weights >= PROGRESS_MIN_WEIGHTS and os.environ.get("ATMC_PROGRESS", "1") != "0"


def _bar(items, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)


def _default_filter(module: nn.Module, name: str) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention))


_KINDS = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)
# weight-bearing layers ATMC has no layer for: left dense and named in one warning
_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd, nn.Embedding, nn.EmbeddingBag, nn.Bilinear)


def _own_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


@dataclass(frozen=True)
class CompressReport:
    """What :func:`compress_` did (``str(report)`` is a summary; it is also logged, DEBUG level, to the
    ``atmc_triton`` logger).

    Attributes:
        swapped: ``(name, kind, weights)`` of every layer now compressed.
        skipped: ``(name, kind, parameters, reason)`` of every weight-bearing layer left dense.
        dense_params: parameters left dense (biases, norms, embeddings, skipped layers).
        compressed_weights: dense weights now held as factors.
        factor_entries: entries of all U, V, C factors (the ADMM state is this long).
        nnz_budget: the global nonzero budget ``k``; ``floor``: entries of the layer floor inside it.
        training_state_bytes: estimated ADMM training memory: ``21 B`` per factor entry
            (:data:`STATE_BYTES_PER_ENTRY`) plus ``12 B`` per dense parameter (weight, grad, momentum);
            activations not included.
    """

    swapped: tuple[tuple[str, str, int], ...]
    skipped: tuple[tuple[str, str, int, str], ...]
    dense_params: int
    compressed_weights: int
    factor_entries: int
    nnz_budget: int
    floor: int
    training_state_bytes: int

    @property
    def dense_share(self) -> float:
        """Share of the model's parameters left dense."""
        total = self.dense_params + self.compressed_weights
        return self.dense_params / total if total else 0.0

    def __str__(self) -> str:
        lines = [
            f"compress_: {len(self.swapped)} layers compressed ({self.compressed_weights:,} weights -> "
            f"{self.factor_entries:,} factor entries, budget k={self.nnz_budget:,} nonzeros incl. a floor of "
            f"{self.floor}); {self.dense_params:,} parameters left dense ({self.dense_share:.1%}); "
            f"estimated training state {self.training_state_bytes / 2**20:,.1f} MiB"
        ]
        lines += [f"  skipped {n} ({k}, {p:,} params): {r}" for n, k, p, r in self.skipped]
        return "\n".join(lines)


def unmatched_layer_bits(cfg: ATMCConfig, names: list[str]) -> list[str]:
    """The ``cfg.layer_bits`` keys that name none of the layers ``names`` (exactly or as an fnmatch pattern):
    a typo there would silently leave the layer at ``cfg.bits``.

    Example:
        >>> unmatched_layer_bits(ATMCConfig(ratio=0.1, layer_bits={"fc": 4, "conv*": 2}), ["conv1", "head"])
        ['fc']
    """
    return [p for p, _ in cfg.layer_bits or () if not any(p == n or fnmatch.fnmatchcase(n, p) for n in names)]


def _record_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: remember the shape and dtype of the model's input when it is one float tensor; a call
    with anything else (several inputs, keywords, token ids) forgets it: no probe input is known then."""
    if torch.compiler.is_compiling():
        return
    t = args[0] if len(args) == 1 and not kwargs else None
    if not (isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 1):
        module.__dict__["_atmc_input_spec"] = None
    elif t.numel() > 0:  # an empty batch says nothing
        module.__dict__["_atmc_input_spec"] = (tuple(t.shape), t.dtype, t.device)


def _hooks_of(m: nn.Module) -> bool:
    """``m`` (or a child it takes along, e.g. attention's ``out_proj``) has module hooks or a parametrization."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(parametrize.is_parametrized(c) or any(getattr(c, k, None) for k in kinds) for c in m.modules())


def _tied(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> list[str]:
    """``"a.weight (also b.weight)"`` for each parameter of a layer in ``targets`` that another module of
    ``model`` holds too (tied weights, e.g. an output projection sharing an embedding's matrix). A layer
    registered under two names (one module, shared) is not tied: it is swapped once, everywhere."""
    owners: dict[int, list[tuple[int, str]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((id(mod), f"{mod_name}.{p_name}" if mod_name else p_name))
    out = []
    for name, m in targets:
        inside = {id(c) for c in m.modules()}
        for p_name, p in m.named_parameters():
            others = sorted({n for owner, n in owners.get(id(p), ()) if owner not in inside})
            if others:
                out.append(f"{name}.{p_name} (also {', '.join(others)})")
    return out


def _keep_frozen(old: nn.Module, new: nn.Module) -> None:
    """``requires_grad=False`` of a replaced layer's weight (bias) carries over to its factors (bias), so a frozen
    layer stays frozen (and :class:`atmc_triton.ADMM` names it) instead of training again."""
    flags = dict(old.named_parameters())  # weight, bias; in_proj_weight, out_proj.weight, ... for attention
    for name, p in new.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        key = ".".join(filter(None, [prefix, "weight" if leaf in FACTORS else leaf]))
        src = flags.get(key, flags.get(key.replace("in_proj.", "in_proj_")))
        if src is not None and not src.requires_grad:
            p.requires_grad_(False)


def compress_(
    model: nn.Module,
    cfg: ATMCConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    progress: bool | None = None,
    return_report: bool = False,
) -> nn.Module | CompressReport:
    """Swap every ``nn.Linear``, ``nn.Conv2d`` (grouped and depthwise too) and
    ``nn.MultiheadAttention`` that ``filter_fn(module, name)`` accepts and ``cfg.exclude`` does
    not name for an :class:`ATMCLinear` / :class:`ATMCConv2d` / :class:`ATMCMultiheadAttention`
    built from its trained weights, in place.

    Layers with weights that ATMC has no layer for (``Conv1d``, ``Conv3d``, transposed convs,
    embeddings, attention with ``kdim != embed_dim``, ...) stay dense and are named, with their
    parameter counts, in one warning. Stores the global budget on the model as buffers
    ``atmc_nnz_budget`` (k) and ``atmc_bits_budget`` (bits, -1 for an explicit ``nnz``), and
    ``cfg`` as ``model.atmc_config``. Logs a :class:`CompressReport` (``logging`` DEBUG).

    Args:
        progress: a tqdm bar over the layers (``None``: on for models of 5M+ weights).
        return_report: return the :class:`CompressReport` instead of ``model``.

    Raises:
        TypeError: a ``filter_fn`` that is not callable.
        ValueError: nothing to compress, a selected layer with non-float or meta-device weights, or with a
            parameter tied to another module's (shared weights), an ``exclude`` pattern that matches no
            layer, a ``layer_bits`` key that matches no compressed layer, or a layer floor larger than half
            the budget.

    Example:
        >>> import atmc_triton as at
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> at.compress_(model, at.ATMCConfig(ratio=0.05, bits=4))[2]
        ATMCLinear(in_features=144, out_features=10, rank=0, bits=4, bias=True)
    """
    if not isinstance(cfg, ATMCConfig):
        raise ValueError(f"compress_: cfg must be an ATMCConfig, got {type(cfg).__name__}")
    model = unwrap(model)
    if isinstance(model, (nn.Linear, nn.Conv2d, nn.MultiheadAttention, ATMCLayer)):
        raise ValueError("compress_ swaps submodules in place; wrap a bare layer first, e.g. nn.Sequential(layer)")
    if atmc_layers(model):
        raise ValueError("compress_: the model already has ATMC layers")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"compress_: filter_fn must be callable(module, name) -> bool, got {type(filter_fn).__name__}")
    keep = filter_fn or _default_filter
    named = [(n, m) for n, m in model.named_modules() if n]
    attn = {id(m) for _, m in named if isinstance(m, nn.MultiheadAttention)}
    inside_attn = {id(c) for _, m in named if id(m) in attn for c in m.children()}
    candidates = [(n, m) for n, m in named if isinstance(m, _KINDS) and id(m) not in inside_attn]
    used = set()
    targets, skipped = [], []
    for name, m in candidates:
        kind = type(m).__name__
        pattern = cfg.excluded(name)
        if pattern is not None:
            used.add(pattern)
            skipped.append((name, kind, _own_params(m) + sum(_own_params(c) for c in m.children()), "excluded"))
        elif isinstance(m, nn.MultiheadAttention) and not m._qkv_same_embed_dim:
            skipped.append((name, kind, sum(p.numel() for p in m.parameters()), "unsupported: kdim/vdim != embed_dim"))
        elif keep(m, name):
            targets.append((name, m))
        else:
            skipped.append((name, kind, sum(p.numel() for p in m.parameters()), "filter_fn"))
    unused = [p for p in cfg.exclude or () if p not in used]
    if unused:
        names = ", ".join(n for n, _ in candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        raise ValueError(f"compress_: ATMCConfig.exclude {unused} matches no compressible layer (layers: {names})")
    if not targets:
        raise ValueError(
            "compress_: the model has nothing to compress (no nn.Linear / nn.Conv2d / nn.MultiheadAttention "
            "matched filter_fn and exclude)"
        )
    unmatched = unmatched_layer_bits(cfg, [n for n, _ in targets])
    if unmatched:
        names = ", ".join(n for n, _ in targets[:8]) + (", ..." if len(targets) > 8 else "")
        raise ValueError(
            f"compress_: ATMCConfig.layer_bits {unmatched} matches no layer being compressed (layers: {names})"
        )
    handled = {id(m) for _, m in candidates}
    for name, m in named:
        if id(m) in handled or id(m) in inside_attn or isinstance(m, _KINDS):
            continue
        w = m._parameters.get("weight")
        if isinstance(m, _UNSUPPORTED) or (w is not None and w.dim() >= 2):
            skipped.append((name, type(m).__name__, _own_params(m), "unsupported layer kind"))
    for name, m in targets:
        w = m.in_proj_weight if isinstance(m, nn.MultiheadAttention) else m.weight
        if not w.dtype.is_floating_point:
            raise ValueError(f"compress_: {name} has non-float weights ({w.dtype})")
        if w.is_meta:
            raise ValueError(
                f"compress_: {name} has meta-device weights; compression factorizes the trained weights, "
                "so materialize and load them first (model.to_empty(device=...), then load_state_dict)"
            )
    tied = _tied(model, targets)
    if tied:
        raise ValueError(
            f"compress_: tied parameters: {'; '.join(tied[:4])}{'; ...' if len(tied) > 4 else ''}. ATMC gives each "
            "layer its own factors, which would silently untie them; leave the layer dense (ATMCConfig.exclude or "
            "filter_fn) or untie it first"
        )
    hooked = [name for name, m in targets if _hooks_of(m)]
    if hooked:
        warnings.warn(
            f"compress_: layers {', '.join(hooked[:8])}{', ...' if len(hooked) > 8 else ''} carry "
            "hooks or torch.nn.utils.parametrize parametrizations, which the ATMC layers replacing them do not "
            "inherit: the effective weights are compressed (weight_norm and spectral_norm are frozen into them); "
            "register hooks again on the new layers after compress_",
            stacklevel=2,
        )
    weights = sum(p.numel() for p in model.parameters())
    swaps: dict[int, nn.Module] = {}
    for name, m in _bar(targets, progress_enabled(progress, weights), "compress_"):
        try:
            if isinstance(m, nn.MultiheadAttention):
                swaps[id(m)] = ATMCMultiheadAttention.from_dense(m, cfg, bits=cfg.bits_for(name))
            else:
                cls = ATMCConv2d if isinstance(m, nn.Conv2d) else ATMCLinear
                swaps[id(m)] = cls.from_dense(m, cfg, bits=cfg.bits_for(name))
        except ValueError as e:
            raise ValueError(f"compress_: {name}: {e}") from None
        swaps[id(m)].train(m.training)
        _keep_frozen(m, swaps[id(m)])
    # the budget and the floor are worked out on the new layers before any enters the model: a refused budget
    # leaves the model as it was (compress_ can be called again)
    layers = [
        (f"{name}.{sub}" if sub else name, layer)
        for name, m in targets
        for sub, layer in swaps[id(m)].named_modules()
        if isinstance(layer, ATMCLayer)
    ]
    # no nonzero factor entry: nothing of the layer can enter the top-k (read off the factors, no weight product)
    dead = [name for name, layer in layers if not layer.C.is_meta and not any(p.any() for _, p in layer.factors())]
    if dead:  # (torchvision zero-initializes its ViT heads)
        warnings.warn(
            f"compress_: the weight of {', '.join(map(repr, dead[:3]))}{' ...' if len(dead) > 3 else ''} is all "
            "zeros: none of its entries can enter the top-k or the layer floor, so ADMM keeps the layer at zero "
            "and its outputs never depend on the input. Initialize it before compress_ (e.g. "
            "nn.init.normal_(weight, std=0.02)) or exclude it",
            CollapseWarning,
            stacklevel=2,
        )
    compressed = sum(layer.C.numel() for _, layer in layers)
    k, budget = nnz_budget(layers, cfg, 32 * compressed)
    plain_layers = [layer for _, layer in layers]
    if cfg.floor == "auto":  # the strongest floor that takes at most a quarter of the budget
        floor = auto_floor(plain_layers, k)
        if floor == "none":
            warnings.warn(
                f"compress_: the budget (k={k}) is too small for a layer floor: no floor, layers may be pruned "
                "away entirely (see ATMCConfig.floor)",
                CollapseWarning,
                stacklevel=2,
            )
    else:
        floor = cfg.floor
    n_floor = floor_indices(plain_layers, floor).numel()
    _refuse_oversized_floor("compress_", f"ATMCConfig.floor={cfg.floor!r}", n_floor, k)
    for parent in model.modules():  # every reference, so shared modules stay shared
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in swaps:
                parent._modules[child_name] = swaps[id(child)]
    swaps.clear()
    layers = atmc_layers(model)  # (module order: the flat-buffer order)
    dev = layers[0][1].C.device
    model.register_buffer("atmc_nnz_budget", torch.tensor(k, dtype=torch.int64, device=dev))
    model.register_buffer(
        "atmc_bits_budget", torch.tensor(-1 if budget is None else budget, dtype=torch.int64, device=dev)
    )
    model.atmc_config = cfg
    model.atmc_floor = floor  # the floor resolved here (ADMM and finalize_ resolve it again: model_floor)
    if not any(getattr(h, "__name__", "") == "_record_input" for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_record_input, with_kwargs=True)
    factor_ids = {id(p) for _, layer in layers for _, p in layer.factors()}
    dense_params = sum(p.numel() for p in model.parameters() if id(p) not in factor_ids)
    entries = sum(p.numel() for _, layer in layers for _, p in layer.factors())
    unsupported = [s for s in skipped if s[3].startswith("unsupported")]
    if unsupported:
        n_par = sum(s[2] for s in unsupported)
        listing = ", ".join(f"{n} ({k_}, {p:,})" for n, k_, p, _ in unsupported)
        warnings.warn(
            f"compress_: {len(unsupported)} layers cannot be compressed and stay dense "
            f"({n_par:,} parameters, {n_par / max(weights, 1):.1%} of the model): {listing}",
            stacklevel=2,
        )
    report = CompressReport(
        swapped=tuple((n, type(m).__name__, sum(p.numel() for p in m.parameters())) for n, m in targets),
        skipped=tuple(skipped),
        dense_params=dense_params,
        compressed_weights=compressed,
        factor_entries=entries,
        nnz_budget=k,
        floor=n_floor,
        training_state_bytes=STATE_BYTES_PER_ENTRY * entries + DENSE_STATE_BYTES * dense_params,
    )
    log.debug("%s", report)  # DEBUG: the CLI's INFO handler keeps its one-line-per-stage output
    return report if return_report else model


@torch.no_grad()
def check_input_dependence(model: nn.Module, example_input: Tensor | None = None, warn: bool = True) -> int | None:
    """How many output units of ``model`` give the same value for two random inputs.

    The inputs are uniform in [0, 1] (a private seeded generator; the global RNG is untouched),
    shaped like ``example_input`` or like the last input the model saw after :func:`compress_`
    (batch at most 2). The model runs in eval mode and gets its train/eval flags back. With
    ``warn``, any input-independent unit raises a :class:`CollapseWarning`. Returns the count,
    or ``None`` when no input shape is known (the model's last call was not one float tensor:
    several inputs, keywords, token ids; pass ``example_input`` only for a one-tensor model) or the
    output is not a float tensor.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 3))
        >>> with torch.no_grad():
        ...     m[0].weight[1] = 0
        >>> check_input_dependence(m, torch.zeros(1, 4), warn=False)
        1
    """
    root = unwrap(model)
    if example_input is not None:
        spec = (tuple(example_input.shape), example_input.dtype, example_input.device)
    else:
        spec = root.__dict__.get("_atmc_input_spec")
    if spec is None:
        return None
    shape, dtype, device = spec
    # where the model is now, not where its last input was: a model moved since (``.cpu()`` after GPU training,
    # or unpickled on a machine without a GPU) would get its probe on the old device
    device = next((t.device for t in itertools.chain(root.parameters(), root.buffers())), device)
    shape = (max(1, min(shape[0], 2)), *shape[1:])
    gen = torch.Generator().manual_seed(0)
    xs = [torch.rand(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(2)]
    modes = [(m, m.training) for m in root.modules()]
    root.eval()
    try:
        ys = []
        for x in xs:
            leaves = [t for t in tree_leaves(root(x)) if isinstance(t, Tensor) and t.is_floating_point()]
            if not leaves:
                return None
            ys.append(leaves[0].float())
    finally:
        for m, t in modes:
            m.training = t
    y1, y2 = (y.reshape(y.shape[0], -1) if y.dim() > 1 else y.reshape(1, -1) for y in ys)
    # relative: a unit is input-independent when its two values agree to float32 rounding
    same = ((y1 - y2).abs() <= 1e-6 * torch.maximum(y1.abs(), y2.abs())).all(dim=0)
    n = int(same.sum())
    if n and warn:
        warnings.warn(
            f"COLLAPSE: {n} of {same.numel()} output units of the model give the same value for two random "
            "inputs: a layer on the path was pruned away. Raise the ratio, use ATMCConfig(floor='rows') or "
            "exclude the layer (ATMCConfig(exclude=[...])).",
            CollapseWarning,
            stacklevel=3,
        )
    return n


def is_finalized(model: nn.Module) -> bool:
    """Whether every ATMC layer of ``model`` went through :func:`finalize_`."""
    layers = atmc_layers(model)
    return bool(layers) and all(bool(layer.finalized) for _, layer in layers)


@torch.no_grad()
def finalize_(
    model: nn.Module,
    *,
    floor: str | None = None,
    progress: bool | None = None,
    check_input: bool = True,
    example_input: Tensor | None = None,
) -> nn.Module:
    """Commit to the compressed model: every factor := its quantized copy Z, then the global top-k
    projection (the layer floor kept first), then (for a ``ratio`` budget) the smallest entries are
    cut until :func:`atmc_triton.model_size_bits` fits the budget exactly. Codebooks become each
    factor's distinct nonzero values, masks its nonzeros, Z := W and u := 0. Returns ``model``.

    Args:
        floor: the layer floor, one of ``"last"``, ``"rows"``, ``"none"`` (default ``None`` or ``"auto"``: the
            floor ``compress_`` resolved for this model); a floor larger than half the budget is a
            ``ValueError``, as in :func:`compress_`.
        progress: a tqdm bar over the factors (``None``: on for models of 5M+ weights).
        check_input: run :func:`check_input_dependence` afterwards (a :class:`CollapseWarning`
            if some output no longer depends on the input).
        example_input: an input for that check (default: the shape of the last input seen).

    Example:
        >>> import atmc_triton as at
        >>> cfg = at.ATMCConfig(ratio=0.2, bits=2)
        >>> model = at.finalize_(at.compress_(nn.Sequential(nn.Linear(16, 8)), cfg))
        >>> at.model_size_bits(model) <= 0.2 * at.dense_bits(model)
        True
    """
    model = unwrap(model)
    layers = [layer for _, layer in atmc_layers(model)]
    if not layers:
        raise ValueError("finalize_: the model has no ATMC layers")
    if floor is not None and floor not in FLOORS:
        raise ValueError(f"finalize_: floor must be None or one of {FLOORS}, got {floor!r}")
    k = int(nnz_budget_of(model, "finalize_"))
    stale = [name for name, layer in atmc_layers(model) if layer.nbits is not None and layer._z_stale()]
    if stale:
        warnings.warn(
            f"finalize_: the factors of {', '.join(stale[:4])}{' ...' if len(stale) > 4 else ''} were written since "
            "their quantized copy Z was last set (by compress_, an ADMM step, finalize_ or a load): trained by "
            "another optimizer? finalize_ commits Z, which drops that training. Train with atmc_triton.ADMM, or "
            "call layer.reset_admm_state() on each ATMC layer first (Z := the quantized factors)",
            stacklevel=3,
        )
    floor = model_floor(model) if floor in (None, "auto") else floor
    budget = int(model.atmc_bits_budget)
    segs = [(layer, f) for layer in layers for f in FACTORS]
    vals = []
    for layer, f in segs:
        src = getattr(layer, f"{f}_z") if layer.nbits is not None else getattr(layer, f)
        vals.append(src.detach().reshape(-1).float())
    flat = torch.cat(vals)
    del vals
    offsets = [0]
    for layer, f in segs:
        offsets.append(offsets[-1] + getattr(layer, f).numel())
    quantized = all(layer.nbits is not None for layer in layers)
    fl = floor_indices(layers, floor, "_z" if quantized else "").to(flat.device)
    _refuse_oversized_floor("finalize_", f"floor={floor!r}", fl.numel(), k)
    kept = flat[fl].clone()
    flat[fl] = 0
    project_topk_(flat, max(k - fl.numel(), 0))
    flat[fl] = kept
    fit_budget_(flat, offsets, [layer.nbits for layer, _ in segs], k, None if budget < 0 else budget, forced=fl)
    flat.add_(0.0)  # -0.0 -> +0.0: zeros are implicit in every packed format
    weights = sum(layer.C.numel() for layer in layers)
    for s, (layer, f) in enumerate(_bar(segs, progress_enabled(progress, weights), "finalize_")):
        p = getattr(layer, f)
        v = flat[offsets[s] : offsets[s + 1]].view(p.shape).to(p.dtype)
        p.copy_(v)
        getattr(layer, f"{f}_z").copy_(v)
        getattr(layer, f"{f}_u").zero_()
        getattr(layer, f"{f}_mask").copy_(v != 0)
        row = layer.codebook[FACTORS.index(f)]
        row.zero_()
        levels = torch.unique(v[v != 0])
        if layer.nbits is not None:
            if levels.numel() > 2**layer.nbits:
                raise AssertionError(f"factor {f} has {levels.numel()} levels > 2^{layer.nbits}")
            row[1 : 1 + levels.numel()] = levels.float()
    for layer in layers:
        layer.finalized.fill_(True)
        layer._mark_z()
    if check_input:
        check_input_dependence(model, example_input)
    return model

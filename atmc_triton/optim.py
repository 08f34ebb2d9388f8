"""The ATMC ADMM optimizer, a real ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from atmc_triton import distributed
from atmc_triton.budget import atmc_layers, floor_indices, nnz_budget_of, unwrap
from atmc_triton.config import ATMCConfig, _is_real, _plain
from atmc_triton.kernels import (
    admm_dual_update,
    admm_dual_update_ref,
    admm_step,
    admm_step_ref,
    lloyd_quantize,
    lloyd_quantize_ref,
)
from atmc_triton.store import FactorStore, check_plain_factors

__all__ = ["ADMM"]


def all_finite(tensors: Iterable[Tensor | None]) -> Tensor | None:
    """A 0-d bool tensor: every element of the given tensors is finite (no host sync). ``None`` entries
    and empty tensors (``init="sparse"``: U and V and their grads are empty) are skipped; ``None`` when
    nothing is left.

    Example:
        >>> bool(all_finite([torch.ones(3), None, torch.empty(0)]))
        True
    """
    ts = [t for t in tensors if t is not None and t.numel()]
    if not ts:
        return None
    norms = torch._foreach_norm(ts, float("inf"))  # one launch per device and dtype group
    return torch.isfinite(torch.stack([x.float().to(ts[0].device) for x in norms])).all()


#: ``ATMCConfig`` fields that :func:`atmc_triton.compress_` fixes in the model (budget, codebooks, factor shapes,
#: floor); the others (rho and its schedule, ``quant_interval``, the quantizer's settings) are the optimizer's own.
COMPRESS_FIELDS = ("ratio", "nnz", "bits", "layer_bits", "init", "rank", "exclude", "floor")


def _check_same_compression(model: nn.Module, cfg: ATMCConfig) -> None:
    """Refuse a ``cfg`` whose compression fields differ from those ``compress_`` applied to ``model``:
    the budget ``k`` and the layers' bits come from the model, so they would be silently ignored."""
    used = model.__dict__.get("atmc_config")
    if not isinstance(used, ATMCConfig):
        return
    diff = [
        f"{f}={getattr(cfg, f)!r} (compress_ used {getattr(used, f)!r})"
        for f in COMPRESS_FIELDS
        if getattr(cfg, f) != getattr(used, f)
    ]
    if diff:
        raise ValueError(
            "ADMM: cfg differs from the config compress_ applied to this model in " + ", ".join(diff) + "; pass "
            "the same config (only rho, rho_factor, rho_every, quant_interval, max_iter, tol and quant_method may "
            "differ)"
        )


class ADMM(torch.optim.Optimizer):
    """ADMM for ATMC: projected momentum SGD on ``loss + rho/2 ||W - Z + u||^2`` with a global
    top-k projection every step, and ``Z = Lloyd_b(W + u); u += W - Z`` every
    ``cfg.quant_interval`` steps. Other parameters (biases, norms, uncompressed layers) take
    ordinary momentum SGD steps with the same ``lr``, ``momentum`` and ``weight_decay``.

    Param group 0 holds the factors (keys ``rho`` and ``k`` besides the SGD ones); group 1,
    if present, the other parameters. LR schedulers act on both. ``state_dict`` carries
    momenta, the step count, the current ``rho`` and :attr:`nonfinite_steps`. A step that updates
    the factors clears the layers' ``finalized`` flags: after training a finalized model, call
    ``finalize_`` again before ``pack_``.

    Args:
        model: a model after :func:`atmc_triton.compress_` (DDP / compiled wrappers are fine).
        cfg: the config given to ``compress_`` (a ``ValueError`` if its :data:`COMPRESS_FIELDS` differ;
            ``rho``, its schedule, ``quant_interval`` and the quantizer's settings may).
        check_finite: raise ``FloatingPointError``, with nothing written, if a grad (or the
            factor update) is NaN/Inf: one host sync per step. With ``False`` there is no sync:
            such a step is voided on the device (factors, dense parameters and momenta keep
            their values; the step count, quantizer and rho schedule still advance) and counted
            in :attr:`nonfinite_steps`.
        backend: ``"auto"`` runs the ``torch.ops.atmc`` ops (Triton on CUDA, the references on
            CPU); ``"reference"`` always runs the pure-PyTorch references (for comparisons).
        sync_quantizer: data parallel training (DDP): after each quantizer step, overwrite Z and
            the codebooks with rank 0's (one broadcast of ``n + 257 S`` floats every
            ``cfg.quant_interval`` steps; u follows from them). The ops are deterministic, so this
            is insurance, e.g. against a non-deterministic reduction on some GPU. ``None`` (default):
            on whenever a ``torch.distributed`` process group of more than one rank is running;
            set ``False`` when ranks train different models. Every rank must step together.

    Raises:
        ValueError: no ATMC layers or budget, bad hyperparameters, a ``cfg`` that differs from
            ``compress_``'s, sharded (FSDP) factors, or a factor with ``requires_grad=False``.

    Example:
        >>> import atmc_triton as at
        >>> model = at.compress_(nn.Sequential(nn.Linear(8, 4)), at.ATMCConfig(nnz=10))
        >>> opt = at.ADMM(model, at.ATMCConfig(nnz=10), lr=0.1)
        >>> model(torch.randn(3, 8)).sum().backward(); opt.step()
        >>> sum(int((p != 0).sum()) for n, p in model.named_parameters() if n[-1] in "UVC") <= 10
        True
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: ATMCConfig,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = False,
        check_finite: bool = True,
        backend: str = "auto",
        sync_quantizer: bool | None = None,
    ):
        if not isinstance(cfg, ATMCConfig):
            raise ValueError(f"ADMM: cfg must be an ATMCConfig, got {type(cfg).__name__}")
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not (_is_real(v) and v >= 0):
                raise ValueError(f"ADMM: {name} must be a finite number >= 0, got {v!r}")
        lr, momentum, weight_decay = _plain(lr), _plain(momentum), _plain(weight_decay)  # numpy -> builtins
        for name, v in (("nesterov", nesterov), ("check_finite", check_finite)):
            if not isinstance(v, bool):
                raise ValueError(f"ADMM: {name} must be True or False, got {v!r}")
        if nesterov and momentum <= 0:
            raise ValueError("ADMM: nesterov needs momentum > 0")
        model = unwrap(model)
        named = atmc_layers(model)
        layers = [layer for _, layer in named]
        if not layers:
            raise ValueError("ADMM: the model has no ATMC layers; call atmc_triton.compress_(model, cfg) first")
        check_plain_factors(layers)
        frozen = [f"{n}.{f}" for n, layer in named for f, p in layer.factors() if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"ADMM: factors {frozen[:4]}{' ...' if len(frozen) > 4 else ''} have requires_grad=False, but ADMM "
                "projects every factor onto the one global budget each step; to keep a layer fixed, leave it out "
                "of compress_ (cfg.exclude or filter_fn)"
            )
        _check_same_compression(model, cfg)
        k = nnz_budget_of(model, "ADMM")
        factor_ids = {id(p) for layer in layers for _, p in layer.factors()}
        factors = [p for layer in layers for _, p in layer.factors()]
        others = [p for p in model.parameters() if id(p) not in factor_ids and p.requires_grad]
        # where each dense parameter lives: model.to("meta"), to_empty and load_state_dict(assign=True) put new
        # Parameter objects there, which _sync adopts (as the store does for the factors)
        owner = {}
        for mod in model.modules():
            for name, q in mod._parameters.items():
                if q is not None:
                    owner.setdefault(id(q), (mod, name))
        self._owners = [owner[id(q)] for q in others]
        groups: list[dict[str, Any]] = [{"params": factors, "atmc": True, "rho": float(cfg.rho), "k": int(k)}]
        if others:
            groups.append({"params": others, "atmc": False})
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov}
        super().__init__(groups, defaults)
        self.cfg = cfg
        self.check_finite = check_finite
        if backend not in ("auto", "reference"):
            raise ValueError(f"ADMM: backend must be 'auto' or 'reference', got {backend!r}")
        self.backend = backend
        if sync_quantizer not in (None, True, False):
            raise ValueError(f"ADMM: sync_quantizer must be None, True or False, got {sync_quantizer!r}")
        self.sync_quantizer = sync_quantizer
        self._bind_ops()
        self.store = FactorStore(layers)
        self._layers = layers
        # the layer floor (cfg.floor): entries kept whatever the top-k says, inside the budget k
        from atmc_triton.api import model_floor

        self._floor = floor_indices(layers, model_floor(model, cfg)).to(self.store.device)
        self._root = model  # its budget buffer: a model.load_state_dict after this brings another k (_sync)
        self._k_seen = (k, k._version)
        self.state["admm"] = {"step": 0, "quant_steps": 0}
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=self.store.device)
        self._tau: Tensor | None = None  # the last step's threshold: a speed hint for the next (not state)
        self._point_state()

    def _bind_ops(self) -> None:
        ref = self.backend == "reference"
        self._step_op = admm_step_ref if ref else admm_step
        self._lloyd_op = lloyd_quantize_ref if ref else lloyd_quantize
        self._dual_op = admm_dual_update_ref if ref else admm_dual_update

    #: attributes beyond torch.optim.Optimizer's own that a copy or pickle of the optimizer must carry
    _PICKLED = (
        *("cfg", "check_finite", "backend", "sync_quantizer"),
        *("store", "_layers", "_owners", "_floor", "_nonfinite", "_tau", "_root"),
    )

    def __getstate__(self) -> dict[str, Any]:
        """``torch.optim.Optimizer``'s state plus the flat store, the layers and the settings, so
        ``copy.deepcopy((model, opt))`` (or of ``opt`` alone, which copies the model with it) and pickling give a
        working optimizer; the copy re-adopts its model's tensors on its first ``step`` / ``zero_grad``."""
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._PICKLED}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by load_state_dict, with state and param_groups only
        if "backend" in state:
            self._bind_ops()

    # -- flat-state plumbing -------------------------------------------------------------
    def _point_state(self) -> None:
        for s, p in enumerate(self.param_groups[0]["params"]):
            self.state[p]["momentum_buffer"] = self.store.view(self.store.mom, s)

    def _sync(self) -> None:
        if self.store.sync():
            self._point_state()
            if self._floor.device != self.store.device:  # the model moved (``.cuda()`` after ADMM was built)
                self._floor = self._floor.to(self.store.device)  # else every step indexed across devices
        self._adopt_params()
        self._sync_budget()

    def _sync_budget(self) -> None:
        """The model's budget buffer changed since this optimizer last read it (a ``model.load_state_dict`` into a
        twin whose own k differed): take its k, and the layer floor that k resolves to (one host read, only then).
        """
        root = self.__dict__.get("_root")
        k = None if root is None else root._buffers.get("atmc_nnz_budget")
        seen = self.__dict__.get("_k_seen")
        if k is None or (seen is not None and seen[0] is k and seen[1] == k._version):
            return
        fg = self.param_groups[0]
        if not k.is_meta and int(k) != int(fg["k"]):  # (a model moved to "meta" holds no value to read)
            from atmc_triton.api import model_floor

            fg["k"] = int(k)
            self._floor = floor_indices(self._layers, model_floor(root, self.cfg)).to(self.store.device)
        self._k_seen = (k, k._version)

    def _adopt_params(self) -> None:
        """Put the model's current Parameter objects in the param groups, with their state, where something
        replaced them (``model.to("meta")`` + ``to_empty``, ``load_state_dict(assign=True)``)."""
        current = [[p for layer in self._layers for _, p in layer.factors()]]
        if len(self.param_groups) > 1:
            current.append([mod._parameters[name] for mod, name in self._owners])
        for group, now in zip(self.param_groups, current):
            params = group["params"]
            for i, (old, new) in enumerate(zip(params, now)):
                if old is not new and new is not None:
                    if old in self.state:
                        self.state[new] = self.state.pop(old)
                    params[i] = new

    @torch.compiler.disable  # eager inside torch.compile, as torch.optim.Optimizer.zero_grad: pointer bookkeeping
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero grads; factor grads are always zeroed in place in the flat buffer."""
        self._sync()
        self.store.zero_grad()
        for group in self.param_groups[1:]:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, after checking that ``state_dict`` is an ADMM state of
        a model shaped like this one (a ``ValueError`` before anything is loaded, not a half-loaded state)."""
        self._check_state_dict(state_dict)
        self._sync()  # the model's current Parameters first (load_state_dict(assign=True) replaced them): the loaded
        # momenta attach to those and reach the flat buffer (after a sync below they were overwritten with zeros)
        state = dict(state_dict["state"])
        if isinstance(state.get("admm"), dict):  # a copy: torch would keep the caller's dict (step counts) as ours
            state["admm"] = dict(state["admm"])
        super().load_state_dict({**state_dict, "state": state})
        floor = state_dict.get("floor")
        if floor is not None:  # the floor the saved run chose (None: a state saved before it was saved)
            self._floor = floor.to(self.store.device, copy=True)
        self._sync()
        with torch.no_grad():
            for s, p in enumerate(self.param_groups[0]["params"]):
                buf = self.state[p].get("momentum_buffer")
                view = self.store.view(self.store.mom, s)
                if buf is None:
                    view.zero_()
                elif buf.data_ptr() != view.data_ptr():
                    view.copy_(buf)
        self._point_state()
        self.state.setdefault("admm", {"step": 0, "quant_steps": 0})
        voided = self.state["admm"].pop("nonfinite_steps", 0)  # kept out of self.state: a device counter
        self._nonfinite = torch.full((), int(voided), dtype=torch.int64, device=self.store.device)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict`` plus :attr:`nonfinite_steps` (one host sync), so a resumed
        optimizer keeps counting the voided steps from where it stopped, and ``"floor"``: the layer floor's flat
        indices (chosen from the factors when the optimizer was built), so a resumed run keeps the same entries
        (a fresh twin's random init, or the loaded weights, would choose others)."""
        sd = super().state_dict()
        sd["state"]["admm"] = {**sd["state"]["admm"], "nonfinite_steps": int(self._nonfinite)}
        sd["floor"] = self._floor.detach().cpu().clone()
        return sd

    def _check_state_dict(self, sd: Any) -> None:
        groups = sd.get("param_groups") if isinstance(sd, dict) else None
        if not (isinstance(groups, list) and isinstance(sd.get("state"), dict)):
            raise ValueError("ADMM.load_state_dict: expected an optimizer state_dict with 'state' and 'param_groups'")
        sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
        mine = [len(g["params"]) for g in self.param_groups]
        if sizes != mine or not groups[0].get("atmc"):
            raise ValueError(
                f"ADMM.load_state_dict: the state holds parameter groups of {sizes} parameters, this optimizer "
                f"{mine} (the ATMC factors first): it is not the ADMM state of this model"
            )
        ids = [i for g in groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for n, (i, p) in enumerate(zip(ids, params)):
            buf = sd["state"].get(i, {}).get("momentum_buffer") if isinstance(sd["state"].get(i), dict) else None
            if buf is not None and (not isinstance(buf, Tensor) or buf.shape != p.shape):
                got = tuple(buf.shape) if isinstance(buf, Tensor) else type(buf).__name__
                raise ValueError(
                    f"ADMM.load_state_dict: the momentum of parameter {n} is {got}, the parameter "
                    f"{tuple(p.shape)}: the state of a model with other layer shapes"
                )
        floor = sd.get("floor")
        if floor is not None:
            if not (isinstance(floor, Tensor) and floor.dtype == torch.int64 and floor.dim() == 1):
                raise ValueError("ADMM.load_state_dict: state_dict['floor'] must be a 1-D int64 tensor of indices")
            if floor.numel() and not (0 <= int(floor.min()) and int(floor.max()) < self.store.n):
                raise ValueError(
                    f"ADMM.load_state_dict: floor index out of range for this model's {self.store.n} factor entries"
                )

    # -- the step --------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return self.state["admm"]["step"]

    @property
    def nonfinite_steps(self) -> Tensor:
        """Steps voided on the device because a gradient or the update was NaN/Inf (only counts
        with ``check_finite=False``; a 0-dim int64 tensor, reading it syncs)."""
        return self._nonfinite

    def _void_if_dense_nonfinite(self) -> Tensor | None:
        """A NaN/Inf dense grad voids the whole step: it is passed on to the factor op (which then
        writes nothing and returns tau = NaN) as a NaN in the first factor grad; no host sync.
        Returns that grad's own value (``[1]``), which :meth:`step` puts back after the op."""
        ok = all_finite(p.grad for g in self.param_groups[1:] for p in g["params"])
        if ok is None:
            return None
        g0 = self.store.grad[:1]
        saved = g0.clone()
        g0.copy_(torch.where(ok.to(g0.device), g0, float("nan")))
        return saved

    # Eager inside torch.compile: the factor update is the same few op calls either way, and the step's Python
    # scalars (lr under a scheduler, rho under its schedule) would recompile the graph at every change, until
    # dynamo's recompile limit made the step fall back to eager anyway (with a warning)
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync()
        g0 = self._void_if_dense_nonfinite()
        st = self.state["admm"]
        fg = self.param_groups[0]
        quantized = self.cfg.quantized
        fl = self._floor
        before = self._hold_floor() if fl.numel() else None
        tau = self._step_op(
            self.store.w,
            self.store.grad,
            self.store.mom,
            self.store.z,
            self.store.u,
            self.store.mask,
            float(fg["lr"]),
            float(fg["momentum"]),
            float(fg["weight_decay"]),
            float(fg["rho"]) if quantized else 0.0,
            max(int(fg["k"]) - fl.numel(), 0),
            bool(fg["nesterov"]),
            self._tau if self._tau is not None and self._tau.device == self.store.w.device else None,
        )
        self._tau = tau
        bad = torch.isnan(tau)  # the op refused a non-finite update and wrote nothing
        if before is not None:
            self._release_floor(fg, before, bad)
        if g0 is not None:  # the grads as the caller left them (a voided step must not blame a factor)
            self.store.grad[:1].copy_(g0)
        ok = None
        if self.check_finite:
            if bool(bad):  # the one host sync of this mode
                raise FloatingPointError(
                    "ADMM.step: a gradient (or the factor update) has NaN or Inf; nothing was updated"
                )
        else:
            ok = ~bad
            if self._nonfinite.device != bad.device:
                self._nonfinite = self._nonfinite.to(bad.device)
            self._nonfinite += bad
        for group in self.param_groups[1:]:
            self._sgd(group, ok)
        flags = [layer.finalized for layer in self._layers]  # trained factors need finalize_ again before pack_
        if ok is None:
            torch._foreach_zero_(flags)
        else:
            for f in flags:
                f.logical_and_(bad.to(f.device))
        st["step"] += 1
        if quantized and st["step"] % self.cfg.quant_interval == 0:
            self.quantize_()
            st["quant_steps"] += 1
            if st["quant_steps"] % self.cfg.rho_every == 0:
                fg["rho"] *= self.cfg.rho_factor
        for layer in self._layers:  # ADMM trained them: finalize_ may commit their Z
            layer._mark_z()
        return loss

    def _hold_floor(self) -> list[Tensor]:
        """Take the floor entries out of the top-k competition: zero them (their state saved) so the
        op spends exactly ``k - |floor|`` on the others; a non-finite floor grad voids the step."""
        s, fl = self.store, self._floor
        before = [t[fl] for t in (s.w, s.grad, s.mom, s.z, s.u)]
        finite = torch.isfinite(before[1]).all()
        s.w[fl] = 0.0
        s.mom[fl] = 0.0
        s.z[fl] = 0.0
        s.u[fl] = 0.0
        s.grad[fl] = torch.where(finite, 0.0, float("nan")).to(s.grad.dtype)
        return before

    def _release_floor(self, fg: dict[str, Any], before: list[Tensor], bad: Tensor) -> None:
        """Write the floor entries' own SGD+prox update (or, for a voided step, their old state) back."""
        w, grad, mom, z, u = before
        lr, m_, wd, nest = float(fg["lr"]), float(fg["momentum"]), float(fg["weight_decay"]), bool(fg["nesterov"])
        rho = float(fg["rho"]) if self.cfg.quantized else 0.0
        g = grad.float() + wd * w + rho * (w - z + u)
        m = mom * m_ + g
        wn = w - lr * (g + m_ * m if nest else m)
        s, fl = self.store, self._floor
        ok = ~bad & torch.isfinite(wn).all() & torch.isfinite(m).all()
        s.w[fl] = torch.where(ok, wn, w)
        s.mom[fl] = torch.where(ok, m, mom)
        s.mask[fl] = torch.where(ok, wn != 0, s.mask[fl])
        s.z[fl], s.u[fl], s.grad[fl] = z, u, grad

    def _sgd(self, group: dict[str, Any], ok: Tensor | None) -> None:
        """torch.optim.SGD on ``group``; with a device flag ``ok``, a no-op where it is False."""
        lr, mom, wd, nest = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
            if mom:
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = g.clone() if ok is None else torch.where(ok, g, 0.0)
                elif ok is None:
                    buf.mul_(mom).add_(g)
                else:
                    buf.copy_(torch.where(ok, buf * mom + g, buf))
                g = g.add(buf, alpha=mom) if nest else buf
            if ok is None:
                p.add_(g, alpha=-lr)
            else:
                p.copy_(torch.where(ok, p.add(g, alpha=-lr), p))

    @torch.no_grad()
    def quantize_(self) -> Tensor:
        """``Z = Lloyd_b(W + u)`` for every factor, then ``u += W - Z``; returns the per-factor error."""
        s = self.store
        book, _, q, err = self._lloyd_op(
            s.w + s.u, s.offsets_t, s.bits_t, self.cfg.max_iter, self.cfg.tol, self.cfg.quant_method
        )
        if self.sync_quantizer is not False and distributed.is_distributed():
            q, book = q.contiguous(), book.contiguous()
            distributed.broadcast_([q, book])
        s.z.copy_(q)
        s.codebook.copy_(book)
        self._dual_op(s.u, s.w, s.z)
        return err

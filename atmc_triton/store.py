"""One flat buffer per kind of state for every ATMC factor of a model.

Weights, grads, momenta, Z, u and masks of all factors (U, V, C of every layer, in module
order) live back to back in flat tensors, and each layer's parameters and buffers are *views*
into them. A whole-model ADMM step is then one launch over contiguous memory ("multi-tensor
apply" for free), while autograd, ``state_dict`` and DDP still see ordinary per-layer
tensors. If something replaces those tensors (``model.to(...)``, ``load_state_dict(...,
assign=True)``, ``zero_grad(set_to_none=True)``), :meth:`FactorStore.sync` notices by pointer
and re-adopts the current values, so nothing is lost.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from atmc_triton.kernels import NUM_SLOTS
from atmc_triton.layers import FACTORS, ATMCLayer

__all__ = ["FactorStore", "check_plain_factors"]

_BUFFERS = ("_z", "_u", "_mask")


def check_plain_factors(layers: list[ATMCLayer]) -> None:
    """Refuse factors that are not plain, registered parameters (FSDP, DTensor/tensor parallel).

    ATMC's projection and quantizer are whole-tensor operations over every factor of every layer;
    the flat store needs the full, unsharded factors on each rank (DDP, not FSDP).
    """
    for layer in layers:
        for f in FACTORS:
            p = layer._parameters.get(f)
            if p is None and parametrize.is_parametrized(layer, f):
                raise ValueError(
                    f"ADMM: factor {f} of {type(layer).__name__} carries a torch.nn.utils.parametrize "
                    "parametrization; ADMM projects and quantizes the raw factors, so it cannot train a function "
                    "of them: remove it (parametrize.remove_parametrizations(layer, "
                    f"{f!r})) before building ADMM"
                )
            if p is None:
                raise ValueError(
                    f"ADMM: factor {f} of {type(layer).__name__} is not a registered parameter; FSDP (which "
                    "flattens parameters) is not supported: wrap the model in DistributedDataParallel instead"
                )
            if type(p.data) is not torch.Tensor:
                raise ValueError(
                    f"ADMM: factor {f} of {type(layer).__name__} is a {type(p.data).__name__}; sharded "
                    "parameters (FSDP2 fully_shard, DTensor, tensor parallel) are not supported: use DDP"
                )


class FactorStore:
    """Flat ``w``, ``grad``, ``mom``, ``z``, ``u`` ``[n]``, ``mask [n]`` bool and ``codebook [S, 257]``.

    Segment ``s`` (factor ``FACTORS[s % 3]`` of layer ``s // 3``) is ``[offsets[s], offsets[s+1])``.
    """

    def __init__(self, layers: list[ATMCLayer]):
        if not layers:
            raise ValueError("FactorStore needs at least one ATMC layer")
        if len({id(layer) for layer in layers}) != len(layers):  # (two views of one parameter: every sync re-adopted)
            raise ValueError("FactorStore: a layer is listed twice (atmc_layers lists a shared layer once)")
        self.layers = list(layers)
        self.segments = [(layer, f) for layer in self.layers for f in FACTORS]
        self.shapes = [tuple(getattr(layer, f).shape) for layer, f in self.segments]
        self.offsets = [0]
        for shape in self.shapes:
            self.offsets.append(self.offsets[-1] + math.prod(shape))
        self.n = self.offsets[-1]
        self.seg_bits = [layer.nbits or 0 for layer, _ in self.segments]
        self.mom: Tensor | None = None
        self._adopt()

    def view(self, flat: Tensor, s: int) -> Tensor:
        return flat[self.offsets[s] : self.offsets[s + 1]].view(self.shapes[s])

    def _adopt(self) -> None:
        params = [layer._parameters[f] for layer, f in self.segments]
        dev, dtype = params[0].device, params[0].dtype
        for (layer, f), p in zip(self.segments, params):
            if p.dtype != torch.float32 or p.device != dev:
                raise ValueError(
                    f"ADMM keeps float32 master weights on one device; factor {f} of "
                    f"{type(layer).__name__}({layer.extra_repr()}) "
                    f"is {p.dtype} on {p.device} (first factor: {dtype} on {dev}). Keep the model in "
                    "float32 and use autocast for lower precision."
                )
        n = self.n
        self.device = dev
        self.w = torch.empty(n, dtype=dtype, device=dev)
        self.grad = torch.zeros(n, dtype=dtype, device=dev)
        self.z = torch.empty(n, dtype=dtype, device=dev)
        self.u = torch.empty(n, dtype=dtype, device=dev)
        self.mask = torch.empty(n, dtype=torch.bool, device=dev)
        self.codebook = torch.empty(len(self.segments), NUM_SLOTS, dtype=torch.float32, device=dev)
        self.mom = torch.zeros(n, dtype=dtype, device=dev) if self.mom is None else self.mom.to(dev)
        self.offsets_t = torch.tensor(self.offsets, dtype=torch.int64, device=dev)
        self.bits_t = torch.tensor([b or 1 for b in self.seg_bits], dtype=torch.int32, device=dev)
        with torch.no_grad():
            for s, ((layer, f), p) in enumerate(zip(self.segments, params)):
                v = self.view(self.w, s)
                v.copy_(p)
                p.data = v
                g = self.view(self.grad, s)
                if p.grad is not None:
                    g.copy_(p.grad)
                p.grad = g
                for suffix, flat in zip(_BUFFERS, (self.z, self.u, self.mask)):
                    v = self.view(flat, s)
                    v.copy_(layer._buffers[f + suffix])
                    layer._buffers[f + suffix] = v
            for j, layer in enumerate(self.layers):
                cb = self.codebook[3 * j : 3 * j + 3]
                cb.copy_(layer._buffers["codebook"])
                layer._buffers["codebook"] = cb

    def _intact(self) -> bool:
        item = self.w.element_size()
        for s, (layer, f) in enumerate(self.segments):
            start = self.offsets[s]
            p = layer._parameters[f]
            empty = start == self.offsets[s + 1]  # a rank-0 U / V: data_ptr() is 0, there is nothing to share
            if p.device != self.device or not empty and p.data_ptr() != self.w.data_ptr() + start * item:
                return False
            for suffix, flat in zip(_BUFFERS, (self.z, self.u, self.mask)):
                b = layer._buffers[f + suffix]
                if (
                    b.device != self.device
                    or not empty
                    and b.data_ptr() != flat.data_ptr() + start * flat.element_size()
                ):
                    return False
        return all(
            layer._buffers["codebook"].data_ptr() == self.codebook[3 * j].data_ptr()
            for j, layer in enumerate(self.layers)
        )

    def sync(self) -> bool:
        """Re-adopt replaced tensors and route every factor grad into the flat grad.

        Returns True when the layout had to be rebuilt (the caller re-points its state).
        """
        rebuilt = not self._intact()
        if rebuilt:
            self._adopt()
        with torch.no_grad():
            for s, (layer, f) in enumerate(self.segments):
                p = layer._parameters[f]
                g = self.view(self.grad, s)
                if p.grad is None:
                    g.zero_()
                elif p.grad.data_ptr() != g.data_ptr():
                    g.copy_(p.grad)
                else:
                    continue
                p.grad = g
        return rebuilt

    def zero_grad(self) -> None:
        """Zero the flat grad and point every factor grad back at it."""
        self.grad.zero_()
        for s, (layer, f) in enumerate(self.segments):
            layer._parameters[f].grad = self.view(self.grad, s)

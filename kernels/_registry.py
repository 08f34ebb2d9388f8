"""Operator registration shared by the kernel families.

Every family registers one ``torch.library`` op per entry point. With Triton present the op
is a :func:`torch.library.triton_op` (its launcher calls kernels through ``wrap_triton``, so
``torch.compile(fullgraph=True)`` traces into it) and the pure-PyTorch reference is its CPU
kernel. Without Triton the reference is the only kernel. Nothing here probes hardware.

A graph of CPU tensors cannot hold Triton kernels (no CPU backend runs them), and some references
read their data on the host (numpy, ``.tolist()``), so they cannot be traced either. Such ops
(``cpu_opaque=True``) also register ``atmc::<name>_cpu``, a plain custom op of the reference with
the fake kernel: a trace of CPU tensors (``torch.compile`` with any backend, ``torch.export``,
``opcheck``) records that op as one opaque node, which runs the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable, Iterable

import torch

__all__ = [
    "HAS_TRITON",
    "fake_propagation",
    "interpreted",
    "metadata_only",
    "no_data",
    "register_op",
    "tracing",
    "wrap_triton",
]


def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


HAS_TRITON: bool = _has_triton()


def tracing(t: torch.Tensor) -> bool:
    """``t`` carries no data here: a ``torch.compile`` / export trace, or a fake tensor (``FakeTensorMode``,
    ``torch.library.opcheck``). Checks that read values (a host sync) must be skipped then."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


def no_data(t: torch.Tensor) -> bool:
    """``t`` has no data to read: a meta tensor (``device="meta"``) or a fake / traced one (:func:`tracing`).
    Checks that read values (``.item()``, ``.tolist()``, finiteness, offsets) or that ask for a kernel-capable
    device must be skipped then; the op only propagates metadata."""
    return t.device.type == "meta" or tracing(t)


def interpreted(kernel: Callable) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function, autotuned or not) runs in Triton's CPU interpreter
    (``TRITON_INTERPRET=1`` when it was decorated)."""
    from triton.runtime.interpreter import InterpretedFunction

    fn = kernel
    while not isinstance(fn, InterpretedFunction) and hasattr(fn, "fn"):  # autotune / heuristics wrappers
        fn = fn.fn
    return isinstance(fn, InterpretedFunction)


def wrap_triton(kernel: Callable) -> Callable:
    """:func:`torch.library.wrap_triton`, except that a kernel of Triton's CPU interpreter
    (``TRITON_INTERPRET=1``) is returned as it is, to be launched eagerly: torch 2.14 does this
    itself, while older releases (torch 2.11 on the lent GPU's image) refuse the interpreter's
    functions, which failed every interpreted launch there."""
    return kernel if interpreted(kernel) else torch.library.wrap_triton(kernel)


def fake_propagation(t: torch.Tensor) -> bool:
    """``t`` is a fake tensor outside a functionalizing (AOT) trace: dynamo's or ``torch.export``'s pass that
    runs an op's fake kernel (for a ``triton_op``, the launcher itself) only for its outputs' metadata. A
    launcher may return its allocated outputs then, instead of choosing a path from the sizes (which would
    guard a dynamic dimension). Under AOT tracing (``FunctionalTensor``) it must launch its kernels. A meta
    tensor (:func:`no_data`) counts too: no kernel can run on it."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return t.device.type == "meta" or (is_fake(t) and not isinstance(t, FunctionalTensor))


def metadata_only(t: torch.Tensor, interpreted: bool, who: str) -> bool:
    """Whether a Triton launcher only propagates metadata: a fake-tensor trace of CPU tensors or under Triton's
    CPU interpreter (``interpreted``), whose kernels cannot be traced into a graph. Dynamo's fake propagation
    only needs the outputs' metadata, so the launcher returns its allocated outputs; a functionalizing (AOT)
    trace cannot work there and is refused, naming ``who``. (A registered op never gets here with CPU tensors:
    it sends CPU traces to its opaque twin; this serves direct launcher calls.) A meta tensor (:func:`no_data`)
    always only propagates metadata."""
    if t.device.type == "meta":
        return True
    if not ((interpreted or t.device.type == "cpu") and tracing(t)):
        return False
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(t, FunctionalTensor):
        raise RuntimeError(
            f"{who} cannot be traced into a graph on CPU (or under TRITON_INTERPRET=1); "
            "compile on a GPU, or use torch.compile(backend='eager') on CPU"
        )
    return True


def register_op(
    name: str,
    *,
    reference: Callable,
    fake: Callable,
    launcher: Callable | None = None,
    mutates_args: Iterable[str] = (),
    cpu_opaque: bool = False,
):
    """Register ``atmc::<name>``; ``launcher`` (Triton) serves non-CPU devices when available.

    ``reference`` and ``launcher`` must share one annotated signature. ``fake`` computes output
    metadata only (it is used by the no-Triton op and by the CPU twin; ``triton_op`` traces the
    launcher instead). ``cpu_opaque``: traces of CPU tensors call the twin ``atmc::<name>_cpu``
    (see the module docstring) instead of the launcher.
    """
    qualname = f"atmc::{name}"
    mutates_args = tuple(mutates_args)
    if launcher is not None and HAS_TRITON:
        launcher = _on_device(launcher)
        if cpu_opaque:
            twin = torch.library.custom_op(f"{qualname}_cpu", reference, mutates_args=mutates_args)
            twin.register_fake(fake)
            schema = torch.library.infer_schema(launcher, mutates_args=mutates_args)  # (its module's names)
            op = torch.library.triton_op(
                qualname, _cpu_traces_to(twin, launcher), mutates_args=mutates_args, schema=schema
            )
        else:
            op = torch.library.triton_op(qualname, launcher, mutates_args=mutates_args)
        op.register_kernel("cpu")(reference)
    else:
        op = torch.library.custom_op(qualname, reference, mutates_args=mutates_args)
        op.register_fake(fake)
    return op


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))


def _on_device(launcher: Callable) -> Callable:
    """``launcher`` run with its first tensor's CUDA device current (``torch.cuda.device_of``; a no-op for other
    devices): Triton launches on the current device, so tensors on ``cuda:1`` while ``cuda:0`` is current would
    fail or address the wrong GPU."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        with torch.cuda.device_of(_first_tensor(args, kwargs)):
            return launcher(*args, **kwargs)

    launch.__signature__ = inspect.signature(launcher, eval_str=True)  # (see _cpu_traces_to)
    return launch


def _cpu_traces_to(twin: Callable, launcher: Callable) -> Callable:
    """``launcher``, except that a trace of CPU tensors calls ``twin`` (same signature)."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        t = _first_tensor(args, kwargs)
        if t.device.type == "cpu" and tracing(t):
            return twin(*args, **kwargs)
        return launcher(*args, **kwargs)

    # the launcher's signature with its annotations evaluated in its own module: torch releases whose triton_op
    # ignores ``schema=`` (2.13 and older, torch 2.11 on the lent GPU among them) infer the schema from this
    # wrapper, and would evaluate the launcher's string annotations (``from __future__ import annotations``)
    # in this module, where ``Tensor`` is not defined
    launch.__signature__ = inspect.signature(launcher, eval_str=True)
    return launch

"""Every atmc op traces under ``torch.compile(fullgraph=True)`` as one frame and its compiled result equals the
pure-PyTorch reference, bitwise, on inputs where an implementation can go wrong: tied values (at the top-k threshold
and at Lloyd's midpoints), NaN gradients (the step must write nothing), empty, all-zero, one-element, exactly-2^b
and odd-sized (1031) segments, CSR and empty factors, NaN rows in the GEMM input. The compiled function also reads
the buffers the op mutated, so dynamo must order the in-place writes before the reads.

These run on CPU tensors, where the compiled op dispatches to its CPU kernel, which is the reference itself: what
they test is the one-frame trace, the functionalization of the in-place ops and the order of their writes, not the
Triton kernels. Those are tested against the reference on the same kinds of inputs by the launchers in Triton's
interpreter (``test_admm_triton.py``, ``test_lloyd_triton.py``, ``test_lowrank_gemm.py``; the compiled-op tests
there run the launchers too)."""

import copy

import pytest
import torch
from atmc_triton.kernels import (
    admm_step,
    admm_step_ref,
    atmc_decode,
    atmc_linear,
    atmc_linear_ref,
    errors_for_bits,
    errors_for_bits_ref,
    lloyd_quantize,
    lloyd_quantize_ref,
)
from atmc_triton.kernels.lowrank_gemm import atmc_decode_ref
from atmc_triton.kernels.packed_format import FMT_CSR, FMT_DENSE, FMT_EMPTY, encode_factor
from torch._dynamo.testing import CompileCounter


def compiled_once(fn, *args):
    counter = CompileCounter()
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=counter)(*args)
    assert counter.frame_count == 1, f"{counter.frame_count} frames: the op broke the graph"
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of dtype, shape and contents (a NaN equals a NaN of the same bit pattern)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    return torch.equal(a, b)


def _segments():
    """Segments of sizes 0, 1, 7 (zeros), 16 = 2^4 (kept exactly), 17, 63 (four tied values), 1031 (normal)."""
    g = torch.Generator().manual_seed(0)
    parts = [
        torch.zeros(0),
        torch.tensor([0.75]),
        torch.zeros(7),
        torch.randn(16, generator=g),
        torch.randn(17, generator=g),
        torch.randint(-2, 2, (63,), generator=g).float() * 0.5,  # ties at the 1-bit midpoints
        torch.randn(1031, generator=g),
    ]
    offsets = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)
    return torch.cat(parts), offsets, torch.tensor([3, 1, 2, 4, 4, 1, 8], dtype=torch.int32)


def test_lloyd_ops_compile_in_one_frame_and_equal_the_reference():
    values, offsets, bits = _segments()

    def quantize(v, o, b):
        book, codes, q, err = lloyd_quantize(v, o, b, 10, 0.0)
        return book, codes, q, err, (q - v).square().sum()  # reads the op's outputs inside the graph

    got = compiled_once(quantize, values, offsets, bits)
    want = lloyd_quantize_ref(values, offsets, bits, 10, 0.0)
    for name, a, b in zip(("codebook", "codes", "q", "err"), got, want):
        assert same(a, b), name
    assert torch.allclose(got[4].double(), want[3].double().sum(), rtol=1e-5)
    got = compiled_once(lambda v, o: errors_for_bits(v, o, 10, 0.0), values, offsets)
    assert same(got, errors_for_bits_ref(values, offsets, 10, 0.0))


def _admm_state(n: int, seed: int) -> list[torch.Tensor]:
    """Tied weights (values in {0, +-0.5, +-1}) with every other input a scalar multiple of them, so the
    tie survives the gradient step and the top-k threshold falls inside a group of equal magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2, 3, (n,), generator=g).float() * 0.5
    return [w, 0.3 * w, -0.1 * w, 0.7 * w, 0.05 * w, torch.zeros(n, dtype=torch.bool)]


HP = (0.1, 0.9, 1e-4, 0.1)  # lr, momentum, weight_decay, rho


@pytest.mark.parametrize("n, k, poison", [(1031, 500, None), (1031, 1031, None), (1, 0, None), (1031, 300, 17)])
def test_admm_step_op_compiles_in_one_frame_and_equals_the_reference(n, k, poison):
    state = _admm_state(n, seed=n + k)
    if poison is not None:
        state[1][poison] = float("nan")  # a NaN gradient: nothing may be written, tau is NaN
        state[5] = state[0] != 0

    def step(w, grad, mom, z, u, mask):
        tau = admm_step(w, grad, mom, z, u, mask, *HP, k, False)
        return tau, mask.sum(), w.abs().sum()  # reads the mutated buffers inside the graph

    got, want = copy.deepcopy(state), copy.deepcopy(state)
    tau, kept, mass = compiled_once(step, *got)
    tau_ref = admm_step_ref(*want, *HP, k, False)
    assert same(tau, tau_ref)
    for name, a, b in zip(("w", "grad", "mom", "z", "u", "mask"), got, want):
        assert same(a, b), name
    assert int(kept) == int(want[5].sum()) and same(mass, want[0].abs().sum())
    if poison is None and 0 < k < n:
        mags = torch.sort(state[0].abs(), descending=True).values
        assert mags[k - 1] == mags[k], "the threshold is not inside a tie"
        assert int(want[5].sum()) == k
    if poison is not None:
        assert torch.isnan(tau) and all(same(a, b) for a, b in zip(got, state))


def _factors(g: torch.Generator):
    """U [5, 3] dense, V [3, 7] CSR, C [5, 7] dense, over one 15-value codebook (repeated values) at 40 %."""
    book = torch.randn(15, generator=g)

    def w(*s):
        return book[torch.randint(0, 15, s, generator=g)] * (torch.rand(*s, generator=g) < 0.4)

    return [
        a
        for t, fmt in ((w(5, 3), FMT_DENSE), (w(3, 7), FMT_CSR), (w(5, 7), FMT_DENSE))
        for a in encode_factor(t, False, fmt)
    ]


@pytest.mark.parametrize("m", [1, 7, 63])
def test_atmc_linear_op_compiles_in_one_frame_and_equals_the_reference(m):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 7, generator=g)
    x[m // 2, 3] = float("nan")  # one poisoned input row: NaN in that output row only
    args = (x, torch.randn(5, generator=g), 5, 3, 0, *_factors(g))
    got = compiled_once(lambda *a: atmc_linear(*a), *args)
    want = atmc_linear_ref(*args)
    assert same(got, want)
    assert torch.isnan(got[m // 2]).all() and not torch.isnan(got[torch.arange(m) != m // 2]).any()


def test_atmc_decode_op_compiles_in_one_frame_and_equals_the_reference():
    g = torch.Generator().manual_seed(1)
    fmt, codes, book, indptr, indices = _factors(g)[5:10]  # the CSR factor V [3, 7]
    assert fmt == FMT_CSR
    got = compiled_once(lambda *a: atmc_decode(*a), fmt, 3, 7, codes, book, indptr, indices)
    assert same(got, atmc_decode_ref(fmt, 3, 7, codes, book, indptr, indices))
    empty = encode_factor(torch.zeros(4, 2), False, FMT_EMPTY)
    got = compiled_once(lambda *a: atmc_decode(*a), empty[0], 4, 2, *empty[1:])
    assert same(got, torch.zeros(4, 2))


def _op_cases():
    """``(op, args)`` for every registered op, on the inputs of the tests above."""
    from atmc_triton.kernels import admm_dual_update

    values, offsets, bits = _segments()
    g = torch.Generator().manual_seed(3)
    factors = _factors(g)
    u, w, z = (torch.randn(1031, generator=g) for _ in range(3))
    return {
        "lloyd_quantize": (lloyd_quantize, (values, offsets, bits, 10, 0.0)),
        "lloyd_errors_for_bits": (errors_for_bits, (values, offsets, 10, 0.0)),
        "admm_step": (admm_step, (*_admm_state(1031, 1), *HP, 500, False)),
        "admm_dual_update": (admm_dual_update, (u, w, z)),
        "atmc_linear": (atmc_linear, (torch.randn(7, 7, generator=g), torch.randn(5, generator=g), 5, 3, 0, *factors)),
        "atmc_decode": (atmc_decode, (*factors[5:6], 3, 7, *factors[6:10])),
    }


@pytest.mark.parametrize("name", list(_op_cases()))
def test_every_op_passes_torch_library_opcheck(name):
    """Schema, autograd registration, fake-tensor metadata against the real outputs, and an AOT-dispatch
    trace with dynamic shapes (once refused: the GEMM's value checks read fake tensors, and CPU traces of
    the Lloyd and ADMM ops reached Triton kernels that no CPU backend can run)."""
    op, args = _op_cases()[name]
    assert op._qualname == f"atmc::{name}"
    assert all(v == "SUCCESS" for v in torch.library.opcheck(op, args).values())


@pytest.mark.parametrize("name", ["lloyd_quantize", "lloyd_errors_for_bits", "admm_step", "admm_dual_update"])
def test_cpu_graphs_with_an_aot_backend_hold_the_op_and_equal_the_reference(name):
    """``torch.compile(backend="aot_eager")`` of CPU tensors (what the default backend does before code
    generation): the op is one opaque node that runs the reference; mutated inputs are written back."""
    op, args = _op_cases()[name]
    want_args = copy.deepcopy(args)
    want = op(*want_args)  # eager CPU: the reference
    torch._dynamo.reset()
    got = torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert (a is None and b is None) or same(a, b)
    for a, b in zip(args, want_args):  # the in-place updates (w, mom, mask; u)
        if isinstance(a, torch.Tensor):
            assert same(a, b)


def test_op_schemas_can_be_inferred_from_the_cpu_trace_wrappers():
    """Torch releases whose ``triton_op`` ignores ``schema=`` (2.13 and older: torch 2.11 on the lent GPU) infer the
    schema from the wrapper that sends CPU traces to the opaque twin; the launchers' annotations are strings
    (``from __future__ import annotations``), which must resolve in the launcher's module, not the wrapper's."""
    pytest.importorskip("triton")
    from atmc_triton.kernels import _registry, admm, lloyd_triton

    launchers = (
        lloyd_triton.lloyd_quantize_triton,
        lloyd_triton.errors_for_bits_triton,
        admm.admm_step_triton,
        admm.admm_dual_update_triton,
    )
    for launcher in launchers:
        wrapper = _registry._cpu_traces_to(lambda *a, **k: None, launcher)
        mine = torch.library.infer_schema(wrapper, mutates_args=())
        assert mine == torch.library.infer_schema(launcher, mutates_args=()) and mine.startswith("(Tensor ")


def test_launchers_run_on_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: every registered launcher runs inside
    ``torch.cuda.device_of(its first tensor)`` (a probe op, called on the meta device, where the launcher runs;
    the schema is the launcher's). Fails if ``register_op`` registers the bare launcher."""
    pytest.importorskip("triton")
    import contextlib

    from atmc_triton.kernels import _registry

    entered, ran = [], []
    monkeypatch.setattr(torch.cuda, "device_of", lambda t: entered.append(t) or contextlib.nullcontext())

    def launcher(x: torch.Tensor, k: int) -> torch.Tensor:
        ran.append(len(entered))
        return x * k

    op = _registry.register_op(
        "_device_probe", reference=lambda x, k: x * k, fake=lambda x, k: torch.empty_like(x), launcher=launcher
    )
    assert "(Tensor x, SymInt k)" in str(torch.ops.atmc._device_probe.default._schema)
    x = torch.ones(3, device="meta")
    assert op(x, 2).device.type == "meta" and ran == [1] and entered[0] is x
    assert torch.equal(op(torch.ones(2), 3), torch.full((2,), 3.0)) and ran == [1]  # CPU: the reference


def test_interpreted_kernels_launch_without_torch_wrap_triton(monkeypatch):
    """torch 2.11's ``wrap_triton`` (the lent GPU's image) refuses the interpreter's kernels, which failed every
    interpreted launch there: the kernels' shim hands them over as they are (plain and autotuned); a compiled
    kernel still goes through torch's ``wrap_triton``."""
    triton = pytest.importorskip("triton")
    from atmc_triton.kernels import _registry, admm_triton, lowrank_gemm_triton

    def refuse(kernel):  # torch 2.11's check
        if not isinstance(kernel, (triton.runtime.jit.JITFunction, triton.runtime.autotuner.Autotuner)):
            raise RuntimeError("wrap_triton only works on functions annotated with triton.jit or triton.autotune")
        return ("wrapped", kernel)

    monkeypatch.setattr(torch.library, "wrap_triton", refuse)
    for kernel in (admm_triton._update_kernel, lowrank_gemm_triton._tile_small):
        interpreted = not isinstance(kernel, triton.runtime.jit.JITFunction) and not isinstance(
            getattr(kernel, "fn", None), triton.runtime.jit.JITFunction
        )
        got = _registry.wrap_triton(kernel)
        assert got is kernel if interpreted else got == ("wrapped", kernel)

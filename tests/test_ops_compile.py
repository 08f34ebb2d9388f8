"""Every atmc op traces under torch.compile(fullgraph=True) as one frame and matches eager."""

import torch
from atmc_triton.kernels import admm_step, atmc_linear, lloyd_quantize
from torch._dynamo.testing import CompileCounter


def compiled_once(fn, *args):
    counter = CompileCounter()
    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=counter)(*args)
    assert counter.frame_count == 1
    return out


def test_lloyd_op_compiles_in_one_frame():
    x = torch.randn(500)
    args = (x, torch.tensor([0, 200, 500]), torch.tensor([2, 4], dtype=torch.int32), 10, 0.0)
    for got, want in zip(compiled_once(lambda *a: lloyd_quantize(*a), *args), lloyd_quantize(*args)):
        assert torch.equal(got, want)


def test_admm_step_op_compiles_in_one_frame():
    n = 300

    def make():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(n, generator=g) for _ in range(5)] + [torch.zeros(n, dtype=torch.bool)]

    def step(w, grad, mom, z, u, mask):
        return admm_step(w, grad, mom, z, u, mask, 0.1, 0.9, 1e-4, 0.1, 50, False)

    a, b = make(), make()
    tau_c = compiled_once(step, *a)
    tau_e = step(*b)
    assert torch.equal(tau_c, tau_e)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_atmc_linear_op_compiles_in_one_frame():
    from atmc_triton.kernels.packed_format import FMT_CSR, FMT_DENSE, encode_factor

    g = torch.Generator().manual_seed(0)
    book = torch.randn(15, generator=g)
    w = lambda *s: book[torch.randint(0, 15, s, generator=g)] * (torch.rand(*s, generator=g) < 0.4)  # noqa: E731
    factors = [
        a
        for t, fmt in ((w(5, 3), FMT_DENSE), (w(3, 7), FMT_CSR), (w(5, 7), FMT_DENSE))
        for a in encode_factor(t, raw=False, fmt=fmt)
    ]
    args = (torch.randn(4, 7), torch.randn(5), 5, 3, 0, *factors)
    assert torch.allclose(compiled_once(lambda *a: atmc_linear(*a), *args), atmc_linear(*args))

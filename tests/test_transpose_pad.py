"""The CSR kernel's activation operand in one launch (issue 15, packed GEMM at small batch).

At ``M > 1`` :func:`csr_operand` hands ``_csr_mm_kernel`` ``x^T`` padded to ``[K + 1, Mp]`` (zeros in columns
``m >= M`` and in row ``K``). ``F.pad(x.t(), ...)`` made that two launches (a fill, then a copy);
``_transpose_pad_kernel`` writes every element in one. It is a copy: checked for exact equality with ``F.pad`` in
Triton's interpreter, written into NaN-poisoned buffers (a missed element stays NaN), at odd and flat / tiled
``Mp``; and the identity-init all-CSR layer at ``M = 4`` is two launches (what ``bench/model.py`` charges).
"""

import os

import pytest
import torch

lt = pytest.importorskip("atmc_triton.kernels.lowrank_gemm_triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need TRITON_INTERPRET=1")


def padded_ref(a: torch.Tensor) -> torch.Tensor:
    M = a.shape[0]
    return torch.nn.functional.pad(a.t(), (0, lt._csr_cols(M) - M, 0, 1))


def poisoned(a: torch.Tensor) -> torch.Tensor:
    M, K = a.shape
    return torch.full((K + 1, lt._csr_cols(M)), float("nan"), dtype=a.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # (the interpreter has no bf16)
@pytest.mark.parametrize("K", [1, 7, 1031])
@pytest.mark.parametrize("M", [2, 7, 63, 100])  # Mp 2, 8, 64 (flat runs), 128 ([64, 64] tiles, two column blocks)
def test_equals_f_pad_and_writes_every_element(M, K, dtype):
    g = torch.Generator().manual_seed(M * 1000 + K)
    a = torch.randn(M, K, generator=g).to(dtype)
    ref = padded_ref(a)
    out = poisoned(a)
    got = lt.transpose_pad(a, out)
    assert got is out
    assert torch.equal(got, ref)  # bit-exact, and no NaN left: every element written
    fresh = lt.transpose_pad(a)
    assert fresh.shape == (K + 1, lt._csr_cols(M)) and fresh.dtype == dtype and fresh.is_contiguous()
    assert torch.equal(fresh, ref)


@pytest.mark.parametrize("M", [3, 40])
def test_csr_operand_is_the_kernel_and_strided_inputs(M, monkeypatch):
    """``csr_operand`` takes the kernel (one launch) at ``M > 1`` and returns ``x`` itself at ``M = 1``; a row
    stride above ``K`` (a column slice) and a transposed view read as ``F.pad`` reads them."""
    ran, wrap = [], lt.wrap_triton
    monkeypatch.setattr(lt, "wrap_triton", lambda k: ran.append(k.__name__) or wrap(k))
    g = torch.Generator().manual_seed(M)
    a = torch.randn(M, 50, generator=g)
    assert torch.equal(lt.csr_operand(a), padded_ref(a)) and ran == ["_transpose_pad_kernel"]
    one = lt.csr_operand(a[:1])
    assert one.shape == (50,) and one.data_ptr() == a.data_ptr() and ran == ["_transpose_pad_kernel"]
    wide = torch.randn(M, 80, generator=g)[:, 13:63]  # stride(0) 80
    assert torch.equal(lt.transpose_pad(wide, poisoned(wide)), padded_ref(wide))
    tview = torch.randn(50, M, generator=g).t()  # stride(1) != 1
    assert torch.equal(lt.transpose_pad(tview, poisoned(tview)), padded_ref(tview))


def test_large_k_one_grid_axis(monkeypatch):
    """K = 2^20 + 3: the 1-D grid holds every row block (no axis-1 limit of 65535); the last, partial block masks
    its stores."""
    grids, wrap = [], lt.wrap_triton

    def record(kernel):
        launch = wrap(kernel)

        class Grid:
            def __getitem__(self, grid):
                grids.append(grid)
                return launch[grid]

        return Grid()

    monkeypatch.setattr(lt, "wrap_triton", record)
    K = 2**20 + 3
    a = torch.randn(2, K).to(torch.float16)
    assert torch.equal(lt.transpose_pad(a, poisoned(a)), padded_ref(a))
    assert grids == [(-(-(K + 1) // (lt.TRANSPOSE_TILE // 2)),)]  # 1025 programs of 1024 rows x 2 columns


def test_rejects_a_wrong_out():
    a = torch.randn(4, 9)
    for out in (torch.empty(10, 8), torch.empty(10, 4, dtype=torch.float16), torch.empty(4, 10).t()):
        with pytest.raises(ValueError, match="transpose_pad: out must be"):
            lt.transpose_pad(a, out)


def test_identity_init_all_csr_layer_is_two_launches_at_m4(monkeypatch):
    """The launches ``bench/model.py`` charges at ``M = 4`` for the README rows' layer (identity init, C and U both
    CSR): the padded transpose of ``x``, then ONE fused CSR launch that writes the output; nothing else (no
    ``F.pad`` fill and copy, no zero fill, no second CSR pass)."""
    from atmc_triton.kernels.packed_format import FMT_CSR

    from bench import model
    from bench.gemm import Layer

    layer = Layer("transpose", 256, 256, 0.05, 8, "identity", torch.device("cpu"))
    assert [f[0] for f in layer.factors] == [FMT_CSR, 0, FMT_CSR], "the layer's structure changed"
    ran, wrap = [], lt.wrap_triton
    monkeypatch.setattr(lt, "wrap_triton", lambda k: ran.append(getattr(k, "__name__", None)) or wrap(k))
    x = torch.randn(4, 256)
    y = lt.linear_launch(x, None, 256, layer.r, layer.identity, layer.factors, {})
    torch.testing.assert_close(y, x @ layer.w16.float().T, rtol=2e-2, atol=2e-2 * float(y.abs().max()))
    assert ran == ["_transpose_pad_kernel", "_csr_mm_kernel"], ran
    assert [launch.name for launch in model.atmc_linear(4, 4096, 4096, 0.05, 8).launches] == ran

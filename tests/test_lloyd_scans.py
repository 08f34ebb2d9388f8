"""The quantizer's scans (issue 14): the float64 prefix sums of the segment-sorted values come from the two scan
kernels for both methods, no longer from ``nan_to_num`` and ``cumsum(dtype=float64)`` (three passes).

Checked in Triton's interpreter with every output poisoned: the prefix sums against a float64 ``cumsum`` of the
values with non-finite ones as 0 (to float64 rounding: the block totals are summed in another order), the
squares likewise, the ranks exactly, at 1 to 3,000 values (one block, its edges, several), for ``fast`` and not.
"""

import os

import pytest
import torch

lt = pytest.importorskip("atmc_triton.kernels.lloyd_triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need TRITON_INTERPRET=1")


@pytest.fixture
def poisoned(monkeypatch):
    def new(shape, dtype, device):
        return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)

    monkeypatch.setattr(lt, "_new", new)


def ranks_ref(srt: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Inclusive count of distinct-run starts among the nonzeros (a run starts at a segment's first value or
    where a value differs from its predecessor; NaN != NaN)."""
    starts = torch.zeros(srt.numel(), dtype=torch.bool)
    starts[offsets[:-1][offsets[:-1] < srt.numel()]] = True
    prev = torch.cat([srt[:1], srt[:-1]])
    new = (srt != 0) & (starts | (srt != prev))
    return torch.cumsum(new.to(torch.int32), 0).to(torch.int32)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("n", [1, 7, 1023, 1024, 1025, 3000])
def test_scans_match_float64_cumsums(n, fast, poisoned):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))  # magnitudes over ~8 decades
    x[torch.rand(n, generator=g) < 0.2] = 0.0
    x[torch.rand(n, generator=g) < 0.2] = 1.5  # runs of ties
    if n > 7:
        x[[3, n // 2, n - 2]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    cuts = sorted({0, n // 3, n // 3, n // 2, n})
    off = torch.tensor(cuts)
    srt = lt._segment_sort(x, off)
    prefix, prefix2, rank = lt._scans(srt, off, fast)
    finite = torch.nan_to_num(srt.double(), nan=0.0, posinf=0.0, neginf=0.0)
    scale = torch.cumsum(finite.abs(), 0)
    assert not prefix.isnan().any()
    assert ((prefix - torch.cumsum(finite, 0)).abs() <= 1e-13 * scale).all()
    if not fast:
        assert prefix2 is None and rank is None
        return
    assert ((prefix2 - torch.cumsum(finite**2, 0)).abs() <= 1e-13 * torch.cumsum(finite**2, 0)).all()
    assert torch.equal(rank, ranks_ref(srt, off))


def test_a_segments_nan_does_not_reach_the_next_segments_prefix(poisoned):
    off = torch.tensor([0, 3, 6])
    srt = torch.tensor([float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0])
    prefix, prefix2, _ = lt._scans(srt, off, True)
    assert torch.equal(prefix, torch.tensor([0.0, 1.0, 3.0, 6.0, 10.0, 15.0], dtype=torch.float64))
    assert torch.equal(prefix2, torch.tensor([0.0, 1.0, 5.0, 14.0, 30.0, 55.0], dtype=torch.float64))

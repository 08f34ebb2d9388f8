"""Gaps the fourth mutation audit found (the packed GEMM's reference, path choice and cost model, the Triton Lloyd
launcher, ``compress_`` / ``finalize_``): behaviour no other test pinned, each checked against a value worked out by
hand or a documented one.

Every test here failed under at least one mutant of the module it names (the README's "Mutation audit, part 4"
lists them) and passes on the real code.
"""

import pytest
import torch
from atmc_triton.kernels.lowrank_gemm import (
    H100,
    IDENTITY_NONE,
    ISSUE_COUNTS,
    check_linear,
    dense_crossover,
    issue_instructions,
    linear_path,
    predicted_us,
)
from atmc_triton.kernels.packed_format import FMT_EMPTY
from torch import nn

import atmc_triton as at

# --- kernels/lowrank_gemm.py -----------------------------------------------------------------------------------------


def _empty_factor():
    e = torch.empty(0, dtype=torch.int32)
    return (FMT_EMPTY, e, e.float(), e, e.short())


def test_check_linear_refuses_x_without_columns():
    """``x [M, 0]`` (K = 0) is refused before any factor is read (``K < 1`` -> ``K < 0`` lived: every empty factor
    then passes and nothing is refused)."""
    with pytest.raises(ValueError, match=r"need N, K >= 1 and r >= 0, got N=3, r=0, K=0"):
        check_linear("atmc_linear", torch.zeros(2, 0), None, 3, 0, IDENTITY_NONE, [_empty_factor()] * 3)


def test_predicted_us_csr_flops_are_two_per_nonzero_and_row():
    """On a machine whose CUDA cores are the bottleneck the CSR term is ``2 M nnz / fma`` (a multiply and an add per
    stored nonzero and row; ``2`` -> ``3`` lived: with the H100 figures the L1 gathers always bound it)."""
    hw = dict(H100, fma=1e9)  # 1 GFLOP/s of fp32: compute dominates every other term
    M, nnz = 8, 10_000
    assert predicted_us("split_k", M, 64, 64, 0, nnz, 0, hw=hw) == pytest.approx(1.0 + 1e6 * 2 * M * nnz / 1e9)
    assert predicted_us("tile", 40, 64, 64, 0, nnz, 0, hw=hw) == pytest.approx(1.0 + 1e6 * 2 * 40 * nnz / 1e9)


def test_dense_crossover_never_below_seventeen_rows():
    """Up to 16 rows (``PACKED_M``, one mma tile) the packed kernels always run: a layer for which cuBLAS wins at
    every M gets the crossover 17, the docstring's example (``PACKED_M`` 16 -> 17 lived)."""
    N = K = 4096
    nnz = 6_710_886
    assert dense_crossover(N, K, nnz * 5 // 2, nnz, 0) == 17
    assert [linear_path(m, 17) for m in (1, 16, 17)] == ["split_k", "split_k", "dense"]


@pytest.mark.parametrize("triton", sorted(ISSUE_COUNTS))
def test_issue_instructions_defined_for_every_m_and_triton(triton):
    """Every Triton version's table covers the tiles the launchers use (16/32/64/128 rows; CSR 1..32), so
    ``issue_instructions`` answers for every M; 3.6's 32-row dense tile costs 0.90 (key 32 -> 33 lived: a
    ``KeyError`` for 17..32 rows on 3.6)."""
    counts = ISSUE_COUNTS[triton]
    for kind in ("dense", "bitmap"):
        assert sorted(counts[kind]) == [16, 32, 64, 128]
    assert sorted(counts["csr"]) == [1, 2, 4, 8, 16, 32]
    for M in range(0, 300):
        assert issue_instructions(M, 10, 100, 50, triton=triton) >= 0
    if triton == "3.6":
        assert issue_instructions(32, 0, 100, triton=triton) == pytest.approx(90.0)  # 100 elements at 0.90


# --- atmc_triton/api.py ----------------------------------------------------------------------------------------------


def test_finalize_floor_is_read_off_the_quantized_copies():
    """A quantized layer's values and floor both come from ``Z`` (what ``finalize_`` commits to), not ``W``
    (``layer.nbits is not None`` -> ``is None`` lived: the floor was then each row's largest ``|W|``)."""
    model = at.compress_(nn.Sequential(nn.Linear(4, 2)), at.ATMCConfig(nnz=4, bits=4, floor="rows"))
    layer = model[0]
    assert layer.nbits is not None and layer.rank == 0
    with torch.no_grad():
        layer.C.copy_(torch.tensor([[0.0, 0.0, 0.0, 5.0], [5.0, 0.0, 0.0, 0.0]]))  # W's row maxima: (0, 3), (1, 0)
        layer.C_z.copy_(torch.tensor([[10.0, 1.0, 0.5, 0.1], [0.2, 9.0, 0.3, 0.4]]))
    at.finalize_(model, floor="rows", check_input=False)
    # floor: Z's row maxima 10 and 9; then the two largest others, 1 and 0.5
    want = torch.tensor([[10.0, 1.0, 0.5, 0.0], [0.0, 9.0, 0.0, 0.0]])
    assert torch.equal(layer.C.detach(), want)


def test_a_scalar_first_input_records_no_input_shape():
    """A 0-dim first tensor says nothing about the input's shape: ``check_input_dependence`` then knows none and
    returns ``None`` (``t.dim() >= 1`` -> ``>= 0`` lived: the scalar's shape ``()`` was recorded and the check failed
    with an ``IndexError``)."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, s):
            return self.fc(s * torch.ones(1, 4))

    torch.manual_seed(0)
    model = at.compress_(Scaled(), at.ATMCConfig(ratio=0.5, floor="none"))
    model(torch.tensor(2.0))
    assert model.__dict__.get("_atmc_input_spec") is None
    assert at.check_input_dependence(model) is None
    model(torch.rand(1))  # a 1-D input is recorded
    assert model.__dict__["_atmc_input_spec"][0] == (1,)


def test_compress_report_training_state_by_hand():
    """``training_state_bytes`` is 21 B per factor entry (weight, grad, momentum, Z, u as float32 and a bool mask)
    plus 12 B per dense parameter (``5 * 4 + 1`` -> ``5 * 4 + 0`` lived)."""
    report = at.compress_(nn.Sequential(nn.Linear(4, 3)), at.ATMCConfig(nnz=6, floor="none"), return_report=True)
    assert (report.factor_entries, report.dense_params) == (12, 3)  # sparse init: C [3, 4]; the bias stays dense
    assert report.training_state_bytes == 12 * (5 * 4 + 1) + 3 * (3 * 4) == 288


def test_excluded_attention_reports_all_its_parameters():
    """An excluded ``nn.MultiheadAttention`` is reported with its own parameters plus its ``out_proj``'s
    (``+`` -> ``-`` lived: the child's were subtracted)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.fc = nn.Linear(8, 4)

    cfg = at.ATMCConfig(ratio=0.5, exclude=["attn"], floor="none")
    report = at.compress_(Model(), cfg, return_report=True)
    # in_proj 3 * 8 * 8 + 24, out_proj 8 * 8 + 8
    assert report.skipped == (("attn", "MultiheadAttention", 192 + 24 + 64 + 8, "excluded"),)
    assert report.dense_params == 288 + 4  # and fc's bias


@pytest.mark.parametrize(("batch", "runs"), [(1, 1), (2, 2), (5, 2)])
def test_check_input_dependence_runs_at_most_two_rows(batch, runs):
    """The two random inputs take ``example_input``'s shape with the batch cut to at most 2 (and kept at 1 for a
    batch of 1) (``min(batch, 2)`` -> ``max`` lived: the whole batch, and never fewer than 2 rows)."""
    model = nn.Sequential(nn.Linear(4, 3))
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    assert at.check_input_dependence(model, torch.zeros(batch, 4), warn=False) == 0
    assert seen == [(runs, 4), (runs, 4)]

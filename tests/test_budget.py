"""Size accounting (``atmc_triton.budget``): the paper's per-factor cost, its pre-Lloyd bound, and ``nnz_budget``'s k.

The cost of a quantized factor with ``n`` nonzeros over ``L`` levels is ``n * max(1, ceil(log2 L)) + 32 * L``
(32 * n without a quantizer); ``k`` is the largest count whose bound ``n_f * b + 32 * min(2^b, n_f)``, summed over
the factors holding the current top-k magnitudes, fits ``ratio * dense_bits``. Expected values are worked out by
hand in the comments.
"""

import copy
import dataclasses
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import event, example, given
from hypothesis import strategies as st
from torch import nn

import atmc_triton as at
from atmc_triton.budget import factor_bits, factor_bits_bound


@pytest.mark.parametrize(
    "nnz, levels, bits, want",
    [
        (0, 0, 8, 0),  # an empty factor is free
        (0, 0, None, 0),
        (5, 1, 4, 5 * 1 + 32),  # one level still takes one bit per code
        (5, 2, 4, 5 * 1 + 64),
        (10, 3, 4, 10 * 2 + 96),  # ceil(log2 3) = 2
        (10, 4, 4, 10 * 2 + 128),
        (10, 5, 8, 10 * 3 + 160),  # ceil(log2 5) = 3: the code width follows L, not b
        (1000, 256, 8, 8000 + 8192),
        (1000, 129, 8, 8000 + 4128),
        (7, 7, None, 7 * 32),  # no quantizer: 32 bits a nonzero, no codebook
    ],
)
def test_factor_bits_is_codes_plus_a_32_bit_codebook_entry_per_level(nnz, levels, bits, want):
    assert factor_bits(nnz, levels, bits) == want


@pytest.mark.parametrize(
    "nnz, bits, want",
    [
        (0, 8, 0),
        (1, 1, 1 + 32),  # one nonzero: one level
        (2, 1, 2 + 64),  # 2^1 = 2 levels at most
        (3, 1, 3 + 64),
        (10, 2, 20 + 128),
        (10, 8, 80 + 320),  # min(256, 10) = 10 levels
        (300, 8, 2400 + 8192),  # min(256, 300) = 256 levels
    ],
)
def test_factor_bits_bound_counts_full_bits_and_min_2b_n_levels(nnz, bits, want):
    assert factor_bits_bound(nnz, bits) == want
    if nnz:  # a bound: at least the real cost of any level count it allows
        assert all(factor_bits_bound(nnz, bits) >= factor_bits(nnz, lv, bits) for lv in range(1, min(2**bits, nnz) + 1))


def _linear(out: int, inn: int, lo: float, hi: float, seed: int) -> nn.Linear:
    """A bias-free Linear whose weights are distinct and lie in [lo, hi) in magnitude, random signs."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Linear(inn, out, bias=False)
    mag = lo + (hi - lo) * torch.randperm(out * inn, generator=g).float() / (out * inn)
    sign = torch.where(torch.rand(out * inn, generator=g) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        m.weight.copy_((mag * sign).view(out, inn))
    return m


@pytest.mark.parametrize(
    "bits, want_k",
    [
        (1, 96),  # one 10x10 factor holds W: n + 32 * 2 <= 160 bits  ->  n = 96
        (2, 16),  # 2n + 32 * 4 <= 160  ->  n = 16
        (8, 4),  # 8n + 32n <= 160 (n < 256 levels)  ->  n = 4
        (None, 5),  # 32n <= 160  ->  n = 5
    ],
)
def test_nnz_budget_k_pays_for_the_codebook(bits, want_k):
    """Linear(10, 10), identity init (U = W [10, 10], V = C = 0), ratio 0.05 of 3200 dense bits = 160 bits."""
    model = at.compress_(nn.Sequential(_linear(10, 10, 0.5, 1.5, 0)), at.ATMCConfig(ratio=0.05, bits=bits))
    assert int(model.atmc_bits_budget) == 160
    assert int(model.atmc_nnz_budget) == want_k


def test_nnz_budget_k_with_per_layer_bits():
    """Layer 0 (1 bit, magnitudes in [2, 3)) fills first, then layer 1 (8 bits, magnitudes in [0.1, 1)).

    Budget: 0.04 * 6400 = 256 bits. All 100 of layer 0 cost 100 + 64 = 164; n more of layer 1 cost 8n + 32n,
    so 164 + 40 * 2 = 244 fits and 164 + 40 * 3 = 284 does not: k = 102 (without codebooks it would be 119).
    """
    model = nn.Sequential(_linear(10, 10, 2.0, 3.0, 1), _linear(10, 10, 0.1, 1.0, 2))
    at.compress_(model, at.ATMCConfig(ratio=0.04, bits=8, layer_bits={"0": 1}))
    assert int(model.atmc_bits_budget) == 256
    assert int(model.atmc_nnz_budget) == 102


def test_explicit_nnz_is_capped_by_the_factor_count_and_has_no_bit_budget():
    model = at.compress_(nn.Sequential(nn.Linear(4, 3)), at.ATMCConfig(nnz=10**6, bits=4, init="identity"))
    assert int(model.atmc_nnz_budget) == 3 * 3 + 3 * 4 + 3 * 4  # U [3, 3], V [3, 4], C [3, 4]
    assert int(model.atmc_bits_budget) == -1


def test_a_ratio_below_one_nonzero_and_its_codebook_is_refused():
    # Linear(10, 10) at 1 bit: 1 nonzero costs 1 + 32 = 33 bits > floor(0.01 * 3200) = 32
    with pytest.raises(ValueError, match="leaves no nonzeros at bits=1"):
        at.compress_(nn.Sequential(_linear(10, 10, 0.5, 1.5, 0)), at.ATMCConfig(ratio=0.01, bits=1))
    at.compress_(nn.Sequential(_linear(10, 10, 0.5, 1.5, 0)), at.ATMCConfig(ratio=0.0104, bits=1))  # 33 bits: k = 1


def _bound_of_top(k: int, factors: list[tuple[int, torch.Tensor]]) -> int:
    """The oracle: bits of keeping the top-``k`` magnitudes (ties at the threshold to the lowest flat indices, as
    ``project_topk_``), each factor at ``n * b + 32 * min(2^b, n)``."""
    flat = torch.cat([m for _, m in factors])
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
    total, start = 0, 0
    for b, m in factors:
        n = sum(start <= i < start + m.numel() for i in order)
        total += n * b + 32 * min(2**b, n) if n else 0
        start += m.numel()
    return total


@st.composite
def budget_cases(draw):
    """1-3 bias-free Linear layers (1..12 wide) with distinct or heavily tied weights (zeros too), per-layer bits."""
    sizes = draw(st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=3))
    tied = draw(st.booleans())
    bits = draw(st.lists(st.sampled_from([1, 2, 4, 8]), min_size=len(sizes), max_size=len(sizes)))
    ratio = draw(st.sampled_from([0.02, 0.05, 0.2, 0.6, 0.95]))
    return sizes, tied, bits, ratio, draw(st.integers(0, 2**16))


@given(case=budget_cases())
@example(case=([(12, 12)], True, [2], 0.2, 0))  # values in {0, +-0.25, .., +-0.75}: k ends a tie group
@example(case=([(1, 1)], False, [8], 0.95, 0))  # budget 30 bits < 8 + 32: nothing fits
@example(case=([(12, 12), (3, 5)], False, [1, 1], 0.95, 0))  # every entry (zeros too) fits: k = total
@example(case=([(7, 1), (1, 7), (5, 5)], True, [8, 1, 4], 0.6, 3))
def test_k_is_the_largest_count_whose_bound_holds(case):
    sizes, tied, bits, ratio, seed = case
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(*(nn.Linear(i, o, bias=False) for o, i in sizes))
    with torch.no_grad():
        for m in model:
            w = torch.randn(m.weight.shape, generator=g)
            m.weight.copy_(torch.randint(-3, 4, w.shape, generator=g) * 0.25 if tied else w)
    layer_bits = {str(j): b for j, b in enumerate(bits)}
    cfg = at.ATMCConfig(ratio=ratio, bits=8, layer_bits=layer_bits)
    budget = math.floor(Fraction(str(ratio)) * at.dense_bits(model))  # the ratio as the decimal it prints as
    same_factors = at.compress_(copy.deepcopy(model), dataclasses.replace(cfg, ratio=None, nnz=1))
    factors = [
        (layer.nbits, p.detach().abs().reshape(-1))
        for _, layer in at.atmc_layers(same_factors)
        for _, p in layer.factors()
    ]
    try:
        at.compress_(model, cfg)
    except ValueError as e:
        assert "leaves no nonzeros" in str(e)
        assert _bound_of_top(1, factors) > budget, "refused although one nonzero fits"
        event("nothing fits")
        return
    k, total = int(model.atmc_nnz_budget), sum(m.numel() for _, m in factors)
    assert int(model.atmc_bits_budget) == budget
    assert 1 <= k <= total
    assert _bound_of_top(k, factors) <= budget, "k's own bound exceeds the budget"
    if k < total:
        assert _bound_of_top(k + 1, factors) > budget, "k is not the largest count whose bound holds"
        event("k < every entry")  # k ends a tie group: entries tied at the threshold count together
    else:
        event("k = every entry")

"""Gaps the third mutation audit found (the fast quantizer's windowed refinement and Lloyd batch, export_dense, the
factor store): behaviour no other test pinned, each checked against an independent computation or a documented
value.

Every test here failed under at least one mutant of the module it names (the README's "Mutation audit, part 3"
lists them) and passes on the real code.
"""

import warnings

import numpy as np
import pytest
import torch
from atmc_triton.kernels.lloyd_window import _candidates, refine_partition
from torch import nn

import atmc_triton as at

# --- kernels/lloyd_window.py -----------------------------------------------------------------------------------------


def _candidates_by_hand(B: np.ndarray, G: np.ndarray, W: int) -> np.ndarray:
    """The module docstring's candidates, one boundary at a time: ``2 W + 1`` fine moves around ``B[t]`` whose
    outermost two are replaced by one atom inside each end of the spread, then ``2 W + 1`` points spread over
    ``[min(B[t-1], B[t]-W), max(B[t+1], B[t]+W)]`` (clipped to ``[0, G]``; the first free boundary's lowest point
    is atom 1, the last one's highest atom ``G - 1``); the pinned ends are all 0 and all ``G``."""
    S, T = B.shape
    out = np.zeros((S, T, 2 * (2 * W + 1)), np.int64)
    for r in range(S):
        g = int(G[r])
        out[r, -1] = g
        for t in range(1, T - 1):
            b = int(B[r, t])
            lo = max(0, min(int(B[r, t - 1]), b - W))
            hi = min(max(int(B[r, t + 1]), b + W), g)
            spread = [int(np.rint(lo + k / (2 * W) * (hi - lo))) for k in range(2 * W + 1)]
            if t == 1:
                spread[0] = min(1, g)
            if t == T - 2:
                spread[-1] = max(g - 1, 0)
            fine = [min(max(b + o, 0), g) for o in range(-W, W + 1)]
            fine[0], fine[-1] = min(spread[0] + 1, spread[-1]), max(spread[-1] - 1, spread[0])
            out[r, t] = fine + spread
    return out


def test_candidates_are_the_documented_list_in_order():
    """Every boundary's candidates, in order (the Viterbi breaks ties to the first): W = 1 too (``if W > 1``
    skipped the one-atom-inside-the-spread moves), and the end-atom replacements on the right slots."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        S, K, W = int(rng.integers(1, 4)), int(rng.integers(1, 8)), int(rng.integers(1, 7))
        G = rng.integers(1, 40, S)
        B = np.stack([np.concatenate([[0], np.sort(rng.integers(0, g + 1, K)), [g]]) for g in G])
        np.testing.assert_array_equal(_candidates(B, G, W), _candidates_by_hand(B, G, W), err_msg=f"{B}, {G}, {W}")


def test_refine_partition_stops_after_32_passes_by_default():
    """The default cap is the fast path's 32 passes (``MAX_PASSES``; the README: "or after 32 passes"): a start
    with every boundary bunched at the left and a one-atom window needs more, so the cap binds."""
    s = np.sort(np.random.default_rng(0).standard_normal(150))
    C, P1, P2 = (np.concatenate([[0.0], np.cumsum(v)])[None] for v in (np.ones(150), s, s * s))
    G, za = np.array([150]), np.array([int(np.searchsorted(s, 0.0))])
    B, zc = np.concatenate([[0], np.arange(1, 41), [150]])[None], np.array([40])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (its torch ops are tiny: on a loaded machine, more threads only wait on each other)
    try:
        B1, zc1, passes = refine_partition(C, P1, P2, G, za, B, zc, 1)  # (converging takes 34 passes from this start)
        B31 = refine_partition(C, P1, P2, G, za, B, zc, 1, 31)[0]
    finally:
        torch.set_num_threads(threads)
    assert passes == 32
    assert not np.array_equal(B1, B31)  # the 32nd pass still moved a boundary


def test_refine_partition_refuses_a_window_below_1():
    """The audit's one bug: W = 0 divided by ``2 W`` in the spread (NaN cast to int64's minimum, then an
    IndexError deep in ``_pass``, with 3 or more free centres). ``refine_partition`` now refuses it by name."""
    s = np.sort(np.random.default_rng(1).standard_normal(12))
    C, P1, P2 = (np.concatenate([[0.0], np.cumsum(v)])[None] for v in (np.ones(12), s, s * s))
    za = int(np.searchsorted(s, 0.0))
    args = (C, P1, P2, np.array([12]), np.array([za]), np.array([[0, 3, za, 9, 12]]), np.array([1]))
    for W in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="W must be an int >= 1"):
            refine_partition(*args, W)
    assert refine_partition(*args, 1)[0].shape == (1, 5)


# --- atmc_triton/export.py -------------------------------------------------------------------------------------------


def test_export_dense_refuses_a_bare_compressed_layer():
    """A bare ATMC / packed layer / ATMC attention is refused with the documented message (``raise`` -> ``pass``
    returned a copy instead)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        atmc = at.compress_(nn.Sequential(nn.Linear(6, 4), nn.MultiheadAttention(8, 2)), at.ATMCConfig(nnz=40))
        packed = at.pack_(at.finalize_(at.compress_(nn.Sequential(nn.Linear(6, 4)), at.ATMCConfig(nnz=12, bits=2))))
    assert isinstance(atmc[1], at.ATMCMultiheadAttention) and isinstance(packed[0], at.PackedLinear)
    for layer in (atmc[0], atmc[1], packed[0]):
        with pytest.raises(ValueError, match="pass the model, not a bare compressed layer"):
            at.export_dense(layer)


# --- atmc_triton/store.py --------------------------------------------------------------------------------------------


def test_store_readopts_a_replaced_admm_buffer_alone():
    """``load_state_dict(..., strict=False, assign=True)`` of one ADMM buffer (the factor itself kept): ``sync``
    rebuilds, and the store's flat ``z`` holds the new values as the layer's buffer (``or`` -> ``and`` in the
    buffer check noticed a replaced buffer only if it also moved device)."""
    torch.manual_seed(0)
    cfg = at.ATMCConfig(nnz=20, bits=4)
    model = at.compress_(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)), cfg)
    store = at.ADMM(model, cfg, lr=0.01).store
    assert not store.sync()
    new = torch.randn(model[2].C_z.shape)
    model.load_state_dict({"2.C_z": new}, strict=False, assign=True)
    assert model[2].C_z is new  # the buffer was replaced, the parameters were not
    assert store.sync()
    s = store.segments.index((model[2], "C"))
    assert torch.equal(store.view(store.z, s), new)
    assert model[2].C_z.data_ptr() == store.view(store.z, s).data_ptr()

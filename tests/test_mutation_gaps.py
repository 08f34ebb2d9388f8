"""Gaps a mutation audit found: behaviour no other test pinned, each checked against an independent computation.

Every test here failed under at least one mutant of the module it names (the README's "Mutation audit" section
lists them) and passes on the real code.
"""

import math
import os

import pytest
import torch
from atmc_triton.kernels import IDENTITY_NONE, IDENTITY_U, admm_step_ref, project_topk_
from atmc_triton.kernels.packed_format import choose_format, factor_nbytes
from hypothesis import event, example, given
from hypothesis import strategies as st
from torch import nn

import atmc_triton as at
from atmc_triton.budget import factor_bits, fit_budget_, floor_indices

# --- atmc_triton.budget ----------------------------------------------------------------------------------------------


def _fit_oracle(flat: torch.Tensor, offsets: list[int], bits: list, budget: int, forced: list[int]) -> int:
    """Brute force: the order (forced nonzeros first, then |w| desc, index asc) and the longest prefix whose
    paper cost (codes + a 32-bit entry per distinct value, per factor) fits ``budget``."""
    vals = flat.tolist()
    nz = [i for i, v in enumerate(vals) if v != 0]
    first = sorted({i for i in forced if vals[i] != 0})
    rest = sorted((i for i in nz if i not in first), key=lambda i: (-abs(vals[i]), i))
    order = first + rest
    bounds = offsets + [len(vals)]

    def cost(n: int) -> int:
        total = 0
        for s, b in enumerate(bits):
            mine = [vals[i] for i in order[:n] if bounds[s] <= i < bounds[s + 1]]
            total += factor_bits(len(mine), len(set(mine)), b)
        return total

    if cost(len(first)) > budget:
        return -1
    return max(n for n in range(len(first), len(order) + 1) if cost(n) <= budget)


@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    bits=st.lists(st.sampled_from([None, 1, 2, 8]), min_size=3, max_size=3),
    budget=st.integers(0, 400),
    n_forced=st.integers(0, 3),
    seed=st.integers(0, 999),
)
@example(sizes=[5], bits=[2, None, None], budget=10**6, n_forced=0, seed=0)  # everything fits: nothing cut
@example(sizes=[6, 3], bits=[1, 8, None], budget=80, n_forced=0, seed=1)  # a cut inside a tie group
@example(sizes=[4, 4], bits=[None, None, None], budget=40, n_forced=2, seed=2)  # the floor alone is too big
def test_fit_budget_keeps_the_longest_prefix_that_fits(sizes, bits, budget, n_forced, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    flat = torch.randint(-3, 4, (n,), generator=g).float() * 0.25  # zeros and heavy ties
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    forced = torch.randperm(n, generator=g)[:n_forced]
    bits = bits[: len(sizes)]
    want = _fit_oracle(flat, offsets, bits, budget, forced.tolist())
    got_flat = flat.clone()
    if want < 0:
        with pytest.raises(ValueError, match="the layer floor alone"):
            fit_budget_(got_flat, offsets, bits, n, budget, forced=forced)
        event("the floor alone exceeds the budget")
        return
    kept = fit_budget_(got_flat, offsets, bits, n, budget, forced=forced if n_forced else None)
    event("every nonzero kept" if kept == int((flat != 0).sum()) else "a cut")
    assert kept == want == int((got_flat != 0).sum())
    assert torch.equal(got_flat[got_flat != 0], flat[got_flat != 0])  # kept entries are untouched
    order = sorted({i for i in forced.tolist() if flat[i] != 0})
    order += sorted((i for i in range(n) if flat[i] != 0 and i not in order), key=lambda i: (-abs(float(flat[i])), i))
    assert set(torch.nonzero(got_flat).view(-1).tolist()) == set(order[:want])


def _expected_floor(layer, mode_rows: bool) -> set[int]:
    """Floor by hand: per output row (or the single largest entry) of the factor carrying W, plus for the SVD
    init the largest entry of each used row of V. Flat offsets: U, then V, then C."""
    U, V, C = (t.detach().abs() for t in (layer.U, layer.V, layer.C))
    off = {"U": 0, "V": U.numel(), "C": U.numel() + V.numel()}
    ident = int(layer.identity)
    carrier = "C" if layer.rank == 0 else "V" if ident == IDENTITY_U else "U"
    a = {"U": U, "V": V, "C": C}[carrier]
    picks = [(i, int(a[i].argmax())) for i in range(a.shape[0])] if mode_rows else [divmod(int(a.argmax()), a.shape[1])]
    out = {off[carrier] + i * a.shape[1] + j for i, j in picks if a[i, j] != 0}
    if carrier == "U" and ident == IDENTITY_NONE:
        for r in {j for i, j in picks if a[i, j] != 0}:
            if V[r].max() != 0:
                out.add(off["V"] + r * V.shape[1] + int(V[r].argmax()))
    return out


@pytest.mark.parametrize(
    "init, shape", [("identity", (5, 3)), ("identity", (3, 5)), ("svd", (4, 6)), ("sparse", (4, 6))]
)
def test_floor_indices_are_one_per_row_of_the_carrier(init, shape):
    torch.manual_seed(0)
    out, inn = shape
    layers = [
        at.ATMCLinear.from_dense(
            nn.Linear(inn, out), at.ATMCConfig(nnz=8, init=init, rank=2 if init == "svd" else None)
        )
        for _ in range(2)
    ]
    carrier = {"sparse": "C", "svd": "U"}.get(init, "V" if out < inn else "U")
    with torch.no_grad():
        getattr(layers[0], carrier)[1].zero_()  # a dead output unit has no floor entry
        if init == "svd":  # nor does a zero row of V behind the largest U[i, r]
            layers[1].V[int(layers[1].U[0].abs().argmax())].zero_()
    got = floor_indices(layers, "rows").tolist()
    base, want = 0, []
    for layer in layers:
        want += sorted(base + i for i in _expected_floor(layer, True))
        base += sum(p.numel() for _, p in layer.factors())
    assert sorted(got) == sorted(want) and len(got) == len(set(got))
    if init == "identity":
        assert len(got) == 2 * out - 1  # one per live output unit: no V entries for the identity init
    for mode in ("auto", "row", "Rows"):  # (these gave the "last" floor silently)
        with pytest.raises(ValueError, match=f"floor_indices: mode must be .*, got '{mode}'"):
            floor_indices(layers, mode)
    last = floor_indices(layers, "last").tolist()  # the last layer keeps its rows, the others one entry
    n0 = sum(p.numel() for _, p in layers[0].factors())
    assert sorted(last) == sorted(
        list(_expected_floor(layers[0], False)) + [n0 + i for i in _expected_floor(layers[1], True)]
    )
    assert floor_indices(layers, "none").numel() == 0


def test_size_report_per_layer_adds_up_its_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))
    at.finalize_(at.compress_(model, at.ATMCConfig(ratio=0.2, bits=2)))
    rep = at.size_report(model, check_input=False)
    per = rep.per_layer()
    assert sorted(per) == ["0", "2"]
    for name, layer in at.atmc_layers(model):
        paper = packed = 0
        for _, p in layer.factors():  # the paper cost by hand: codes of ceil(log2 L) bits plus 32 bits a level
            nz = p[p != 0]
            levels = int(torch.unique(nz).numel())
            paper += nz.numel() * max(1, math.ceil(math.log2(levels))) + 32 * levels if nz.numel() else 0
            fmt = choose_format(*p.shape, nz.numel(), levels, False)
            packed += factor_nbytes(fmt, *p.shape, nz.numel(), levels, False)
        assert per[name] == (paper, packed) and paper > 0
    assert sum(p for p, _ in per.values()) == rep.total_bits


# --- atmc_triton.kernels.admm (the reference) ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 63])
def test_topk_threshold_is_zero_when_nothing_is_cut_and_inf_at_k0(n):
    """The documented tau at the edges: 0 for k >= n (nothing cut), +inf for k = 0, for the projection and the step."""
    g = torch.Generator().manual_seed(n)
    w0 = torch.randn(n, generator=g) + 3.0  # |w| >= 0.5 or so: a nonzero k-th magnitude
    for k, want in ((n, 0.0), (n + 5, 0.0), (0, math.inf)):
        w = w0.clone()
        keep, tau = project_topk_(w, k)
        assert float(tau) == want and int(keep.sum()) == min(k, n)
        assert torch.equal(w, w0 if k else torch.zeros(n))
        z = torch.zeros(n)
        t = dict(
            w=w0.clone(), grad=z.clone(), mom=z.clone(), z=z.clone(), u=z.clone(), mask=torch.zeros(n, dtype=torch.bool)
        )
        tau = admm_step_ref(**t, lr=0.1, momentum=0.9, weight_decay=0.0, rho=0.0, k=k, nesterov=False)
        assert float(tau) == want and int(t["mask"].sum()) == min(k, n)


def test_projection_refuses_a_negative_k():
    with pytest.raises(ValueError, match="k must be >= 0, got -1"):
        project_topk_(torch.ones(4), -1)


@pytest.mark.parametrize(
    "hint, message",
    [
        (torch.tensor(0.5, dtype=torch.float64), "tau_hint must be a 0-dim float32 tensor"),
        (torch.tensor([0.5]), "tau_hint must be a 0-dim float32 tensor"),
        (torch.tensor(0.5, device="meta"), "tau_hint is on meta"),
    ],
)
def test_step_refuses_a_bad_tau_hint(hint, message):
    t = {name: torch.zeros(5) for name in ("w", "grad", "mom", "z", "u")}
    with pytest.raises(ValueError, match=message):
        admm_step_ref(
            **t,
            mask=torch.zeros(5, dtype=torch.bool),
            lr=0.1,
            momentum=0.9,
            weight_decay=0.0,
            rho=0.0,
            k=2,
            nesterov=False,
            tau_hint=hint,
        )


def test_an_update_that_overflows_writes_nothing():
    """w - lr * m overflows to inf although m is finite: the step still writes nothing and returns NaN."""
    w0 = torch.tensor([3.0e38, 1.0, -2.0])
    t = dict(
        w=w0.clone(), grad=torch.tensor([-3.0e38, 0.5, 0.5]), mom=torch.zeros(3), z=torch.zeros(3), u=torch.zeros(3)
    )
    t["mask"] = torch.ones(3, dtype=torch.bool)
    tau = admm_step_ref(**t, lr=1.0, momentum=0.0, weight_decay=0.0, rho=0.0, k=2, nesterov=False)
    assert math.isnan(float(tau))
    assert torch.equal(t["w"], w0) and torch.equal(t["mom"], torch.zeros(3)) and bool(t["mask"].all())


@pytest.mark.gpu
def test_kth_largest_on_cuda_is_the_kth_of_a_sort():
    from atmc_triton.kernels.admm import kth_largest

    a = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for k in (1, 7, 500, 1001):
        assert float(kth_largest(a.cuda(), k)) == float(torch.sort(a, descending=True).values[k - 1])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter test: needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("n", [0, 1, 7])
def test_triton_launcher_on_interpreted_cpu_tensors_equals_the_reference(n):
    """The launcher itself (not the raw launch): CPU tensors are served when interpreting, and n = 1 is a real step."""
    from atmc_triton.kernels.admm import admm_step_triton

    g = torch.Generator().manual_seed(n)
    state = {name: torch.randn(n, generator=g) for name in ("w", "grad", "mom", "z", "u")}
    state["mask"] = torch.zeros(n, dtype=torch.bool)
    ref, tri = ({k: v.clone() for k, v in state.items()} for _ in range(2))
    hp = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, rho=0.3, k=max(n - 2, 1), nesterov=False)
    tau_ref, tau = admm_step_ref(**ref, **hp), admm_step_triton(**tri, **hp)
    assert float(tau) == float(tau_ref)
    for name in ("w", "mom", "mask"):
        assert torch.equal(tri[name], ref[name]), name


# --- atmc_triton.bitalloc --------------------------------------------------------------------------------------------


def test_bit_allocation_charges_a_choice_that_keeps_nothing_the_whole_layer():
    """Linear(10, 10) (3200 dense bits) at ratio 0.0104: a 33-bit budget. One 1-bit nonzero and its codebook entry
    cost 1 + 32 = 33 bits and fit; at 2..8 bits not even one nonzero fits (k = 0), which loses every weight: a
    relative distortion of exactly 1. The allocation must pick 1 bit. (The model is compressed first, at 1 bit: a
    dense one would be compressed at cfg's 8 bits, which nnz_budget refuses here.)"""
    from atmc_triton.bitalloc import allocation_report

    torch.manual_seed(0)
    with pytest.warns(at.CollapseWarning, match="too small for a layer floor"):  # k = 1 < one per output unit
        model = at.compress_(nn.Sequential(nn.Linear(10, 10, bias=False)), at.ATMCConfig(ratio=0.0104, bits=1))
    rep = allocation_report(model, at.ATMCConfig(ratio=0.0104, bits=8))
    assert all(rep.uniform[b][0] == 0 and rep.uniform[b][1] == pytest.approx(1.0, rel=1e-12) for b in range(2, 9))
    k1, d1 = rep.uniform[1]
    assert k1 == 1 and 0.0 < d1 < 1.0
    assert rep.bits == {"0": 1} and rep.k == 1 and rep.distortion == d1


def test_allocate_bits_tries_every_width_up_to_8_by_default():
    """At ratio 0.95 every entry of a 400-weight layer fits at every width (8 bits: 8 * 400 + 32 * 256 = 11392 of
    12160 bits), so the finest codebook has the least Lloyd error and wins; ``allocate_bits``'s default candidates
    must include it."""
    from atmc_triton.bitalloc import allocate_bits

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 20, bias=False))
    assert allocate_bits(model, at.ATMCConfig(ratio=0.95, bits=8)) == {"0": 8}


# --- atmc_triton.packed ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups, ok", [(1, True), (2, False), (4, False)])
def test_packed_conv_decomposed_mode_needs_groups_1(groups, ok):
    from atmc_triton.packed import PackedConv2d

    empty = {f: {"fmt": 0, "nnz": 0, "levels": 0} for f in "UVC"}  # all-zero factors: nothing to store
    kw = dict(rank=0, identity=IDENTITY_NONE, bits=4, factors=empty, conv_mode="decomposed", groups=groups)
    if ok:
        conv = PackedConv2d(4, 8, 3, padding=1, **kw)
        assert conv.conv_mode == "decomposed" and conv.weight_shape == (8, 4, 3, 3)
    else:
        with pytest.raises(ValueError, match="conv_mode='decomposed' needs groups=1"):
            PackedConv2d(4, 8, 3, padding=1, **kw)


def test_packed_metadata_counts_levels_and_nonzeros_per_factor():
    """spec() (the file's metadata) against the finalized factors: an all-zero factor is empty with 0 levels."""
    torch.manual_seed(0)
    model = at.finalize_(at.compress_(nn.Sequential(nn.Linear(12, 6)), at.ATMCConfig(ratio=0.3, bits=2)))
    layer = model[0]
    want = {}
    for f, p in layer.factors():
        nz = p.detach()[p != 0]
        want[f] = (nz.numel(), int(torch.unique(nz).numel()))
    at.pack_(model)
    spec = model[0].spec()["factors"]
    assert {f: (s["nnz"], s["levels"]) for f, s in spec.items()} == want
    assert want["U"] == want["V"] == (0, 0) and spec["U"]["fmt"] == 0  # the sparse init: U [6, 0], V [0, 12]
    assert 1 <= want["C"][1] <= 4


# --- atmc_triton.layers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_layer_refuses_bits_outside_1_to_8(bits):
    with pytest.raises(ValueError, match=f"bits must be an int in 1..8 or None, got {bits}"):
        at.ATMCLinear(4, 3, rank=0, bits=bits)
    assert at.ATMCLinear(4, 3, rank=0, bits=None).nbits is None and at.ATMCLinear(4, 3, rank=0, bits=8).nbits == 8


@pytest.mark.parametrize(
    "saved, theirs",
    [(dict(init="svd", rank=2), "init='svd' (rank 2)"), (dict(init="identity"), "init='identity' (rank 4)")],
)
def test_loading_another_init_names_both_inits(saved, theirs):
    """A checkpoint of another factor init is refused with both inits in words (the message says what to build)."""
    torch.manual_seed(0)
    a = at.compress_(nn.Sequential(nn.Linear(4, 6)), at.ATMCConfig(nnz=60, bits=4, **saved))
    b = at.compress_(nn.Sequential(nn.Linear(4, 6)), at.ATMCConfig(nnz=60, bits=4))  # init="sparse"
    with pytest.raises(ValueError) as e:
        b.load_state_dict(a.state_dict())
    assert f"saved with {theirs}" in str(e.value) and "this layer has init='sparse'" in str(e.value)


def test_conv_constructor_defaults_are_nn_conv2ds():
    conv, ref = at.ATMCConv2d(3, 4, 3, rank=0, bits=None), nn.Conv2d(3, 4, 3)
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(conv, attr) == getattr(ref, attr), attr
    assert conv(torch.zeros(1, 3, 9, 9)).shape == ref(torch.zeros(1, 3, 9, 9)).shape == (1, 4, 7, 7)


@pytest.mark.parametrize("rank", [4, -1, 1.5])
def test_layer_refuses_a_rank_outside_0_to_min_dim(rank):
    with pytest.raises(ValueError, match=r"rank must be an int in 0\.\.3 for a \[3, 4\] weight"):
        at.ATMCLinear(4, 3, rank=rank)
    assert at.ATMCLinear(4, 3, rank=3).U.shape == (3, 3)

"""The quantizer's segmented sort: ``torch.sort`` then the Triton split by segment (issue 14, quantizer speed).

``segment_sort`` must return exactly the bits of ``segment_sort_ref`` (``torch.sort``, ``searchsorted``, a stable
sort of narrow segment ids and a gather): every segment ascending in its own range, NaN last, ties (``-0.0``
and ``0.0`` among them) in ``torch.sort``'s order. Checked in Triton's interpreter with every buffer the split writes
NaN / sentinel-poisoned, at 1, 7, 63, 1000+ values, one to 1,024 segments (1, 2 and 4 bins per value in the
tables), empty segments at either end and inside, a segment across many blocks, and through the Lloyd
launchers (the same codebooks, codes and errors as with the reference's fix-up).
"""

import os

import pytest
import torch
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

ls = pytest.importorskip("atmc_triton.kernels.lloyd_split_triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need TRITON_INTERPRET=1")


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the split allocates starts as NaN (floats) or a value no kernel writes (ints): an element
    left unwritten shows in the output or breaks the scatter."""
    made = []

    def empty(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else (7 if dtype == torch.uint8 else -(2**15) + 3)
        made.append(dtype)
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(ls, "_empty", empty)
    return made


def offsets_for(sizes: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(sizes, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64)


def values_for(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g)
    v[torch.rand(n, generator=g) < 0.2] = 0.0  # zeros (and, below, -0.0) in the middle of segments
    v[torch.rand(n, generator=g) < 0.1] = -0.0
    v[torch.rand(n, generator=g) < 0.2] = 0.5  # heavy ties
    return v


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def sorted_segments(v: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """The oracle's oracle: each segment sorted on its own."""
    o = off.tolist()
    return torch.cat([torch.sort(v[a:b])[0] for a, b in zip(o, o[1:])]) if v.numel() else v


@pytest.mark.parametrize(
    "sizes",
    [
        [1],  # one value
        [7],
        [0, 63, 0],  # empty segments at both ends
        [3, 0, 0, 1, 996],  # empty inside; 1,000 values in one block
        [1000, 2048, 1],  # a segment across three blocks; 3,049 values (a tail block)
        [5] * 111 + [448],  # 112 segments (ResNet34's 111 + 1): 128 bins
        [1] * 256 + [769],  # 257 segments: int16 ids, 512 bins, 2,048-value blocks
    ],
    ids=["n1", "n7", "empty-ends", "empty-inside", "three-blocks", "112seg", "257seg"],
)
def test_split_equals_the_reference_bit_for_bit(sizes, poisoned):
    off = offsets_for(sizes)
    v = values_for(int(off[-1]), len(sizes))
    v[len(v) // 2] = float("nan")
    got = ls.segment_sort(v, off)
    assert poisoned, "the split allocated nothing: the kernels did not run"
    ref = ls.segment_sort_ref(v, off)
    assert same_bits(got, ref)
    assert torch.equal(got.nan_to_num(9.0), sorted_segments(v, off).nan_to_num(9.0))  # (and the reference is right)


def test_nan_inf_signed_zeros_keep_torch_sort_order(poisoned):
    v = torch.tensor([float("nan"), 0.0, -0.0, float("inf"), -float("inf"), 1.0, -0.0, 0.0, float("nan"), -1.0])
    off = torch.tensor([0, 5, 5, 10])
    got = ls.segment_sort(v, off)
    ref = ls.segment_sort_ref(v, off)
    assert same_bits(got, ref)  # (ties, +-0 among them, in torch.sort's order: bits compared, not values)
    assert torch.equal(torch.signbit(got), torch.signbit(ref)) and bool(torch.signbit(got[v == 0]).any())
    assert got[4].isnan() and got[9].isnan() and not got[:4].isnan().any()  # NaN last in its segment


def test_1024_segments_is_the_largest_split_and_more_take_the_reference(poisoned, monkeypatch):
    v = values_for(1100, 3)
    off = offsets_for([1] * 1023 + [77])  # 1,024 segments: 1,024 bins, 4,096-value blocks
    assert same_bits(ls.segment_sort(v, off), ls.segment_sort_ref(v, off)) and len(poisoned) == 4
    poisoned.clear()
    off = offsets_for([1] * 1024 + [76])  # 1,025: past MAX_SEGMENTS
    assert same_bits(ls.segment_sort(v, off), ls.segment_sort_ref(v, off)) and not poisoned
    assert ls.MAX_SEGMENTS == 1024


def test_split_shape_keeps_the_tables_a_quarter_of_the_values():
    for S in (1, 3, 16, 17, 111, 256, 257, 600, 1024):
        nb, block, logb = ls.split_shape(S)
        assert nb >= S and nb & (nb - 1) == 0 and block == 2**logb and block >= 4 * nb and block >= 1024
        assert (nb << logb) | (block - 1) < 2**31  # the sort key, masked slots' bin NB included, fits int32


EDGES = {"n <= 7", "several blocks", "empty segment", "one segment", "NaN", "ties", "-0.0 and 0.0"}


def edges(sizes: list[int], v: torch.Tensor) -> set[str]:
    n = v.numel()
    out = {"n <= 7"} if n <= 7 else set()
    out |= {"several blocks"} if n > ls.split_shape(len(sizes))[1] else set()
    out |= {"empty segment"} if 0 in sizes else set()
    out |= {"one segment"} if len(sizes) == 1 else set()
    out |= {"NaN"} if bool(v.isnan().any()) else set()
    out |= {"ties"} if v.unique().numel() < n else set()
    zeros = v[v == 0]
    out |= {"-0.0 and 0.0"} if bool(torch.signbit(zeros).any()) and not bool(torch.signbit(zeros).all()) else set()
    return out


@st.composite
def problems(draw):
    """Segment sizes (up to 4 x 1,500 values) and values: normal draws with a drawn share of specials each
    (NaN, +-inf, 0.0, -0.0, one repeated value), built from a drawn seed (large problems stay cheap to draw)."""
    sizes = draw(st.lists(st.integers(0, 1500), min_size=1, max_size=4))
    n = sum(sizes)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    v = torch.randn(n, generator=g)
    for special in (float("nan"), float("inf"), 0.0, -0.0, 0.5):
        share = draw(st.sampled_from([0.0, 0.05, 0.5]))
        v[torch.rand(n, generator=g) < share] = special
    return sizes, v


def test_the_strategy_reaches_every_edge():
    seen: set[str] = set()

    @hsettings(max_examples=60)
    @given(p=problems())
    def draw(p):
        seen.update(edges(*p))

    draw()
    assert seen >= EDGES, EDGES - seen


@hsettings(max_examples=6)  # (about 1.5 s a block in the interpreter)
@given(p=problems())
@example(p=([0, 1, 0], torch.tensor([-0.0])))
@example(p=([3, 0, 1100], torch.cat([torch.tensor([0.0, -0.0, float("nan")]), values_for(1100, 1)])))
def test_split_equals_the_reference_on_drawn_problems(p):
    sizes, v = p
    off = offsets_for(sizes)
    assert same_bits(ls.segment_sort(v, off), ls.segment_sort_ref(v, off))


def test_lloyd_launchers_with_the_split_match_the_reference_fixup(monkeypatch):
    """The launchers in the interpreter take the reference's fix-up past ``INTERPRETED_MAX`` values; with the
    kernels (cap raised) every output is bit-identical: ``lloyd_quantize`` (``"fast"``) and ``errors_for_bits``
    (``"lloyd"``)."""
    lt = pytest.importorskip("atmc_triton.kernels.lloyd_triton")
    ran, wrap = [], lt.wrap_triton
    monkeypatch.setattr(ls, "wrap_triton", lambda k: ran.append(k.__name__) or wrap(k))
    v = values_for(300, 9)
    off, bits = torch.tensor([0, 100, 103, 300]), torch.tensor([3, 2, 4], dtype=torch.int32)
    monkeypatch.setattr(ls, "INTERPRETED_MAX", 0)
    ref = lt.lloyd_quantize_triton(v, off, bits, 5, 1e-5, "fast")
    ref_err = lt.errors_for_bits_triton(v, off, 5, 1e-5, "lloyd")  # (one launcher per method: the interpreter
    assert not ran  # takes about 3 s a split)
    monkeypatch.setattr(ls, "INTERPRETED_MAX", 10**6)
    got = lt.lloyd_quantize_triton(v, off, bits, 5, 1e-5, "fast")
    got_err = lt.errors_for_bits_triton(v, off, 5, 1e-5, "lloyd")
    assert ran == ["split_count_kernel", "split_scatter_kernel"] * 2
    for a, b in zip((*got, got_err), (*ref, ref_err)):
        assert same_bits(a, b) if a.dtype == torch.float32 else torch.equal(a, b)


@pytest.mark.parametrize(
    "values, offsets, needle",
    [
        (torch.zeros(4, dtype=torch.float64), torch.tensor([0, 4]), "float32"),
        (torch.zeros(2, 2), torch.tensor([0, 4]), "1-D"),
        (torch.zeros(8)[::2], torch.tensor([0, 4]), "contiguous"),
        (torch.zeros(4), torch.tensor([0, 4], dtype=torch.int32), "int64"),
        (torch.zeros(4), torch.tensor([], dtype=torch.int64), r"\[S \+ 1\]"),
        (torch.zeros(4), torch.tensor([0, 4], device="meta"), "offsets are on meta"),
    ],
)
def test_bad_inputs_are_refused_before_any_launch(values, offsets, needle, poisoned):
    for fn in (ls.segment_sort, ls.segment_sort_ref):
        with pytest.raises(ValueError, match=needle):
            fn(values, offsets)
    assert not poisoned  # nothing allocated, no kernel launched

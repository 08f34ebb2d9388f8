"""The prediction model counts what the launchers run (the 2026-12-02 review of ``bench/model.py``).

Each test pins one count the review found wrong: the launches torch ops expand to on their own (checked
with the profiler on CPU, where the same ATen composites run), the gather into segment order, the
per-launch charge of ``predicted_us`` and the backtrack's instructions per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from atmc_triton.kernels.lowrank_gemm import H100, predicted_us
from torch.profiler import ProfilerActivity, profile

from bench import model

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


NO_KERNEL = ("aten::empty", "aten::resize_", "aten::as_strided", "aten::view", "aten::t", "aten::transpose")


def _ops(fn, leaves: bool = True) -> list[str]:
    """Names of the ATen ops that ran while ``fn`` ran on CPU: the leaves that launch a kernel (allocations and
    views left out), or every op."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    parents = {e.cpu_parent.id for e in events if e.cpu_parent is not None}
    names = [e.name for e in events if e.name.startswith("aten::") and not (leaves and e.id in parents)]
    return [n for n in names if not (leaves and n.startswith(NO_KERNEL))]


@pytest.mark.parametrize("fast", [False, True])
def test_prefix_sums_are_the_scans_and_no_torch_pass(fast):
    """The prefix sums come from the two scan kernels for both methods (they replaced ``nan_to_num`` and
    ``cumsum(dtype=float64)``, a cast and a scan: three passes over the values); ``fast`` adds the segment-start
    marks, and its scans also write squares and ranks (20 B per value written, 8 without)."""
    names = [launch.name for launch in model._lloyd_prepare([600, 400], fast=fast)]
    assert not {"nan_to_num", "cumsum: cast to float64", "cumsum float64"} & set(names), names
    assert names.count("scan_totals_kernel") == names.count("scan_kernel") == 1
    assert ("zeros (segment starts)" in names) == fast
    assert names.count("cumsum / sub / cast of the block totals") == (7 if fast else 2)
    scan = next(x for x in model._lloyd_prepare([10**6], fast=fast) if x.name == "scan_kernel")
    assert scan.written == (20 if fast else 8) * 10**6


@pytest.mark.parametrize("segments", [2, 1024, 1025])
def test_every_torch_sort_has_its_index_fill(segments):
    """One ``torch.sort`` then the Triton split up to ``MAX_SEGMENTS`` segments; past it the reference's fix-up,
    whose stable sort of segment ids is a second ``torch.sort`` with its own index fill."""
    names = [launch.name for launch in model._lloyd_prepare([600] + [1] * (segments - 1))]
    sorts = [i for i, n in enumerate(names) if "sort" in n and "fill" not in n and "searchsorted" not in n]
    fills = [i for i, n in enumerate(names) if "index fill" in n]
    assert len(sorts) == len(fills) == (1 if segments <= 1024 else 2), names
    assert all(f + 1 == s for f, s in zip(fills, sorts)), names
    split = ["split_count_kernel", "cumsum of the block counts", "split_scatter_kernel"]
    assert (names[2:5] == split) == (segments <= 1024), names


@pytest.mark.parametrize("shares", [[1], [1, 1, 1, 1], [50, 30, 15, 4, 1], [1] * 60])
def test_gather_bytes_match_a_simulated_gather_into_segment_order(shares):
    """Count the 32-B sectors a gather touches: each segment's values in rising order, segments at random
    places of the sorted buffer (alike distributions), one segment after another as ``index_select`` reads."""
    g = torch.Generator().manual_seed(0)
    n = 400_000
    sizes = [n * s // sum(shares) for s in shares]
    sizes[-1] += n - sum(sizes)
    seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[torch.randperm(n, generator=g)]
    sectors = 0
    for s in range(len(sizes)):
        pos = torch.nonzero(seg == s).flatten() // 8  # rising positions -> their sectors
        sectors += int(torch.unique_consecutive(pos).numel())
    simulated = 32.0 * sectors
    big = [s * 1000 for s in sizes]  # the same shares, past L2 (the formula is per value, scale-free)
    predicted = model.segment_gather_bytes(big) / 1000
    assert predicted == pytest.approx(simulated, rel=0.02)
    assert model.segment_gather_bytes(sizes) == 4 * n  # fits in L2: read once


def test_predicted_us_charges_every_launch():
    args = ("split_k", 16, 4096, 4096, 10_000_000, 3_000_000, 0)
    one, four = predicted_us(*args), predicted_us(*args, launches=4)
    assert four - one == pytest.approx(3 * H100["launch_us"])
    with pytest.raises(ValueError, match="launches"):
        predicted_us(*args, launches=0)


def test_the_csr_operand_is_one_launch_and_the_model_lists_it():
    """``csr_operand`` at ``M > 1`` is ONE ``_transpose_pad_kernel`` launch (``F.pad``, which it replaced, was a fill
    and a copy: kept only for CPU tensors without Triton's interpreter, and still two ATen kernels there)."""
    from atmc_triton.kernels import lowrank_gemm_triton as lt

    a = torch.randn(16, 64)
    ops = _ops(lambda: torch.nn.functional.pad(a.t(), (0, 0, 0, 1)))
    assert sum("fill" in o for o in ops) == 1 and sum("copy" in o for o in ops) == 1, ops
    assert lt.interpreted(lt._transpose_pad_kernel)  # (conftest: no GPU here) csr_operand takes the kernel, as on CUDA
    names = [launch.name for launch in model.atmc_linear(16, 4096, 4096, 0.05, 8).launches]
    assert names == ["_transpose_pad_kernel", "_csr_mm_kernel"]  # C and U share x: one CSR launch
    pad = model.atmc_linear(16, 4096, 4096, 0.05, 8).launches[0]
    assert (pad.read, pad.written) == (2 * 16 * 4096, 2 * 4097 * 16)  # reads x, writes [K + 1, Mp]
    assert [launch.name for launch in model.atmc_linear(1, 4096, 4096, 0.05, 8).launches] == ["_csr_mm_kernel"]


@pytest.mark.parametrize("M", [1, 4])
def test_the_model_lists_the_launches_the_launcher_makes(M, monkeypatch):
    """The identity-init CSR + CSR layer of ``bench/gemm.py`` (256 x 256, ratio 0.05, b = 8: C and U both CSR, the
    README rows' structure) run through the launcher in the interpreter: its Triton launches (the padded transpose
    of ``x`` at ``M > 1`` among them, and nothing outside ``wrap_triton``: ``csr_operand``'s ``F.pad`` fallback,
    two launches, must not run) are the model's launch list."""
    from atmc_triton.kernels import lowrank_gemm_triton as lt
    from atmc_triton.kernels.packed_format import FMT_CSR

    from bench.gemm import Layer

    layer = Layer("review", 256, 256, 0.05, 8, "identity", torch.device("cpu"))
    assert [f[0] for f in layer.factors] == [FMT_CSR, 0, FMT_CSR], "the layer's structure changed"
    ran, wrap, pad = [], lt.wrap_triton, torch.nn.functional.pad

    def record(kernel):
        ran.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
        return wrap(kernel)

    def padded(*args, **kwargs):
        ran.extend(["F.pad: fill", "F.pad: copy of x^T"])
        return pad(*args, **kwargs)

    monkeypatch.setattr(lt, "wrap_triton", record)
    monkeypatch.setattr(torch.nn.functional, "pad", padded)
    x = torch.randn(M, 256)
    y = lt.linear_launch(x, None, 256, layer.r, layer.identity, layer.factors, {})
    torch.testing.assert_close(y, x @ layer.w16.float().T, rtol=2e-2, atol=2e-2 * float(y.abs().max()))
    modelled = [launch.name for launch in model.atmc_linear(M, 256, 256, 0.05, 8).launches]
    assert sorted(ran) == sorted(modelled), (ran, modelled)


def test_the_backtrack_step_count_divides_by_its_stores():
    from bench.refine_issue import classify

    gate = json.loads((RESULTS / "fast_refine_sass_2026-12-01_race.json").read_text())
    for res in gate:
        got = classify(res["loops"])
        assert got["back"] == 143 / 4, res["triton"]  # 4 steps unrolled: 4 stores, 8 picks
        assert model.REFINE_SASS[res["triton"][:3]]["back"] == got["back"]


def test_split_sass_is_the_sort_rank_run():
    """``bench.model.SPLIT_SASS`` (the split's instruction totals) is what ``python -m bench.sort_rank`` compiled, for
    every Triton and bin count of its results file, and the model picks the smallest table entry that covers NB."""
    run = json.loads((RESULTS / "sort_rank_2026-12-02_split.json").read_text())
    got: dict = {}
    for r in run["split"]:
        version = ".".join(r["triton"].split(".")[:2])
        got.setdefault(version, {}).setdefault(r["NB"], {})[r["kernel"]] = r["sass_total"]
    pair = ("split_count_kernel", "split_scatter_kernel")
    assert {v: {nb: tuple(k[x] for x in pair) for nb, k in t.items()} for v, t in got.items()} == model.SPLIT_SASS
    launches = {x.name: x for x in model._segment_split(1_000_000, 111, "3.6")}  # 128 bins
    assert launches["split_scatter_kernel"].issue == 977 * 8 * model.SPLIT_SASS["3.6"][128][1]  # 977 blocks of 1,024

"""Could the quantizer's segmented sort be a keys-only radix sort in Triton? Its ranking step, compiled.

The quantizer's GPU time is bounded by its sort (``bench.model.lloyd_quantize``): ``torch.sort``
is CUB's radix sort of (float32 key, int64 index) pairs, about 100 B per value over four passes,
and ``lloyd_triton._segment_sort`` adds a stable sort of segment ids and a gather. A keys-only
segmented LSD radix sort would move about 12 B per value and pass (read for the digit counts, read and
write to scatter; CUB's one-sweep design folds the counting read into one pass up front: 8 B per pass).
Its one hard step is ranking: each key must learn how many keys before it in its block have the
same digit (CUB does this with warp ``match``/ballot instructions, which Triton does not expose).
This script compiles, for sm_90 and without a GPU, one complete scatter pass per ranking method Triton offers:

* ``sort``: ``tl.sort`` of ``digit << log2(B) | index`` (8-bit digits, 4 passes), ``tl.gather``
  of the keys, ``tl.histogram`` for the digit starts;
* ``onehot D``: a ``[B, D]`` one-hot of ``log2(D)``-bit digits, ``tl.cumsum`` down the block
  (``32 / log2(D)`` passes).

Each kernel reads its block's keys and per-digit global offsets and scatters the keys. Its
warp instructions per key and pass come from the SASS (``bench.aot``). Kernels with no loop
in their SASS (``loops`` 0) execute every instruction exactly once per warp, so the count is
exact. Kernels with loops are counted statically, as if each loop ran once, so their count is
a lower bound. Predicted time of a full 32-bit sort of ``n`` keys on an H100:
``passes x max(n x count / issue rate, n x 12 B / bandwidth)``. This is a prediction, not a
measurement. ``torch.sort`` + segment fix-up uses the model's figure for the same ``n``.

The quantizer's own split by segment (:mod:`atmc_triton.kernels.lloyd_split_triton`, one pass after
``torch.sort``) is compiled too, at 111 segments (ResNet34's, 128 bins), 256 and 1,024: its two kernels' SASS
instruction totals (no loops and no branches: each warp issues every instruction once) are
``bench.model.SPLIT_SASS``.

``python -m bench.sort_rank [--out DIR] [--side PATH[,PATH...]|off]``: the tables, and ``sort_rank.json`` in DIR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import triton
import triton.language as tl

N_RESNET34 = 46_426_496  # values of every ResNet34 factor (bench.lloyd), 111 segments


@triton.jit
def _rank_sort_kernel(
    keys_ptr,  # [n] i32, one block of B per program
    offsets_ptr,  # [programs, 256] i32: where each digit of this block starts in the output
    out_ptr,  # [n] i32
    shift,  # i32: the digit's lowest bit
    B: tl.constexpr,
    LOGB: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.arange(0, B)
    k = tl.load(keys_ptr + pid * B + i)  # [B]
    d = (k >> shift) & 255
    s = tl.sort((d << LOGB) | i, 0)  # [B]: stable by digit (the index breaks ties)
    ds = s >> LOGB
    kk = tl.gather(k, s & (B - 1), 0)
    h = tl.histogram(d, 256)  # [256]
    first = tl.gather(tl.cumsum(h, 0) - h, ds, 0)  # [B]: position of each sorted key's digit run
    dest = tl.load(offsets_ptr + pid * 256 + ds) + (i - first)
    tl.store(out_ptr + dest, kk)


@triton.jit
def _rank_onehot_kernel(
    keys_ptr,  # [n] i32
    offsets_ptr,  # [programs, D] i32
    out_ptr,  # [n] i32
    shift,  # i32
    B: tl.constexpr,
    D: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.arange(0, B)
    k = tl.load(keys_ptr + pid * B + i)  # [B]
    d = (k >> shift) & (D - 1)
    oh = (d[:, None] == tl.arange(0, D)[None, :]).to(tl.int32)  # [B, D]
    rank = tl.sum(oh * tl.cumsum(oh, 0), 1) - 1  # [B]: earlier keys of the same digit
    dest = tl.load(offsets_ptr + pid * D + d) + rank
    tl.store(out_ptr + dest, k)


VARIANTS = (  # (label, kernel name, constexprs, num_warps, passes for 32-bit keys)
    ("sort B=1024", "_rank_sort_kernel", {"B": 1024, "LOGB": 10}, 8, 4),
    ("sort B=4096", "_rank_sort_kernel", {"B": 4096, "LOGB": 12}, 8, 4),
    ("onehot D=4 B=1024", "_rank_onehot_kernel", {"B": 1024, "D": 4}, 4, 16),
    ("onehot D=16 B=1024", "_rank_onehot_kernel", {"B": 1024, "D": 16}, 4, 8),
)


def specs() -> list[dict]:
    tensors = {n: ["tensor", "i32", True] for n in ("keys_ptr", "offsets_ptr", "out_ptr")}
    return [
        {
            "module": __name__ if __name__ != "__main__" else "bench.sort_rank",
            "name": name,
            "args": {**tensors, "shift": ["int", 8], **{k: ["int", v] for k, v in consts.items()}},
            "options": {"num_warps": warps, "num_stages": 1},
        }
        for _, name, consts, warps, _ in VARIANTS
    ]


SPLIT_SEGMENTS = (111, 256, 1024)


def split_specs() -> list[dict]:
    """The split's two kernels as ``lloyd_split_triton.segment_sort`` launches them, at :data:`SPLIT_SEGMENTS`."""
    from atmc_triton.kernels import lloyd_split_triton as ls

    t = lambda dtype: ["tensor", dtype, True]  # noqa: E731
    out = []
    for S in SPLIT_SEGMENTS:
        nb, block, logb = ls.split_shape(S)
        seg = t("u8" if S <= 256 else "i16")
        shape = {"NB": ["int", nb], "BLOCK": ["int", block]}
        count = {"idx_ptr": t("i64"), "offsets_ptr": t("i64"), "seg_ptr": seg, "counts_ptr": t("i32")}
        count |= {"adj_ptr": t("i32"), "n": ["int", N_RESNET34], "S": ["int", S]}
        count["LOG_NB"] = ["int", nb.bit_length() - 1]
        scatter = {"by_value_ptr": t("fp32"), "seg_ptr": seg, "cum_ptr": t("i32"), "adj_ptr": t("i32")}
        scatter |= {"out_ptr": t("fp32"), "n": ["int", N_RESNET34], "LOGB": ["int", logb]}
        for name, args in (("split_count_kernel", count), ("split_scatter_kernel", scatter)):
            opts = {"num_warps": ls.SPLIT_WARPS, "num_stages": 1}
            out.append({"module": ls.__name__, "name": name, "args": args | shape, "options": opts})
    return out


def split_rows(results: list[dict]) -> list[dict]:
    out = []
    segments = [S for S in SPLIT_SEGMENTS for _ in ("count", "scatter")]  # split_specs' order
    for spec, S, r in zip(split_specs(), segments, results, strict=True):
        if not r["ok"]:
            raise RuntimeError(r["error"])
        a = spec["args"]
        out.append(
            {
                "triton": r["triton"],
                "kernel": spec["name"],
                "segments": S,
                "NB": a["NB"][1],
                "BLOCK": a["BLOCK"][1],
                "regs": r["regs"],
                "spill_bytes": r["spill_bytes"],
                "smem": r["smem"],
                "sass_total": r["sass"]["total"],
                "loops": int(r["sass"]["loop"] > 2),
                "ldg128": r["sass"]["ldg128"],
                "warp_instr_per_value": round(r["sass"]["total"] * spec["options"]["num_warps"] / a["BLOCK"][1], 2),
            }
        )
    return out


def rows(results: list[dict], n: int = N_RESNET34) -> list[dict]:
    from bench.model import H100

    out = []
    for (label, _, consts, warps, passes), r in zip(VARIANTS, results):
        if not r["ok"]:
            raise RuntimeError(r["error"])
        per_key = r["sass"]["total"] * warps / consts["B"]
        per_pass = max(n * per_key / H100.issue_rate, n * 12 / H100.bandwidth)
        out.append(
            {
                "triton": r["triton"],
                "variant": label,
                "regs": r["regs"],
                "spill_bytes": r["spill_bytes"],
                "smem": r["smem"],
                "loops": int(r["sass"]["loop"] > 2),  # (a 1-2 instruction backward branch is the exit spin)
                "warp_instr_per_key_pass": round(per_key, 2),
                "passes": passes,
                "predicted_sort_ms_h100": round(1e3 * passes * per_pass, 2),
            }
        )
    return out


def torch_sort_ms(sizes: list[int] | None = None) -> float:
    """The model's ``torch.sort`` pairs + segment fix-up (``_lloyd_prepare`` up to its split), H100, for
    segments of ``sizes`` (default: ImageNet ResNet34's 111 factors, :data:`N_RESNET34` values)."""
    from bench.lloyd import resnet34_shapes
    from bench.model import H100, _lloyd_prepare

    if sizes is None:
        sizes = [s for o, i in resnet34_shapes() for s in (o * min(o, i), min(o, i) * i, o * i)]
    launches = _lloyd_prepare(sizes)
    names = [x.name for x in launches]
    last = names.index("split_scatter_kernel" if "split_scatter_kernel" in names else "index_select")
    sort = launches[: last + 1]
    return round(1e3 * sum(x.time_s(H100) for x in sort), 2)


def main(argv: list[str] | None = None) -> None:
    import torch

    from bench.aot import compile_specs, side_paths
    from bench.common import environment

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--side", "--triton36", default="off", help="Triton `pip --target` directories (off: only the installed one)"
    )
    a = p.parse_args(argv)
    table = rows(compile_specs(specs(), 90))
    split = split_rows(compile_specs(split_specs(), 90))
    for d in side_paths(a.side):
        table += rows(compile_specs(specs(), 90, d))
        split += split_rows(compile_specs(split_specs(), 90, d))
    ref = torch_sort_ms()
    print(f"n = {N_RESNET34:,} keys (ResNet34's factors); torch.sort pairs + segment fix-up (model): {ref} ms on H100")
    print("| Triton | ranking | regs | spills | loops | warp instr / key / pass | passes | predicted sort, H100 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['triton']} | {r['variant']} | {r['regs']} | {r['spill_bytes']} | {r['loops']} "
            f"| {r['warp_instr_per_key_pass']} | {r['passes']} | {r['predicted_sort_ms_h100']} ms |"
        )
    print("\nThe quantizer's split by segment (lloyd_split_triton), sm_90, 8 warps (no loops, no branches):")
    print("| Triton | kernel | segments | NB | BLOCK | regs | spills | smem | SASS | LDG.128 | warp instr/value |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in split:
        print(
            f"| {r['triton']} | {r['kernel']} | {r['segments']} | {r['NB']} | {r['BLOCK']} | {r['regs']} "
            f"| {r['spill_bytes']} | {r['smem']} | {r['sass_total']} | {r['ldg128']} | {r['warp_instr_per_value']} |"
        )
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        floor = round(1e3 * 4 * 12 * N_RESNET34 / 3.0e12, 3)  # four keys-only passes at 12 B per key
        doc = {"n": N_RESNET34, "torch_sort_fixup_ms_h100": ref, "keys_only_bytes_ms_h100": floor, "rows": table}
        doc["split"] = split
        doc["environment"] = environment(torch.device("cpu"))  # compiled for sm_90 here: no GPU ran
        (a.out / "sort_rank.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()

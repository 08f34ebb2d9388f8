"""Packed ATMC linear layers: the packed path against what a user would otherwise run.

Side by side in one run, fp16 activations, per (layer, compression, M):

* ``cuBLAS fp16 dense`` / ``cuBLAS bf16 dense``: ``F.linear`` on the dense weight ``W = U (V + I) + C``;
* ``torch.sparse CSR``: CSR factors as ``torch.sparse_csr_tensor`` (cuSPARSE SpMM), dense-coded
  ones decoded to fp16 for cuBLAS, in the factored order ``t = x (V + I)^T``, ``y = t U^T + x C^T``;
* ``packed``: what a ``PackedLinear`` runs: the path of ``linear_path(M, crossover)`` ("split_k" /
  "tile": op ``atmc::atmc_linear``, autotuned; "dense": cuBLAS on the weight decoded once, cached);
* ``dequant+matmul (PyTorch)``: decode with torch ops every call, then ``F.linear`` (a baseline).

Timed as CUDA graphs (``do_bench_cudagraph``: the GPU time, no Python launch overhead; a variant
that cannot be captured falls back to ``do_bench``, noted in the row). Every row carries ``floor``
(the packed-bytes floor ``(packed bytes + x + y) / measured copy bandwidth`` over its time: the
fraction of the floor reached), ``pred_us`` (the roofline model of
:func:`atmc_triton.kernels.lowrank_gemm.predicted_us` with the bandwidth of the GPU found and the installed
Triton's instruction counts, :func:`model_args`, for the packed and cuBLAS rows)
and ``meas/pred``.

Layers are synthetic packed factors at a paper-convention size ``ratio * 32 N K`` bits: ``nnz =
(ratio 32 N K - 3 * 32 * 2^b) / b`` nonzeros over ``2^b`` levels per factor, placed as in an
identity-initialized ATMC layer (the factor that started as W holds 85 %, C 15 %; the other factor
is empty, as ``finalize_`` leaves it without training), plus a low-rank ("svd") layer whose
dense-coded U, V hold half of the nonzeros and an "identity+V" layer (5 % in the second factor).

Grid (issue 15) under a soft time budget (``ATMC_BENCH_GEMM_BUDGET_S``, skipped cases are listed): 4096x4096,
11008x4096, the ResNet34 conv-as-GEMM shapes (512x4608, 256x2304, 128x1152, 64x576) and LeNet's fc1 (500x800)
and conv2 (50x500); ratios 0.05, 0.01, 0.002; b = 8 and 4; M = 1, 4, 16, 128, 1024, 8192; most important
first (:func:`gemm_cases`): the two big shapes at ratio 0.05, the low-rank and identity+V 4096x4096 layers,
the big shapes at 0.01 and 0.002, then the small shapes. End to end: packed LeNet and ResNet34 (ratio
0.01, b = 8) at batch 1 and 256 against the dense fp16 model, both under ``torch.compile``; the
packed convs also eager in both conv modes (cached dense weight vs decomposed).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from atmc_triton.kernels.lowrank_gemm import (
    H100,
    IDENTITY_NONE,
    IDENTITY_U,
    IDENTITY_V,
    atmc_linear,
    dense_crossover,
    issue_instructions,
    linear_path,
    predicted_us,
)
from atmc_triton.kernels.packed_format import (
    FMT_BITMAP,
    FMT_CSR,
    FMT_DENSE,
    FMT_EMPTY,
    SIZE_FORMATS,
    SPEED_FORMATS,
    choose_format,
    decode_factor_ref,
    encode_factor,
    factor_bytes_breakdown,
)

import atmc_triton as at
from bench.common import Ctx, Row, Target, bench_ms, copy_bandwidth

BENCH = "gemm"
BUDGET_S = float(os.environ.get("ATMC_BENCH_GEMM_BUDGET_S", "240"))


# --- synthetic packed layers ----------------------------------------------------------------------------------------


class Layer:
    """Packed factors of one synthetic layer ``W [N, K]`` and its dense fp16 weight."""

    def __init__(
        self,
        name: str,
        N: int,
        K: int,
        ratio: float,
        bits: int,
        structure: str,
        device,
        seed: int = 0,
        formats: str = "speed",
    ):
        self.name, self.N, self.K = name, N, K
        self.ratio, self.bits, self.structure, self.formats = ratio, bits, structure, formats
        nnz = max(3, int((ratio * 32 * N * K - 3 * 32 * 2**bits) // bits))
        g = torch.Generator(device=device).manual_seed(seed)
        if structure == "svd":
            self.identity = IDENTITY_NONE
            self.r = max(1, min(N, K, nnz // 2 // (N + K)))
            want = {"U": (N * self.r, 1.0), "V": (self.r * K, 1.0), "C": (nnz - self.r * (N + K), None)}
        else:  # identity init: W = U (V + I) + C (K <= N) or (U + I) V + C
            self.identity = IDENTITY_V if K <= N else IDENTITY_U
            self.r = K if K <= N else N
            main, other = ("U", "V") if K <= N else ("V", "U")
            share = (0.8, 0.05) if structure == "identity+V" else (0.85, 0.0)
            want = {main: (int(share[0] * nnz), None), other: (int(share[1] * nnz), None), "C": (int(0.15 * nnz), None)}
        shapes = {"U": (N, self.r), "V": (self.r, K), "C": (N, K)}
        self.factors, self.dense = [], []
        for f in "UVC":
            rows, cols = shapes[f]
            count, density = want[f]
            density = min(1.0, count / (rows * cols)) if density is None else density
            keep = torch.rand(rows, cols, generator=g, device=device) < density
            book = torch.randn(2**bits, generator=g, device=device) * 0.02
            book = book + torch.sign(book) * 1e-3
            w = torch.where(keep, book[torch.randint(0, 2**bits, (rows, cols), generator=g, device=device)], 0.0)
            enc = encode_factor(w, raw=False, formats=SIZE_FORMATS if formats == "size" else SPEED_FORMATS)
            self.factors.append(enc)
            self.dense.append(w)
        self.fmts = "".join({FMT_EMPTY: "-", FMT_DENSE: "d", FMT_CSR: "s", FMT_BITMAP: "b"}[f[0]] for f in self.factors)
        self.nbytes = sum(t.nbytes for f in self.factors for t in f[1:])
        self.csr_nnz = sum(f[4].numel() for f in self.factors if f[0] == FMT_CSR)
        self.coded = sum(r * c for f, (r, c) in zip(self.factors, shapes.values()) if f[0] == FMT_DENSE)
        self.bitmap = sum(r * c for f, (r, c) in zip(self.factors, shapes.values()) if f[0] == FMT_BITMAP)
        self.crossover = dense_crossover(N, K, self.nbytes, self.csr_nnz, self.coded, 2, self.bitmap)
        self.cached = None
        U, V, C = self.dense
        eye = torch.eye(self.r, device=device)
        W = (U + eye if self.identity == IDENTITY_U else U) @ (V + eye if self.identity == IDENTITY_V else V) + C
        self.w16 = W.half()
        self.args = [a for f in self.factors for a in f]
        self.case = f"{name} r={ratio} b={bits} [{self.fmts}]"

    def triton(self, x):
        return atmc_linear(x, None, self.N, self.r, self.identity, *self.args)

    def path(self, M: int) -> str:
        return linear_path(M, self.crossover)

    def packed(self, x):
        """What ``PackedLinear`` runs: the packed op, or cuBLAS on the weight decoded once (first call)."""
        if self.path(x.shape[0]) != "dense":
            return self.triton(x)
        if self.cached is None or self.cached.dtype != x.dtype:
            self.cached = self.torch_weight(x.dtype)
        return F.linear(x, self.cached)

    def predict_us(self, M: int, path: str, hw: dict | None = None, triton: str = "3.8") -> float:
        """:func:`predicted_us` of this layer, charged for each kernel launch the call makes (:func:`launches`)."""
        return predicted_us(
            path,
            M,
            self.N,
            self.K,
            self.nbytes,
            self.csr_nnz,
            self.coded,
            hw=hw,
            bitmap_elems=self.bitmap,
            triton=triton,
            launches=1
            if path == "dense"
            else launches(M, self.N, self.K, self.ratio, self.bits, self.structure, self.formats),
        )

    def torch_weight(self, dtype):
        U, V, C = (
            decode_factor_ref(f[0], rows, cols, *f[1:]).to(dtype)
            for f, (rows, cols) in zip(self.factors, ((self.N, self.r), (self.r, self.K), (self.N, self.K)))
        )
        if self.identity == IDENTITY_V:
            return torch.addmm(C + U, U, V)
        if self.identity == IDENTITY_U:
            return torch.addmm(C + V, U, V)
        return torch.addmm(C, U, V)

    def torch_dequant(self, x):
        return F.linear(x, self.torch_weight(x.dtype))

    def make_sparse(self):
        """cuSPARSE operands: CSR and bitmap factors as sparse fp16 tensors, dense-coded ones as dense fp16."""
        ops = []
        for f, w in zip(self.factors, self.dense):
            if f[0] in (FMT_CSR, FMT_BITMAP):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                    ops.append(w.half().to_sparse_csr())
            elif f[0] == FMT_DENSE:
                ops.append(w.half())
            else:
                ops.append(None)
        self.sparse_ops = ops

    def torch_sparse(self, x):
        U, V, C = self.sparse_ops
        xt = x.t()
        tt = None  # t^T [r, M]
        if U is not None or self.identity == IDENTITY_U:
            tt = V @ xt if V is not None else None
            if self.identity == IDENTITY_V:
                tt = xt if tt is None else tt + xt
        yt = None
        if U is not None and tt is not None:
            yt = U @ tt
        if self.identity == IDENTITY_U and tt is not None:
            yt = tt if yt is None else yt + tt
        if C is not None:
            yt = C @ xt if yt is None else yt + C @ xt
        return yt.t() if yt is not None else x.new_zeros(x.shape[0], self.N)


# --- timing ---------------------------------------------------------------------------------------------------------


def time_ms(fn, device) -> tuple[float, str]:
    """Median ms as a CUDA graph (GPU time), or with ``bench_ms`` where capture fails / on CPU."""
    fn()
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        try:
            return float(do_bench_cudagraph(fn, rep=50, return_mode="median")), "graph"
        except Exception:  # noqa: BLE001 (cuSPARSE / allocator paths that refuse capture)
            torch.cuda.synchronize()
    return bench_ms(fn, device, warmup_ms=10, rep_ms=60 if device.type == "cuda" else 20), "eager"


SHAPES = [  # (name, N, K), most important first
    ("4096x4096", 4096, 4096),
    ("11008x4096", 11008, 4096),
    ("resnet34 conv 512x4608", 512, 4608),
    ("resnet34 conv 256x2304", 256, 2304),
    ("resnet34 conv 128x1152", 128, 1152),
    ("resnet34 conv 64x576", 64, 576),
    ("lenet fc1 500x800", 500, 800),
    ("lenet conv2 50x500", 50, 500),
]
RATIOS = (0.05, 0.01, 0.002)
BITS = (8, 4)
MS = (1, 4, 16, 128, 1024, 8192)


def gemm_cases(quick: bool) -> list[tuple]:
    """``(name, N, K, ratio, bits, structure, Ms)``, most important first (the time budget cuts the end): the
    two big shapes at ratio 0.05, the low-rank and identity+V layers, the big shapes at 0.01 and 0.002, then
    the ResNet34 and LeNet shapes."""
    if quick:
        return [
            ("256x384", 256, 384, 0.05, 8, "identity", (1, 40)),
            ("256x384", 256, 384, 0.05, 4, "svd", (1, 40)),
            ("lenet fc1 500x800", 500, 800, 0.01, 8, "identity", (1,)),
        ]
    big = [(name, N, K, ratio, bits, "identity", MS) for ratio in RATIOS for name, N, K in SHAPES[:2] for bits in BITS]
    small = [
        (name, N, K, ratio, bits, "identity", MS) for name, N, K in SHAPES[2:] for ratio in RATIOS for bits in BITS
    ]
    structures = [
        ("4096x4096 lowrank", 4096, 4096, 0.05, 4, "svd", (1, 16, 1024)),
        ("4096x4096 ident+V", 4096, 4096, 0.05, 8, "identity+V", (1, 16, 1024, 8192)),
    ]
    return big[: 2 * len(BITS)] + structures + big[2 * len(BITS) :] + small  # ratio 0.05 of the big shapes first


def launches(M: int, N: int, K: int, ratio: float, bits: int, structure: str, formats: str = "speed") -> int:
    """Kernel launches of one packed call at batch ``M`` (those ``bench.model.atmc_linear`` lists for the layer)."""
    from bench.model import atmc_linear as modelled

    return len(modelled(M, N, K, ratio, bits, structure, formats=formats).launches)


def model_args(device: torch.device, bw: float) -> dict:
    """``hw`` and ``triton`` for :func:`predicted_us` on this machine: the H100 constants with the HBM
    bandwidth of the GPU found (``bench.model.gpu_for``: H200 4.3 TB/s, H100 3.0, another its measured copy
    bandwidth ``bw``), and the installed Triton's instruction counts (3.8's if it has none)."""
    from bench.model import gpu_for, installed_triton

    hw = dict(H100)
    if device.type == "cuda":
        hw["hbm"] = gpu_for(torch.cuda.get_device_name(device), bw).bandwidth
    return {"hw": hw, "triton": installed_triton()}


def run_gemm(ctx: Ctx, bw: float, deadline: float) -> tuple[list[Row], list[Target]]:
    rows, targets = [], []
    dev = ctx.device
    cuda = dev.type == "cuda"
    margs = model_args(dev, bw)
    for name, N, K, ratio, bits, structure, Ms in gemm_cases(ctx.quick):
        if time.time() > deadline:
            rows.append(Row(BENCH, f"{name} r={ratio} b={bits}", "skipped", float("nan"), {"why": "time budget"}))
            continue
        layer = Layer(name, N, K, ratio, bits, structure, dev)
        layer.make_sparse()
        w16 = layer.w16 if cuda else layer.w16.float()
        wbf = layer.w16.bfloat16() if cuda else None
        for M in Ms:
            x = torch.randn(M, K, device=dev).half() if cuda else torch.randn(M, K)
            xb = x.bfloat16()
            floor_ms = (layer.nbytes + x.nbytes + M * N * x.element_size()) / bw * 1e3
            path = layer.path(M)
            pred = {"packed": layer.predict_us(M, path, **margs), "cuBLAS": layer.predict_us(M, "dense", **margs)}
            variants = {
                "cuBLAS fp16 dense": (lambda x=x, w=w16: F.linear(x, w), pred["cuBLAS"]),
                "cuBLAS bf16 dense": (lambda x=xb, w=wbf: F.linear(x, w), pred["cuBLAS"]),
                "torch.sparse CSR": (lambda x=x, lay=layer: lay.torch_sparse(x), None),
                f"packed ({path})": (lambda x=x, lay=layer: lay.packed(x), pred["packed"]),
                "dequant+matmul (PyTorch)": (lambda x=x, lay=layer: lay.torch_dequant(x), None),
            }
            if not cuda:  # smoke run: the op is the reference on CPU, and nothing is fp16
                variants = {
                    "F.linear fp32 (CPU)": variants["cuBLAS fp16 dense"],
                    f"packed ({path}, CPU)": variants[f"packed ({path})"],
                }
            times = {}
            for variant, (fn, pred_us) in variants.items():
                try:
                    ms, how = time_ms(fn, dev)
                except Exception as e:  # noqa: BLE001 (e.g. cuSPARSE without half support)
                    rows.append(Row(BENCH, f"{layer.case} M={M}", variant, float("nan"), {"error": type(e).__name__}))
                    continue
                times[variant.split(" (")[0]] = ms
                extra = {"floor": floor_ms / ms, "timing": how, "packed_MB": layer.nbytes / 2**20}
                if pred_us is not None:
                    extra |= {"pred_us": pred_us, "meas/pred": ms * 1e3 / pred_us}
                rows.append(Row(BENCH, f"{layer.case} M={M}", variant, ms, extra))
            if "packed" in times and "cuBLAS fp16 dense" in times and structure == "identity":
                case = f"{layer.case} M={M}"
                if M <= 16:
                    frac = floor_ms / times["packed"]
                    targets.append(
                        Target(BENCH, f"packed, {case}: fraction of bytes floor", frac, ">= 0.7", frac >= 0.7)
                    )
                elif M >= 1024:
                    slow = times["packed"] / min(times["cuBLAS fp16 dense"], times.get("cuBLAS bf16 dense", 1e9))
                    targets.append(Target(BENCH, f"packed / cuBLAS time, {case}", slow, "<= 1.1", slow <= 1.1))
    return rows, targets


def predicted_table(hbm: float = 3.0e12) -> str:
    """Markdown: per shape, ratio and b of the grid (identity-init layers, sizes by construction, no
    tensors), the packed bytes against the paper's bits, the speedup over cuBLAS fp16 that the bytes
    floor allows at M = 1, and what the model predicts (H100, Triton 3.8's instruction counts and, for the
    fraction of the floor, 3.6's and 3.9's too; predictions, not measurements). Rows
    for ``pack_(formats="size")`` follow where it stores a factor differently (the bitmap)."""
    lines = [
        "| layer | ratio | b | fmt | packed MB | paper MB | overhead (positions / row ptrs / zero codes) "
        "| floor speedup M=1 | predicted speedup M=1 / 16 | % of floor M=1 / 4 / 16 "
        "| % of floor, Triton 3.6 counts | % of floor, Triton 3.9 counts | M=16 terms | M=1024: path, time / cuBLAS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, N, K in SHAPES:
        for ratio in RATIOS:
            for bits in BITS:
                seen = set()
                for objective, cands in (("speed", SPEED_FORMATS), ("size", SIZE_FORMATS)):
                    row = _predicted_row(name, N, K, ratio, bits, cands, hbm)
                    if row[0] not in seen:
                        seen.add(row[0])
                        lines.append(
                            row[1] if objective == "speed" else row[1].replace(f"| {row[0]} |", f"| {row[0]} (size) |")
                        )
    return "\n".join(lines)


def _predicted_row(name: str, N: int, K: int, ratio: float, bits: int, cands: tuple, hbm: float) -> tuple[str, str]:
    """``(formats, markdown row)`` of :func:`predicted_table` for one layer and candidate formats."""
    nnz = max(3, int((ratio * 32 * N * K - 3 * 32 * 2**bits) // bits))
    parts, fmts, paper, csr, elems = [], "", 0, 0, {FMT_DENSE: 0, FMT_BITMAP: 0}
    for share in (0.85, 0.15):  # the factor that started as W, and C; both [N, K]
        n = int(share * nnz)
        levels = min(2**bits, n)
        fmt = choose_format(N, K, n, levels, False, cands)
        parts.append(factor_bytes_breakdown(fmt, N, K, n, levels, False))
        fmts += {FMT_DENSE: "d", FMT_CSR: "s", FMT_BITMAP: "b", FMT_EMPTY: "-"}[fmt]
        paper += n * max(1, (levels - 1).bit_length()) + 32 * levels
        csr += n if fmt == FMT_CSR else 0
        elems[fmt] = elems.get(fmt, 0) + N * K
    packed = sum(sum(p.values()) for p in parts)
    pos = sum(p["indices"] for p in parts)
    ptr = sum(p["indptr"] for p in parts)
    zero = packed - paper / 8 - pos - ptr - sum(p["pad"] for p in parts)  # dense zeros, word rounding
    args = (N, K, packed, csr, elems[FMT_DENSE])
    objective = "size" if cands == SIZE_FORMATS else "speed"
    cross = dense_crossover(*args, 2, elems[FMT_BITMAP])

    def pred(m, path=None, triton="3.8"):
        path = path or linear_path(m, cross)
        calls = 1 if path == "dense" else launches(m, N, K, ratio, bits, "identity", objective)
        return predicted_us(path, m, *args, bitmap_elems=elems[FMT_BITMAP], triton=triton, launches=calls)

    def floor(m):
        return (packed + 2 * m * (N + K)) / hbm * 1e6

    def pct_of_floor(triton):  # at M = 1 / 4 / 16, with that Triton's instruction counts
        return " / ".join(f"{100 * floor(m) / pred(m, triton=triton):.0f}" for m in (1, 4, 16))

    issue16 = 1e6 * issue_instructions(16, csr, elems[FMT_DENSE], elems[FMT_BITMAP]) / H100["issue"]
    fetch16 = 1e6 * (packed + 2 * 16 * (N + K) + 4 * 16 * N) / H100["hbm"]
    gather16 = 1e6 * 2 * 16 * csr / H100["l1"]  # the CSR kernel's activation gathers (fp16 x)
    bound = f"issue {issue16:.1f} / gather {gather16:.1f} / bytes {fetch16:.1f} us"
    return fmts, (
        f"| {name} | {ratio} | {bits} | {fmts} | {packed / 1e6:.3f} | {paper / 8e6:.3f} "
        f"| {pos / 1e6:.3f} / {ptr / 1e6:.3f} / {max(zero, 0) / 1e6:.3f} MB "
        f"| {(2 * N * K + 2 * (N + K)) / (packed + 2 * (N + K)):.1f}x "
        f"| {pred(1, 'dense') / pred(1):.1f}x / {pred(16, 'dense') / pred(16):.1f}x "
        f"| {pct_of_floor('3.8')} | {pct_of_floor('3.6')} | {pct_of_floor('3.9')} "
        f"| {bound} "
        f"| {linear_path(1024, cross)}, {pred(1024) / pred(1024, 'dense'):.2f} |"
    )


def run_diagnostics(ctx: Ctx, bw: float) -> list[Row]:
    """The design measurements: codebook in L1 vs tl.gather; CSR SpMM vs densified tiles; output RMW cost."""
    if ctx.device.type != "cuda":
        return []
    from atmc_triton.kernels import lowrank_gemm_triton as lt

    rows = []
    layer = Layer("4096x4096", 4096, 4096, 0.05, 4, "identity", ctx.device)
    for M in (1, 1024):
        x = torch.randn(M, 4096, device=ctx.device).half()
        facs = [tuple(layer.factors[i]) for i in range(3)]
        for label, cfg in (
            ("triton, codebook via tl.gather", {"book_gather": True}),
            ("triton, CSR factors densified" if M > 16 else "triton, CSR factors as CSR SpMV", {"densify": M > 16}),
            ("triton, CSR factors as CSR SpMM" if M > 16 else "triton, CSR factors densified", {"densify": M <= 16}),
        ):
            cfg = {
                **cfg,
                "tile": (
                    lt.FIXED_CONFIG["tile_small"] | {"BLOCK_K": 64, "SPLIT_K": 8}
                    if M <= 16
                    else lt.TILE_LARGE_CONFIGS[2].kwargs  # 4 warps, as fixed tiles launch
                ),
            }
            ms, how = time_ms(
                lambda x=x, cfg=cfg, facs=facs: lt.linear_launch(x, None, 4096, layer.r, layer.identity, facs, cfg),
                ctx.device,
            )
            rows.append(Row(BENCH, f"{layer.case} M={M} (fixed tiles)", label, ms, {"timing": how}))
        y = torch.zeros(M, 4096, device=ctx.device, dtype=torch.float16)
        ms, how = time_ms(lambda y=y: y.add_(1), ctx.device)
        rows.append(
            Row(
                BENCH,
                f"[{M}, 4096] fp16",
                "one output read-modify-write pass",
                ms,
                {"timing": how, "why": "what a separate CSR kernel adds over a fused one"},
            )
        )
    return rows


# --- end to end -----------------------------------------------------------------------------------------------------


def _packed_model(name: str, device, ratio: float, bits: int):
    from atmc_triton.models import build_model
    from atmc_triton.packed import pack_

    shape = (1, 28, 28) if name == "lenet" else (3, 32, 32)
    torch.manual_seed(0)
    dense = build_model(name, 10, shape).to(device).eval()
    model = copy.deepcopy(dense)
    at.compress_(model, at.ATMCConfig(ratio=ratio, bits=bits))
    at.finalize_(model)
    packed = pack_(model).eval()
    return dense, packed, shape


def run_e2e(ctx: Ctx, deadline: float) -> list[Row]:
    from atmc_triton.packed import packed_layers, save_packed

    rows = []
    dev = ctx.device
    half = dev.type == "cuda"
    for name in ("lenet",) if ctx.quick else ("lenet", "resnet34"):
        if time.time() > deadline:
            rows.append(Row(BENCH, f"e2e {name}", "skipped", float("nan"), {"why": "time budget"}))
            continue
        dense, packed, shape = _packed_model(name, dev, 0.01, 8)
        rep = at.size_report(packed)
        with tempfile.TemporaryDirectory() as d:
            file_bytes = save_packed(packed, os.path.join(d, "m.safetensors"))
        dense_bytes = at.dense_bits(dense) // 32 * 2  # fp16 weights
        if half:
            dense, packed = dense.half(), packed.half()
        dtype = torch.float16 if half else torch.float32
        batches = (1, 256) if not ctx.quick else (1, 8)
        labels = (
            ("dense fp16, torch.compile", "packed, torch.compile")
            if half
            else ("dense fp32 eager (CPU)", "packed eager (CPU)")
        )
        torch._dynamo.reset()
        # dynamic=True still specializes a batch of 1: two compiles per model (ResNet34's are the slow part), so the
        # time budget is checked before each batch
        compiled = [torch.compile(m, dynamic=True) if half else m for m in (dense, packed)]
        with torch.no_grad():
            for batch in batches:
                if time.time() > deadline:
                    rows.append(
                        Row(BENCH, f"e2e {name} batch {batch}", "skipped", float("nan"), {"why": "time budget"})
                    )
                    continue
                x = torch.rand(batch, *shape, device=dev, dtype=dtype)
                for conv_mode in ("decomposed", "dense"):  # ends in "dense", the mode compiled below
                    for _, layer in packed_layers(packed):
                        if hasattr(layer, "conv_mode"):
                            layer.conv_mode = conv_mode
                    ms, how = time_ms(lambda x=x, m=packed: m(x), dev)
                    rows.append(
                        Row(BENCH, f"e2e {name} batch {batch}", f"packed eager, conv {conv_mode}", ms, {"timing": how})
                    )
                # the eager forwards above cached the convs' dense weights: the compiled graph reads them
                for label, fn, nbytes in zip(labels, compiled, (dense_bytes, rep.packed_bytes)):
                    ms, how = time_ms(lambda fn=fn, x=x: fn(x), dev)
                    rows.append(
                        Row(
                            BENCH,
                            f"e2e {name} batch {batch}",
                            label,
                            ms,
                            {"timing": how, "weight_bytes": nbytes, "file_bytes": file_bytes},
                        )
                    )
    return rows


def run(ctx: Ctx) -> tuple[list[Row], list[Target]]:
    t0 = time.time()
    deadline = t0 + BUDGET_S
    bw = copy_bandwidth(ctx.device)
    rows, targets = run_gemm(ctx, bw, t0 + 0.55 * BUDGET_S)
    rows += run_diagnostics(ctx, bw)
    rows += run_e2e(ctx, deadline)
    rows.append(Row(BENCH, "copy bandwidth", "torch copy_", float("nan"), {"GB_s": bw / 1e9}))
    return rows, targets


if __name__ == "__main__":  # python -m bench.gemm: the model's table (no GPU needed)
    print(predicted_table())

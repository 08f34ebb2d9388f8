"""Shared benchmark plumbing: timing, bandwidth floor, result rows and the summary table."""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["Ctx", "Row", "Target", "bench_ms", "copy_bandwidth", "environment", "predicted", "write_results"]


@dataclass
class Ctx:
    """What a benchmark module gets: the device, quick mode (tiny CPU smoke sizes) and an output dir."""

    device: torch.device
    quick: bool
    out: Path


@dataclass
class Row:
    bench: str  # e.g. "admm"
    case: str  # e.g. "resnet34 (42.5M)"
    variant: str  # e.g. "triton", "eager reference", "torch.compile(reference)"
    median_ms: float
    extra: dict = field(default_factory=dict)


@dataclass
class Target:
    bench: str
    what: str  # e.g. "triton vs eager reference, resnet34"
    value: float
    goal: str  # e.g. ">= 20x"
    met: bool


def bench_ms(fn, device: torch.device, warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median milliseconds of ``fn()``: CUDA events via triton.testing.do_bench on GPU, wall clock on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    t_end = time.perf_counter() + rep_ms / 1000
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2]


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled in this process (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warm_up(fn, calls: int = 12, still: int = 3) -> int:
    """Call a ``torch.compile``'d ``fn`` until dynamo's graph count has not moved for ``still`` calls (at most
    ``calls`` calls), so that no recompile lands in a timing; returns the graph count then. Raises
    ``torch._dynamo.exc.FailOnRecompileLimitHit`` where dynamo would give up and run a frame eagerly (a
    "compiled" variant would then time eager code).

    Example:
        >>> f = torch.compile(lambda x: x * 2, backend="eager")
        >>> warm_up(lambda: f(torch.ones(3))) >= 1
        True
    """
    seen, same = -1, 0
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # no silent fall-back to eager code
        for _ in range(calls):
            fn()
            now = dynamo_graphs()
            same = same + 1 if now == seen else 0
            seen = now
            if same >= still:
                break
    return seen


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        nbytes = 1 << 26
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a), device)
    return 2 * nbytes / (ms / 1000)


def predicted(ms: float, op, device: torch.device, bandwidth: float | None = None) -> dict:
    """``{"pred_ms", "x_pred"}``: the roofline prediction of :mod:`bench.model` ``op`` on this GPU and
    measured / predicted (the model's check); empty off CUDA, where a GPU model predicts nothing."""
    if device.type != "cuda":
        return {}
    from bench import model

    pred = op.predict_s(model.gpu_for(torch.cuda.get_device_name(device), bandwidth)) * 1e3
    return {"pred_ms": pred, "x_pred": ms / pred}


def environment(device: torch.device) -> dict:
    """The GPU, commit, date and torch of a results row; the commit ends in ``+dirty`` when tracked files differ
    from it (the measured code is then not that commit's)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False, cwd=root).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD") or "unknown"
        if commit != "unknown" and git("status", "--porcelain", "--untracked-files=no"):
            commit += "+dirty"
    except OSError:
        commit = "unknown"
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (no GPU)"
    return {"gpu": gpu, "commit": commit, "date": _dt.date.today().isoformat(), "torch": torch.__version__}


def _fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def write_results(out: Path, env: dict, rows: list[Row], targets: list[Target], stem: str = "results") -> str:
    """Write ``<stem>.jsonl`` and ``<stem>.md`` under ``out`` (each whole or not at all); return the markdown
    summary."""
    lines = [json.dumps({**env, **asdict(r)}) for r in rows] + [
        json.dumps({**env, "target": asdict(t)}) for t in targets
    ]
    _replace(out / f"{stem}.jsonl", "".join(f"{ln}\n" for ln in lines))
    head = f"GPU: {env['gpu']} | commit {env['commit']} | {env['date']} | torch {env['torch']}"
    timings = _fmt_table(
        ["bench", "case", "variant", "median ms", "predicted ms", "measured / predicted", "notes"],
        [
            [
                r.bench,
                r.case,
                r.variant,
                f"{r.median_ms:.4g}",
                f"{r.extra['pred_ms']:.4g}" if "pred_ms" in r.extra else "(no model)",
                f"{r.extra['x_pred']:.2f}" if "x_pred" in r.extra else "",
                ", ".join(
                    f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in r.extra.items()
                    if k not in ("pred_ms", "x_pred")
                ),
            ]
            for r in rows
        ],
    )
    summary = _fmt_table(
        ["bench", "target", "measured", "goal", "met"],
        [[t.bench, t.what, f"{t.value:.3g}", t.goal, "yes" if t.met else "NO"] for t in targets],
    )
    md = f"{head}\n\n### Timings (medians)\n\n{timings}\n\n### Targets\n\n{summary}\n"
    _replace(out / f"{stem}.md", md)
    return md


def _replace(path: Path, text: str) -> None:
    """Write ``text`` over ``path`` whole or not at all (the checkpoints' temporary file, fsync and rename)."""
    from atmc_triton.checkpoint import atomic_save

    atomic_save(path, lambda tmp: Path(tmp).write_text(text))

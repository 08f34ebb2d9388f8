"""Memory and CPU step time of ATMC on real architectures: ``python -m bench.drop_in [--models resnet50,vit_b_16]``.

Per torchvision model (weights=None, 10 classes, batch ``--batch`` of 224x224 on CPU):

* ``dense f+b``: one dense forward + backward (median of two), before compression;
* ``step``: ``ADMM.step()`` alone (median of two steady steps; the quantizer, every
  ``quant_interval`` steps, is timed separately as ``quantize``: the Lloyd reference);
* memory, from RSS sampled every 2 ms by a thread: ``first`` is the peak over ``compress_`` +
  ``ADMM(...)`` + the first training step, ``steady`` the peak over two later steps, both above
  the RSS with the dense model built; the acceptance target is ``first <= 1.25 x steady``.
  ``state`` is :class:`atmc_triton.CompressReport`'s estimate (21 B per factor entry + 12 B per
  dense parameter).

Appends one JSON line per model, with the machine load (1-minute load average before and after),
to ``bench/results/drop_in.jsonl`` (``--no-results``: don't). Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import atmc_triton as at
from bench.common import environment

RESULTS = Path(__file__).resolve().parent / "results" / "drop_in.jsonl"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


class PeakRSS:
    """Peak resident set size inside a ``with`` block, sampled by a thread."""

    def __enter__(self):
        self.peak, self._stop = _rss(), False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, _rss())


def _train_step(model, x, y, opt=None):
    t0 = time.perf_counter()
    if opt is not None:
        opt.zero_grad()
    else:
        model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    t1 = time.perf_counter()
    if opt is not None:
        opt.step()
    return t1 - t0, time.perf_counter() - t1


def run(name: str, batch: int, ratio: float, bits: int) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).train()
    x, y = torch.rand(batch, 3, 224, 224), torch.arange(batch) % 10
    dense = statistics.median(_train_step(model, x, y)[0] for _ in range(2))
    model.zero_grad(set_to_none=True)
    base = _rss()
    cfg = at.ATMCConfig(ratio=ratio, bits=bits)
    t0 = time.perf_counter()
    with PeakRSS() as first:
        report = at.compress_(model, cfg, return_report=True, progress=False)
        t_compress = time.perf_counter() - t0
        opt = at.ADMM(model, cfg, lr=0.01)
        fb1, step1 = _train_step(model, x, y, opt)
    with PeakRSS() as steady:
        times = [_train_step(model, x, y, opt) for _ in range(2)]
    t0 = time.perf_counter()
    opt.quantize_()
    t_quant = time.perf_counter() - t0
    return {
        "model": name,
        "batch": batch,
        "ratio": ratio,
        "bits": bits,
        "weights": report.compressed_weights,
        "factor_entries": report.factor_entries,
        "dense_fwd_bwd_s": round(dense, 3),
        "atmc_fwd_bwd_s": round(statistics.median(t[0] for t in times), 3),
        "step_s": round(statistics.median(t[1] for t in times), 3),
        "first_step_s": round(step1, 3),
        "quantize_s": round(t_quant, 3),
        "compress_s": round(t_compress, 3),
        "state_estimate_mb": round(report.training_state_bytes / 2**20, 1),
        "first_peak_mb": round((first.peak - base) / 2**20, 1),
        "steady_peak_mb": round((steady.peak - base) / 2**20, 1),
        "first_over_steady": round((first.peak - base) / max(steady.peak - base, 1), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,vit_b_16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.05)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-results", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    env = environment(torch.device("cpu")) | {"threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    for name in a.models.split(","):
        load0 = os.getloadavg()[0]
        row = run(name, a.batch, a.ratio, a.bits) | env
        row["load_avg_1min"] = [round(load0, 1), round(os.getloadavg()[0], 1)]
        print(json.dumps(row), flush=True)
        if not a.no_results:
            RESULTS.parent.mkdir(exist_ok=True)
            with RESULTS.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

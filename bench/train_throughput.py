"""CPU training throughput of each training attack, in one run: images/s of :func:`atmc_triton.train.fit` on
MNIST-shaped data (Caffe-LeNet, batch 128, random images: the cost does not depend on the pixels).

``python -m bench.train_throughput [--threads 1,2] [--steps 30] [--variants ...]``

Rows: the paper's PGD-16 (0.5 clean + 0.5 adversarial CE), PGD-5 and PGD-3, FGSM-RS and N-FGSM (adversarial CE
only, the fast preset's loss), FGSM-RS with the TRADES loss, and FGSM-RS on a ``channels_last`` model and on
``torch.compile(model)``; each at every thread count. Images/s counts training images (an epoch of MNIST is
60,000); CPU seconds are the process's, over all threads. The fixed cost of the first steps (allocations,
compilation) is excluded by timing a second ``fit`` call. Appends a JSON line per row to
``bench/results/train_throughput.jsonl`` (with the CPU, commit and date) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from atmc_triton.data import synthetic_dataset
from atmc_triton.train import Experiment, Protocol, Schedule, fit

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.jsonl"
VARIANTS = {
    "pgd16-paper": (Protocol(eps=0.3, pgd_steps=16, clean_weight=0.5), None),
    "pgd5": (Protocol(eps=0.3, pgd_steps=5, clean_weight=0.0), None),
    "pgd3": (Protocol(eps=0.3, pgd_steps=3, clean_weight=0.0), None),
    "fgsm_rs": (Protocol(eps=0.3, pgd_steps=1, clean_weight=0.0, train_attack="fgsm_rs"), None),
    "n_fgsm": (Protocol(eps=0.3, pgd_steps=1, clean_weight=0.0, train_attack="n_fgsm"), None),
    "fgsm_rs+trades": (Protocol(eps=0.3, pgd_steps=1, train_attack="fgsm_rs", loss="trades"), None),
    "fgsm_rs+channels_last": (Protocol(eps=0.3, pgd_steps=1, clean_weight=0.0, train_attack="fgsm_rs"), "cl"),
    "fgsm_rs+compile": (Protocol(eps=0.3, pgd_steps=1, clean_weight=0.0, train_attack="fgsm_rs"), "compile"),
}


def measure(name: str, threads: int, steps: int, batch: int = 128) -> dict:
    """Images/s and CPU seconds per 1,000 images of ``steps`` training steps of variant ``name``."""
    protocol, mode = VARIANTS[name]
    torch.set_num_threads(threads)
    data = synthetic_dataset("mnist", n_train=steps * batch, n_test=8, seed=0)
    model = Experiment("lenet", data, protocol, device="cpu", eval_size=0, channels_last=mode == "cl").new_model()
    net = torch.compile(model) if mode == "compile" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = Schedule(epochs=1, lr=0.01, batch_size=batch)
    fit(net, opt, data, protocol, sched, stage="warm", eval_size=0, device="cpu")  # first-call costs
    t0, c0 = time.perf_counter(), time.process_time()
    fit(net, opt, data, protocol, sched, stage="timed", eval_size=0, device="cpu")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = steps * batch
    return {"variant": name, "threads": threads, "images": n, "images_per_s": n / wall, "cpu_s_per_1k": 1e3 * cpu / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default=f"1,{torch.get_num_threads()}", help="comma list of thread counts")
    ap.add_argument("--steps", type=int, default=30, help="timed training steps per row (batch 128)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--no-results", action="store_true", help=f"do not append to {RESULTS}")
    a = ap.parse_args(argv)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or a.steps < 1:
        ap.error(f"unknown variant(s) {bad}" if bad else "--steps must be >= 1")
    from bench.common import environment

    env = environment(torch.device("cpu"))
    rows = [measure(v, int(t), a.steps) for t in sorted({int(t) for t in a.threads.split(",")}) for v in names]
    base = {r["threads"]: r["images_per_s"] for r in rows if r["variant"] == "pgd16-paper"}
    print("| variant | threads | images/s | CPU s / 1k images | x PGD-16 |\n|---|---|---|---|---|")
    for r in rows:
        rel = f"{r['images_per_s'] / base[r['threads']]:.2f}x" if r["threads"] in base else "-"
        print(f"| {r['variant']} | {r['threads']} | {r['images_per_s']:.0f} | {r['cpu_s_per_1k']:.2f} | {rel} |")
    if not a.no_results:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, **env}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

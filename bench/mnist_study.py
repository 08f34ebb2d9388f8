"""Real-MNIST study against the paper's Figure 2: Caffe-LeNet, eps 0.3, PGD-16 training and evaluation.

``python -m bench.mnist_study --data-root ../shared/data --out runs/mnist_study [--reduced|--full]``

Points, all in one run and from the same two dense models:

* **DA**: dense PGD adversarial pretraining (0.5 clean + 0.5 adversarial CE, the paper's MNIST loss);
* **ATMC-8b** / **ATMC-32b**: :meth:`Experiment.compress` of DA at ``bits=8`` / ``bits=None`` for every ratio;
* **AP**: DA, global magnitude pruning to the same size in bits (32-bit weights: ``nnz = ratio *
  dense_bits / 32``), adversarial fine-tuning with the mask fixed (:mod:`atmc_triton.baselines`);
* **NAP**: natural training, the same pruning, natural fine-tuning (no adversarial training anywhere);
* **ATMC-alloc** (not in the paper; ``--methods ...,ATMC-alloc``): ATMC with per-layer bits chosen by
  :func:`atmc_triton.bitalloc.allocate_bits` for each ratio (the codebooks dominate small budgets);
* **ATMC-svd**, **ATMC-svd-r**, **ATMC-sparse** (``--methods``): ATMC-8b from another factor init (SVD at
  full / quarter rank; ``init="sparse"``, W = C with no low-rank part).

Every point is evaluated on the same test examples: TA, ATA (PGD-16 with a random start, step
2.5 eps / 16), the robustness suite (``--suite``, default ``auto``: AutoAttack-grade, see
:func:`atmc_triton.attacks.robust_suite`) as a cascade on the points PGD and FGSM missed, and the
headline robust accuracy: the per-example worst case over PGD, FGSM and every stage of the suite,
labelled with the suite, with its flags (``masking?``: PGD more than 3 points above it;
``square+k``: Square broke k points every gradient attack missed; ``collapsed``: the prediction
histogram on clean or attacked inputs is dominated by one class), FGSM and WRM accuracy, size
bits (paper convention, codebooks counted: ``n ceil(log2 L) + 32 L`` per quantized factor), ratio
and packed bytes. Outputs in ``--out``: ``mnist_study.csv``, ``mnist_study.png`` (TA and the worst
case vs ratio, log-x, laid out like the paper's Figure 2, with the
paper's readings as open markers), ``mnist_study.md`` (tables, comparison with the paper) and
``study.json`` (protocol, commit, date, device); copied to ``bench/results/mnist_study_<date>.*``.

The run is resumable: every stage checkpoints each epoch and every evaluated point is cached in
``<out>/points/``; run the same command again to continue. ``--reduced`` (the CPU preset) trains
on a seeded 10,240-image subset for fewer epochs and evaluates on 1,000 test images;
``--full`` uses all 60,000 / 10,000 images (a GPU run of a few tens of minutes).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import shutil
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from atmc_triton.baselines import MaskedSGD, magnitude_prune_, nnz_for_ratio, pruned_size
from atmc_triton.bitalloc import allocate_bits
from atmc_triton.budget import atmc_layers
from atmc_triton.config import ATMCConfig
from atmc_triton.data import load_dataset, synthetic_dataset
from atmc_triton.train import PROTOCOLS, EvalResult, Experiment, Protocol, Schedule, fit

RATIOS = (1e-3, 3e-3, 1e-2, 5e-2)
ATTACKS = ("pgd", "apgd", "fgsm", "wrm")
RESULTS = Path(__file__).resolve().parent / "results"

# the paper's Figure 2 (MNIST), read off the plot (about +-0.02): (TA, ATA)
PAPER = {
    ("DA", None): (0.98, 0.785),
    ("ATMC-8b", 1e-3): (0.80, 0.63),
    ("ATMC-8b", 1e-2): (0.95, 0.73),
    ("ATMC-32b", 1e-2): (0.87, 0.72),
}


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a study (stored in ``study.json``; a resumed run must match it).

    Schedules are SGD with momentum 0.9: ``lr_schedule`` ``"cosine"`` or ``"step"`` (x0.1 at the
    ``*_milestones`` epochs). ``synthetic``: random data of the dataset's shapes (``train_subset`` /
    ``test_subset`` examples) instead of the files, for smoke tests.
    """

    preset: str
    train_subset: int | None  # None = the whole split
    test_subset: int | None
    dense_epochs: int
    atmc_epochs: int
    prune_epochs: int
    dataset: str = "mnist"
    model: str = "lenet"
    protocol: str = "mnist"  # a key of atmc_triton.train.PROTOCOLS
    batch_size: int = 128
    lr: float = 0.05  # dense (DA and natural) training
    atmc_lr: float = 0.01  # ATMC, and the AP / NAP fine-tuning
    lr_schedule: str = "cosine"
    dense_milestones: tuple[int, ...] = ()
    atmc_milestones: tuple[int, ...] = ()
    weight_decay: float = 1e-4
    ratios: tuple[float, ...] = RATIOS
    rho: float = 0.1
    quant_interval: int = 10
    init: str = "identity"
    apgd_steps: int = 100  # APGD-CE / APGD-T / FAB-T iterations of the suite
    suite: str = "auto"  # the robustness suite (atmc_triton.attacks.SUITES)
    square_queries: int = 5000
    eval_size: int = 200  # test examples of the per-epoch check
    synthetic: bool = False
    channels_last: bool = False  # models in channels_last memory format (faster on CPU; same values)
    seed: int = 0
    methods: tuple[str, ...] = ("ATMC-8b", "ATMC-32b", "AP", "NAP")  # besides DA and NAT; also "ATMC-alloc"


PRESETS = {
    # about an hour on one busy CPU core: 10,240 training images, 1,000 test images
    "reduced": StudyConfig("reduced", 10240, 1000, dense_epochs=12, atmc_epochs=2, prune_epochs=2),
    # the whole dataset (GPU): 20 dense + 10 ATMC / fine-tuning epochs
    "full": StudyConfig("full", None, None, dense_epochs=20, atmc_epochs=10, prune_epochs=10, eval_size=1000),
    # the CPU preset (issue 19): all 60,000 training images, PGD-3 training with an eps warm-up, a one-cycle LR
    # and the catastrophic-overfitting guard (PROTOCOLS["mnist_fast"]); every point on the same 1,000 test images
    # (the README's goal points also ran on all 10,000 with ``atmc eval``)
    "fast": StudyConfig(
        "fast",
        None,
        1000,
        dense_epochs=40,
        atmc_epochs=8,
        prune_epochs=8,
        protocol="mnist_fast",
        lr=0.05,
        atmc_lr=0.01,
        lr_schedule="onecycle",
        weight_decay=5e-4,
        square_queries=1000,
        eval_size=500,
        channels_last=True,
        methods=("ATMC-8b", "ATMC-32b", "ATMC-alloc", "AP", "NAP"),
    ),
    # a smoke test of the code path (seconds)
    "tiny": StudyConfig(
        "tiny",
        64,
        32,
        dense_epochs=1,
        atmc_epochs=1,
        prune_epochs=1,
        batch_size=32,
        ratios=(1e-2, 5e-2),
        apgd_steps=5,
        square_queries=20,
        eval_size=0,
    ),
}


@dataclass(frozen=True)
class Point:
    method: str  # DA, NAT, ATMC-8b, ATMC-32b, AP, NAP
    ratio: float | None = None  # target size ratio (None: dense)

    @property
    def stage(self) -> str:
        return {"DA": "dense", "NAT": "natural"}.get(self.method) or f"{self.method.lower()}_r{self.ratio:g}"


METHODS = ("ATMC-8b", "ATMC-32b", "ATMC-alloc", "ATMC-svd", "ATMC-svd-r", "ATMC-sparse", "AP", "NAP")


def points(cfg: StudyConfig) -> list[Point]:
    """DA, the goal points of the fast preset (ATMC-8b at 1e-2, ATMC-alloc at 1e-3), NAT, the paper's
    comparison points, then the rest (partial runs stay useful)."""
    bad = set(cfg.methods) - set(METHODS)
    if bad:
        raise ValueError(f"unknown method(s) {sorted(bad)}; choose from {', '.join(METHODS)}")
    ps = [Point("DA")]
    ps += [
        p
        for p in (Point("ATMC-8b", 1e-2), Point("ATMC-alloc", 1e-3))
        if p.ratio in cfg.ratios and p.method in cfg.methods
    ]
    ps.append(Point("NAT"))
    key = [Point("ATMC-8b", 1e-3), Point("ATMC-8b", 1e-2), Point("ATMC-32b", 1e-2)]
    ps += [p for p in key if p.ratio in cfg.ratios and p.method in cfg.methods and p not in ps]
    for r in cfg.ratios:
        for m in METHODS:
            if m in cfg.methods and Point(m, r) not in ps:
                ps.append(Point(m, r))
    return ps


class Study:
    """The stages and evaluation of one study (any dataset / model of the registries)."""

    def __init__(
        self,
        cfg: StudyConfig,
        data_root: Path | None,
        out: Path,
        device: str = "auto",
        progress: bool = False,
        resume: bool = True,
    ):
        self.cfg, self.out = cfg, out
        if cfg.synthetic:
            data = synthetic_dataset(cfg.dataset, cfg.train_subset or 64, cfg.test_subset or 32, seed=cfg.seed)
        else:
            data = load_dataset(
                cfg.dataset, data_root, subset=cfg.train_subset, test_subset=cfg.test_subset, seed=cfg.seed
            )
        self.protocol: Protocol = dataclasses.replace(PROTOCOLS[cfg.protocol], apgd_steps=cfg.apgd_steps)
        self.exp = Experiment(
            cfg.model,
            data,
            self.protocol,
            out=out,
            seed=cfg.seed,
            device=device,
            progress=progress,
            resume=resume,
            eval_size=cfg.eval_size,
            attacks=ATTACKS,
            suite=cfg.suite,
            square_queries=cfg.square_queries,
            channels_last=cfg.channels_last,
        )
        common = {"weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "lr_schedule": cfg.lr_schedule}
        self.dense_schedule = Schedule(epochs=cfg.dense_epochs, lr=cfg.lr, milestones=cfg.dense_milestones, **common)
        self.atmc_schedule = Schedule(epochs=cfg.atmc_epochs, lr=cfg.atmc_lr, milestones=cfg.atmc_milestones, **common)
        self.prune_schedule = Schedule(
            epochs=cfg.prune_epochs, lr=cfg.atmc_lr, milestones=cfg.atmc_milestones, **common
        )
        self._models: dict[str, torch.nn.Module] = {}
        self.resume = resume

    # -- stages ------------------------------------------------------------------------------
    def dense(self, adversarial: bool) -> torch.nn.Module:
        key = "dense" if adversarial else "natural"
        if key not in self._models:
            self._models[key], _ = self.exp.pretrain(self.dense_schedule, adversarial=adversarial)
        return self._models[key]

    def atmc_config(self, p: Point) -> ATMCConfig:
        """ATMC-8b: 8 bits everywhere; ATMC-32b: no quantizer; ATMC-alloc: per-layer bits from
        :func:`atmc_triton.bitalloc.allocate_bits` on DA's weights (8 bits the starting point); ATMC-svd /
        ATMC-svd-r: ATMC-8b from a truncated-SVD init at full rank / a quarter of it; ATMC-sparse: ATMC-8b with
        ``init="sparse"`` (W = C, no low-rank part) (the study's ``init`` is the others')."""
        c = self.cfg
        svd = p.method.startswith("ATMC-svd")
        cfg = ATMCConfig(
            ratio=p.ratio,
            bits=None if p.method == "ATMC-32b" else 8,
            rho=c.rho,
            quant_interval=c.quant_interval,
            init="svd" if svd else "sparse" if p.method == "ATMC-sparse" else c.init,
            rank=0.25 if p.method == "ATMC-svd-r" else None,
        )
        if p.method == "ATMC-alloc":
            cfg = dataclasses.replace(cfg, layer_bits=allocate_bits(self.dense(True), cfg))
        return cfg

    def pruned(self, p: Point) -> torch.nn.Module:
        """AP / NAP: global magnitude pruning of DA / NAT to ``p.ratio``, fine-tuned with the mask fixed."""
        adversarial = p.method == "AP"
        model = copy.deepcopy(self.dense(adversarial))
        nnz = nnz_for_ratio(model, p.ratio)
        masks = magnitude_prune_(model, nnz)
        s = self.prune_schedule
        opt = MaskedSGD(model, masks, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov)
        e = self.exp
        fit(
            model,
            opt,
            e.data,
            e.protocol,
            s,
            stage=p.stage,
            adversarial=adversarial,
            seed=e.seed,
            device=e.device,
            checkpoint=e.path(p.stage),
            meta={**e.identity, "atmc": None, "pruned_nnz": nnz},
            resume=self.resume,
            log=self.out / "metrics.jsonl",
            progress=e.progress,
            eval_size=e.eval_size,
        )
        return model.eval()

    def train(self, p: Point) -> torch.nn.Module:
        if p.method in ("DA", "NAT"):
            return self.dense(p.method == "DA")
        if p.method.startswith("ATMC"):
            model, _ = self.exp.compress(self.dense(True), self.atmc_config(p), self.atmc_schedule, stage=p.stage)
            return model
        return self.pruned(p)

    def _train_seconds(self, stage: str) -> tuple[float, float]:
        """Wall and CPU seconds logged by ``stage``'s epochs (rolled-back epochs included: that time was spent)."""
        log = self.out / "metrics.jsonl"
        recs = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()] if log.is_file() else []
        mine = [r for r in recs if r.get("stage") == stage]
        return tuple(sum(r.get(k) or 0.0 for r in mine) for k in ("train_seconds", "train_cpu_seconds"))

    def run_point(self, p: Point) -> dict[str, Any]:
        cache = self.out / "points" / f"{p.stage}.json"
        row = json.loads(cache.read_text()) if self.resume and cache.is_file() else None
        if row is not None and "robust_acc" in row:  # else: cached under the old PGD / APGD-CE headline
            row.setdefault("bits", "8" if p.method == "ATMC-8b" else "32")  # caches written before the column
            return row
        _say(f"[study] {p.method}" + (f" at ratio {p.ratio:g}" if p.ratio else "") + f" (stage {p.stage})")
        model = self.train(p)
        ev: EvalResult = self.exp.evaluate(model)
        if p.method in ("AP", "NAP"):
            ev = dataclasses.replace(ev, **pruned_size(model))
        layers = atmc_layers(model)
        factors = {f: 0 for f in "UVC"}  # where the nonzeros ended up (the factor holding W under init=identity)
        for _, layer in layers:
            for f, t in layer.factors():
                factors[f] += int(torch.count_nonzero(t))
        per_layer = [str(layer.nbits or 32) for _, layer in layers] or ["32"]
        bits = per_layer[0] if len(set(per_layer)) == 1 else "/".join(per_layer)  # e.g. "8", or "4/1/1/2"
        wall, cpu = self._train_seconds(p.stage)
        row = {
            "method": p.method,
            "target_ratio": p.ratio,
            "bits": bits,
            **ev.as_dict(),
            **({f"nnz_{f}": n for f, n in factors.items()} if layers else {}),
            "train_seconds": wall,
            "train_cpu_seconds": cpu,
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(row, indent=1))
        _say(
            f"[study]   TA {ev.clean_acc:.3f} ATA {ev.pgd_acc:.3f} robust {ev.robust_acc:.3f} ({ev.headline}) "
            f"{' '.join(ev.flags)} FGSM {ev.fgsm_acc:.3f} WRM {ev.wrm_acc:.3f} ratio {ev.ratio:.2e} "
            f"packed {ev.packed_bytes} B ({ev.seconds:.0f} s eval)"
        )
        return row


# -- outputs -----------------------------------------------------------------------------------
CSV_KEYS = [
    "method",
    "target_ratio",
    "bits",
    "ratio",
    "size_bits",
    "dense_bits",
    "packed_bytes",
    "nnz",
    "clean_acc",
    "pgd_acc",
    "robust_acc",
    "suite",
    "headline",
    "gradient_masking",
    "gradient_free_broken",
    "collapse",
    "fgsm_acc",
    "wrm_acc",
    "n",
    "nnz_U",
    "nnz_V",
    "nnz_C",
    "train_seconds",
    "train_cpu_seconds",
    "seconds",
]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ata_label(protocol: Protocol) -> str:
    return f"PGD-{protocol.eval_steps}, eps {protocol.eps:.3g}"


def _flags(r: dict[str, Any]) -> str:
    out = ["masking?"] if r.get("gradient_masking") else []
    out += [f"square+{r['gradient_free_broken']}"] if r.get("gradient_free_broken") else []
    out += [f"collapsed ({r['collapse']})"] if r.get("collapse") else []
    return ", ".join(out) or "-"


def _robust(r: dict[str, Any]) -> str:
    return _pct(r.get("robust_acc")) + (" (collapsed)" if r.get("collapse") else "")


def markdown(rows: list[dict[str, Any]], cfg: StudyConfig, paper: dict | None = None) -> str:
    """The results table (the worst case is the headline, labelled with the suite; PGD a named column), the flags
    and (with ``paper`` readings) the comparison with the paper."""
    protocol = PROTOCOLS[cfg.protocol]
    suite = next((r["suite"] for r in rows if r.get("suite")), "-")
    head = [
        "method",
        "target ratio",
        "bits",
        "TA %",
        f"ATA % ({_ata_label(protocol)})",
        f"robust % (worst case, {suite})",
        "flags",
        "FGSM %",
        "WRM %",
        "size bits",
        "ratio",
        "packed B",
        "train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        tr = "dense" if r["target_ratio"] is None else f"{r['target_ratio']:g}"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"],
                    tr,
                    r.get("bits", "-"),
                    _pct(r["clean_acc"]),
                    _pct(r["pgd_acc"]),
                    _robust(r),
                    _flags(r),
                    _pct(r["fgsm_acc"]),
                    _pct(r["wrm_acc"]),
                    f"{r['size_bits']:,}",
                    f"{r['ratio']:.2e}",
                    f"{r['packed_bytes']:,}",
                    f"{r['train_seconds']:.0f}",
                ]
            )
            + " |"
        )

    def name(r: dict[str, Any]) -> str:
        return r["method"] + ("" if r["target_ratio"] is None else f" @ {r['target_ratio']:g}")

    masked = [name(r) for r in rows if r.get("gradient_masking")]
    square = [f"{name(r)} ({r['gradient_free_broken']})" for r in rows if r.get("gradient_free_broken")]
    collapsed = [name(r) for r in rows if r.get("collapse")]
    headline = next((r["headline"] for r in rows if r.get("headline")), "-")
    text = (
        "\n".join(lines)
        + f"\n\nrobust % = per-example {headline}."
        + "\ngradient-masking flags (PGD more than 3 points above the worst case): "
        + (", ".join(masked) if masked else "none")
        + "\ngradient-free flags (Square broke points every gradient attack missed): "
        + (", ".join(square) if square else "none")
        + "\ncollapsed models (one class > 2x its share or > 50 % of the predictions; their robust accuracy is "
        + "not comparable): "
        + (", ".join(collapsed) if collapsed else "none")
        + "\n"
    )
    spread = [r for r in rows if r.get("nnz_U") is not None]
    if spread:
        text += (
            "\nWhere the nonzeros ended up (finalized ATMC layers; init identity starts with W in V where a layer "
            "has more inputs than outputs, else in U):\n\n"
            "| point | nnz U | nnz V | nnz C | train CPU s |\n|---|---|---|---|---|\n"
        )
        for r in spread:
            text += (
                f"| {name(r)} | {r['nnz_U']:,} | {r['nnz_V']:,} | {r['nnz_C']:,} | "
                f"{r.get('train_cpu_seconds') or 0:.0f} |\n"
            )
    if paper:
        cmp = [
            "| point | paper TA / ATA | ours TA / ATA (worst case) | ours - paper, TA / ATA |",
            "|---|---|---|---|",
        ]
        by = {(r["method"], r["target_ratio"]): r for r in rows}
        for (m, ratio), (ta, ata) in paper.items():
            r = by.get((m, ratio))
            if r is not None:
                label = m if ratio is None else f"{m} @ {ratio:g}"
                worst = "-" if r.get("robust_acc") is None else f"{r['robust_acc']:.3f}"
                worst += ", collapsed" if r.get("collapse") else ""
                cmp.append(
                    f"| {label} | {ta:.3f} / {ata:.3f} | {r['clean_acc']:.3f} / {r['pgd_acc']:.3f} "
                    f"({worst}) | {r['clean_acc'] - ta:+.3f} / {r['pgd_acc'] - ata:+.3f} |"
                )
        text += "\nComparison with the paper (Figure 2, read off the plot, +-0.02):\n\n" + "\n".join(cmp) + "\n"
    return text


def plot(rows: list[dict[str, Any]], path: Path, title: str, protocol: Protocol, paper: dict | None = None) -> None:
    """Two panels (TA, ATA) vs size ratio, log-x, like the paper's Figure 2: one line per method, the dense
    models as horizontal lines, the paper's readings (if any) as open markers."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper = paper or {}
    style = {
        "ATMC-8b": ("C0", "o"),
        "ATMC-32b": ("C1", "s"),
        "ATMC-alloc": ("C4", "D"),
        "AP": ("C2", "^"),
        "NAP": ("C3", "v"),
        "ATMC-svd": ("C5", "P"),
        "ATMC-svd-r": ("C6", "X"),
        "ATMC-sparse": ("C7", "*"),
    }
    extra = [r["method"] for r in rows if r["method"] not in style and r["method"] not in ("DA", "NAT")]
    for i, m in enumerate(dict.fromkeys(extra)):  # any other method still gets a line (none is dropped)
        style[m] = (f"C{(8 + i) % 10}", "o")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    worst = all(r.get("robust_acc") is not None for r in rows)
    headline = f"robust, worst case ({rows[0]['headline']})" if worst and rows else f"ATA ({_ata_label(protocol)})"
    for ax, key, name in ((axes[0], "clean_acc", "TA"), (axes[1], "robust_acc" if worst else "pgd_acc", headline)):
        col = 0 if key == "clean_acc" else 1
        for m, (color, marker) in style.items():
            pts = sorted((r["ratio"], r[key]) for r in rows if r["method"] == m)
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, label=m)
            for r in rows:
                if r["method"] == m and r.get("collapse"):
                    ax.plot([r["ratio"]], [r[key]], "x", color="red", ms=9)  # collapsed: not comparable
            ref = [(rt, v[col]) for (pm, rt), v in paper.items() if pm == m]
            if ref:
                ax.plot(*zip(*ref), ls="none", marker=marker, mfc="none", ms=10, color=color, label=f"{m} (paper)")
        for r in rows:
            if r["method"] in ("DA", "NAT"):
                ax.axhline(
                    r[key], color="k" if r["method"] == "DA" else "gray", ls="--", label=f"{r['method']} (dense)"
                )
        if ("DA", None) in paper:
            ax.axhline(paper[("DA", None)][col], color="k", ls=":", label="DA (paper)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("model size ratio (compressed bits / dense 32-bit bits)")
        ax.set_ylabel(name.split(" (")[0])  # the short name; the full suite label goes in the title
        ax.set_title(textwrap.fill(name, 70), fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves(log: Path, path: Path, title: str) -> None:
    """Per-epoch training curves from ``metrics.jsonl``, one panel per stage: clean and PGD accuracy on the
    held-out test examples of the per-epoch check, the guard's PGD accuracy on its training batch, and the
    training attack's accuracy; rolled-back epochs as red crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log.is_file():
        return
    recs = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    stages = list(dict.fromkeys(r["stage"] for r in recs if "stage" in r))
    if not stages:
        return
    cols = min(4, len(stages))
    rows_ = math.ceil(len(stages) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.2 * cols, 2.6 * rows_), squeeze=False)
    keys = (
        ("test_acc", "held-out clean", "C0"),
        ("test_pgd_acc", "held-out PGD", "C1"),
        ("guard_pgd_acc", "guard PGD (train batch)", "C2"),
        ("train_adv_acc", "training attack (train)", "C7"),
    )
    for ax, stage in zip(axes.flat, stages):
        mine = [r for r in recs if r.get("stage") == stage]
        kept = [r for r in mine if r.get("event") != "rollback"]
        for key, label, color in keys:
            pts = [(r["epoch"], r[key]) for r in kept if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", color=color, label=label)
        for r in mine:
            if r.get("event") == "rollback":
                ax.plot([r["epoch"]], [r.get("guard_pgd_acc") or 0], "x", color="red", ms=9)
        ax.set_title(stage, fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("epoch", fontsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(stages) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="lower right")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _environment(device: torch.device) -> dict[str, Any]:
    from bench.common import environment

    return environment(device)


def run(
    cfg: StudyConfig,
    data_root: Path | None,
    out: Path,
    *,
    name: str = "mnist_study",
    paper: dict | None = None,
    device: str = "auto",
    results: Path | None = RESULTS,
    progress: bool = False,
    resume: bool = True,
    command: str = "",
    report: bool = False,
) -> list[dict[str, Any]]:
    """Run (or continue) a study; returns the rows. Writes ``<name>.csv``, ``<name>.png``, ``<name>.md`` and
    ``study.json`` in ``out`` and, unless ``results`` is None, copies them to ``results/<name>_<date>.*``.
    ``report=True`` trains and evaluates nothing: the outputs hold the cached points only, and the
    missing ones are named."""
    if report and not resume:
        raise ValueError("report needs the cached points: it cannot be combined with no-resume")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    record = out / "study.json"
    spec = json.loads(json.dumps(asdict(cfg)))
    if resume and record.is_file():
        defaults = json.loads(json.dumps(asdict(dataclasses.replace(cfg, methods=StudyConfig.methods))))
        old = {**defaults, **json.loads(record.read_text()).get("config", {})}  # fields added since: defaults
        free = ("methods", "ratios")  # points are cached per method and ratio: adding or dropping some is fine
        if {k: v for k, v in old.items() if k not in free} != {k: v for k, v in spec.items() if k not in free}:
            raise ValueError(f"{out} holds a study with another configuration ({record}); use another --out")
    study = Study(cfg, data_root, out, device=device, progress=progress, resume=resume)
    env = _environment(study.exp.device)
    meta = {
        "config": spec,
        **env,
        "device": str(study.exp.device),
        "threads": torch.get_num_threads(),
        "command": command,
        "protocol": asdict(study.protocol),
        "train_images": len(study.exp.data.train),
        "test_images": len(study.exp.data.test),
    }
    record.write_text(json.dumps(meta, indent=1))
    data = "synthetic " + cfg.dataset if cfg.synthetic else cfg.dataset
    title = (
        f"{cfg.model} on {data} ({cfg.preset}: {meta['train_images']} train / {meta['test_images']} test, "
        f"{cfg.dense_epochs} dense + {cfg.atmc_epochs} ATMC epochs), {_ata_label(study.protocol)}; "
        f"{env['commit']} {env['date']}"
    )
    rows: list[dict[str, Any]] = []
    missing: list[str] = []

    def write() -> str:
        write_csv(rows, out / f"{name}.csv")
        plot(rows, out / f"{name}.png", title, study.protocol, paper)
        md = markdown(rows, cfg, paper)
        (out / f"{name}.md").write_text(f"{title}\n\n{md}")
        curves(out / "metrics.jsonl", out / f"{name}_curves.png", title)
        return md

    for p in points(cfg):
        if report and not (out / "points" / f"{p.stage}.json").is_file():
            missing.append(p.stage)
            continue
        rows.append(study.run_point(p))
        if not report:  # rewritten after every trained point: a stopped study keeps what it finished
            md = write()
    if report:  # cached points only: written once
        if not rows:
            raise ValueError(f"{out} holds no evaluated point of this study to report")
        md = write()
    if missing:
        _say(f"not evaluated yet (left out of the report): {', '.join(missing)}")
    meta["wall_seconds_last_run"] = time.perf_counter() - t0
    record.write_text(json.dumps(meta, indent=1))
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        stem = f"{name}_{env['date']}"
        for src, ext in (
            (f"{name}.csv", "csv"),
            (f"{name}.png", "png"),
            (f"{name}_curves.png", "curves.png"),
            (f"{name}.md", "md"),
            ("study.json", "json"),
        ):
            if (out / src).is_file():
                shutil.copyfile(out / src, results / f"{stem}.{ext}")
    print(md)
    return rows


def _ratios(s: str) -> tuple[float, ...]:
    vals = tuple(float(r) for r in s.split(",") if r.strip())
    if not vals or any(not (0 < r < 1 and math.isfinite(r)) for r in vals):
        raise argparse.ArgumentTypeError(f"ratios must be numbers in (0, 1), got {s!r}")
    return vals


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _flag(s: str) -> bool:
    if s.lower() not in ("0", "1", "true", "false", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")
    return s.lower() in ("1", "true", "yes")


def _type(f: dataclasses.Field):
    t = str(f.type)
    if f.name == "ratios":
        return _ratios
    if "tuple[int" in t:
        return _ints
    if "tuple[str" in t:
        return lambda v: tuple(x.strip() for x in v.split(",") if x.strip())
    if t.startswith("bool"):
        return _flag
    if t.startswith("str"):
        return str
    return float if "float" in t else int


def parser(
    prog: str, description: str, presets: dict[str, StudyConfig], default: str | None, switches: bool = True
) -> argparse.ArgumentParser:
    """The shared command line: the preset (``--<preset>`` switches, or ``--preset NAME``), ``--data-root``,
    ``--out``, one override per :class:`StudyConfig` field, device / threads / results options."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--data-root", type=Path, help="torchvision data directory holding the dataset")
    ap.add_argument("--out", type=Path, help="run directory (checkpoints, logs, outputs)")
    if switches:
        g = ap.add_mutually_exclusive_group()
        for name in presets:
            g.add_argument(
                f"--{name}",
                dest="preset",
                action="store_const",
                const=name,
                help=f"preset {name!r}" + (" (default)" if name == default else ""),
            )
        ap.set_defaults(preset=default)
    else:
        ap.add_argument(
            "--preset", choices=list(presets), required=default is None, default=default, help="the protocol to run"
        )
    for f in dataclasses.fields(StudyConfig):
        if f.name not in ("preset", "synthetic"):
            ap.add_argument("--" + f.name.replace("_", "-"), type=_type(f), help=f"override the preset's {f.name}")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="copy the outputs here (default bench/results)")
    ap.add_argument("--no-results", action="store_true", help="do not copy the outputs to --results")
    ap.add_argument("--no-resume", action="store_true", help="retrain every stage even if checkpoints exist")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument(
        "--report", action="store_true", help="train nothing: write the outputs from the points already evaluated"
    )
    return ap


def config_from_args(a: argparse.Namespace, presets: dict[str, StudyConfig]) -> StudyConfig:
    over = {
        f.name: getattr(a, f.name)
        for f in dataclasses.fields(StudyConfig)
        if f.name not in ("preset", "synthetic") and getattr(a, f.name, None) is not None
    }
    return dataclasses.replace(presets[a.preset], **over)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser("python -m bench.mnist_study", __doc__.splitlines()[0], PRESETS, "reduced")
    a = ap.parse_args(argv)
    if a.data_root is None or a.out is None:
        ap.error("--data-root and --out are required")
    cfg = config_from_args(a, PRESETS)
    if a.threads:
        torch.set_num_threads(a.threads)
    return run_cli(
        "mnist_study",
        cfg,
        a.data_root,
        a.out,
        name="mnist_study",
        paper=PAPER,
        device=a.device,
        results=None if a.no_results else a.results,
        progress=a.progress,
        resume=not a.no_resume,
        command="python -m bench.mnist_study " + " ".join(argv),
        report=a.report,
    )


def run_cli(prog: str, *args: Any, **kwargs: Any) -> int:
    """:func:`run` for a command line: 0, or 2 with a one-line ``prog: error: ...`` on a ``ValueError``."""
    try:
        run(*args, **kwargs)
    except ValueError as e:
        print(f"{prog}: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel helpers: process group from the torchrun environment, DDP wrapping, collectives.

ATMC trains with PyTorch's own engine, :class:`~torch.nn.parallel.DistributedDataParallel`:
every rank holds the whole model and the whole :class:`~atmc_triton.ADMM` state, gradients are
averaged by DDP, and the ADMM step (top-k projection with integer histograms, Lloyd) is
deterministic, so every rank computes the same weights, masks, Z, u and codebooks; by default
ADMM also broadcasts rank 0's quantizer output once per quantizer step (``sync_quantizer``).

* :func:`init_from_env` starts the process group from the variables ``torchrun`` sets
  (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ...): NCCL on CUDA (one GPU per
  process, ``cuda:LOCAL_RANK``), gloo on CPU. Without them (a plain ``python`` run) it does
  nothing, and every helper below acts as the world of one process.
* :func:`wrap_ddp` wraps a model in DDP without syncing ATMC's own buffers (Z, u, masks,
  codebooks: as large as the factors themselves) on every forward pass; they are broadcast
  from rank 0 once, at wrap time.
* :func:`shard` gives a rank its strided share of a global batch (``DistributedSampler``'s
  convention): with a global batch ``B`` and ``N`` ranks, rank ``r`` trains on rows
  ``r, r + N, ...`` of the batch one process would see, so one step of ``N`` ranks is one step
  of one process on the same global batch (BatchNorm aside: each rank normalizes by its shard's
  statistics unless the model uses ``nn.SyncBatchNorm``).

Example (one process: every helper is a no-op):
    >>> import torch
    >>> init_from_env("cpu"), world_size(), rank(), is_main()
    (device(type='cpu'), 1, 0, True)
    >>> shard(torch.arange(6)).tolist()
    [0, 1, 2, 3, 4, 5]
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from atmc_triton.config import _is_int

__all__ = [
    "agree",
    "all_reduce_",
    "atmc_state_names",
    "barrier",
    "broadcast_",
    "destroy",
    "env_world_size",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local_rank",
    "rank",
    "rank_rng_states",
    "restart_count",
    "set_rank_rng_state",
    "shard",
    "sync_buffers_",
    "world_size",
    "wrap_ddp",
]


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """``LOCAL_RANK`` as torchrun sets it (0 when unset): the process's index on its node."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def restart_count() -> int:
    """How often torchrun's elastic agent restarted this worker group (``TORCHELASTIC_RESTART_COUNT``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (the only rank that writes checkpoints, logs and results)."""
    return rank() == 0


def init_from_env(device: str | torch.device | None = "auto") -> torch.device:
    """Start the process group torchrun describes (if any) and return this rank's device.

    ``device``: ``"auto"``/``None`` (CUDA when present), ``"cpu"`` or ``"cuda"``. Under torchrun
    with CUDA, each process takes ``cuda:LOCAL_RANK`` and the NCCL backend; on CPU, gloo. An
    already initialized group is kept. Without torchrun this only resolves ``device``.

    Raises:
        ValueError: a device other than auto/cpu/cuda[:i], CUDA requested but absent, or fewer GPUs on
            this node than processes.
    """
    want = "auto" if device is None else str(device)
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(want)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:INDEX', got {want!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but no CUDA GPU is available")
    if env_world_size() <= 1:
        return dev
    if dev.type == "cuda":
        lr = local_rank()
        if dev.index is not None and dev.index != lr:
            raise ValueError(f"under torchrun each process uses cuda:LOCAL_RANK; got device {want} on local rank {lr}")
        if lr >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {lr} has no GPU: this node has {torch.cuda.device_count()}; "
                "start at most that many processes per node (--nproc-per-node)"
            )
        dev = torch.device("cuda", lr)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # torchrun's agent store outlives an elastic restart, and the world group's keys (peer addresses) are
        # the same every attempt: namespace them by attempt, or a restarted rank may dial a dead peer's port
        store, r, w = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"atmc/attempt_{restart_count()}", store)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=store, rank=r, world_size=w)
        _started.append(dist.group.WORLD)
    return dev


_started: list = []  # the process group init_from_env started (destroy() ends only that one)


def destroy() -> None:
    """Tear down the process group :func:`init_from_env` started (a group the caller made is left alone)."""
    if _started and dist.is_initialized() and dist.group.WORLD is _started[-1]:
        dist.destroy_process_group()
    _started.clear()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_(t: Tensor, op: str = "sum") -> Tensor:
    """In-place all-reduce of ``t`` over every rank (``op``: "sum", "max" or "min"); no-op for one rank."""
    if op not in ("sum", "max", "min"):  # (checked in one process too, not only where it would fail)
        raise ValueError(f"all_reduce_: op must be 'sum', 'max' or 'min', got {op!r}")
    if is_distributed():
        dist.all_reduce(t, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (contiguous) in place with rank ``src``'s values; no-op for one rank."""
    if not is_distributed():
        return
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("broadcast_ needs contiguous tensors")
        dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src)


def rank_rng_states() -> list[dict[str, Tensor]] | None:
    """Every rank's own torch generator states, gathered on every rank (``None`` for one rank): the CPU
    generator and, where CUDA is initialized, the current GPU's. Rank 0 alone writes checkpoints, and its
    process sees the other GPUs' generators untouched, so a resumed rank must take its own entry back
    (:func:`set_rank_rng_state`); the package's own draws use explicit generators, a model's dropout does not."""
    if not is_distributed():
        return None
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    out: list = [None] * world_size()
    dist.all_gather_object(out, mine)
    return out


def set_rank_rng_state(states: list[dict[str, Tensor]] | None) -> bool:
    """Restore this rank's entry of :func:`rank_rng_states` (after the checkpoint's rank-0 states); a list saved
    by another number of ranks is ignored. Returns whether an entry was restored."""
    if not is_distributed() or not isinstance(states, list) or len(states) != world_size():
        return False
    mine = states[rank()]
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"], torch.cuda.current_device())
    return True


def agree(value: int, what: str) -> int:
    """``value`` if every rank holds the same integer, else ``ValueError`` naming ``what``.

    Example:
        >>> agree(3, "resume epoch")
        3
    """
    if not is_distributed():
        return value
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    lo = torch.tensor([value, -value], dtype=torch.int64, device=dev)
    dist.all_reduce(lo, dist.ReduceOp.MIN)
    if int(lo[0]) != -int(lo[1]):
        raise ValueError(
            f"ranks disagree on the {what} ({int(lo[0])}..{-int(lo[1])}); with several nodes the "
            "output directory must be on a filesystem every node shares"
        )
    return value


def shard(t: Tensor, rank_: int | None = None, world: int | None = None) -> Tensor:
    """Rows ``rank, rank + world, ...`` of ``t`` (this rank's share of a global batch); ``rank_`` / ``world``
    default to this process's.

    Raises:
        ValueError: ``world`` not an int >= 1, or ``rank_`` not an int in ``[0, world)``.

    Example:
        >>> shard(torch.arange(8), 1, 4).tolist()
        [1, 5]
    """
    r, w = (rank() if rank_ is None else rank_), (world_size() if world is None else world)
    if not (_is_int(w) and w >= 1 and _is_int(r) and 0 <= r < w):
        raise ValueError(f"shard: rank must be an int in [0, world) and world an int >= 1, got rank {r!r}, world {w!r}")
    return t if w == 1 else t[r::w]


def atmc_state_names(model: nn.Module) -> list[str]:
    """Fully qualified names of ATMC's own buffers in ``model`` (Z, u, masks, codebooks, flags, budgets)."""
    from atmc_triton.layers import ATMCLayer

    names = [
        f"{prefix}.{b}" if prefix else b
        for prefix, m in model.named_modules()
        if isinstance(m, ATMCLayer)
        for b, _ in m.named_buffers(recurse=False)
    ]
    return names + [b for b in ("atmc_nnz_budget", "atmc_bits_budget") if b in model._buffers]


def sync_buffers_(model: nn.Module) -> None:
    """Give every rank rank 0's values of ``model``'s buffers other than ATMC's own and those DDP is told to
    ignore (``_ddp_params_and_buffers_to_ignore``): BatchNorm statistics.

    DDP broadcasts them from rank 0 at the start of each forward, and the forward then updates each rank's
    copy from its own shard: after a stage's last step the ranks differ. ``fit`` calls this before its
    end-of-epoch guard, evaluation and checkpoint, which must see one model on every rank (a guard decision
    that differed between ranks would leave one rolling back while the other waits in a collective).
    No-op for one rank.
    """
    if not is_distributed():
        return
    skip = set(atmc_state_names(model)) | set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))  # (as DDP)
    with torch.no_grad():
        broadcast_([b for n, b in model.named_buffers() if n not in skip and b.is_contiguous()])


def wrap_ddp(model: nn.Module, device: torch.device | str | None = None, **ddp_kwargs) -> nn.Module:
    """``DistributedDataParallel(model)`` for an ATMC model (a no-op returning ``model`` for one rank).

    ATMC's buffers (:func:`atmc_state_names`) are broadcast from rank 0 once and then left out
    of DDP's per-forward buffer broadcast (``broadcast_buffers`` still syncs BatchNorm
    statistics); ADMM keeps them identical across ranks itself. Call after
    :class:`~atmc_triton.ADMM` is built (``compress_`` -> ``ADMM`` -> ``wrap_ddp``).

    Example:
        >>> wrap_ddp(nn.Linear(2, 2))  # one process: nothing to wrap
        Linear(in_features=2, out_features=2, bias=True)
    """
    if not is_distributed():
        return model
    names = atmc_state_names(model)
    if names:
        bufs = dict(model.named_buffers())
        with torch.no_grad():
            broadcast_([bufs[n] for n in names if bufs[n].is_contiguous()])
        own = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))  # the caller's, kept
        model._ddp_params_and_buffers_to_ignore = own + [n for n in names if n not in own]
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)

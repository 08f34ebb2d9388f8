"""Checkpoints: atomic writes, safe loads, exact resume.

A checkpoint is a ``torch.save`` file of plain containers and tensors only, read back with
``torch.load(weights_only=True)`` (a file with pickled Python objects is refused), holding:

* ``meta``: what was trained (model and dataset names, classes, input shape, stage, the
  :class:`~atmc_triton.ATMCConfig` as a dict, protocol, schedule, seed);
* ``model``: the model's ``state_dict`` (ATMC factors, Z, u, masks, codebooks included);
* ``optimizer``: the optimizer's ``state_dict`` (ADMM: momenta, step count, current rho);
* ``epoch`` (completed epochs), ``step`` (optimizer steps) and ``rng`` (python, numpy, torch
  CPU and CUDA generator states), so a resumed run continues exactly;
* ``digest``: SHA-256 of everything else (tensor bytes, dtypes, shapes and plain values), checked
  on load: ``torch.save`` files carry no checksum of their tensor data, so without it a flipped
  bit on disk would load silently.

Files are written to a temporary file in the same directory, flushed, fsynced and renamed
over the target (``os.replace``), so a crash (even SIGKILL in the middle of a write) never
leaves a half-written checkpoint: the previous one stays in place, and the partial temporary
file is removed by :func:`remove_partial_writes` (the trainer calls it when it starts).
Loading never runs code from the file: pickled objects other than tensors and plain containers
are refused before anything is built, truncated or corrupted files and foreign files raise
:class:`CheckpointError` with one line.
:func:`export_safetensors` writes just the weights as safetensors (contiguous copies: the ATMC
factors are views into shared flat buffers, which safetensors refuses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import os
import pickle
import random
import stat
import sys
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from atmc_triton.config import ATMCConfig, _is_int

__all__ = [
    "CheckpointError",
    "atomic_save",
    "atomic_write",
    "check_loadable",
    "check_meta",
    "config_from_dict",
    "config_to_dict",
    "export_safetensors",
    "get_rng_state",
    "load_checkpoint",
    "load_safetensors",
    "payload_digest",
    "remove_partial_writes",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = "atmc-triton-checkpoint"
VERSION = 2  # 2: SHA-256 digest of the payload
_REQUIRED = {"meta": dict, "model": dict, "epoch": int, "step": int, "rng": dict, "extra": dict, "digest": str}


class CheckpointError(ValueError):
    """A checkpoint cannot be used (unreadable, unsafe, or from another model/dataset/config)."""


_TMP_SUFFIX = ".tmp"


def remove_partial_writes(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` of ``path`` left behind.

    Only call it while nothing else writes ``path``. Returns the removed paths.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / ".m.pt.x1y2.tmp").write_bytes(b"half")
        >>> [p.name for p in remove_partial_writes(d / "m.pt")]
        ['.m.pt.x1y2.tmp']
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    gone = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()
            gone.append(p)
    return gone


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask: from ``/proc/self/status`` on Linux (no race), else set and restored under a lock."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """The permission bits a file written at ``path`` takes: the existing file's, else what ``open`` would give."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_save(path: str | os.PathLike, save: Callable[[str], None]) -> Path:
    """Call ``save(tmp)`` with the name of a new temporary file next to ``path``, fsync it, then rename
    it over ``path``: an interrupted save leaves whatever was at ``path`` whole. Returns ``path``. The file
    keeps the permission bits of the one it replaces, else takes ``0o666`` less the umask (as ``open`` would).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.txt"
        >>> _ = atomic_save(p, lambda tmp: pathlib.Path(tmp).write_text("ok")); p.read_text()
        'ok'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, _new_file_mode(path))  # mkstemp made it 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = None
    try:  # make the rename durable too (not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temp file next to ``path``, fsync it, then rename it over ``path``
    (:func:`atomic_save` with an open binary file).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> _ = atomic_write(p, lambda f: f.write(b"ok")); p.read_bytes()
        b'ok'
    """

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    return atomic_save(path, save)


# -- RNG state ------------------------------------------------------------------------------
def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if initialized) CUDA generator states, as safe-to-load values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned (CUDA states only where CUDA is present)."""
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- config -----------------------------------------------------------------------------------
def config_to_dict(cfg: ATMCConfig | None) -> dict[str, Any] | None:
    """``ATMCConfig`` as plain values (``layer_bits`` as a dict)."""
    if cfg is None:
        return None
    d = dataclasses.asdict(cfg)
    d["layer_bits"] = dict(cfg.layer_bits) if cfg.layer_bits else None
    return d


def config_from_dict(d: dict[str, Any] | None) -> ATMCConfig | None:
    """Inverse of :func:`config_to_dict`."""
    return None if d is None else ATMCConfig(**d)


# -- integrity ------------------------------------------------------------------------------------
def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(obj, set):  # no order survives pickling: the members' digests, sorted
        h.update(b"<")
        for d in sorted(_digest(v) for v in obj):
            h.update(d)
        h.update(b">")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def _digest(obj: Any) -> bytes:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.digest()


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint payload without its ``digest`` entry: tensor bytes, dtypes,
    shapes and plain values, in order.

    Example:
        >>> payload_digest({"a": torch.zeros(2)}) == payload_digest({"a": torch.zeros(2)})
        True
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "digest"})
    return h.hexdigest()


# -- save / load --------------------------------------------------------------------------------
_PLAIN = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)
_DICTS = (dict, OrderedDict, Counter)  # exactly these: weights_only loading refuses a defaultdict, any dict subclass


def check_loadable(obj: Any, where: str = "payload") -> None:
    """Raise ``ValueError`` naming the first value of ``obj`` that ``torch.load(weights_only=True)``
    would refuse: anything but tensors, plain scalars, strings, dtypes, devices and containers of them of
    exactly the types it rebuilds: dict, OrderedDict, Counter, list, tuple, set, ``torch.Size`` (not a
    defaultdict, another dict subclass, a namedtuple or a frozenset). :func:`save_checkpoint` checks before
    writing, so it never writes a checkpoint :func:`load_checkpoint` then refuses.

    Example:
        >>> check_loadable({"lr": 0.1, "w": torch.zeros(2), "names": ["a", "b"]})
        >>> check_loadable({"out": Path("runs")}, "meta")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: meta['out'] is a PosixPath: a checkpoint holds only tensors, plain scalars, ...
    """
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and not isinstance(obj, nn.Parameter):
            raise ValueError(f"{where} is a {type(obj).__name__} (a tensor subclass), not a plain tensor")
        return
    if type(obj) in _DICTS:
        for k, v in obj.items():
            check_loadable(k, f"{where} key {k!r}")
            check_loadable(v, f"{where}[{k!r}]")
        if type(obj) is OrderedDict:  # its attributes are pickled too (a state_dict's _metadata)
            check_loadable(vars(obj), f"{where} attributes")
        return
    if isinstance(obj, (list, tuple, set)) and type(obj) in (list, tuple, set, torch.Size):
        for i, v in enumerate(obj):
            check_loadable(v, f"{where}[{i}]")
        return
    if type(obj) not in _PLAIN:
        raise ValueError(
            f"{where} is a {type(obj).__name__}: a checkpoint holds only tensors, plain scalars, strings and "
            "dict/OrderedDict/Counter/list/tuple/set of them (torch.load(weights_only=True) would refuse it)"
        )


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int = 0,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (see the module docstring). Returns the path.

    Raises:
        ValueError: ``model`` is not an ``nn.Module``, ``epoch`` / ``step`` are not ints >= 0, or
            ``meta`` / ``extra`` / the optimizer state hold a value :func:`load_checkpoint` would refuse
            (e.g. a ``Path`` or a config object: store ``str(path)`` / ``config_to_dict(cfg)``); nothing is
            written then.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.pt"
        >>> _ = save_checkpoint(p, model=nn.Linear(2, 2), meta={"model": "toy"}, epoch=3)
        >>> load_checkpoint(p)["epoch"]
        3
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"save_checkpoint: model must be an nn.Module, got {type(model).__name__}")
    for name, v in (("epoch", epoch), ("step", step)):
        if not (_is_int(v) and v >= 0):
            raise ValueError(f"save_checkpoint: {name} must be an int >= 0, got {v!r}")
    if not isinstance(meta, dict) or not (extra is None or isinstance(extra, dict)):
        raise ValueError("save_checkpoint: meta and extra must be dicts")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "meta": dict(meta),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "rng": get_rng_state(),
        "extra": dict(extra or {}),
    }
    for key in ("meta", "model", "optimizer", "extra"):
        check_loadable(payload[key], f"save_checkpoint: {key}")
    payload["digest"] = payload_digest(payload)
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``; refuse unsafe or foreign files.

    Raises:
        ValueError: ``map_location`` is not a device (or its name), is ``"meta"`` (no data to check
            against the checksum), or asks for CUDA where there is none.
        CheckpointError: missing file, pickled objects beyond tensors and plain containers (their
            code never runs), truncated or corrupted data (checksum), or not a file written by
            :func:`save_checkpoint`.
    """
    try:  # a bad device is the caller's mistake, not a bad file
        if not isinstance(map_location, (str, torch.device)):
            raise TypeError
        dev = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise ValueError(f"load_checkpoint: map_location must be a torch device, got {map_location!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load_checkpoint: map_location {map_location!r} asks for CUDA, which is not available")
    if dev.type == "meta":
        raise ValueError(
            "load_checkpoint: map_location 'meta' holds no data to check against the checksum; load to 'cpu'"
        )
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, not a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = [ln.strip() for ln in str(e).splitlines() if "unsupported global" in ln.lower()]
        if not found:
            raise CheckpointError(
                f"{str(path)!r} is not a readable checkpoint, truncated or corrupted (UnpicklingError)"
            ) from None
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it holds pickled Python objects, not just "
            f"tensors and plain containers (weights_only=True): {found[0][:160]}"
        ) from None
    except Exception as e:  # truncated / corrupted archives fail in many ways (zip, pickle, storage sizes)
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint, truncated or corrupted ({type(e).__name__})"
        ) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an atmc_triton checkpoint")
    if ck.get("version") != VERSION:
        raise CheckpointError(f"{str(path)!r} has checkpoint version {ck.get('version')}, expected {VERSION}")
    bad = [k for k, t in _REQUIRED.items() if not isinstance(ck.get(k), t) or (t is int and isinstance(ck[k], bool))]
    if bad:
        raise CheckpointError(
            f"{str(path)!r} is not a complete atmc_triton checkpoint (bad or missing: {', '.join(bad)})"
        )
    if payload_digest(ck) != ck["digest"]:
        raise CheckpointError(f"{str(path)!r} is corrupted: its contents do not match their SHA-256 checksum")
    return ck


def check_meta(ck: dict[str, Any], path: str | os.PathLike, **expected: Any) -> None:
    """Raise :class:`CheckpointError` (one line) if ``ck["meta"]`` disagrees with any ``expected`` value.

    Example:
        >>> check_meta({"meta": {"model": "lenet"}}, "x.pt", model="lenet")
    """
    meta = ck.get("meta", {})
    bad = [_mismatch(k, meta.get(k), v) for k, v in expected.items() if meta.get(k) != v]
    if bad:
        what = f"model {meta.get('model')!r} on {meta.get('dataset')!r}"
        raise CheckpointError(f"checkpoint {str(path)!r} is from {what}: " + ", ".join(bad))


def _mismatch(key: str, got: Any, want: Any) -> str:
    """``key=got (expected want)``; of two dicts (a protocol, a config) only the entries that differ."""
    if isinstance(got, dict) and isinstance(want, dict):
        keys = [k for k in {**want, **got} if k not in got or k not in want or got[k] != want[k]]
        got, want = {k: got[k] for k in keys if k in got}, {k: want[k] for k in keys if k in want}
    return f"{key}={got!r} (expected {want!r})"


def export_safetensors(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.state_dict()`` as safetensors (contiguous CPU copies; no shared storage), atomically.

    Example:
        >>> import tempfile, pathlib
        >>> p = export_safetensors(nn.Linear(2, 2), pathlib.Path(tempfile.mkdtemp()) / "m.safetensors")
        >>> sorted(load_safetensors(p))
        ['bias', 'weight']
    """
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return atomic_write(path, lambda f: f.write(blob))


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (load them with ``model.load_state_dict``).

    Raises:
        CheckpointError: missing, truncated or malformed file (safetensors holds no code, and its
            header is checked against the file size before any tensor is read).
    """
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CheckpointError(f"safetensors file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors_rust.SafetensorError, OSError, ...
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({type(e).__name__}: {msg})") from None

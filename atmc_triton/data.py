"""Datasets as in-memory tensors with inputs in ``[0, 1]`` and reproducible batching.

* ``digits`` (the embedded default, needs no files): scikit-learn's real 8x8 handwritten digits
  (1,797 images, pixel values 0..16 scaled to ``[0, 1]``), a deterministic stratified 80/20
  split (1,437 train / 360 test).
* ``mnist``, ``cifar10``, ``cifar100``, ``svhn``: torchvision's datasets under ``root``
  (``download=True`` fetches them when online; offline, ``root`` must already hold them).
  Images are kept as uint8 and scaled by 1/255 per batch, exactly what ``ToTensor`` gives;
  no normalization here (models normalize inside, see :mod:`atmc_triton.models`).

Batches come from :func:`iterate_batches`, whose order and augmentation depend only on the
``torch.Generator`` it is given, so a run resumed at epoch ``e`` sees the same data as an
uninterrupted one (the trainer seeds one generator per epoch).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from atmc_triton.config import _is_int

__all__ = [
    "DATASETS",
    "DataBundle",
    "DataError",
    "DataSpec",
    "Split",
    "iterate_batches",
    "load_dataset",
    "synthetic_dataset",
    "with_subsets",
]


class DataError(ValueError):
    """A dataset cannot be loaded (unknown name, missing files); the message is one line."""


@dataclass(frozen=True)
class DataSpec:
    """What a dataset looks like: classes, one input's ``(C, H, W)``, channel stats, augmentation."""

    num_classes: int
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop: int = 0  # random-crop padding for training batches (0 = none)
    flip: bool = False  # random horizontal flips for training batches


DATASETS: dict[str, DataSpec] = {
    "digits": DataSpec(10, (1, 8, 8)),
    "mnist": DataSpec(10, (1, 28, 28)),
    "cifar10": DataSpec(10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), crop=4, flip=True),
    "cifar100": DataSpec(100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), crop=4, flip=True),
    "svhn": DataSpec(10, (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), crop=4),
}


@dataclass(frozen=True)
class Split:
    """``x [N, C, H, W]`` (uint8 read as ``x / 255``, or float in ``[0, 1]``) and labels ``y [N]``
    (any integer dtype, stored as int64; class indices, so ``>= 0``).

    Raises:
        ValueError: other shapes, ``x`` neither uint8 nor float, float ``x`` outside ``[0, 1]`` or not finite
            (e.g. images in ``0..255`` as floats, or already normalized: normalize inside the model), or labels
            not integers or negative.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self):
        if self.x.dim() != 4 or self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"Split needs x [N, C, H, W] and y [N], got {tuple(self.x.shape)}, {tuple(self.y.shape)}")
        if not (self.x.dtype == torch.uint8 or self.x.dtype.is_floating_point):
            raise ValueError(f"Split needs uint8 or floating-point x, got {self.x.dtype}")
        if self.y.dtype.is_floating_point or self.y.dtype.is_complex or self.y.dtype == torch.bool:
            raise ValueError(f"Split needs integer class labels y, got {self.y.dtype}")
        if self.x.dtype.is_floating_point and self.x.numel():
            lo, hi = (float(v) for v in torch.aminmax(self.x))
            if not (lo >= 0.0 and hi <= 1.0):  # (False for NaN too)
                raise ValueError(
                    f"Split needs float x in [0, 1] (uint8 for 0..255), got values in [{lo:g}, {hi:g}]; "
                    "scale images to [0, 1] and normalize inside the model (Normalize)"
                )
        if self.y.numel() and int(self.y.min()) < 0:
            raise ValueError(f"Split needs class labels >= 0, got {int(self.y.min())}")
        if self.y.dtype != torch.long:
            object.__setattr__(self, "y", self.y.long())

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: Tensor, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Rows ``idx`` as ``(float32 x in [0, 1], int64 y)`` on ``device``."""
        # asynchronous only towards a GPU: a copy to the host returns before its data has arrived (a blocking
        # host-to-GPU copy of the indices would wait for the stream every batch, when the split is on the GPU)
        idx = idx.to(self.x.device, non_blocking=self.x.device.type == "cuda")
        nb = device is not None and torch.device(device).type == "cuda"
        x = self.x[idx].to(device, non_blocking=nb)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return x, self.y[idx].to(device, non_blocking=nb)

    def to(self, device: torch.device | str | None) -> Split:
        """This split with its tensors on ``device`` (e.g. the whole dataset on the GPU)."""
        return Split(self.x.to(device), self.y.to(device))

    def subset(self, n: int | None, seed: int = 0) -> Split:
        """A seeded random subset of ``n`` rows (all rows when ``n`` is None or too large)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return Split(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class DataBundle:
    """A dataset: ``name``, ``spec`` (:class:`DataSpec`), ``train`` and ``test`` :class:`Split`.

    Raises:
        ValueError: a split whose inputs are not shaped ``spec.in_shape`` or whose labels are not below
            ``spec.num_classes`` (the model is built from ``spec``).
    """

    name: str
    spec: DataSpec
    train: Split
    test: Split

    def __post_init__(self):
        for part, sp in (("train", self.train), ("test", self.test)):
            if tuple(sp.x.shape[1:]) != tuple(self.spec.in_shape):
                raise ValueError(
                    f"DataBundle {self.name!r}: {part} inputs are {tuple(sp.x.shape[1:])}, "
                    f"the spec says {tuple(self.spec.in_shape)}"
                )
            if len(sp) and int(sp.y.max()) >= self.spec.num_classes:
                raise ValueError(
                    f"DataBundle {self.name!r}: {part} label {int(sp.y.max())} is not below the spec's "
                    f"{self.spec.num_classes} classes"
                )


def _digits() -> tuple[Split, Split]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    y = torch.from_numpy(d.target).long()
    itr, ite = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, stratify=y.numpy(), random_state=0)
    itr, ite = torch.from_numpy(itr), torch.from_numpy(ite)
    return Split(x[itr], y[itr]), Split(x[ite], y[ite])


def _torchvision(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    import torchvision.datasets as tvd

    def one(train: bool) -> Split:
        if name == "mnist":
            ds = tvd.MNIST(str(root), train=train, download=download)
            return Split(ds.data.unsqueeze(1).contiguous(), ds.targets.long())
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(str(root), train=train, download=download)
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # [N, 32, 32, 3] -> [N, 3, 32, 32]
            return Split(x, torch.tensor(ds.targets, dtype=torch.long))
        ds = tvd.SVHN(str(root), split="train" if train else "test", download=download)
        return Split(torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels).long())

    try:
        return one(True), one(False)
    except (RuntimeError, OSError) as e:
        hint = "" if download else "; pass --download (needs internet) or --data-root DIR holding it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load {name} from {root}: {first}{hint}") from None


def _check_subsets(where: str, subset, test_subset, seed) -> None:
    for arg, v in (("subset", subset), ("test_subset", test_subset)):
        if v is not None and not (_is_int(v) and v >= 1):
            raise DataError(f"{where}: {arg} must be None or an int >= 1, got {v!r}")
    if not _is_int(seed):
        raise DataError(f"{where}: seed must be an int, got {seed!r}")


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
) -> DataBundle:
    """Load ``name`` (one of ``DATASETS``) as a :class:`DataBundle`.

    ``root`` is the torchvision data directory (``--data-root``; default ``./data``), ignored for
    ``digits``. ``subset`` / ``test_subset`` keep seeded random subsets of the splits.

    Example:
        >>> d = load_dataset("digits")
        >>> len(d.train), len(d.test), tuple(d.train.x.shape[1:])
        (1437, 360, (1, 8, 8))
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    _check_subsets("load_dataset", subset, test_subset, seed)  # before any file is read
    spec = DATASETS[name]
    if name == "digits":
        train, test = _digits()
    else:
        path = Path(root if root is not None else "data").expanduser()
        if not download and not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise DataError(
                f"data root {str(path)!r} {what}; pass --data-root DIR holding {name}, or --download (needs internet)"
            )
        if download:
            path.mkdir(parents=True, exist_ok=True)
        train, test = _torchvision(name, path, download)
    return DataBundle(name, spec, train.subset(subset, seed), test.subset(test_subset, seed + 1))


def synthetic_dataset(name: str, n_train: int = 64, n_test: int = 32, seed: int = 0) -> DataBundle:
    """Random inputs and labels shaped like ``name`` (for tests of the CIFAR / SVHN paths offline).

    Example:
        >>> tuple(synthetic_dataset("cifar10", 4, 2).train.x.shape)
        (4, 3, 32, 32)
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    spec = DATASETS[name]
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        x = torch.randint(0, 256, (n, *spec.in_shape), generator=g, dtype=torch.uint8)
        return Split(x, torch.randint(0, spec.num_classes, (n,), generator=g))

    return DataBundle(name, spec, split(n_train), split(n_test))


def _augment(x: Tensor, spec: DataSpec, g: torch.Generator) -> Tensor:
    """Random crop (zero padding ``spec.crop``) and horizontal flip of ``x [B, C, H, W]``, driven by ``g``."""
    b, _, h, w = x.shape
    if spec.crop:
        p = spec.crop
        xp = torch.nn.functional.pad(x, (p, p, p, p))
        i = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device, non_blocking=True)  # (no stream wait)
        j = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device, non_blocking=True)
        rows = (i[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
        cols = (j[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
        bidx = torch.arange(b, device=x.device)[:, None, None, None]
        cidx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[bidx, cidx, rows, cols]
    if spec.flip:
        flip = (torch.rand(b, generator=g) < 0.5).to(x.device, non_blocking=True)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    spec: DataSpec | None = None,
    device: torch.device | str | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x [B, C, H, W] float in [0, 1], y [B])`` batches.

    With a (CPU) ``generator`` the order is a permutation drawn from it and, when ``spec`` is
    given, training augmentation (crop / flip per ``spec``) is drawn from it too; without one,
    batches come in order, unaugmented (evaluation). The last batch may be smaller; ``drop_last``
    leaves it out, except when the whole split is smaller than ``batch_size``: then that one short
    batch is still yielded (an epoch always has a step).

    Raises:
        ValueError: ``batch_size`` not an int >= 1.

    Example:
        >>> d = load_dataset("digits")
        >>> x, y = next(iterate_batches(d.train, 32, generator=torch.Generator().manual_seed(0)))
        >>> tuple(x.shape), float(x.min()) >= 0.0, float(x.max()) <= 1.0
        ((32, 1, 8, 8), True, True)
    """
    if not (_is_int(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for s in range(0, stop, batch_size):
        x, y = split.take(order[s : s + batch_size], device)
        if generator is not None and spec is not None and (spec.crop or spec.flip):
            x = _augment(x, spec, generator)
        yield x, y


def with_subsets(bundle: DataBundle, subset: int | None, test_subset: int | None, seed: int = 0) -> DataBundle:
    """``bundle`` with seeded random subsets of its splits (as :func:`load_dataset`'s ``subset`` / ``test_subset``).

    Raises:
        DataError: a subset size not None or an int >= 1, or a seed not an int.
    """
    _check_subsets("with_subsets", subset, test_subset, seed)
    return replace(bundle, train=bundle.train.subset(subset, seed), test=bundle.test.subset(test_subset, seed + 1))

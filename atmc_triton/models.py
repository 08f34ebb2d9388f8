"""The paper's models (Caffe-LeNet, ResNet34 for CIFAR, WRN-16-8 for SVHN) and a small CNN for 8x8 digits.

Every model takes inputs in ``[0, 1]``; any normalization is a :class:`Normalize` module inside
the model (the torchattacks / AutoAttack convention), so attacks work in pixel space.
Dense sizes (conv + linear weights, biases and norms excluded, ``atmc_triton.dense_bits``):

============================  ==========  ============
model                         weights     32-bit size
============================  ==========  ============
``lenet`` (MNIST)               430,500    13,776,000
``resnet34`` (CIFAR-10)      21,265,088   680,482,816
``resnet34`` (CIFAR-100)     21,311,168   681,957,376
``wrn16_8`` (SVHN)           10,954,160   350,533,120
============================  ==========  ============

(ResNet34 and WRN count their 1x1 projection shortcuts.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

from atmc_triton.config import _is_int

__all__ = [
    "MODELS",
    "CaffeLeNet",
    "CifarResNet",
    "DigitsCNN",
    "Normalize",
    "WideResNet",
    "build_model",
    "external_model",
    "is_model_name",
]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as buffers (so it travels with ``state_dict``).

    Example:
        >>> Normalize([0.5], [0.25])(torch.ones(1, 1, 2, 2)).flatten().tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"Normalize needs one mean and one positive std per channel, got {mean}, {std}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _norm(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> nn.Module:
    """A :class:`Normalize` for ``channels`` input channels (``nn.Identity`` without ``mean`` / ``std``)."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    for what, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) != channels:
            raise ValueError(f"{what} needs one value per input channel ({channels}), got {len(v)}")
    return nn.Identity() if mean is None else Normalize(mean, std)


class CaffeLeNet(nn.Module):
    """Caffe's LeNet: conv20 5x5 - maxpool - conv50 5x5 - maxpool - fc500 - ReLU - fc.

    ``x [N, C, H, W] -> logits [N, num_classes]``; 430,500 weights on MNIST (1x28x28).

    Example:
        >>> CaffeLeNet()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_shape: Sequence[int] = (1, 28, 28),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        c, h, w = in_shape
        self.normalize = _norm(mean, std, c)
        self.features = nn.Sequential(nn.Conv2d(c, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2))
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise ValueError(f"CaffeLeNet needs inputs of at least 16x16, got {h}x{w}")
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * fh * fw, 500), nn.ReLU(inplace=True), nn.Linear(500, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))


class CifarResNet(ResNet):
    """torchvision's ResNet with the CIFAR stem: 3x3 stride-1 conv, no max-pool.

    ``resnet34`` = ``BasicBlock`` x ``[3, 4, 6, 3]``: 21,265,088 weights for 10 classes.

    Example:
        >>> CifarResNet([1, 1, 1, 1], num_classes=4)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 4])
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 10,
        in_shape: Sequence[int] = (3, 32, 32),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(BasicBlock, list(layers), num_classes=num_classes)
        self.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()
        self.normalize = _norm(mean, std, in_shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_impl(self.normalize(x))


class _WideBlock(nn.Module):
    """Pre-activation wide basic block (BN-ReLU-conv3x3-BN-ReLU-conv3x3, 1x1 projection if shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv2(self.dropout(self.relu(self.bn2(self.conv1(o)))))
        return o + skip


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis): widths 16, 16k, 32k, 64k, ``(depth - 4) / 6`` blocks per group.

    WRN-16-8 has 10,954,160 weights for 10 classes.

    Example:
        >>> WideResNet(depth=10, widen=1, num_classes=3)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 3])
    """

    def __init__(
        self,
        depth: int = 16,
        widen: int = 8,
        num_classes: int = 10,
        in_shape: Sequence[int] = (3, 32, 32),
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.normalize = _norm(mean, std, in_shape[0])
        self.conv1 = nn.Conv2d(in_shape[0], widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for g, cout in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(_WideBlock(cin, cout, (1 if g == 0 else 2) if i == 0 else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        o = self.blocks(self.conv1(self.normalize(x)))
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(o))), 1))


class DigitsCNN(nn.Module):
    """Small CNN for scikit-learn's 8x8 digits: conv32 3x3 - ReLU - conv64 3x3/2 - ReLU - fc128 - ReLU - fc.

    151,072 weights on 1x8x8 inputs (the embedded default of ``atmc train``).

    Example:
        >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_shape: Sequence[int] = (1, 8, 8),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        c, h, w = in_shape
        self.normalize = _norm(mean, std, c)
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        flat = 64 * ((h + 1) // 2) * ((w + 1) // 2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": CaffeLeNet,
    "resnet34": CifarResNet,
    "wrn16_8": lambda **kw: WideResNet(depth=16, widen=8, **kw),
    "digits_cnn": DigitsCNN,
}


EXTERNAL_PREFIXES = ("tv:", "timm:")
TV_AUX_LOGITS = ("googlenet", "inception_v3")  # built with aux_logits=False (their train-mode output is a tuple)


def is_model_name(name: str) -> bool:
    """Whether ``name`` is a built-in model or a ``tv:NAME`` / ``timm:NAME`` architecture."""
    return name in MODELS or (isinstance(name, str) and name.startswith(EXTERNAL_PREFIXES) and ":" != name[-1])


def _adapt_stem(model: nn.Module, in_chans: int) -> None:
    """Rebuild the first ``nn.Conv2d`` of a torchvision model for ``in_chans`` input channels, initialized like the
    one it replaces: weights (and a nonzero bias) drawn from a normal with the replaced tensor's standard deviation,
    a zero bias kept zero. That is the family's own init wherever it does not depend on the input channels
    (``kaiming_normal_(mode="fan_out")`` in the ResNets, VGGs, MobileNets, EfficientNets; a fixed std elsewhere),
    where PyTorch's default for a new conv (``kaiming_uniform_(a=sqrt(5))``, fan-in based) gives the 7x7 ResNet stem
    about 3x the std at one channel. (A fan-in init, as ViT's patch projection, keeps the 3-channel std.)"""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_chans:
                    if child.groups != 1:
                        raise ValueError(f"cannot adapt a grouped stem conv to {in_chans} input channels")
                    conv = nn.Conv2d(
                        in_chans,
                        child.out_channels,
                        child.kernel_size,
                        child.stride,
                        child.padding,
                        child.dilation,
                        1,
                        child.bias is not None,
                        child.padding_mode,
                    )
                    with torch.no_grad():
                        for new, old in ((conv.weight, child.weight), (conv.bias, child.bias)):
                            if new is None:
                                continue
                            if bool((old == 0).all()):
                                new.zero_()
                            else:
                                new.normal_(0.0, float(old.float().std()))
                    setattr(parent, name, conv)
                return


def external_model(name: str, num_classes: int, in_shape: Sequence[int]) -> nn.Module:
    """A randomly initialized torchvision (``tv:NAME``) or timm (``timm:NAME``) classifier for inputs
    of ``in_shape = (C, H, W)`` with ``num_classes`` outputs (``in_chans`` and, for vision
    transformers, the image size set).

    Example:
        >>> external_model("tv:resnet18", 10, (1, 28, 28))(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    kind, _, arch = name.partition(":")
    c, h, w = (int(s) for s in in_shape)
    try:
        if kind == "tv":
            import torchvision

            if arch not in torchvision.models.list_models(torchvision.models):
                raise ValueError(f"torchvision has no classification model {arch!r}")
            # GoogLeNet and Inception v3 return (logits, aux logits) tuples in train mode: plain logits instead
            kw = {"aux_logits": False} if arch in TV_AUX_LOGITS else {}
            try:  # vision transformers need the image size
                model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, image_size=h, **kw)
            except TypeError:
                model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kw)
            else:
                if h != w:  # (its forward would fail on the promised input)
                    raise ValueError(f"{name} takes square images (one image_size), got in_shape {tuple(in_shape)}")
            _adapt_stem(model, c)
        elif kind == "timm":
            import timm

            if not timm.is_model(arch):
                raise ValueError(f"timm has no model {arch!r}")
            try:
                model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=c, img_size=(h, w))
            except TypeError:
                model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=c)
        else:
            raise ValueError(f"unknown model source {kind!r}")
    except ImportError as e:
        raise ValueError(f"model {name!r} needs the {kind} package ({e})") from None
    except (AssertionError, RuntimeError) as e:  # e.g. a ViT whose patch size does not divide the image
        msg = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(f"model {name!r} cannot be built for inputs {tuple(in_shape)}: {msg}") from None
    return model


def build_model(
    name: str,
    num_classes: int = 10,
    in_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """A fresh model from the registry ``MODELS`` (``lenet``, ``resnet34``, ``wrn16_8``, ``digits_cnn``),
    or any torchvision / timm classifier as ``tv:NAME`` / ``timm:NAME`` (:func:`external_model`).

    ``in_shape = (C, H, W)`` of one input (default: the model's usual dataset; required for
    ``tv:`` / ``timm:``); ``mean``/``std`` add a :class:`Normalize` in front, one value per input
    channel (``ValueError`` otherwise, also against the default ``in_shape``).

    Example:
        >>> import atmc_triton as at
        >>> at.dense_bits(build_model("lenet", 10, (1, 28, 28)))
        13776000
    """
    if not is_model_name(name):
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}, tv:NAME or timm:NAME")
    if not (_is_int(num_classes) and num_classes >= 2):  # (numpy's integers too; not a bool)
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    num_classes = int(num_classes)  # (mean / std are checked against the channels by _norm, where they are used)
    if name not in MODELS:
        if in_shape is None or len(in_shape) != 3:
            raise ValueError(f"{name} needs in_shape=(C, H, W)")
        return nn.Sequential(_norm(mean, std, int(in_shape[0])), external_model(name, num_classes, in_shape))
    kw: dict = {"num_classes": num_classes, "mean": mean, "std": std}
    if in_shape is not None:
        if len(in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {tuple(in_shape)}")
        kw["in_shape"] = tuple(int(s) for s in in_shape)
    return MODELS[name](**kw)

"""The whole chain on torchvision and timm architectures (reduced widths, small inputs, CPU):
compress_ -> 2 ADMM steps -> finalize_ -> pack_ -> forward -> save_packed / load_packed ->
forward -> export_dense -> forward, plus torch.export / ONNX of the exported copy and torch.export of the packed
model with a dynamic batch."""

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import atmc_triton as at

tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from torchvision.models import convnext, densenet, efficientnet, resnet  # noqa: E402


def _tv_vit():
    m = tv.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    nn.init.normal_(m.heads.head.weight, std=0.1)  # torchvision zero-inits the head: a constant model
    return m


def _tv_efficientnet():
    setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return efficientnet.EfficientNet(setting, 0.2, last_channel=last, num_classes=10)


def _tv_convnext():
    cfg = [convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, 64, 1), convnext.CNBlockConfig(64, None, 1)]
    return convnext.ConvNeXt(cfg, num_classes=10)


# name: (factory, input size); mobilenetv3_small_100 at its real width, resnet18 one block per stage
MODELS = {
    "tv:resnet18": (lambda: resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10), 32),
    "tv:mobilenet_v3_small": (lambda: tv.models.mobilenet_v3_small(num_classes=10, width_mult=0.5), 32),
    "tv:efficientnet_b0": (_tv_efficientnet, 32),
    "tv:convnext_tiny": (_tv_convnext, 32),
    "tv:vit_b_16": (_tv_vit, 32),
    "tv:densenet121": (
        lambda: densenet.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=10),
        32,
    ),
    "timm:vit_tiny_patch16_224": (
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=10),
        32,
    ),
    "timm:deit_tiny_patch16_224": (
        lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, depth=2, num_classes=10),
        32,
    ),
    "timm:convnext_atto": (
        lambda: timm.create_model("convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=10),
        32,
    ),
    "timm:mobilenetv3_small_100": (lambda: timm.create_model("mobilenetv3_small_100", num_classes=10), 32),
}
RATIO = 0.05
# per-model overrides (kept empty: every model runs at RATIO with the default floor)
RATIOS: dict[str, float] = {}
EXCLUDE: dict[str, tuple[str, ...]] = {}


@torch.no_grad()
def _build(name):
    """The model with BatchNorm statistics of random batches, as a trained model has: with the
    default ones (mean 0, var 1) torchvision's reduced EfficientNet gives outputs of ~1e-11 even dense."""
    torch.manual_seed(0)
    factory, size = MODELS[name]
    model = factory().train()
    gen = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average
    for _ in range(2):
        model(torch.rand(8, 3, size, size, generator=gen))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0  # frozen from here: two batch-2 training steps would skew them
    return model.eval(), torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _types(model):
    return {type(m).__name__ for m in model.modules()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_whole_chain(name, tmp_path):
    torch.set_num_threads(1)
    model, x = _build(name)
    with torch.no_grad():
        y_dense = model(x)
    ratio = RATIOS.get(name, RATIO)
    cfg = at.ATMCConfig(ratio=ratio, bits=4, quant_interval=2, exclude=EXCLUDE.get(name))  # the quantizer runs once
    with warnings.catch_warnings():
        warnings.simplefilter("error", at.CollapseWarning)  # the default floor must fit every model here
        report = at.compress_(model, cfg, return_report=True)
    assert report.swapped and report.nnz_budget > report.floor > 0
    with torch.no_grad():  # identity init: outputs unchanged by compress_
        assert torch.allclose(model(x), y_dense, rtol=1e-4, atol=1e-4 * float(y_dense.abs().max()))
    model.train()
    opt = at.ADMM(model, cfg, lr=1e-3)
    y = torch.tensor([0, 1])
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", at.CollapseWarning)  # the output still depends on the input
        at.finalize_(model)
        rep = at.size_report(model)
    assert at.check_input_dependence(model, x, warn=False) == 0
    assert rep.total_bits <= ratio * rep.dense_bits  # the budget holds
    for lname, layer in at.atmc_layers(model):  # no layer pruned away
        assert sum(int((p != 0).sum()) for _, p in layer.factors()) > 0, lname
    assert rep.dense_params == report.dense_params and 0 <= rep.dense_share < 1
    assert rep.model_ratio <= ratio + rep.dense_share  # whole model: the dense share is what is added
    assert 0 < rep.file_ratio < 1
    with torch.no_grad():
        y_fin = model(x)
        plain = at.export_dense(model)
        assert torch.equal(plain(x), y_fin)  # export: bit-identical
        at.pack_(model)
        y_pack = model(x)
        assert torch.allclose(y_pack, y_fin, rtol=1e-4, atol=1e-5 * (1 + float(y_fin.abs().max())))
        path = tmp_path / "m.safetensors"
        at.save_packed(model, path)
        fresh, _ = _build(name)
        at.load_packed(fresh, path).eval()
        assert torch.equal(fresh(x), y_pack)  # load: bit-identical to the packed model
        plain2 = at.export_dense(fresh)
        assert torch.equal(plain2(x), y_fin)  # the packed factors are the finalized ones, exactly
    assert not any(t.startswith(("ATMC", "Packed")) for t in _types(plain2))
    assert not any(k.startswith("atmc_") for k in plain2.state_dict())


@functools.lru_cache
def _exported(name):
    model, x = _build(name)
    cfg = at.ATMCConfig(ratio=0.1, bits=4)
    at.finalize_(at.compress_(model, cfg), check_input=False)
    at.pack_(model)
    return at.export_dense(model).eval(), x


@pytest.mark.parametrize("name", ["tv:vit_b_16", "tv:mobilenet_v3_small"])
def test_torch_export_of_exported_model(name):
    plain, x = _exported(name)
    ep = torch.export.export(plain, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), plain(x), atol=1e-6)


@pytest.mark.parametrize("name", ["tv:vit_b_16", "tv:mobilenet_v3_small"])
def test_onnx_export_runs_in_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    plain, x = _exported(name)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (x,), str(path), dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = plain(x).numpy()
    assert abs(got - want).max() <= 1e-4 * (1 + abs(want).max())


@pytest.mark.parametrize("name", ["tv:vit_b_16", "tv:mobilenet_v3_small"])
def test_torch_export_of_packed_model_with_dynamic_batch(name):
    model, x = _build(name)
    at.finalize_(at.compress_(model, at.ATMCConfig(ratio=0.1, bits=4)), check_input=False)
    at.pack_(model).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    with torch.no_grad():
        for xn in (x[:1], torch.cat([x, x, x[:1]])):  # batch sizes other than the traced one
            torch.testing.assert_close(ep.module()(xn), model(xn), rtol=1e-5, atol=1e-5)

"""Packed inference models: pack_ / unpack, state dicts, safetensors round trips, sizes, accuracy.

CPU forwards run the reference (dequantize + matmul); the ``gpu`` tests run the Triton kernels, and
with ``TRITON_INTERPRET=1`` the same tests run them on CPU in Triton's interpreter (``triton_on_cpu``).
"""

import copy
import json
import os
import struct

import pytest
import torch
from atmc_triton.kernels.packed_format import FMT_BITMAP, FMT_CSR, FMT_DENSE, FMT_EMPTY
from helpers import lenet, small_cnn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import CompileCounter

import atmc_triton as at
from atmc_triton import packed as pk

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

ATMC_SUFFIXES = ("U", "V", "C", "_z", "_u", "_mask", "codebook", "finalized", "bits", "identity")


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def finalized(model: nn.Module, bits=4, ratio=0.2, init="identity", steps=2, x=None, y=None) -> nn.Module:
    """``model`` compressed, trained ``steps`` ADMM steps (so U, V and C all move), finalized, in eval mode."""
    cfg = at.ATMCConfig(ratio=ratio, bits=bits, init=init, quant_interval=1)
    at.compress_(model, cfg)
    if steps:
        opt = at.ADMM(model, cfg, lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return at.finalize_(model).eval()


def bits_of(sd: dict, signed_zeros: bool = True) -> dict:
    """Tensors as raw bytes (bit-exact comparisons); ``signed_zeros=False`` first maps -0.0 to +0.0."""

    def raw(v):
        if not signed_zeros and v.is_floating_point():
            v = torch.where(v == 0, torch.zeros_like(v), v)
        return v.reshape(-1).contiguous().view(torch.uint8).tolist()

    return {k: (v.dtype, tuple(v.shape), raw(v)) for k, v in sd.items()}


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(1)
    x, y = torch.rand(16, 3, 10, 10), torch.randint(0, 5, (16,))
    return finalized(small_cnn(), bits=3, ratio=0.3, x=x, y=y), x


# --- pack_ / unpack --------------------------------------------------------------------------------------------------


@settings(max_examples=max(3, settings.default.max_examples // 3))  # follows the profile: 8 in ci, 100 thorough
@given(
    bits=st.sampled_from([1, 2, 4, 8, None]),
    ratio=st.sampled_from([0.02, 0.1, 0.5]),
    init=st.sampled_from(["identity", "svd", "sparse"]),
    seed=st.integers(0, 99),
)
def test_packed_forward_equals_finalized_and_unpack_is_exact(bits, ratio, init, seed):
    torch.manual_seed(seed)
    x, y = torch.rand(8, 3, 9, 9), torch.randint(0, 5, (8,))
    model = finalized(small_cnn(), bits=bits, ratio=ratio, init=init, x=x, y=y)
    want = model(x)
    before = bits_of(model.state_dict(), signed_zeros=False)  # packed zeros are +0.0
    packed = pk.pack_(copy.deepcopy(model))
    assert not at.atmc_layers(packed) and len(pk.packed_layers(packed)) == 4
    assert max_rel(packed(x), want) <= 1e-5
    back = pk.unpack(packed)
    assert all(type(a) is type(b) for a, b in zip(back.modules(), model.modules()))
    assert bits_of(back.state_dict()) == before
    assert at.is_finalized(back) and torch.equal(back(x), want)


def test_pack_is_a_noop_on_packed_layers(cnn):
    model, x = cnn
    packed = pk.pack_(copy.deepcopy(model))
    layers = [m for _, m in pk.packed_layers(packed)]
    assert pk.pack_(packed) is packed
    assert [m for _, m in pk.packed_layers(packed)] == layers  # the same objects


def test_pack_refuses_unfinalized_and_empty_models():
    model = at.compress_(small_cnn(), at.ATMCConfig(ratio=0.2, bits=4))
    with pytest.raises(ValueError, match="not finalized: call atmc_triton.finalize_"):
        pk.pack_(model)
    with pytest.raises(ValueError, match="no ATMC layers"):
        pk.pack_(small_cnn())
    with pytest.raises(ValueError, match="wrap a bare layer"):
        pk.pack_(model[0])
    with pytest.raises(ValueError, match="no packed layers"):
        pk.unpack(small_cnn())
    with pytest.raises(ValueError, match="not finalized"):
        pk.PackedLayer.from_atmc(model[0])


def test_shared_module_stays_shared():
    lin = nn.Linear(6, 6)
    model = finalized(nn.Sequential(lin, nn.ReLU(), lin), bits=2, ratio=0.5, steps=0)
    packed = pk.pack_(model)
    assert packed[0] is packed[2] and isinstance(packed[0], pk.PackedLinear)


def test_state_dict_holds_only_packed_tensors(cnn):
    model, _ = cnn
    packed = pk.pack_(copy.deepcopy(model))
    sd = packed.state_dict()
    for name, layer in pk.packed_layers(packed):
        keys = {k[len(name) + 1 :] for k in sd if k.startswith(name + ".")}
        want = {f"{f}_{p}" for f in "UVC" for p in ("codes", "book", "indptr", "indices")}
        assert keys == want | ({"bias"} if layer.bias is not None else set())
        for f in "UVC":
            assert sd[f"{name}.{f}_codes"].dtype == torch.int32
            assert sd[f"{name}.{f}_book"].numel() <= 2**3 + 1
    assert not any(k.endswith(ATMC_SUFFIXES) for k in sd if not k.startswith("atmc_"))


def known_formats() -> nn.Module:
    """A finalized ``Linear(200, 64)`` whose U is dense-coded (4 levels), V CSR (3 nonzeros), C empty."""
    torch.manual_seed(0)
    model = finalized(nn.Sequential(nn.Linear(200, 64)), bits=2, ratio=0.5, init="svd", steps=0)
    layer = model[0]
    with torch.no_grad():
        levels = torch.tensor([-1.0, -0.5, 0.5, 1.0])
        layer.U.copy_(levels[torch.randint(0, 4, layer.U.shape)])
        layer.V.zero_()
        layer.V[0, 0], layer.V[3, 199], layer.V[3, 7] = 1.5, -0.5, 0.25
        layer.C.zero_()
    return model


def test_formats_follow_density():
    model = known_formats()
    packed = pk.pack_(model)[0]
    assert packed.fmts == {"U": FMT_DENSE, "V": FMT_CSR, "C": FMT_EMPTY}
    assert packed.V_indices.dtype == torch.int16 and packed.V_indptr.numel() == packed.rank + 1
    assert packed.U_book.tolist() == [0.0, -1.0, -0.5, 0.5, 1.0] and packed.U_codes.numel() == 64 * 64 * 3 // 32 + 1
    assert packed.C_codes.numel() == packed.C_book.numel() == 0


def bitmap_model() -> nn.Module:
    """``known_formats`` with C a 30 %-dense factor over 3 levels, which packs smallest as a bitmap."""
    model = known_formats()
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        keep = torch.rand(64, 200, generator=g) < 0.3
        model[0].C.copy_(
            torch.where(keep, torch.tensor([-0.25, 0.25, 0.75])[torch.randint(0, 3, (64, 200), generator=g)], 0.0)
        )
    return model


def test_bitmap_layer_packs_saves_loads_and_unpacks_exactly(tmp_path):
    model = bitmap_model()
    x = torch.randn(5, 200)
    assert pk.pack_(copy.deepcopy(model))[0].fmts["C"] == FMT_DENSE  # the default keeps the faster formats
    with pytest.raises(ValueError, match="formats must be one of"):
        pk.pack_(copy.deepcopy(model), formats="smallest")
    packed = pk.pack_(copy.deepcopy(model), formats="size")
    layer = packed[0]
    assert layer.fmts == {"U": FMT_DENSE, "V": FMT_CSR, "C": FMT_BITMAP}
    assert layer.C_indices.dtype == torch.int32 and layer.C_indices.numel() == 64 * 7  # 7 words per 200-column row
    assert layer.C_indptr.numel() == 64 * 1 + 1  # one 256-column group per row
    torch.testing.assert_close(packed(x), model(x), rtol=1e-5, atol=1e-5)
    counter = CompileCounter()  # the bitmap decode has static shapes: one frame, no graph break
    assert torch.equal(torch.compile(packed, backend=counter, fullgraph=True)(x), packed(x))
    assert counter.frame_count == 1
    path = tmp_path / "bitmap.safetensors"
    pk.save_packed(packed, path)
    loaded = pk.load_packed(nn.Sequential(nn.Linear(200, 64)), path)
    assert loaded[0].fmts == layer.fmts and bits_of(loaded.state_dict()) == bits_of(packed.state_dict())
    assert torch.equal(loaded(x), packed(x))
    unpacked = pk.unpack(loaded)
    assert torch.equal(unpacked[0].C, model[0].C) and torch.equal(unpacked(x), model(x))
    for edit, message in (
        (lambda t, h: t["0.C_indices"].__setitem__(6, -1), "bits set past column 200"),
        (lambda t, h: t["0.C_indptr"].__setitem__(1, 0), "indptr must count"),
        (lambda t, h: t["0.C_codes"].fill_(-1), "past its"),
    ):
        with pytest.raises(ValueError, match=message):
            pk.load_packed(nn.Sequential(nn.Linear(200, 64)), _corrupt(tmp_path, packed, edit))
    layer.C_indices[6] = -1  # changed in place after loading: refused before any kernel on the next forward
    with pytest.raises(ValueError, match="bits set past column 200"):
        packed(x)


def test_writes_through_data_need_a_forced_check():
    """``t.data[...] = v`` bypasses the version counter the per-forward check keys on (README)."""
    layer = pk.pack_(finalized(nn.Sequential(nn.Linear(40, 24)), steps=0))[0]
    layer.check_valid()
    layer._dense_weight(torch.float32)  # the cached decoded weight
    assert layer.cache_nbytes > 0
    book = next(b for b in (layer.U_book, layer.V_book, layer.C_book) if b.numel() > 1)
    book.data[1] = float("nan")  # corrupt, unseen by the counter
    layer.check_valid()
    assert layer.cache_nbytes > 0  # (the limitation the README states)
    with pytest.raises(ValueError, match="codebook levels must be finite"):
        layer.check_valid(force=True)
    assert layer.cache_nbytes == 0  # the stale weight is gone too


# --- sizes -----------------------------------------------------------------------------------------------------------


def test_size_report_matches_real_packed_bytes(cnn):
    model, _ = cnn
    rep = at.size_report(model)
    packed = pk.pack_(copy.deepcopy(model))
    prep = at.size_report(packed)
    assert prep.total_bits == rep.total_bits and prep.dense_bits == rep.dense_bits
    assert at.model_size_bits(packed) == at.model_size_bits(model)
    assert prep.packed_bytes == rep.packed_bytes == pk.packed_nbytes(packed)
    for name, layer in pk.packed_layers(packed):
        assert prep.per_layer()[name] == rep.per_layer()[name]
        assert prep.per_layer()[name][1] == sum(layer.factor_nbytes(f) for f in "UVC")
    assert "packed" in str(prep)


def test_file_size_is_packed_bytes_plus_header(cnn, tmp_path):
    model, _ = cnn
    packed = pk.pack_(copy.deepcopy(model))
    path = tmp_path / "m.safetensors"
    size = pk.save_packed(packed, path)
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    other = sum(
        v.nbytes
        for k, v in packed.state_dict().items()
        if not any(k.endswith(f"{f}_{p}") for f in "UVC" for p in ("codes", "book", "indptr", "indices"))
    )
    assert size == os.path.getsize(path) == 8 + header + at.size_report(packed).packed_bytes + other
    assert header < 8192


# --- save / load -----------------------------------------------------------------------------------------------------


def test_save_load_round_trip_on_meta_skeleton(cnn, tmp_path, monkeypatch):
    model, x = cnn
    packed = pk.pack_(copy.deepcopy(model))
    path = tmp_path / "m.safetensors"
    pk.save_packed(packed, path)
    with torch.device("meta"):
        skeleton = small_cnn()

    def no_dense(*a, **k):
        raise AssertionError("loading must not decode or re-encode factors")

    monkeypatch.setattr(pk.PackedLayer, "from_atmc", no_dense)
    monkeypatch.setattr(pk, "atmc_decode", no_dense)
    loaded = pk.load_packed(skeleton, path).eval()
    monkeypatch.undo()
    assert loaded is skeleton
    assert [type(m) for m in loaded.modules()] == [type(m) for m in packed.modules()]
    assert torch.equal(loaded(x), packed(x))
    assert bits_of(loaded.state_dict()) == bits_of(packed.state_dict())
    assert torch.equal(pk.unpack(loaded)(x), model(x))  # back to the finalized model exactly


def test_load_into_a_dense_lenet(tmp_path):
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    model = finalized(lenet(), bits=8, ratio=0.05, x=x, y=y)
    packed = pk.pack_(copy.deepcopy(model))
    pk.save_packed(packed, tmp_path / "l.safetensors")
    loaded = pk.load_packed(lenet(), tmp_path / "l.safetensors")
    assert torch.equal(loaded(x), packed(x))
    assert max_rel(loaded(x), model(x)) <= 1e-5


def _corrupt(tmp_path, packed, edit):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = tmp_path / "ok.safetensors"
    pk.save_packed(packed, src)
    tensors = load_file(src)
    with safe_open(src, "pt") as fh:
        meta = fh.metadata()
    header = json.loads(meta[pk.META_KEY])
    edit(tensors, header)
    header["sha256"] = pk._packed_digest(header, tensors)  # resealed: the structural checks must catch it
    dst = tmp_path / "bad.safetensors"
    save_file(tensors, dst, metadata={pk.META_KEY: json.dumps(header)})
    return dst


def test_load_validates_everything(tmp_path):
    packed = pk.pack_(known_formats())
    x = torch.rand(2, 200)
    cases = [
        (lambda t, h: t["0.U_codes"].fill_(-1), "past its"),  # 3-bit codes 7 > 4 levels
        (lambda t, h: t["0.U_book"].__setitem__(0, 1.0), "codebook must be 0 then"),
        (lambda t, h: t["0.U_book"].__setitem__(2, -2.0), "codebook must be 0 then"),  # not ascending
        (lambda t, h: t.__setitem__("0.U_codes", t["0.U_codes"][:-1].clone()), "size mismatch"),
        (lambda t, h: t["0.V_indices"].fill_(10_000), "column indices outside"),
        (lambda t, h: t["0.V_indptr"].__setitem__(1, 10**6), "indptr must rise"),
        (lambda t, h: t["0.V_indices"].zero_(), "must ascend within each row"),
        (lambda t, h: t["0.V_codes"].fill_(-1), "past its"),
        (lambda t, h: h.__setitem__("version", 99), "unsupported packed format version"),
        (lambda t, h: h["layers"]["0"].__setitem__("type", "conv3d"), "unknown type"),
        (lambda t, h: h["layers"]["0"].pop("rank"), "bad packed-layer metadata"),
        (lambda t, h: h["layers"].__setitem__("nope", h["layers"]["0"]), "no submodule 'nope'"),
        (lambda t, h: h["layers"]["0"]["factors"]["U"].__setitem__("nnz", 10), "metadata says"),
    ]
    for edit, message in cases:
        with torch.device("meta"):
            skeleton = nn.Sequential(nn.Linear(200, 64))
        with pytest.raises(ValueError, match=message):
            pk.load_packed(skeleton, _corrupt(tmp_path, packed, edit))
    assert torch.equal(
        pk.load_packed(nn.Sequential(nn.Linear(200, 64)), _corrupt(tmp_path, packed, lambda t, h: 0))(x), packed(x)
    )
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not written by save_packed"):
        pk.load_packed(nn.Sequential(nn.Linear(200, 64)), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="no packed layers"):
        pk.save_packed(nn.Sequential(nn.Linear(2, 2)), tmp_path / "x.safetensors")


# --- modules ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["identity", "svd", "sparse"])
def test_decomposed_conv_equals_cached_dense_conv(init):
    torch.manual_seed(3)
    convs = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(8, 4, (3, 1), stride=2, dilation=(1, 2), padding=(1, 0)),
        nn.ReLU(),
        nn.Conv2d(4, 16, 1, bias=False),
    )
    x = torch.rand(2, 3, 11, 11)
    model = finalized(convs, bits=5, ratio=0.3, init=init, steps=0)
    want = model(x)
    packed = pk.pack_(model)
    assert max_rel(packed(x), want) <= 1e-5
    for _, layer in pk.packed_layers(packed):
        layer.conv_mode = "decomposed"
    assert max_rel(packed(x), want) <= 1e-5


def test_conv_cache_follows_loads_and_dtype(cnn):
    model, x = cnn
    packed = pk.pack_(copy.deepcopy(model))
    conv = packed[0]
    w1 = conv._dense_weight(torch.float32)
    assert conv._dense_weight(torch.float32) is w1  # cached
    sd = packed.state_dict()
    for f in "UVC":
        sd[f"0.{f}_book"] = 2 * sd[f"0.{f}_book"]
    packed.load_state_dict(sd)  # new values: the cache is dropped
    fresh = pk.pack_(copy.deepcopy(model))
    fresh.load_state_dict(sd)  # (never decoded before: no cache)
    want = fresh[0]._dense_weight(torch.float32)
    assert not torch.equal(want, w1) and torch.equal(conv._dense_weight(torch.float32), want)
    packed.half()
    assert conv.weight_cache is None and conv._dense_weight(torch.float16).dtype == torch.float16
    assert "weight_cache" not in "".join(packed.state_dict())


def test_decoded_weight_is_float32_under_autocast():
    """``weight_2d`` (what the dense path caches, ``.weight`` and ``export_dense`` read) ignores autocast: under
    bf16 autocast its ``U V`` product ran in bf16 (a 1e-3 difference), and the first call's mode then stuck in
    the layer's cache for every later call."""
    torch.manual_seed(0)
    x, y = torch.rand(8, 40), torch.randint(0, 5, (8,))
    model = at.pack_(finalized(nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 5)), 8, 0.5, "svd", 2, x, y))
    layer = model[0]
    assert all(layer.fmts[f] != FMT_EMPTY for f in ("U", "V"))  # both factors stored: the product runs
    want = layer.weight_2d()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer.weight_2d()
        w = layer.weight
    assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(w, want.to(w.dtype))


def test_half_keeps_float32_codebooks(cnn):
    model, x = cnn
    packed = pk.pack_(copy.deepcopy(model)).half()
    for _, layer in pk.packed_layers(packed):
        assert all(getattr(layer, f"{f}_book").dtype == torch.float32 for f in "UVC")
        assert layer.bias is None or layer.bias.dtype == torch.float16
    back = pk.unpack(copy.deepcopy(packed))
    assert all(layer.U.dtype == torch.float16 for _, layer in at.atmc_layers(back))
    lin = packed[7]
    xh = torch.rand(3, 28).half()
    assert max_rel(lin(xh).float(), model[7](xh.float())) <= 2e-3


def test_input_gradients_flow_through_packed_layers(cnn):
    model, x = cnn
    packed = pk.pack_(copy.deepcopy(model))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(xa).square().sum().backward()
    packed(xb).square().sum().backward()
    assert max_rel(xb.grad, xa.grad) <= 1e-4


def test_packed_model_compiles_in_one_frame(cnn):
    model, x = cnn
    packed = pk.pack_(copy.deepcopy(model))
    packed[3].conv_mode = "decomposed"
    counter = CompileCounter()
    torch._dynamo.reset()
    got = torch.compile(packed, fullgraph=True, backend=counter)(x)
    assert counter.frame_count == 1
    assert max_rel(got, packed(x)) <= 1e-6


# --- accuracy --------------------------------------------------------------------------------------------------------


def test_packed_clean_and_adversarial_accuracy_equal_finalized():
    """A CNN trained on scikit-learn's digits, compressed with ATMC; its test set under PGD."""
    from atmc_triton.attacks import pgd
    from atmc_triton.data import load_dataset

    torch.manual_seed(0)
    data = load_dataset("digits")
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        i = torch.randint(0, len(data.train), (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.train.x[i]), data.train.y[i]).backward()
        opt.step()
    cfg = at.ATMCConfig(ratio=0.1, bits=4, quant_interval=5)
    at.compress_(model, cfg)
    admm = at.ADMM(model, cfg, lr=0.02, momentum=0.9)
    for _ in range(40):
        i = torch.randint(0, len(data.train), (64,))
        admm.zero_grad()
        nn.functional.cross_entropy(model(data.train.x[i]), data.train.y[i]).backward()
        admm.step()
    at.finalize_(model).eval()
    packed = pk.pack_(copy.deepcopy(model)).eval()
    x, y = data.test.x, data.test.y

    def accuracies(m):
        clean = (m(x).argmax(1) == y).float().mean().item()
        adv = pgd(m, x, y, eps=0.1, alpha=0.025, steps=5, generator=torch.Generator().manual_seed(0))
        return clean, (m(adv).argmax(1) == y).float().mean().item()

    want, got = accuracies(model), accuracies(packed)
    assert want[0] > 0.8 and want[1] < want[0]  # a real classifier, and a real attack
    assert got == want


# --- the Triton kernels inside packed models (GPU, or the interpreter on CPU) -----------------------------------------


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Packed layers call the Triton launchers on CPU tensors too (Triton's interpreter), not the reference."""
    if not INTERPRET:
        pytest.skip("CPU tensors run Triton kernels only in its interpreter (TRITON_INTERPRET=1)")
    from atmc_triton.kernels import lowrank_gemm_triton as lt

    def linear(x, bias, n, r, identity, *f):
        return lt.linear_launch(x, bias, n, r, identity, [f[i : i + 5] for i in (0, 5, 10)])

    def decode(fmt, rows, cols, *parts):
        return lt.decode_launch(lt._Factor(fmt, rows, cols, *parts))

    monkeypatch.setattr(pk, "atmc_linear", linear)
    monkeypatch.setattr(pk, "atmc_decode", decode)
    return lt


DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]


def fp32_rtol(device: str, model: bool = False) -> float:
    """float32 in the interpreter is exact float32; on a GPU the kernels use tf32 tensor cores (10-bit
    mantissa, as ``F.linear`` under ``allow_tf32``), which truncate their operands: the low-rank product
    truncates four (x, V, then x V^T and U), 8 units of 2^-11 relative to the largest output of one layer;
    a whole ``model`` (cuDNN's convolutions are tf32 too) gets float16's bound, the same mantissa."""
    return 1e-5 if device == "cpu" else 1e-2 if model else 8 * 2.0**-11


@pytest.fixture
def kernels_on(request, device):
    if device == "cpu":
        request.getfixturevalue("triton_on_cpu")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_model_kernels_match_finalized(device, dtype, kernels_on):
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    model = finalized(lenet(), bits=4, ratio=0.1, x=x, y=y)
    packed = pk.pack_(copy.deepcopy(model)).to(device).to(dtype)
    paths = set()
    for batch in (1, 8, 64):
        xb = torch.rand(batch, 1, 28, 28)
        got = packed(xb.to(device).to(dtype)).float().cpu()
        assert max_rel(got, model(xb)) <= (fp32_rtol(device, model=True) if dtype == torch.float32 else 1e-2)
        paths |= {m.path(batch, dtype) for _, m in pk.packed_layers(packed) if isinstance(m, pk.PackedLinear)}
    assert "split_k" in paths
    if device == "cuda":
        compiled = torch.compile(packed, fullgraph=True)
        got = compiled(x.cuda().to(dtype)).float().cpu()
        assert max_rel(got, model(x)) <= (fp32_rtol(device, model=True) if dtype == torch.float32 else 1e-2)


def _one_linear(seed=0, n_in=40, n_out=24):
    torch.manual_seed(seed)
    x, y = torch.rand(6, n_in), torch.randint(0, n_out, (6,))
    model = finalized(nn.Sequential(nn.Linear(n_in, n_out)), bits=3, ratio=0.3, x=x, y=y)
    return model, pk.pack_(copy.deepcopy(model))


@pytest.mark.parametrize("device", DEVICES)
def test_every_path_is_correct_at_its_boundaries(device, kernels_on, monkeypatch):
    """Sampled M on both sides of each path boundary (split_k | tile at 32/33, tile | dense at a
    crossover of 50; split_k | dense at a crossover of 17, the lowest ``dense_crossover`` returns);
    ``test_every_m_takes_exactly_one_path`` covers every M of 1..4096."""
    model, packed = _one_linear()
    layer = packed[0].to(device)
    for crossover, ms, paths in (
        (50, (1, 16, 32, 33, 49, 50, 51, 300), {"split_k", "tile", "dense"}),
        (17, (1, 16, 17, 18, 33), {"split_k", "dense"}),
    ):
        monkeypatch.setattr(layer, "crossover", lambda act_bytes=2, c=crossover: c)
        layer.weight_cache = None
        seen = {}
        for M in ms:
            x = torch.randn(M, 40)
            seen[layer.path(M, torch.float32)] = M
            got = layer(x.to(device)).cpu()
            assert (layer.cache_nbytes > 0) == (M >= crossover)  # the dense path ran (and cached) from M on
            want = model(x).detach()
            tol = fp32_rtol(device)
            torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
        assert set(seen) == paths


@pytest.mark.parametrize("device", DEVICES)
def test_dense_cache_is_counted_freed_and_follows_changes(device, kernels_on, monkeypatch):
    model, packed = _one_linear(seed=1)
    packed = packed.to(device)
    layer = packed[0]
    monkeypatch.setattr(layer, "crossover", lambda act_bytes=2: 40)
    x = torch.randn(64, 40)
    assert pk.cached_nbytes(packed) == 0
    model.requires_grad_(False)
    want = model(x)
    tol = fp32_rtol(device)
    torch.testing.assert_close(packed(x.to(device)).cpu(), want, rtol=tol, atol=tol * float(want.abs().max()))
    assert layer.cache_nbytes == pk.cached_nbytes(packed) == 24 * 40 * 4  # one fp32 [24, 40] weight
    w = layer.weight_cache
    packed(x.to(device))
    assert layer.weight_cache is w  # decoded once, not per call
    sd = packed.state_dict()
    sd["0.bias"] = sd["0.bias"] + 1
    for f in "UVC":
        sd[f"0.{f}_book"] = 2 * sd[f"0.{f}_book"]
    packed.load_state_dict(sd)  # new values: the cache is dropped and rebuilt from them
    assert layer.cache_nbytes == 0
    linear = model[0]
    with torch.no_grad():
        for f in "UVC":
            getattr(linear, f).mul_(2)
        linear.bias.add_(1)
    want = model(x)
    torch.testing.assert_close(packed(x.to(device)).cpu(), want, rtol=tol, atol=tol * float(want.abs().max()))
    layer.U_book[1:].mul_(0.5)  # an in-place change also invalidates it
    got = packed(x.to(device)).cpu()
    assert not torch.allclose(got, want)
    layer.U_book[1:].mul_(2)
    assert torch.equal(packed(x.to(device)).cpu(), layer(x.to(device)).cpu())
    back = pk.unpack(packed)
    assert layer.cache_nbytes == 0 and pk.cached_nbytes(back) == 0  # unpack frees the decoded weight
    torch.testing.assert_close(back(x.to(device)).cpu(), want, rtol=tol, atol=tol * float(want.abs().max()))
    again = pk.pack_(back)
    monkeypatch.setattr(again[0], "crossover", lambda act_bytes=2: 40)
    torch.testing.assert_close(again(x.to(device)).cpu(), want, rtol=tol, atol=tol * float(want.abs().max()))
    assert again[0].path(64, torch.float32) == "dense" and again[0].cache_nbytes > 0
    again[0].dense_cache = False
    assert again[0].path(10**6, torch.float32) == "tile"


def test_corrupt_packed_tensors_are_refused_before_any_kernel(monkeypatch):
    packed = pk.pack_(known_formats())  # U dense-coded, V CSR
    layer = packed[0]

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran on corrupt data")

    monkeypatch.setattr(pk, "atmc_linear", no_kernel)
    monkeypatch.setattr(pk, "atmc_decode", no_kernel)
    x = torch.randn(3, 200)
    corruptions = []
    for f in "UVC":
        if layer.fmts[f] == FMT_CSR:
            corruptions.append((getattr(layer, f"{f}_indices"), 10_000, "column indices outside"))
        if layer.fmts[f] != FMT_EMPTY:
            corruptions.append((getattr(layer, f"{f}_codes"), -1, "past its"))
    assert any(t.dtype == torch.int16 for t, _, _ in corruptions)  # both kinds of corruption reached
    for t, value, message in corruptions:
        saved = t.clone()
        t.fill_(value)
        for M in (3, 100):  # the packed path and the cached dense path
            with pytest.raises(ValueError, match=message):
                layer(torch.randn(M, 200))
        t.copy_(saved)
    books = [getattr(layer, f"{f}_book") for f in "UVC"]
    assert sum(b.numel() > 2 for b in books) >= 2
    for book in books:  # a non-finite level (the CSR kernel multiplies masked slots' levels by zero)
        if book.numel() > 2:
            saved = book.clone()
            book[-1] = float("inf")
            with pytest.raises(ValueError, match=r"codebook levels must be finite, got \[inf\]"):
                layer(x)
            book.copy_(saved)
    monkeypatch.undo()
    assert torch.isfinite(layer(x)).all()


def test_a_packed_twins_state_dict_is_refused_whole_with_a_way_out():
    """Another packed model's weights hold other nonzero counts: the load fails, and it used to leave the
    failing layer's bias changed and name only the count ("its metadata says"), not how to load such weights.
    (Layers before it keep what they loaded, as torch's load_state_dict does with any error.)"""
    models = []
    for seed in (0, 1):  # (the same buffer sizes, other nonzero counts: the load reaches the packed check)
        torch.manual_seed(seed)
        dense = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
        models.append(pk.pack_(at.finalize_(at.compress_(dense, at.ATMCConfig(ratio=0.1, bits=4)))))
    src, dst = models
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"packed layer 2: .*nonzeros.*use at\.load_packed\(model, path\)"):
        dst.load_state_dict(src.state_dict())
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items() if k.startswith("2."))


def test_a_failed_load_packed_leaves_the_model_as_it_was(tmp_path):
    """A key the file lacks (here a fifth layer) fails after the layers were swapped: they are put back."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    pk.save_packed(pk.pack_(at.finalize_(at.compress_(dense, at.ATMCConfig(ratio=0.1, bits=4)))), tmp_path / "m.st")
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4), nn.ReLU(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = list(model)
    with pytest.raises(ValueError, match="does not fit the model"):
        pk.load_packed(model, tmp_path / "m.st")
    assert list(model) == layers  # (was: PackedLinear, ReLU, PackedLinear, ReLU, Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

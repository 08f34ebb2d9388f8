"""Defects a review of packed inference and checkpoint writing found (2026-12-02), each pinned by value. Every test
here failed on the code before its fix (each fix was planted out once and the test re-run), except
``test_check_valid_force_refreshes_a_compiled_packed_model``, which pins the documented way to refresh a compiled
packed model after an in-place edit."""

import collections
import copy
import io
import json
import os
import stat

import pytest
import torch
from pipeline_helpers import one_thread
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import atmc_triton as at
from atmc_triton.checkpoint import check_loadable, export_safetensors, load_checkpoint, save_checkpoint
from atmc_triton.layers import ATMCLinear
from atmc_triton.packed import PackedLinear, cached_nbytes


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _compressed(model: nn.Module, init: str = "identity", ratio: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    return at.finalize_(at.compress_(model, at.ATMCConfig(ratio=ratio, bits=4, init=init)))


def _sparse_linear(inn: int = 64, out: int = 32) -> nn.Sequential:
    """A finalized ATMCLinear of rank 0, sparse 4-bit C (its PackedLinear takes the cached dense path at M=100)."""
    g = torch.Generator().manual_seed(0)
    lay = ATMCLinear(inn, out, True, rank=0, bits=4)
    with torch.no_grad():
        lv = torch.linspace(-1, 1, 18)[1:-1]
        lv = lv[lv != 0]
        C = torch.where(torch.rand(out, inn, generator=g) < 0.3, lv[torch.randint(len(lv), (out, inn), generator=g)], 0)
        for f, t in (("C", C), ("U", lay.U.new_zeros(lay.U.shape)), ("V", lay.V.new_zeros(lay.V.shape))):
            getattr(lay, f).copy_(t)
            getattr(lay, f + "_z").copy_(t)
            getattr(lay, f + "_mask").copy_(t != 0)
        lay.bias.copy_(torch.randn(out, generator=g))
        lay.finalized.fill_(True)
    return nn.Sequential(lay)


# --- 1. save_checkpoint refuses containers torch.load(weights_only=True) refuses --------------------------------------


def test_save_checkpoint_refuses_a_defaultdict_and_keeps_the_previous_checkpoint(tmp_path):
    """A ``defaultdict`` passed the pre-write check (any ``dict`` subclass did), so a good checkpoint was replaced by
    one ``load_checkpoint`` refuses. Only the exact types weights_only loading rebuilds are accepted now."""
    p = tmp_path / "last.pt"
    save_checkpoint(p, model=nn.Linear(2, 2), meta={"model": "toy"}, epoch=1)
    stats = collections.defaultdict(float, loss=0.5)

    class Sub(dict):
        pass

    for bad in (stats, [stats], {"x": Sub(a=1)}, collections.OrderedDict(a=stats)):
        with pytest.raises(ValueError, match=r"extra\['s'\].* is a (defaultdict|Sub):"):
            save_checkpoint(p, model=nn.Linear(2, 2), meta={"model": "toy"}, epoch=2, extra={"s": bad})
    assert load_checkpoint(p)["epoch"] == 1  # nothing was written
    with pytest.raises(ValueError, match="defaultdict"):
        check_loadable({"stats": stats}, "extra")
    ok = {"od": collections.OrderedDict(a=torch.ones(2)), "c": collections.Counter("aab")}
    save_checkpoint(p, model=nn.Linear(2, 2), meta={"model": "toy"}, epoch=3, extra=ok)
    ck = load_checkpoint(p)
    assert type(ck["extra"]["od"]) is collections.OrderedDict and type(ck["extra"]["c"]) is collections.Counter
    assert ck["extra"]["c"] == {"a": 2, "b": 1} and torch.equal(ck["extra"]["od"]["a"], torch.ones(2))


# --- 2. padding="same" with a padding mode other than zeros -----------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [3, (2, 4)])
@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_packed_conv_same_padding_with_a_padding_mode(tmp_path, kernel_size, padding_mode):
    """``reversed(self.padding)`` of the string "same" made every forward fail; the padding is torch's now (as in
    ATMCConv2d), asymmetric for an even kernel."""

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 6, kernel_size, padding="same", padding_mode=padding_mode))

    m = _compressed(net())
    x = torch.randn(2, 4, 7, 7)
    y0 = m(x)
    at.pack_(m)
    for mode in ("dense", "decomposed"):
        m[0].conv_mode = mode
        assert torch.allclose(m(x), y0, atol=1e-5)
    at.save_packed(m, tmp_path / "c.safetensors")
    twin = at.load_packed(net().to("meta"), tmp_path / "c.safetensors")
    assert twin[0].padding == "same" and torch.allclose(twin(x), y0, atol=1e-5)


# --- 3. torch.export after an eager forward ---------------------------------------------------------------------------


def test_export_of_a_packed_conv_after_an_eager_forward_decodes_from_the_packed_tensors():
    """The exported graph computed with the cached dense weight, a constant: stale once the packed tensors change
    (another model's loaded). It decodes from the packed tensors now. (A non-strict export still lists the cache
    buffer among its constants, as every module buffer; the graph does not read it.)"""
    m = at.pack_(_compressed(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)), init="sparse", ratio=0.2))
    x = torch.randn(2, 4, 6, 6)
    m(x)  # caches the dense weight
    assert cached_nbytes(m) > 0
    ep = torch.export.export(m, (x,))
    cache = [s.arg.name for s in ep.graph_signature.input_specs if s.target == "0.weight_cache"]
    assert all(not n.users for n in ep.graph.nodes if n.name in cache)
    other = at.pack_(_compressed(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)), init="sparse", ratio=0.2))
    with torch.no_grad():
        other[0].C_book.mul_(3.0)
    mod = ep.module()
    mod.load_state_dict(other.state_dict(), strict=False)
    assert torch.allclose(mod(x), other(x), atol=1e-5)


# --- 4. the validation key survives id reuse --------------------------------------------------------------------------


def test_a_replaced_packed_tensor_is_seen_even_when_its_id_is_reused():
    """The key was ``(id(t), t._version)``: a replacement tensor that CPython put at a freed tensor's address (same id,
    version 1) read as unchanged, so the forward used the old cached weight (and a corrupt tensor went unchecked)."""
    m = at.pack_(_sparse_linear())
    lay = m[0]
    x = torch.randn(100, 64)  # the cached dense path
    book = lay.C_book.clone()
    for _ in range(30):
        b = book.clone()
        b.mul_(1.0)  # version 1
        lay.C_book = b
        del b
        lay(x)  # validated and cached
        lay.C_book = lay.C_book.clone()  # replaced twice: the second new tensor often takes the first one's id
        nb = book.clone()
        nb.mul_(2.0)
        lay.C_book = nb
        del nb
        ref = x @ PackedLinear.weight_2d(lay).T + lay.bias
        assert torch.allclose(lay(x), ref, atol=1e-5)
    buf = io.BytesIO()  # the key holds weak references, which do not pickle: pickle and deepcopy leave it out
    torch.save(m, buf)
    buf.seek(0)
    for twin in (torch.load(buf, weights_only=False), copy.deepcopy(m)):
        assert twin[0]._valid_key is None and torch.equal(twin(x), m(x))


# --- 5. atomic writes keep the usual permissions ----------------------------------------------------------------------


def test_atomic_writes_take_the_umask_or_the_replaced_files_mode(tmp_path):
    """Checkpoints, safetensors and packed files were created 0600 (tempfile.mkstemp's mode) whatever the umask."""
    m = _compressed(nn.Sequential(nn.Linear(16, 8)))
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "ck.pt", model=m, meta={})
        export_safetensors(m, tmp_path / "w.safetensors")
        at.save_packed(at.pack_(m), tmp_path / "p.safetensors")
        os.umask(0o022)
        (tmp_path / "keep.pt").write_bytes(b"")
        os.chmod(tmp_path / "keep.pt", 0o604)
        save_checkpoint(tmp_path / "keep.pt", model=nn.Linear(2, 2), meta={})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"ck.pt": 0o640, "w.safetensors": 0o640, "p.safetensors": 0o640, "keep.pt": 0o604}


# --- 6. conv geometry in a packed file's header -----------------------------------------------------------------------


def _cnet(**conv):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, **({"padding": 1} | conv)), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 3))


def test_load_packed_refuses_bad_conv_geometry_naming_the_layer(tmp_path):
    """A stride or dilation of 0, a negative padding, a bogus padding or padding mode loaded and failed on every
    forward (or, a valid but different geometry, ran silently with the file's); each is a ValueError at load now."""
    m = at.pack_(_compressed(_cnet()))
    p = tmp_path / "m.safetensors"
    at.save_packed(m, p)
    with safe_open(p, "pt") as fh:
        header, tensors = json.loads(fh.metadata()["atmc_packed"]), {k: fh.get_tensor(k) for k in fh.keys()}
    del header["sha256"]  # (an edited header without a checksum: what its own checks must catch)
    bad = {
        "stride": ([0, 0], [-1, 1], [2], "ab"),
        "dilation": ([0, 1],),
        "padding": ([-3, -3], "bogus"),
        "padding_mode": ("bogus",),
        "bias": ("no",),
    }
    for key, values in bad.items():
        for v in values:
            h = json.loads(json.dumps(header))
            h["layers"]["0"][key] = v
            save_file(tensors, tmp_path / "h.safetensors", metadata={"atmc_packed": json.dumps(h)})
            with pytest.raises(ValueError, match=rf"layer '0': .*{key}"):
                at.load_packed(_cnet(), tmp_path / "h.safetensors")
    for key, v in (("padding_mode", "reflect"), ("stride", [2, 2]), ("dilation", [2, 2]), ("padding", "same")):
        h = json.loads(json.dumps(header))
        h["layers"]["0"][key] = v
        save_file(tensors, tmp_path / "h.safetensors", metadata={"atmc_packed": json.dumps(h)})
        with pytest.raises(ValueError, match=rf"does not fit the model: layer '0'.*'{key}'"):
            at.load_packed(_cnet(), tmp_path / "h.safetensors")
    # the same through save_packed: a file of a stride-2 conv does not load into a stride-1 model of the same sizes
    strided = at.pack_(_compressed(_cnet(stride=2, padding=3)))
    at.save_packed(strided, p)
    with pytest.raises(ValueError, match="does not fit the model"):
        at.load_packed(_cnet(stride=1, padding=1), p)  # its Linear fits too: 8 * 5 * 5 inputs either way
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(at.load_packed(_cnet(stride=2, padding=3), p)(x), strided(x))


# --- 7. unbatched input to a decomposed conv with a bias --------------------------------------------------------------


def test_decomposed_packed_conv_takes_unbatched_input():
    """The bias was added as ``[1, C, 1, 1]``: a ``[C, H, W]`` input (nn.Conv2d takes it) came out ``[1, C, H, W]``."""
    m = _compressed(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1)))
    x = torch.randn(3, 8, 8)
    y0 = m(x)
    at.pack_(m)
    for mode in ("dense", "decomposed"):
        m[0].conv_mode = mode
        y = m(x)
        assert y.shape == (6, 8, 8) and torch.allclose(y, y0, atol=1e-5)


# --- 8. PackedConv2d.weight -------------------------------------------------------------------------------------------


def test_packed_conv_has_a_read_only_weight():
    """ATMCConv2d and PackedLinear have ``.weight``; PackedConv2d had none (AttributeError)."""
    m = _compressed(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 9, 2)))
    w_conv, w_lin = m[0].weight.detach(), m[2].weight.detach()
    at.pack_(m)
    assert m[0].weight.shape == (6, 2, 3, 3) and torch.allclose(m[0].weight, w_conv, atol=1e-6)
    assert m[2].weight.shape == (2, 54) and torch.allclose(m[2].weight, w_lin, atol=1e-6)
    with pytest.raises(AttributeError):
        m[0].weight = torch.zeros(6, 2, 3, 3)


# --- 9. a compiled packed model after an in-place edit (documented) ---------------------------------------------------


def test_check_valid_force_refreshes_a_compiled_packed_model():
    """A graph compiled after an eager forward reads the cached dense weight and validates nothing, so an in-place
    edit of the packed tensors goes unseen by it; ``check_valid(force=True)`` (or an eager forward) drops the cache."""
    m = at.pack_(_sparse_linear())
    lay = m[0]
    x = torch.randn(100, 64)
    m(x)
    c = torch.compile(m, backend="eager")
    c(x)
    with torch.no_grad():
        lay.C_book.mul_(2.0)
    lay.check_valid(force=True)
    y_c = c(x)
    assert torch.allclose(y_c, m(x), atol=1e-5)
    with torch.no_grad():
        lay.C_book.mul_(2.0)
    m(x)  # an eager forward re-validates and re-caches
    assert torch.allclose(c(x), m(x), atol=1e-5)


def test_a_packed_file_whose_bytes_changed_is_refused(tmp_path):
    """A packed file had no checksum: 11 of 400 single-bit corruptions of tensor data loaded with other outputs.
    ``save_packed`` writes a SHA-256 of the header and the tensors; ``load_packed`` checks it. A file without one
    (written before) still loads."""
    torch.manual_seed(0)
    m = at.pack_(_compressed(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))))
    path = tmp_path / "m.safetensors"
    at.save_packed(m, path)
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # the tensors' bytes follow the 8-byte length and the header
    x = torch.rand(3, 16)

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).to("meta")

    assert torch.equal(at.load_packed(net(), path)(x), m(x))
    for at_byte in (start, start + (len(raw) - start) // 2, len(raw) - 1):
        bad = bytearray(raw)
        bad[at_byte] ^= 1  # one bit of tensor data
        (tmp_path / "bad.safetensors").write_bytes(bytes(bad))
        with pytest.raises(ValueError, match="is corrupted: its SHA-256 does not match"):
            at.load_packed(net(), tmp_path / "bad.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        header = json.loads(fh.metadata()["atmc_packed"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    del header["sha256"]
    save_file(tensors, tmp_path / "old.safetensors", metadata={"atmc_packed": json.dumps(header)})
    assert torch.equal(at.load_packed(net(), tmp_path / "old.safetensors")(x), m(x))

"""Safe loading and bad input: pickle payloads never run, truncated / corrupted / foreign checkpoints and packed files
give clear errors, and the validation errors of kernels, optimizer and packed layers each have a test."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from atmc_triton.kernels import HAS_TRITON, admm_dual_update_ref, admm_step_ref, lloyd_quantize_ref, project_topk_
from atmc_triton.kernels.lowrank_gemm import atmc_linear_ref
from atmc_triton.kernels.packed_format import FMT_DENSE, code_width, encode_factor
from hypothesis import given
from hypothesis import strategies as st
from pipeline_helpers import one_thread
from test_packed import known_formats
from torch import nn
from train_worker import single_run

import atmc_triton as at
import atmc_triton.packed as pk
from atmc_triton.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    load_safetensors,
    payload_digest,
    save_checkpoint,
)
from atmc_triton.cli import main
from atmc_triton.data import load_dataset
from atmc_triton.models import build_model
from atmc_triton.store import FactorStore
from atmc_triton.train import Experiment, Protocol, Schedule


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class Payload:
    """Unpickling this runs ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _evil(path: Path, marker: Path, where: str) -> Path:
    legacy = where == "legacy"
    obj = (
        Payload(marker)
        if where == "top"
        else {
            "format": FORMAT,
            "version": 2,
            "meta": {"model": "digits_cnn", "dataset": "digits"},
            "model": {"w": torch.ones(2), "hook": Payload(marker)},
        }
    )
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("where", ["nested", "top", "legacy"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    path = _evil(tmp_path / "evil.pt", marker, where)
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(
        CheckpointError, match=r"refusing to load .*pickled Python objects.*Unsupported global.*exec"
    ) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError):
        Experiment(
            "digits_cnn", load_dataset("digits", subset=8, test_subset=8), Protocol(eps=0.1, pgd_steps=1), device="cpu"
        ).load(path)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_safetensors(path)
    with pytest.raises(Exception):  # noqa: B017 (SafetensorError: not a safetensors header)
        pk.load_packed(nn.Sequential(nn.Linear(200, 64)), path)
    assert not marker.exists()


def test_cli_eval_refuses_a_pickle_payload(tmp_path, capsys):
    marker = tmp_path / "pwned"
    rc = main(["eval", str(_evil(tmp_path / "evil.pt", marker, "nested"))])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("atmc: error: refusing to load") and err.count("\n") == 1
    assert not marker.exists()


def test_resume_refuses_a_pickle_payload(tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    out.mkdir()
    _evil(out / "dense.pt", marker, "nested")
    exp = Experiment(
        "digits_cnn",
        load_dataset("digits", subset=32, test_subset=8),
        Protocol(eps=0.1, pgd_steps=1),
        out=out,
        device="cpu",
        resume=True,
        eval_size=0,
    )
    with pytest.raises(CheckpointError, match="refusing to load"):
        exp.pretrain(Schedule(epochs=1, lr=0.05, batch_size=16))
    assert not marker.exists()


# --- truncated, corrupted and foreign checkpoints --------------------------------------------------------------------


def _ck() -> Path:
    return single_run() / "out" / "atmc.pt"  # a real ATMC checkpoint: model, ADMM state, RNG, metadata


@pytest.mark.parametrize("keep", [0, 1, 64, 0.5, -1])
def test_truncated_checkpoints_are_refused(tmp_path, keep):
    data = _ck().read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    p = tmp_path / "t.pt"
    p.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="not a readable checkpoint, truncated or corrupted") as e:
        load_checkpoint(p)
    assert "\n" not in str(e.value)


def test_a_flipped_bit_in_tensor_data_is_caught_by_the_checksum(tmp_path):
    ck = load_checkpoint(_ck())
    w = max((v for k, v in ck["model"].items() if k[-2:] in (".U", ".V", ".C")), key=torch.count_nonzero).reshape(-1)
    first = int(torch.nonzero(w)[0])
    data = bytearray(_ck().read_bytes())
    at_ = data.find(w[first : first + 4].numpy().tobytes())  # a nonzero weight and its 3 neighbours
    assert at_ > 0
    data[at_] ^= 0x01  # one bit of one weight: torch.load itself does not notice
    p = tmp_path / "flip.pt"
    p.write_bytes(bytes(data))
    assert not torch.equal(torch.load(p, weights_only=True)["model"]["classifier.1.U"], w)
    with pytest.raises(CheckpointError, match="corrupted: its contents do not match their SHA-256 checksum"):
        load_checkpoint(p)


@given(pos=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_any_corrupted_byte_is_refused_or_harmless(tmp_path_factory, pos, xor):
    """Every single-byte corruption either raises CheckpointError or leaves the contents intact (checksum)."""
    data = bytearray(_ck().read_bytes())
    i = int(pos * len(data))
    data[i] ^= xor
    p = tmp_path_factory.mktemp("flip") / "c.pt"
    p.write_bytes(bytes(data))
    try:
        ck = load_checkpoint(p)
    except CheckpointError as e:
        assert "\n" not in str(e)
        return
    assert payload_digest(ck) == payload_digest(load_checkpoint(_ck()))


def test_incomplete_or_old_checkpoints_are_refused(tmp_path):
    p = tmp_path / "x.pt"
    good = load_checkpoint(_ck())
    for edit, match in [
        (lambda c: c.update(version=1), "has checkpoint version 1, expected 2"),
        (lambda c: c.pop("model"), "bad or missing: model"),
        (lambda c: c.update(epoch="3"), "bad or missing: epoch"),
        (lambda c: c.pop("digest"), "bad or missing: digest"),
        (lambda c: c["meta"].update(seed=1), "corrupted"),  # edited after saving: the checksum no longer fits
    ]:
        c = copy.deepcopy(good)
        edit(c)
        torch.save(c, p)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(p)
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_safetensors(tmp_path / "missing.safetensors")


def _digits_experiment(out: Path, **kw) -> tuple[Experiment, Schedule]:
    ck = load_checkpoint(_ck())
    data = load_dataset("digits", subset=128, test_subset=32)
    exp = Experiment("digits_cnn", data, Protocol(**ck["meta"]["protocol"]), out=out, device="cpu", eval_size=16, **kw)
    return exp, Schedule(**ck["meta"]["schedule"])


def test_resume_refuses_a_checkpoint_of_another_config_or_shape(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(single_run() / "out", out)
    exp, sched = _digits_experiment(out, resume=True)
    dense = exp.load(out / "dense.pt")
    with pytest.raises(CheckpointError, match=r"atmc=\{.*'bits': 4.*\(expected \{.*'bits': 3") as e:
        exp.compress(dense, at.ATMCConfig(ratio=0.02, bits=3, quant_interval=3), sched)
    assert "\n" not in str(e.value) and str(e.value).endswith(
        "resume with that run's settings, or start over without resuming"
    )
    assert "'rho'" not in str(e.value)  # the configs' entries that differ, not both whole configs
    # right metadata, wrong tensors (a forged or mixed-up file): a clear error, not a traceback
    meta = load_checkpoint(out / "atmc.pt")["meta"]
    save_checkpoint(out / "atmc.pt", model=build_model("digits_cnn", 10, (1, 8, 8)), meta=meta, epoch=1, step=4)
    with pytest.raises(CheckpointError, match="does not fit this model or optimizer: .*Missing key.*features.0.U"):
        exp.compress(dense, at.ATMCConfig(**meta["atmc"]), sched)
    save_checkpoint(
        out / "dense.pt",
        model=build_model("digits_cnn", 5, (1, 8, 8)),
        meta=load_checkpoint(out / "dense.pt")["meta"],
        epoch=1,
        step=4,
    )
    with pytest.raises(ValueError, match="does not fit digits_cnn"):
        exp.load(out / "dense.pt")


def test_cli_eval_refuses_foreign_and_forged_checkpoints(tmp_path, capsys):
    src = load_checkpoint(_ck())
    p = tmp_path / "f.pt"
    cases = [
        ({**src["meta"], "model": "resnet9"}, "names an unknown model/dataset"),
        ({**src["meta"], "protocol": {"eps": 0.1, "steps": 3}}, "has a bad protocol"),
        ({**src["meta"], "atmc": {**src["meta"]["atmc"], "bits": 3}}, "does not fit digits_cnn"),
    ]
    model = Experiment(
        "digits_cnn", load_dataset("digits", subset=8, test_subset=8), Protocol(eps=0.1, pgd_steps=1), device="cpu"
    ).new_model()
    at.compress_(model, at.ATMCConfig(**src["meta"]["atmc"]))
    model.load_state_dict(src["model"])
    for meta, match in cases:
        save_checkpoint(p, model=model, meta=meta)
        rc = main(["eval", str(p), "--attack", "fgsm", "--test-subset", "8"])
        err = capsys.readouterr().err
        assert rc == 2 and match in err and err.count("\n") == 1, err


# --- packed files ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("packed") / "m.safetensors"
    pk.save_packed(pk.pack_(known_formats()), p)
    return p


def _edit_header(src: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as fh:
        header = json.loads(fh.metadata()[pk.META_KEY])
    edit(header)
    tensors = load_file(str(src))
    header["sha256"] = pk._packed_digest(header, tensors)  # resealed: the structural checks must catch it
    save_file(tensors, str(dst), metadata={pk.META_KEY: json.dumps(header)})
    return dst


def _skeleton():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(200, 64))


def test_packed_metadata_that_lies_is_refused(packed_file, tmp_path):
    layer = lambda h: h["layers"]["0"]  # noqa: E731
    cases = [
        (lambda h: layer(h).update(bits=1), r"has 4 levels, more than 2\^1"),  # U holds 4 levels
        (lambda h: layer(h)["factors"]["C"].update(nnz=3), "factor C is empty but its metadata says 3 nonzeros"),
        (lambda h: layer(h)["factors"]["U"].update(fmt=7), "bad packed-layer metadata.*factor U has unknown format 7"),
        (lambda h: layer(h)["factors"]["U"].update(fmt=3), r"not fit the model:[\s\S]*size mismatch for 0\.U_codes"),
        (lambda h: layer(h)["factors"]["C"].update(fmt=7), "bad packed-layer metadata"),
        (lambda h: layer(h).update(dtype="Tensor"), "bad packed-layer metadata"),
    ]
    for edit, match in cases:
        with pytest.raises(ValueError, match=match):
            pk.load_packed(_skeleton(), _edit_header(packed_file, tmp_path / "bad.safetensors", edit))
    with pytest.raises(ValueError, match="PackedConv2d: conv_mode must be 'dense' or 'decomposed'"):
        pk.PackedConv2d(
            3,
            4,
            3,
            rank=4,
            identity=0,
            bits=2,
            conv_mode="sparse",
            factors={f: {"fmt": 0, "nnz": 0, "levels": 0} for f in "UVC"},
        )


def test_packed_file_lacking_a_layers_tensors_is_refused_even_without_strict(packed_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(packed_file), "pt") as fh:
        header = json.loads(fh.metadata()[pk.META_KEY])
    dst = tmp_path / "partial.safetensors"
    tensors = {k: v for k, v in load_file(str(packed_file)).items() if not k.startswith("0.U_")}
    header["sha256"] = pk._packed_digest(header, tensors)  # resealed: the structural checks must catch it
    save_file(tensors, str(dst), metadata={pk.META_KEY: json.dumps(header)})
    with pytest.raises(ValueError, match="does not fit the model"):
        pk.load_packed(_skeleton(), dst)
    with pytest.raises(ValueError, match="holds no tensors for packed layer '0'"):
        pk.load_packed(_skeleton(), dst, strict=False)


def test_packed_corrupt_header_json_is_a_value_error(packed_file, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "j.safetensors"
    save_file(load_file(str(packed_file)), str(dst), metadata={pk.META_KEY: "{not json"})
    with pytest.raises(ValueError):
        pk.load_packed(_skeleton(), dst)


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_truncated_packed_file_is_a_value_error(packed_file, tmp_path, keep):
    data = packed_file.read_bytes()
    p = tmp_path / "t.safetensors"
    p.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match="load_packed"):
        pk.load_packed(_skeleton(), p)


@pytest.mark.parametrize("edit", [lambda h: h.update(layers=[]), lambda h: h["layers"]["0"].update(rank=-3)])
def test_malformed_packed_header_is_a_value_error(packed_file, tmp_path, edit):
    with pytest.raises(ValueError, match="load_packed|bad packed-layer metadata"):
        pk.load_packed(_skeleton(), _edit_header(packed_file, tmp_path / "h.safetensors", edit))


def test_load_state_dict_of_a_packed_model_validates_indices():
    """``load_packed`` validates; a plain ``load_state_dict`` into a packed model must too (else a GPU kernel
    would read out of bounds)."""
    packed = pk.pack_(known_formats())
    sd = {k: v.clone() for k, v in packed.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    sd["0.V_indices"].fill_(10_000)
    with pytest.raises(ValueError, match="column indices outside"):
        packed.load_state_dict(sd)
    after = packed.state_dict()  # the refused tensors were not kept
    assert all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="column indices outside"):
        packed.load_state_dict(sd, assign=True)
    assert all(torch.equal(packed.state_dict()[k], before[k]) for k in before)
    packed.load_state_dict(before)  # a good state dict still loads


# --- validation errors of kernels, optimizer and packed layers without a test elsewhere ------------------------------


def test_kernel_reference_validation_errors():
    w = torch.zeros(8)
    meta = torch.zeros(8, device="meta")
    mask = torch.zeros(8, dtype=torch.bool)
    with pytest.raises(ValueError, match="project_topk_: k must be >= 0, got -1"):
        project_topk_(w.clone(), -1)
    with pytest.raises(ValueError, match="admm_step: grad is on meta, w is on cpu"):
        admm_step_ref(w, meta, w.clone(), w.clone(), w.clone(), mask, 0.1, 0.9, 0.0, 0.1, 4, False)
    with pytest.raises(ValueError, match="admm_dual_update: z is on meta, u is on cpu"):
        admm_dual_update_ref(w, w.clone(), meta)
    with pytest.raises(ValueError, match="lloyd_quantize: offsets must be a 1-D int64 tensor"):
        lloyd_quantize_ref(w, torch.tensor([0, 8], dtype=torch.int32), torch.tensor([2]), 5, 0.0)
    e32, e16 = torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int16)
    none = (0, e32, e32.float(), e32, e16)
    bad_dev = (0, torch.zeros(0, dtype=torch.int32, device="meta"), e32.float(), e32, e16)
    with pytest.raises(ValueError, match="atmc_linear: factor U .*: codes is on meta, x is on cpu"):
        atmc_linear_ref(torch.ones(1, 2), None, 2, 2, 0, *bad_dev, *none, *none)
    with pytest.raises(ValueError, match="a coded factor needs at least one level, got 0"):
        code_width(FMT_DENSE, 0, False)
    with pytest.raises(ValueError, match="encode_factor: w must be 2-D"):
        encode_factor(torch.ones(3), raw=False)
    with pytest.raises(ValueError, match="encode_factor: unknown format 7"):
        encode_factor(torch.ones(2, 2), raw=False, fmt=7)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_lloyd_launcher_refuses_more_than_int32_elements():
    from atmc_triton.kernels.lloyd_triton import lloyd_quantize_triton

    values = torch.empty(2**31, device="meta")  # metadata only: nothing is allocated
    with pytest.raises(ValueError, match=r"lloyd_quantize: at most 2\*\*31 - 1 values per call"):
        lloyd_quantize_triton(values, torch.tensor([0, 2**31], device="meta"), torch.tensor([2], device="meta"), 5, 0.0)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_launchers_refuse_cpu_tensors_when_not_interpreting(monkeypatch):
    """With compiled Triton (faked here on CPU: the launchers' interpreter probes say no) CPU tensors are refused."""
    from atmc_triton.kernels import admm as admm_mod
    from atmc_triton.kernels import lloyd_triton
    from atmc_triton.kernels.admm import admm_dual_update_triton, admm_step_triton
    from atmc_triton.kernels.lloyd_triton import errors_for_bits_triton, lloyd_quantize_triton

    monkeypatch.setattr(lloyd_triton, "_interpreted", lambda: False)
    monkeypatch.setattr(admm_mod, "interpreted", lambda: False)
    msg = "the Triton kernels need CUDA tensors"
    with pytest.raises(ValueError, match=f"lloyd_quantize: {msg}"):
        lloyd_quantize_triton(torch.zeros(4), torch.tensor([0, 4]), torch.tensor([2]), 5, 0.0)
    with pytest.raises(ValueError, match=msg):
        errors_for_bits_triton(torch.zeros(4), torch.tensor([0, 4]), 5, 0.0)
    z = torch.zeros(4)
    with pytest.raises(ValueError, match=f"admm_step: {msg}"):
        admm_step_triton(z, z, z.clone(), z, z, torch.zeros(4, dtype=torch.bool), 0.1, 0.9, 0.0, 0.1, 2, False)
    with pytest.raises(ValueError, match=f"admm_dual_update: {msg}"):
        admm_dual_update_triton(z.clone(), z, z)


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_kernel_device_mismatch_errors(device):
    """A CPU tensor among another device's: the same check on CPU (with meta tensors) as on CUDA."""
    w = torch.zeros(8, device=device)
    with pytest.raises(ValueError, match=f"admm_step: grad is on cpu, w is on {device}"):
        at.kernels.admm_step(
            w,
            torch.zeros(8),
            w.clone(),
            w.clone(),
            w.clone(),
            torch.zeros(8, dtype=torch.bool, device=device),
            0.1,
            0.9,
            0.0,
            0.1,
            4,
            False,
        )
    with pytest.raises(ValueError, match=f"admm_dual_update: z is on cpu, u is on {device}"):
        at.kernels.admm_dual_update(w, w.clone(), torch.zeros(8))


def test_optimizer_and_store_validation_errors():
    cfg = at.ATMCConfig(nnz=10)
    model = at.compress_(nn.Sequential(nn.Linear(8, 4)), cfg)
    with pytest.raises(ValueError, match="ADMM: nesterov needs momentum > 0"):
        at.ADMM(model, cfg, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="ADMM: sync_quantizer must be None, True or False, got 'yes'"):
        at.ADMM(model, cfg, sync_quantizer="yes")
    del model.atmc_nnz_budget
    with pytest.raises(ValueError, match="ADMM: the model has no budget buffer"):
        at.ADMM(model, cfg)
    with pytest.raises(ValueError, match="FactorStore needs at least one ATMC layer"):
        FactorStore([])


def test_packed_api_validation_errors():
    packed = pk.pack_(known_formats())
    with pytest.raises(ValueError, match="unpack swaps submodules in place"):
        pk.unpack(packed[0])
    mixed = nn.Sequential(
        packed[0], at.finalize_(at.compress_(nn.Sequential(nn.Linear(64, 4)), at.ATMCConfig(nnz=20, bits=2)))[0]
    )
    with pytest.raises(ValueError, match="save_packed: the model still has ATMC layers"):
        pk.save_packed(mixed, "unused.safetensors")
    raw = at.finalize_(at.compress_(nn.Sequential(nn.Linear(4, 4)).double(), at.ATMCConfig(nnz=8, bits=None)))
    f = next(p for p in (raw[0].U, raw[0].V, raw[0].C) if p.count_nonzero())
    with torch.no_grad():
        f.view(-1)[torch.nonzero(f.view(-1))[0]] = 1 + 1e-12  # not a float32 value
    with pytest.raises(ValueError, match="factor [UVC] has values float32 cannot hold exactly"):
        pk.pack_(raw)

"""`memtrain enhance` and `memtrain export` end to end: real DICOM files, real runtimes, real CLI subprocesses."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import assert_user_error, pydicom_test_file, run_cli
from PIL import Image

from memtrain.cli import main
from memtrain.data.phantom import phantom_radiograph
from memtrain.data.readers import load_source, read_image
from memtrain.data.writers import stored_values
from memtrain.errors import MemtrainError, StrategyError
from memtrain.export import export_model, verification_batch
from memtrain.inference import Enhancer, load_model
from memtrain.strategies.base import Stage, Strategy
from memtrain.strategies.registry import _REGISTRY, register

DICOMS = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm")
PATIENT_FIELDS = ("PatientName", "PatientID", "PatientBirthDate")


def _png16(path: Path, h: int, w: int) -> Path:
    img = phantom_radiograph(5, 0, max(h, w))[:h, :w]
    Image.fromarray((img * 40000 + 1000).astype(np.uint16)).save(path)
    return path


def _user_error_in_process(capsys, argv: list[str], *fragments: str) -> str:
    """The CLI's main() in this process: exit code 2 and one 'memtrain: error:' line with every fragment."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("memtrain: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    return lines[0]


# ------------------------------------------------------------------ enhance


@pytest.mark.slow
def test_enhance_dicom_and_16_bit_png_keep_format_linkage_and_privacy(tmp_path, trained_checkpoint):
    import importlib.util

    names = [n for n in DICOMS if "jp2k" not in n or importlib.util.find_spec("openjpeg")]  # JPEG 2000 needs memtrain[dicom]
    folder = tmp_path / "pngs"
    folder.mkdir()
    png = _png16(folder / "knee.png", 150, 200)  # not a multiple of 32: padded, then cropped back
    inputs = [pydicom_test_file(n) for n in names]
    out = tmp_path / "enhanced"
    proc = run_cli("enhance", str(trained_checkpoint), *map(str, inputs), str(folder), "--out", str(out), "--compare")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr

    model, _ = load_model(trained_checkpoint)
    enhancer = Enhancer(model)
    new_series = set()
    for src in inputs:
        before, after = pydicom.dcmread(src), pydicom.dcmread(out / src.name)
        # Patient identifiers never reach logs or file names.
        for field in PATIENT_FIELDS:
            value = str(before.get(field, "") or "")
            if value:
                assert value not in logs and all(value not in p.name for p in out.rglob("*")), field
        # A derived image of the same patient and study, in a new series, uncompressed little endian.
        assert after.SOPInstanceUID != before.SOPInstanceUID and after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        assert after.SeriesInstanceUID != before.SeriesInstanceUID
        for kept in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName", "SOPClassUID", "Modality"):
            assert after.get(kept) == before.get(kept), kept
        assert list(after.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "memtrain" in after.DerivationDescription
        assert after.SourceImageSequence[0].ReferencedSOPInstanceUID == before.SOPInstanceUID
        assert after.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        # Geometry and pixel attributes of the input; values are the model's output on the input's stored range.
        for attr in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "PhotometricInterpretation", "PixelSpacing"):
            assert after.get(attr) == before.get(attr), attr
        source = load_source(src)
        expected = stored_values(source, enhancer(source.image)[0])
        pixels = after.pixel_array
        assert pixels.dtype == expected.dtype and pixels.shape == (before.Rows, before.Columns)
        assert np.abs(pixels.astype(np.int64) - expected).max() <= 1  # other process, other thread count: rounding may differ by one
        assert source.lo <= pixels.min() and pixels.max() <= source.hi and pixels.std() > 0
        # The VOI window spans the output (modality units).
        slope, intercept = float(after.get("RescaleSlope", 1)), float(after.get("RescaleIntercept", 0))
        lo, hi = pixels.min() * slope + intercept, pixels.max() * slope + intercept
        assert abs(float(after.WindowCenter) - ((lo + hi) / 2 + 0.5)) < 1e-3 and abs(float(after.WindowWidth) - (hi - lo + 1)) < 1e-3
        if before.SeriesInstanceUID.startswith("1.3.6.1.4.1.5962.1.3.4"):  # the four MR files share one series
            new_series.add(after.SeriesInstanceUID)
        with Image.open(out / f"{src.stem}_compare.png") as im:
            assert im.size == (2 * before.Columns + 8, before.Rows)
    assert len(new_series) == 1

    # 16-bit PNG in, 16-bit PNG out, same size, the model's output on the input's gray levels.
    with Image.open(out / "knee.png") as im:
        assert im.mode == "I;16" and im.size == (200, 150)
        written = np.asarray(im, dtype=np.uint16)
    source = load_source(png)
    expected = stored_values(source, enhancer(source.image)[0])
    assert np.abs(written.astype(np.int64) - expected).max() <= 1
    back = read_image(out / "knee.png")
    y = enhancer(source.image)[0]
    assert np.abs(back - (y - y.min()) / (y.max() - y.min())).max() < 2.0 / float(written.max() - written.min())
    assert "knee.png (200x150, png, whole image)" in proc.stdout


@pytest.mark.slow
def test_enhance_corrupt_image_is_a_one_line_error_and_keeps_what_was_written(tmp_path, trained_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    _png16(folder / "a_good.png", 64, 64)
    (folder / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    proc = run_cli("enhance", str(trained_checkpoint), str(folder), "--out", str(tmp_path / "out"))
    assert_user_error(proc, "b_broken.png", "cannot decode PNG image")
    assert (tmp_path / "out" / "a_good.png").is_file()


@pytest.mark.slow
def test_enhance_wrong_checkpoint_is_a_one_line_error(tmp_path):
    image = _png16(tmp_path / "x.png", 64, 64)
    proc = run_cli("enhance", str(image), str(image), "--out", str(tmp_path / "out"))
    assert_user_error(proc, "x.png", "not a readable PyTorch checkpoint")
    assert not (tmp_path / "out").exists()


def test_enhance_flag_and_path_errors(tmp_path, capsys, trained_checkpoint):
    image = _png16(tmp_path / "x.png", 64, 64)
    ckpt = str(trained_checkpoint)
    _user_error_in_process(capsys, ["enhance", ckpt, str(tmp_path / "nope.png"), "--out", str(tmp_path / "o")], "nope.png: no such file or folder")
    _user_error_in_process(capsys, ["enhance", ckpt, str(image), "--out", str(tmp_path / "o"), "--tile", "100"], "--tile 100: expected a multiple of 32")
    _user_error_in_process(capsys, ["enhance", ckpt, str(image), "--out", str(tmp_path)], "would overwrite the input")
    (tmp_path / "empty").mkdir()
    _user_error_in_process(capsys, ["enhance", ckpt, str(tmp_path / "empty"), "--out", str(tmp_path / "o")], "empty: no images in this folder")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x.png").write_bytes(b"earlier result")
    _user_error_in_process(capsys, ["enhance", ckpt, str(image), "--out", str(tmp_path / "o")], "already exist; pass --overwrite")
    assert (tmp_path / "o" / "x.png").read_bytes() == b"earlier result"
    _user_error_in_process(
        capsys, ["enhance", ckpt, str(image), "--out", str(tmp_path / "o"), "--tiling", "exact", "--overlap", "16"], "--overlap 16: applies to --tiling blend"
    )
    assert main(["enhance", ckpt, str(image), "--out", str(tmp_path / "o"), "--overwrite", "--tiling", "blend", "--tile", "32", "--overlap", "0"]) == 0
    assert "4 tiles of 32² px" in capsys.readouterr().out
    assert main(["enhance", ckpt, str(image), "--out", str(tmp_path / "o"), "--overwrite", "--tile", "32"]) == 0  # exact by default
    assert "4 exact tiles of 32² px, halo 32" in capsys.readouterr().out
    assert np.asarray(Image.open(tmp_path / "o" / "x.png")).shape == (64, 64)


# ------------------------------------------------------------------ export


@pytest.mark.slow
def test_export_onnx_with_triton_repository_matches_pytorch(tmp_path, trained_checkpoint):
    ort = pytest.importorskip("onnxruntime", reason="pip install 'memtrain[export]'")

    out, repo = tmp_path / "model", tmp_path / "repo"
    proc = run_cli("export", str(trained_checkpoint), "--format", "onnx", "--out", str(out), "--triton-repo", str(repo), "--name", "enhancer")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "export.json").read_text())
    assert meta["verify_shape"] == [2, 1, 160, 224] and 0 <= meta["max_abs_diff"] <= meta["atol"] == 1e-4
    assert "verified with onnxruntime" in proc.stdout
    config = (repo / "enhancer" / "config.pbtxt").read_text()
    for line in ('name: "enhancer"', 'platform: "onnxruntime_onnx"', "max_batch_size: 8", 'name: "image"', 'name: "enhanced"', "dims: [ 1, -1, -1 ]"):
        assert line in config, line
    assert (repo / "enhancer" / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    # Independently: onnxruntime at yet another size and batch equals the PyTorch model.
    session = ort.InferenceSession(str(repo / "enhancer" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    shapes = [(i.name, i.shape) for i in session.get_inputs()]
    assert shapes[0][0] == "image" and shapes[0][1][1] == 1 and all(isinstance(d, str) for d in (shapes[0][1][0], *shapes[0][1][2:]))
    x = verification_batch(96, 288, n=3)
    model, _ = load_model(trained_checkpoint)
    with torch.no_grad():
        ref = model(x).numpy()
    got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4


def test_export_torchscript_loads_and_matches_at_other_sizes(tmp_path, trained_checkpoint):
    result = export_model(trained_checkpoint, "torchscript", tmp_path / "ts", size=64, triton_repo=tmp_path / "repo", name="ts_model", max_batch_size=2)
    assert result.max_abs_diff <= 1e-4 and result.verify_shape == [2, 1, 96, 160]
    with pytest.warns(FutureWarning):  # TorchScript is deprecated in PyTorch; it still loads
        module = torch.jit.load(str(tmp_path / "repo" / "ts_model" / "1" / "model.pt"))
    x = verification_batch(128, 64, n=1)
    model, _ = load_model(trained_checkpoint)
    with torch.no_grad():
        assert torch.allclose(module(x), model(x), atol=1e-5)
    config = (tmp_path / "repo" / "ts_model" / "config.pbtxt").read_text()
    assert 'platform: "pytorch_libtorch"' in config and 'name: "INPUT__0"' in config and "max_batch_size: 2" in config


def test_export_that_fails_verification_writes_nothing(tmp_path, trained_checkpoint):
    pytest.importorskip("onnxruntime", reason="pip install 'memtrain[export]'")
    with pytest.raises(
        MemtrainError, match=r"verification failed: onnxruntime .* output differs from PyTorch by .* \(tolerance --atol 1e-12\); nothing written"
    ):
        export_model(trained_checkpoint, "onnx", tmp_path / "model", size=64, atol=1e-12, triton_repo=tmp_path / "repo")
    assert not (tmp_path / "model").exists() and not (tmp_path / "repo").exists()


@pytest.mark.slow
def test_export_size_not_a_multiple_of_32_is_a_one_line_error(tmp_path, trained_checkpoint):
    proc = run_cli("export", str(trained_checkpoint), "--format", "onnx", "--out", str(tmp_path / "m"), "--size", "100")
    assert_user_error(proc, "--size 100: expected a multiple of 32", "nearest valid: 96 or 128")
    assert not (tmp_path / "m").exists()


def test_export_flag_errors(tmp_path, capsys, trained_checkpoint):
    ckpt = str(trained_checkpoint)
    out = str(tmp_path / "m")
    _user_error_in_process(capsys, ["export", ckpt, "--format", "keras", "--out", out], "--format keras: expected one of onnx, torchscript")
    _user_error_in_process(capsys, ["export", ckpt, "--format", "onnx", "--out", out, "--verify-size", "100x96"], "--verify-size 100")
    _user_error_in_process(capsys, ["export", ckpt, "--format", "onnx", "--out", out, "--int8"], "--int8: not available", "--strategies quant:qat")
    _user_error_in_process(capsys, ["export", str(tmp_path), "--format", "onnx", "--out", out], "is not a file")
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ int8 hook


class _OnnxRuntimeInt8(Strategy):
    """Test quantize-stage strategy: no training change; int8 through onnxruntime's dynamic quantization of the float export."""

    name = "test-ort-int8"
    stage = Stage.QUANTIZE
    summary = "int8 at export by onnxruntime dynamic quantization (tests only)"

    def export_int8(self, model, example, fmt, float_bytes):
        import tempfile

        from onnxruntime.quantization import QuantType, quantize_dynamic

        if fmt != "onnx":
            raise StrategyError(f"{self.name}: int8 only as ONNX")
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "f.onnx").write_bytes(float_bytes)
            quantize_dynamic(Path(d) / "f.onnx", Path(d) / "q.onnx", weight_type=QuantType.QInt8)
            return (Path(d) / "q.onnx").read_bytes()


@contextlib.contextmanager
def _registered(cls):
    register(cls)
    try:
        yield
    finally:
        _REGISTRY.pop(cls.name, None)


def test_int8_export_through_the_quantize_strategy_hook(tmp_path, trained_checkpoint):
    pytest.importorskip("onnxruntime", reason="pip install 'memtrain[export]'")
    full = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    ckpt = {"state_dict": full["state_dict"], "memtrain": {**full["memtrain"], "strategies": ["test-ort-int8"]}}
    torch.save(ckpt, tmp_path / "q.ckpt")
    with _registered(_OnnxRuntimeInt8):
        result = export_model(tmp_path / "q.ckpt", "onnx", tmp_path / "m", size=64, int8=True, triton_repo=tmp_path / "repo")
    report = result.int8
    assert report is not None and (tmp_path / "m" / "model.int8.onnx").is_file()
    # Reported, not bounded: int8 weights are ~1/4 of the float file, and the output moves a little.
    assert report.bytes < 0.35 * report.float_bytes
    assert 0 < report.max_abs_diff < 1 and report.psnr_db > 15
    assert (tmp_path / "repo" / "enhancer" / "1" / "model.onnx").read_bytes() == (tmp_path / "m" / "model.int8.onnx").read_bytes()
    assert "int8" in (tmp_path / "repo" / "enhancer" / "config.pbtxt").read_text()
    assert json.loads((tmp_path / "m" / "export.json").read_text())["int8"]["bytes"] == report.bytes

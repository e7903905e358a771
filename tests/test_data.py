"""Data: the phantom, image readers (PNG/TIFF/JPEG/DICOM from pydicom's own files), folders, fitting."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from conftest import pydicom_test_file
from PIL import Image

from memtrain.config import DataConfig
from memtrain.data.datasets import FolderDataset, PhantomDataset, pair_targets, scan_folder, split
from memtrain.data.enhance import conventional_enhance
from memtrain.data.module import build_datasets
from memtrain.data.phantom import DETECTOR_MAX, phantom_radiograph
from memtrain.data.readers import read_dicom_pixels, read_image
from memtrain.data.transforms import fit_pair, letterbox
from memtrain.errors import DataError

# ------------------------------------------------------------------ phantom


def test_phantom_is_deterministic_in_seed_and_index():
    a = phantom_radiograph(3, 5, 128)
    assert np.array_equal(a, phantom_radiograph(3, 5, 128))
    assert not np.array_equal(a, phantom_radiograph(3, 6, 128))
    assert not np.array_equal(a, phantom_radiograph(4, 5, 128))


def test_phantom_is_a_12_bit_radiograph_in_unit_range():
    img = phantom_radiograph(0, 0, 256)
    assert img.dtype == np.float32 and img.shape == (256, 256)
    assert img.min() >= 0.0 and img.max() <= 1.0
    levels = img * DETECTOR_MAX
    assert np.allclose(levels, np.round(levels), atol=1e-3)  # quantised to 4096 levels
    # Air around the body is dark, the body is not: there is anatomy, not noise.
    assert img[:, :8].mean() < 0.05 and img[96:160, 96:160].mean() > 0.1
    # Bone (brightest 1 %) stands well above soft tissue (median of the body).
    body = img[img > 0.05]
    assert np.quantile(body, 0.99) > np.median(body) + 0.1


def test_phantom_is_the_same_anatomy_at_every_size():
    small = phantom_radiograph(1, 2, 128)
    large = phantom_radiograph(1, 2, 512)
    pooled = large.reshape(128, 4, 128, 4).mean(axis=(1, 3))
    assert np.corrcoef(small.ravel(), pooled.ravel())[0, 1] > 0.97


def test_phantom_target_is_its_conventional_enhancement():
    ds = PhantomDataset(seed=0, first=10, count=2, size=128)
    x, y = ds[1]
    assert x.shape == y.shape == (1, 128, 128) and x.dtype == y.dtype == torch.float32
    raw = phantom_radiograph(0, 11, 128)
    assert torch.equal(x[0], torch.from_numpy(raw))
    assert torch.equal(y[0], torch.from_numpy(conventional_enhance(raw)))
    assert y.std() > 1.5 * x.std()  # the enhancement stretches contrast
    with pytest.raises(IndexError):
        ds[2]


def test_phantom_split_is_disjoint_and_paper_sized_by_default():
    train, val = build_datasets(DataConfig(size=64))
    assert (len(train), len(val)) == (48, 12)
    assert not torch.equal(train[0][0], val[0][0])
    assert torch.equal(val[0][0][0], torch.from_numpy(phantom_radiograph(0, 48, 64)))


# ------------------------------------------------------------------ raster files


def test_16_bit_png_and_tiff_keep_their_precision(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    raw = rng.integers(1000, 50000, size=(40, 60)).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", raw)
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    for name in ("a.png", "a.tif"):
        img = read_image(tmp_path / name)
        assert img.dtype == np.float32 and img.shape == (40, 60)
        assert np.allclose(img, expected, atol=1e-6), name
        assert len(np.unique(img)) > 1000  # far more than 8 bits of levels


def test_8_bit_jpeg_and_rgb_png(tmp_path):
    gray = (np.linspace(0, 255, 64)[None, :] * np.ones((32, 1))).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "rgb.png")
    jpg = read_image(tmp_path / "g.jpg")
    assert jpg.shape == (32, 64) and abs(jpg[:, -1].mean() - 1.0) < 0.05 and jpg[:, 0].mean() < 0.05
    assert np.allclose(read_image(tmp_path / "rgb.png"), gray / 255.0, atol=1 / 255)


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(DataError, match=r"broken\.png: cannot decode PNG image"):
        read_image(bad)


# ------------------------------------------------------------------ DICOM (pydicom's own test files)


def test_dicom_ct_applies_rescale_slope_and_intercept():
    path = pydicom_test_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    values = read_dicom_pixels(path)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert float(ds.RescaleIntercept) != 0
    assert np.allclose(values, expected)
    img = read_image(path)
    assert img.shape == (128, 128) and img.min() == 0.0 and img.max() == 1.0


def test_dicom_negative_slope_flips_and_monochrome1_is_inverted(tmp_path):
    src = pydicom_test_file("MR_small.dcm")
    plain = read_image(src)
    ds = pydicom.dcmread(src)
    ds.RescaleSlope, ds.RescaleIntercept = -1, 100
    ds.save_as(tmp_path / "neg.dcm")
    assert np.allclose(read_image(tmp_path / "neg.dcm"), 1.0 - plain, atol=1e-6)
    ds = pydicom.dcmread(src)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    assert np.allclose(read_image(tmp_path / "mono1.dcm"), 1.0 - plain, atol=1e-6)


def test_compressed_dicom_decodes_to_the_same_image():
    plain = read_image(pydicom_test_file("MR_small.dcm"))
    # RLE Lossless: pydicom's own decoder.
    assert np.array_equal(read_image(pydicom_test_file("MR_small_RLE.dcm")), plain)
    # JPEG 2000 lossless: needs the optional decoders (memtrain[dicom]).
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg not installed (pip install 'memtrain[dicom]')")
    assert np.array_equal(read_image(pydicom_test_file("MR_small_jp2klossless.dcm")), plain)


def test_compressed_dicom_without_decoder_is_a_clear_error(tmp_path):
    # A fresh interpreter where no JPEG 2000 decoder can be imported (pylibjpeg, GDCM, nor
    # Pillow's openjpeg), as on a machine without them.
    import subprocess
    import sys

    from conftest import cli_env

    code = (
        "import sys\n"
        "for m in ('openjpeg', 'pylibjpeg', 'libjpeg', 'rle', 'gdcm', 'PIL'): sys.modules[m] = None\n"
        "from memtrain.data.readers import read_image\n"
        "from memtrain.errors import DataError\n"
        f"try:\n    read_image({str(pydicom_test_file('MR_small_jp2klossless.dcm'))!r})\n"
        "except DataError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert "compressed DICOM" in out.stdout and "memtrain[dicom]" in out.stdout, out.stdout + out.stderr


def test_non_dicom_file_named_dcm(tmp_path):
    fake = tmp_path / "scan.dcm"
    fake.write_text("not a dicom file")
    with pytest.raises(DataError, match=r"scan\.dcm: not a DICOM file"):
        read_image(fake)


def test_dicom_without_pixels_or_truncated():
    with pytest.raises(DataError, match="no pixel data"):
        read_image(pydicom_test_file("rtplan.dcm"))
    with pytest.raises(DataError, match=r"MR_truncated\.dcm"):
        read_image(pydicom_test_file("MR_truncated.dcm"))


# ------------------------------------------------------------------ folders, pairing, split, fitting


def test_folder_with_paired_targets_by_stem(tmp_path, image_folder):
    import tifffile

    inputs = image_folder("in", n=3, size=64)
    targets = tmp_path / "tg"
    targets.mkdir()
    for p in scan_folder(inputs):
        tifffile.imwrite(targets / f"{p.stem}.tif", (1.0 - read_image(p)).astype(np.float32))
    pairs = pair_targets(scan_folder(inputs), str(targets))
    ds = FolderDataset(pairs, size=64, fit="resize", train=False)
    x, y = ds[0]
    assert torch.allclose(x + y, torch.ones_like(x), atol=1e-5)


def test_missing_targets_are_listed(tmp_path, image_folder):
    inputs = image_folder("in", n=3, size=64)
    targets = tmp_path / "tg"
    targets.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(targets / "img00.png")
    with pytest.raises(DataError, match=r"no target for 2 of 3 input\(s\): img01, img02"):
        pair_targets(scan_folder(inputs), str(targets))


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        scan_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images found \(expected files ending in .png"):
        scan_folder(tmp_path / "empty")


def test_split_is_deterministic_disjoint_and_seeded(image_folder):
    pairs = pair_targets(scan_folder(image_folder("in", n=10, size=32)), "clahe")
    train, val = split(pairs, 0.2, seed=0)
    assert split(pairs, 0.2, seed=0) == (train, val)
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val)
    other = [split(pairs, 0.2, seed=s)[1] for s in range(5)]
    assert len({tuple(p.input.name for p in v) for v in other}) > 1  # the seed matters


def test_letterbox_keeps_aspect_and_crop_is_random_only_in_training():
    img = np.ones((100, 50), np.float32)
    boxed = letterbox(img, 64)
    assert boxed.shape == (64, 64)
    assert boxed[:, 16:48].min() > 0.99 and boxed[:, :15].max() == 0.0  # 32 px wide image centred
    ramp = np.arange(128 * 128, dtype=np.float32).reshape(128, 128)
    c1, _ = fit_pair(ramp, ramp, 64, "crop", None)
    c2, _ = fit_pair(ramp, ramp, 64, "crop", None)
    assert np.array_equal(c1, c2) and c1[0, 0] == ramp[32, 32]
    r = [fit_pair(ramp, ramp, 64, "crop", np.random.default_rng(s))[0][0, 0] for s in range(4)]
    assert len(set(r)) > 1


def test_folder_dataset_fits_non_square_images(image_folder):
    folder = image_folder("in", n=3, size=96, shape=(96, 70))
    _, val = build_datasets(DataConfig(source=str(folder), size=64, val_fraction=0.34))
    x, y = val[0]
    assert x.shape == y.shape == (1, 64, 64)
    assert x[0, :, :3].abs().max() == 0  # letterbox padding on the narrow side

"""Reading radiographs from disk: PNG, TIFF, JPEG (8/16-bit) and DICOM.

Every reader returns a 2-D float32 array normalised to [0, 1] (per-image min–max: a
radiograph's useful range is its own). Problems become a one-line :class:`DataError`
that names the file and says what was expected.

DICOM specifics: the modality LUT (Rescale Slope/Intercept) is applied; MONOCHROME1
images (where high values are dark) are inverted so bone is always bright;
compressed transfer syntaxes decode when pydicom's optional decoders are installed
(``pip install 'memtrain[dicom]'``), otherwise the error says which are missing.
"""

# Lazy imports (optional dependency): tifffile, PIL and pydicom load in the function that reads that format;
# a run on phantoms or PNGs loads none of the others.
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memtrain.errors import DataError

RASTER_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | Path) -> np.ndarray:
    """Read one radiograph as float32 in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        raw = read_dicom_pixels(path)
    elif suffix in RASTER_SUFFIXES:
        raw = _read_raster(path)
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (expected one of {', '.join(IMAGE_SUFFIXES)})")
    return normalize(raw, path)


def normalize(raw: np.ndarray, path: Path | str = "image") -> np.ndarray:
    """Min–max scale to [0, 1] in float32; a constant image becomes all zeros."""
    img = np.asarray(raw, dtype=np.float64)
    if not np.isfinite(img).all():
        raise DataError(f"{path}: contains NaN or infinite pixel values")
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros(img.shape, np.float32)
    return ((img - lo) / (hi - lo)).astype(np.float32)


def _read_raster(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            img = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                    img = np.asarray(im, dtype=np.uint16)
                elif im.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                    img = np.asarray(im.convert("L"))
                else:
                    img = np.asarray(im)
    except Exception as e:
        raise DataError(f"{path}: cannot decode {path.suffix.lower().lstrip('.').upper()} image ({_short(e)})") from None
    return _to_gray(np.asarray(img), path)


def _to_gray(img: np.ndarray, path: Path) -> np.ndarray:
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        rgb = img[..., :3].astype(np.float64)
        img = rgb @ np.array([0.2125, 0.7154, 0.0721])  # ITU-R BT.709 luma, as skimage.color.rgb2gray
    if img.ndim != 2:
        raise DataError(f"{path}: expected a single 2-D grayscale image, got an array of shape {tuple(img.shape)}")
    if min(img.shape) < 2:
        raise DataError(f"{path}: image of shape {tuple(img.shape)} is too small")
    return img


def read_dicom(path: Path):
    """The pydicom dataset of ``path``; a non-DICOM file is a DataError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        raise DataError(f"{path}: not a DICOM file (no DICM preamble/prefix); expected a DICOM Part 10 file") from None
    except Exception as e:
        raise DataError(f"{path}: cannot parse DICOM ({_short(e)})") from None


def read_dicom_pixels(path: Path, ds=None) -> np.ndarray:
    """Modality-LUT pixel values of a single-frame grayscale DICOM, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    ds = ds if ds is not None else read_dicom(path)
    if "PixelData" not in ds:
        raise DataError(f"{path}: DICOM file has no pixel data (SOP Class {getattr(ds, 'SOPClassUID', 'unknown')})")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{path}: expected a grayscale radiograph (MONOCHROME1/2), got PhotometricInterpretation {photometric}")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise DataError(f"{path}: expected a single-frame image, got {int(ds.NumberOfFrames)} frames")
    try:
        pixels = ds.pixel_array
    except Exception as e:
        syntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
        name = getattr(syntax, "name", str(syntax))
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise DataError(
                f"{path}: compressed DICOM ({name}) cannot be decoded here ({_short(e)}); "
                "install the optional decoders: pip install 'memtrain[dicom]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)"
            ) from None
        raise DataError(f"{path}: cannot decode DICOM pixel data ({name}: {_short(e)})") from None
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if photometric == "MONOCHROME1":
        values = values.max() + values.min() - values
    return _to_gray(values, path)


def _short(e: Exception) -> str:
    text = " ".join(str(e).split()) or e.__class__.__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- sources for inference


def has_dicom_preamble(path: Path) -> bool:
    """True if ``path`` starts like a DICOM Part 10 file (128-byte preamble, then 'DICM')."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


@dataclass
class ImageSource:
    """An input image for inference, with what is needed to write its output in the same format.

    ``image`` is what the model sees (float32 in [0, 1], bone bright, as :func:`read_image`
    returns). ``lo``..``hi`` is the range of the stored values it was normalised from —
    DICOM stored pixel values before the modality LUT, or a raster's gray levels — and
    ``inverted`` says that higher stored values are darker (DICOM MONOCHROME1, or a
    negative Rescale Slope). ``dtype`` is the container type to write back.
    """

    path: Path
    kind: str  # "dicom", "png", "tiff" or "jpeg"
    image: np.ndarray
    lo: float
    hi: float
    inverted: bool
    dtype: np.dtype
    dataset: Any = None  # the pydicom Dataset (DICOM only)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.image.shape)


def load_source(path: str | Path) -> ImageSource:
    """Read one image for inference; DataError naming the file if it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES or (suffix not in RASTER_SUFFIXES and has_dicom_preamble(path)):
        return _dicom_source(path)
    if suffix not in RASTER_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix or path.name}' (expected one of {', '.join(IMAGE_SUFFIXES)}, or a DICOM file)")
    raw = _read_raster(path)
    kind = {".png": "png", ".tif": "tiff", ".tiff": "tiff"}.get(suffix, "jpeg")
    return ImageSource(path, kind, normalize(raw, path), float(raw.min()), float(raw.max()), False, _raster_dtype(path, kind))


def _raster_dtype(path: Path, kind: str) -> np.dtype:
    """The sample type to write back: the file's own (gray of an RGB file keeps its bit depth)."""
    if kind == "tiff":
        import tifffile

        with tifffile.TiffFile(path) as tif:
            dt = np.dtype(tif.pages[0].dtype)
        if dt.kind == "f":
            return np.dtype(np.float32)
        if dt.kind == "b":
            return np.dtype(np.uint8)
        return dt
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
    if kind == "png" and mode.startswith("I"):
        return np.dtype(np.uint16)
    return np.dtype(np.uint8)


def _dicom_source(path: Path) -> ImageSource:
    ds = read_dicom(path)
    values = read_dicom_pixels(path, ds)  # validates photometric, frames, decoders
    stored = ds.pixel_array
    if stored.dtype.kind not in "ui" or stored.dtype.itemsize > 2:
        raise DataError(
            f"{path}: {ds.get('BitsAllocated', '?')}-bit {stored.dtype} DICOM pixel data; memtrain enhance reads and writes 8- and 16-bit integer pixels"
        )
    slope = float(ds.get("RescaleSlope", 1) or 1) if "ModalityLUTSequence" not in ds else 1.0
    inverted = (str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1") != (slope < 0)
    return ImageSource(path, "dicom", normalize(values, path), float(stored.min()), float(stored.max()), inverted, stored.dtype.newbyteorder("="), dataset=ds)

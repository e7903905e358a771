"""Writing enhanced images back in their input's format and bit depth.

**Intensity mapping.** The model maps a [0, 1] image (bone bright) to a [0, 1] image.
The output is clipped to [0, 1] and mapped linearly onto the *input's own range of
stored values* ``lo..hi`` (DICOM stored pixel values, a PNG/TIFF/JPEG's gray levels),
in the input's sample type, rounded to integers where the type is integer::

    stored = lo + y * (hi - lo)          (hi - y * (hi - lo) where higher stored values are darker)

so the output needs no more bits than the input had, an unchanged pixel keeps its
value (up to rounding), and reading the output back with memtrain gives the model's
output again (up to the min–max normalisation and rounding). A constant input stays
constant.

**DICOM** (a derived image of the input; pydicom):

* new SOP Instance UID (also in the file meta) and a new Series Instance UID — one
  new series per input series within one run, so images of one series stay together;
  Study Instance UID, Frame of Reference UID, patient and study attributes are kept
  (the derived image belongs to the same patient and study); the SOP Class is kept;
* Image Type ``DERIVED\\SECONDARY`` (further values kept), a Derivation Description,
  a Source Image Sequence pointing to the input instance, Instance Creation Date/Time,
  Series Description suffixed with ``(memtrain enhanced)``;
* pixel data uncompressed, Explicit VR Little Endian for compressed or big-endian
  inputs (others keep their uncompressed transfer syntax); Bits Allocated/Stored, High
  Bit, Pixel Representation and Photometric Interpretation are the input's, and the
  values lie within the input's stored range so they fit; MONOCHROME1 stays
  MONOCHROME1 (the mapping above keeps its sense: higher values darker);
* Rescale Slope/Intercept are kept, so the modality values span the input's range —
  they are enhanced intensities on the input's scale, not physical units (a CT's
  values are no longer Hounsfield units). A Modality LUT Sequence is removed (the
  output is linear in stored values). The enhanced image is meant to be displayed
  linearly over its full range, so the VOI window is set to the output's full
  modality range and any VOI LUT Sequence/Function is removed;
* attributes that would no longer be true are removed: Smallest/Largest Image Pixel
  Value, Pixel Padding Value/Range Limit, the Icon Image Sequence.

**PNG / TIFF / JPEG**: same format and sample type (8 or 16 bit; float TIFF stays
float32); an RGB input is written as gray at its bit depth. JPEG output is re-encoded
at quality 95 (lossy, as the input was).

Nothing here logs or names files after DICOM attributes; output names come from input
file names only.
"""

# Lazy imports (optional dependency): tifffile, PIL and pydicom load in the function that writes that format;
# a run on phantoms or PNGs loads none of the others.
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import warnings
from pathlib import Path

import numpy as np

from memtrain.data.readers import ImageSource
from memtrain.errors import DataError
from memtrain.rundir import atomic_write_bytes

JPEG_QUALITY = 95
DERIVED_SUFFIX = " (memtrain enhanced)"
_REMOVED = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "IconImageSequence",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "VOILUTFunction",
    "WindowCenterWidthExplanation",
)


def stored_values(source: ImageSource, y: np.ndarray) -> np.ndarray:
    """Map a model output in [0, 1] onto the input's stored range and sample type (see module doc)."""
    y = np.clip(np.asarray(y, dtype=np.float64), 0.0, 1.0)
    if source.inverted:
        y = 1.0 - y
    values = source.lo + y * (source.hi - source.lo)
    dtype = np.dtype(source.dtype)
    if dtype.kind == "f":
        return values.astype(dtype)
    info = np.iinfo(dtype)
    lo, hi = max(int(np.floor(source.lo)), info.min), min(int(np.ceil(source.hi)), info.max)
    return np.clip(np.rint(values), lo, hi).astype(dtype)


def encode(source: ImageSource, y: np.ndarray, *, description: str, series_uids: dict[str, str] | None = None) -> bytes:
    """The bytes of the output file for ``source`` with model output ``y``."""
    values = stored_values(source, y)
    if source.kind == "dicom":
        return _dicom_bytes(source, values, description, series_uids if series_uids is not None else {})
    return raster_bytes(values, source.kind, source.path)


def write_enhanced(source: ImageSource, y: np.ndarray, out: Path, *, description: str, series_uids: dict[str, str] | None = None) -> None:
    """Write the enhanced image to ``out`` atomically, in the input's format and bit depth."""
    atomic_write_bytes(out, encode(source, y, description=description, series_uids=series_uids))


def raster_bytes(values: np.ndarray, kind: str, where: Path | str = "image") -> bytes:
    buf = io.BytesIO()
    if kind == "tiff":
        import tifffile

        tifffile.imwrite(buf, values)
        return buf.getvalue()
    from PIL import Image

    if kind == "jpeg":
        if values.dtype != np.uint8:
            raise DataError(f"{where}: JPEG output must be 8-bit, got {values.dtype}")
        Image.fromarray(values).save(buf, format="JPEG", quality=JPEG_QUALITY)
    elif kind == "png":
        if values.dtype not in (np.uint8, np.uint16):
            raise DataError(f"{where}: PNG output must be 8- or 16-bit, got {values.dtype}")
        Image.fromarray(values).save(buf, format="PNG")
    else:
        raise ValueError(f"unknown raster kind {kind!r}")
    return buf.getvalue()


def compare_png(before: np.ndarray, after: np.ndarray, gap: int = 8) -> bytes:
    """An 8-bit PNG: input | output side by side (both in [0, 1]), separated by a white gap."""
    h = before.shape[0]
    sep = np.ones((h, gap), np.float32)
    row = np.concatenate([np.clip(before, 0, 1), sep, np.clip(after, 0, 1)], axis=1)
    return raster_bytes(np.rint(row * 255).astype(np.uint8), "png")


@contextlib.contextmanager
def quiet_pydicom():
    """Silence warnings and pydicom's log records inside the block: they can quote element values (names, IDs)."""
    logger = logging.getLogger("pydicom")
    before = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = before


def _dicom_bytes(source: ImageSource, values: np.ndarray, description: str, series_uids: dict[str, str]) -> bytes:
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = source.dataset
    original_sop_class = ds.get("SOPClassUID")
    original_sop_instance = ds.get("SOPInstanceUID")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or syntax.is_compressed or not syntax.is_little_endian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    photometric = str(ds.PhotometricInterpretation).upper()
    ds.set_pixel_data(values, photometric, int(ds.BitsStored), generate_instance_uid=True)

    old_series = str(ds.get("SeriesInstanceUID", ""))
    if old_series not in series_uids:
        series_uids[old_series] = generate_uid()
    ds.SeriesInstanceUID = series_uids[old_series]
    image_type = [str(v) for v in (ds.get("ImageType") or [])]
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    ds.DerivationDescription = description[:1024]
    if original_sop_class and original_sop_instance:
        ref = Dataset()
        ref.ReferencedSOPClassUID = original_sop_class
        ref.ReferencedSOPInstanceUID = original_sop_instance
        ds.SourceImageSequence = Sequence([ref])
    now = datetime.datetime.now()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    series_description = str(ds.get("SeriesDescription", "") or "").strip()
    ds.SeriesDescription = (series_description[: 64 - len(DERIVED_SUFFIX)] + DERIVED_SUFFIX).strip()
    for keyword in _REMOVED:
        if keyword in ds:
            del ds[keyword]
    # Display the enhanced image linearly over its full range (see module doc).
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    a, b = sorted((float(values.min()) * slope + intercept, float(values.max()) * slope + intercept))
    ds.WindowCenter = _ds_number((a + b) / 2 + 0.5)
    ds.WindowWidth = _ds_number(max(1.0, b - a + 1))
    buf = io.BytesIO()
    # dcmwrite (not save_as) so a big-endian input can be written little endian: the
    # pixel data was just replaced by native little-endian bytes.
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _ds_number(v: float) -> str:
    """A Decimal String value (at most 16 characters)."""
    text = f"{v:.6g}"
    return text if len(text) <= 16 else f"{v:.8e}"

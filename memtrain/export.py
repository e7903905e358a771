"""Export a trained model for serving: ONNX or TorchScript, verified, optionally as a Triton model repository.

* **ONNX** — ``torch.onnx.export(dynamo=True)`` (the ``torch.export``-based exporter,
  PyTorch's default since 2.9; the TorchScript-based one is deprecated), opset 18,
  weights inside the one ``.onnx`` file. Input ``image``: float32 ``(batch, 1, H, W)``;
  output ``enhanced``: the same shape. Batch, H and W are dynamic; H and W must be
  multiples of 32 (exported as ``32*h``, ``32*w``).
* **TorchScript** — ``torch.jit.trace``. TorchScript is deprecated in PyTorch (2.5+ warns
  on every ``torch.jit`` call) but is still what Triton's ``pytorch_libtorch`` backend
  loads, so it is offered; prefer ONNX. The traced U-Net has no shape-dependent Python
  control flow (upsampling uses scale factors), so the trace is valid at every size.
  Input ``INPUT__0``, output ``OUTPUT__0`` in the Triton configuration (the backend's
  naming convention).

**Verification.** The exported file is run by its runtime (onnxruntime on the CPU, or the
reloaded TorchScript module) on a test batch of two phantom radiographs at a size other
than the export size (``--verify-size``, default ``(size+32)×(size+96)``), and compared
with the PyTorch model in float32: the largest absolute difference must be at most
``atol`` (default 1e-4, on outputs whose useful range is [0, 1] — below a 12-bit
quantisation step, 2.4e-4). Otherwise the export fails and nothing is written. Measured
on this project's CPU: ONNX ~1e-5, TorchScript 0 (the same kernels).

**Serving contract** (also written to ``export.json``): the input is one gray channel in
[0, 1] — the image min–max normalised per image, bone bright (DICOM MONOCHROME1
inverted), zero-padded at the bottom/right to a multiple of 32; the output is cropped
back and clipped to [0, 1]. ``memtrain enhance`` does exactly this.

**int8** (``int8=True``): only for a model trained with ``--strategies quant:qat``. The
strategy that quantized the model (stage ``QUANTIZE``) provides the conversion as a
method ``export_int8(model, example, fmt, float_bytes) -> bytes`` — ``model`` the
rebuilt float module (its fake-quant observers included), ``example`` the export input,
``float_bytes`` the verified float export in ``fmt`` (e.g. ONNX QDQ from the observers'
scales, onnxruntime quantization of ``float_bytes``, or ``torch.ao`` convert and trace;
raise StrategyError for a format it cannot produce); memtrain runs the result with the same
runtime on the same test batch and reports its size and its difference from the float
model (max absolute difference, PSNR) — reported, not bounded: quantization changes the
output by design. A checkpoint without such a strategy, or a strategy without the
method, is a clear error.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.ao.quantization import FakeQuantizeBase
from torch.export import Dim

from memtrain import __version__
from memtrain.config import EXPORT_ATOL, EXPORT_FORMATS, EXPORT_SIZE, SIZE_MULTIPLE, check_size
from memtrain.data.phantom import phantom_radiograph
from memtrain.errors import ConfigError, MemtrainError, StrategyError
from memtrain.inference import Trained, load_trained
from memtrain.rundir import atomic_write_bytes, atomic_write_text, check_writable
from memtrain.strategies.base import Stage

FORMATS = EXPORT_FORMATS
FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
INT8_FILES = {"onnx": "model.int8.onnx", "torchscript": "model.int8.pt"}
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}
TENSOR_NAMES = {"onnx": ("image", "enhanced"), "torchscript": ("INPUT__0", "OUTPUT__0")}
DEFAULT_ATOL = EXPORT_ATOL
DEFAULT_SIZE = EXPORT_SIZE
OPSET = 18
# Largest side the ONNX export declares (32 * 2048 = 65536 px); only a bound for torch.export.
MAX_SIDE_BLOCKS = 2048


@dataclass
class Int8Report:
    path: str
    bytes: int
    float_bytes: int
    max_abs_diff: float
    psnr_db: float

    def describe(self) -> str:
        return (
            f"int8 {self.path}: {self.bytes / 2**20:.1f} MiB ({self.bytes / self.float_bytes:.0%} of float), "
            f"vs float model: max |diff| {self.max_abs_diff:.2e}, PSNR {self.psnr_db:.1f} dB"
        )


@dataclass
class Exported:
    format: str
    path: str
    bytes: int
    runtime: str
    verify_shape: list[int]
    max_abs_diff: float
    atol: float
    triton_dir: str | None = None
    int8: Int8Report | None = None

    def describe(self) -> str:
        return (
            f"{self.format} {self.path} ({self.bytes / 2**20:.1f} MiB): verified with {self.runtime} on {'x'.join(map(str, self.verify_shape))}, "
            f"max |diff| vs PyTorch {self.max_abs_diff:.2e} <= {self.atol:g}"
        )


def parse_hw(text: str, flag: str) -> tuple[int, int]:
    """'H' or 'HxW' -> (H, W), each a multiple of 32; ConfigError naming the flag otherwise."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{flag} {text}: expected a size like 160 or 160x224 (multiples of {SIZE_MULTIPLE})") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise ConfigError(f"{flag} {text}: expected a size like 160 or 160x224 (multiples of {SIZE_MULTIPLE})")
    return check_size(values[0], flag), check_size(values[1], flag)


def verification_batch(h: int, w: int, n: int = 2) -> torch.Tensor:
    """``n`` phantom radiographs cropped to h×w, as the model sees images: (n, 1, h, w) in [0, 1]."""
    side = max(h, w)
    imgs = [phantom_radiograph(1234, i, side)[:h, :w] for i in range(n)]
    return torch.from_numpy(np.stack(imgs).astype(np.float32))[:, None]


# --------------------------------------------------------------------------- runtimes


def to_bytes(model: torch.nn.Module, fmt: str, example: torch.Tensor) -> bytes:
    """Serialise ``model`` (eval, float32, CPU) in ``fmt`` with dynamic batch, height and width."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations, graph-break notes); the result is verified below
        if fmt == "onnx":
            try:  # lazy (optional dependency): the `export` extra
                import onnx  # noqa: F401
                import onnxscript  # noqa: F401
            except ImportError as e:
                raise MemtrainError(f"--format onnx: {e.name} is not installed; pip install 'memtrain[export]'") from None

            batch = Dim("batch", min=1, max=1024)
            h = Dim("h", min=1, max=MAX_SIDE_BLOCKS)
            w = Dim("w", min=1, max=MAX_SIDE_BLOCKS)
            name = next(iter(_forward_arg_names(model)), "x")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[TENSOR_NAMES["onnx"][0]],
                output_names=[TENSOR_NAMES["onnx"][1]],
                dynamic_shapes={name: {0: batch, 2: SIZE_MULTIPLE * h, 3: SIZE_MULTIPLE * w}},
                opset_version=OPSET,
                verbose=False,
                optimize=True,
            )
            return program.model_proto.SerializeToString()
        if fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(model, example, check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
            return buf.getvalue()
    raise ConfigError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")


def _forward_arg_names(model: torch.nn.Module) -> list[str]:
    return [p for p in inspect.signature(model.forward).parameters if p != "self"]


class Runner:
    """Runs serialised model bytes with their runtime: onnxruntime (CPU) or the reloaded TorchScript module."""

    def __init__(self, data: bytes, fmt: str) -> None:
        self.fmt = fmt
        if fmt == "onnx":
            try:  # lazy (optional dependency): the `export` extra
                import onnxruntime as ort
            except ImportError:
                raise MemtrainError("--format onnx: onnxruntime is needed to verify the export: pip install 'memtrain[export]'") from None
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.log_severity_level = 3
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
            self.runtime = f"onnxruntime {ort.__version__}"
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.module = torch.jit.load(io.BytesIO(data), map_location="cpu")
            self.runtime = f"TorchScript (torch {torch.__version__})"

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if self.fmt == "onnx":
            return np.asarray(self.session.run(None, {self.input: x.numpy()})[0], dtype=np.float32)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.module(x).float().numpy()


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.max()) if np.isfinite(d).all() else math.inf


def psnr(reference: np.ndarray, other: np.ndarray, data_range: float = 1.0) -> float:
    mse = float(np.mean((np.clip(reference, 0, 1) - np.clip(other, 0, 1)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


# --------------------------------------------------------------------------- export


def export_model(
    checkpoint: str | Path,
    fmt: str,
    out_dir: str | Path,
    *,
    size: int = DEFAULT_SIZE,
    verify_size: tuple[int, int] | None = None,
    atol: float = DEFAULT_ATOL,
    triton_repo: str | Path | None = None,
    name: str = "enhancer",
    max_batch_size: int = 8,
    int8: bool = False,
    overwrite: bool = False,
) -> Exported:
    """Export, verify against PyTorch, then write the model (and the Triton repository); nothing is written if verification fails."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    check_size(size, "--size")
    vh, vw = verify_size if verify_size is not None else (size + SIZE_MULTIPLE, size + 3 * SIZE_MULTIPLE)
    check_size(vh, "--verify-size")
    check_size(vw, "--verify-size")
    if not (atol > 0 and math.isfinite(atol)):
        raise ConfigError(f"--atol {atol}: expected a positive number")
    if max_batch_size < 1:
        raise ConfigError(f"--max-batch-size {max_batch_size}: expected 1 or more")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"--name {name}: expected a Triton model name (letters, digits, '_', '.', '-')")
    out_dir = Path(out_dir).expanduser()
    triton_dir = Path(triton_repo).expanduser() / name if triton_repo is not None else None
    targets = _targets(fmt, out_dir, triton_dir, int8)
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise ConfigError(f"{existing[0]}{more} already exist; pass --overwrite to replace them")
    check_writable(out_dir, "--out")
    if triton_dir is not None:
        check_writable(triton_dir, "--triton-repo")

    trained = load_trained(checkpoint, device="cpu")
    int8_strategy = _int8_strategy(trained) if int8 else None
    if fmt == "onnx" and _fake_quantized(trained.model):
        raise StrategyError(
            f"--format onnx: {trained.path} was trained with {','.join(trained.specs)}: torch.export (the ONNX exporter) has no kernel for "
            f"fake-quantization in torch {torch.__version__}; export it with --format torchscript (add --int8 for the int8 model)"
        )
    model = trained.model.float()
    example = verification_batch(size, size, n=1)
    data = to_bytes(model, fmt, example)

    x = verification_batch(vh, vw, n=2)
    with torch.no_grad():
        reference = model(x).float().numpy()
    runner = Runner(data, fmt)
    diff = max_abs_diff(runner(x), reference)
    if not diff <= atol:
        raise MemtrainError(
            f"--format {fmt}: verification failed: {runner.runtime} output differs from PyTorch by {diff:.3g} on a "
            f"{'x'.join(map(str, x.shape))} test batch (tolerance --atol {atol:g}); nothing written"
        )
    result = Exported(fmt, str(out_dir / FILES[fmt]), len(data), runner.runtime, list(x.shape), diff, atol)

    int8_data = None
    if int8_strategy is not None:
        int8_data, result.int8 = _export_int8(int8_strategy, model, fmt, example, data, x, reference, out_dir)

    # Verified: write everything.
    atomic_write_bytes(out_dir / FILES[fmt], data)
    if int8_data is not None:
        atomic_write_bytes(out_dir / INT8_FILES[fmt], int8_data)
    if triton_dir is not None:
        served = int8_data if int8_data is not None else data
        atomic_write_bytes(triton_dir / "1" / FILES[fmt], served)
        atomic_write_text(triton_dir / "config.pbtxt", triton_config(fmt, name, max_batch_size, trained, int8=int8_data is not None))
        result.triton_dir = str(triton_dir)
    atomic_write_text(out_dir / "export.json", json.dumps(_metadata(result, trained), indent=2) + "\n")
    return result


def _targets(fmt: str, out_dir: Path, triton_dir: Path | None, int8: bool) -> list[Path]:
    targets = [out_dir / FILES[fmt], out_dir / "export.json"]
    if int8:
        targets.append(out_dir / INT8_FILES[fmt])
    if triton_dir is not None:
        targets += [triton_dir / "config.pbtxt", triton_dir / "1" / FILES[fmt]]
    return targets


def _fake_quantized(model: torch.nn.Module) -> bool:
    return any(isinstance(m, FakeQuantizeBase) for m in model.modules())


def _int8_strategy(trained: Trained):
    quantizers = [s for s in trained.strategies if s.stage == Stage.QUANTIZE]
    if not quantizers:
        raise StrategyError(
            f"--int8: not available: {trained.path} was trained with strategies {','.join(trained.specs)}; "
            "int8 export needs a model trained with --strategies quant:qat (quantization-aware training)"
        )
    for s in quantizers:
        if callable(getattr(s, "export_int8", None)):
            return s
    raise StrategyError(f"--int8: not available: strategy {quantizers[0].spec} provides no int8 export (export_int8) in this memtrain")


def _export_int8(strategy, model, fmt, example, float_data, x, reference, out_dir) -> tuple[bytes, Int8Report]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = strategy.export_int8(model, example, fmt, float_data)
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise StrategyError(f"--int8: strategy {strategy.spec} returned no model")
    out = Runner(bytes(data), fmt)(x)
    if out.shape != reference.shape or not np.isfinite(out).all():
        raise MemtrainError(
            f"--int8: the int8 model gives {out.shape} outputs (finite: {bool(np.isfinite(out).all())}), expected {reference.shape}; nothing written"
        )
    report = Int8Report(str(out_dir / INT8_FILES[fmt]), len(data), len(float_data), max_abs_diff(out, reference), psnr(reference, out))
    return bytes(data), report


def triton_config(fmt: str, name: str, max_batch_size: int, trained: Trained, *, int8: bool = False) -> str:
    """A Triton ``config.pbtxt``: dynamic H and W (-1), the batch dimension implicit up to ``max_batch_size``."""
    inp, out = TENSOR_NAMES[fmt]
    cfg = trained.config
    return (
        f"# memtrain export of {trained.path.name}: U-Net {cfg.model.encoder}{' int8' if int8 else ''}, strategies {','.join(trained.specs)}.\n"
        "# Input: one gray channel in [0, 1] (per-image min-max, bone bright), H and W multiples of 32 (zero-pad, crop back).\n"
        "# Output: the enhanced image, same shape; clip to [0, 1].\n"
        f'name: "{name}"\n'
        f'platform: "{PLATFORMS[fmt]}"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        "  {\n"
        f'    name: "{inp}"\n'
        "    data_type: TYPE_FP32\n"
        "    dims: [ 1, -1, -1 ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{out}"\n'
        "    data_type: TYPE_FP32\n"
        "    dims: [ 1, -1, -1 ]\n"
        "  }\n"
        "]\n"
    )


def _metadata(result: Exported, trained: Trained) -> dict[str, Any]:
    inp, out = TENSOR_NAMES[result.format]
    versions = {"memtrain": __version__, "torch": torch.__version__}
    if result.format == "onnx":
        import onnx  # lazy (optional dependency): the `export` extra
        import onnxruntime

        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, opset=OPSET)
    meta = dataclasses.asdict(result)
    meta.update(
        input={"name": inp, "dtype": "float32", "shape": ["batch", 1, "height", "width"], "range": [0.0, 1.0]},
        output={"name": out, "dtype": "float32", "shape": ["batch", 1, "height", "width"]},
        constraints="height and width multiples of 32",
        preprocessing="min-max normalise each image to [0, 1], bone bright (invert DICOM MONOCHROME1), zero-pad bottom/right to a multiple of 32",
        postprocessing="crop the padding, clip to [0, 1]",
        checkpoint=str(trained.path),
        encoder=trained.config.model.encoder,
        trained_size=trained.config.data.size,
        strategies=trained.specs,
        versions=versions,
    )
    return meta

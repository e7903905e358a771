"""What a step needs beyond its live tensor bytes: the headroom model `memtrain plan` and `fit --strategies auto` use.

A step of tensor peak ``T_phase`` (the fake-tensor estimate, per phase) on ``B`` images of
``s × s`` pixels needs

    needed = ceil(max_phase (T_phase + workspace_phase × B·s²) × (1 + fraction)) + fixed

* ``workspace_phase`` (bytes per image pixel): kernel working memory that never becomes a
  tensor and grows with the image — oneDNN convolution workspaces and reorders on a CPU;
  on CUDA what the allocator holds for cuDNN beyond the tensors. A model may give
  ``<phase>@16-bit`` for plans with ``amp`` (16-bit kernels need less).
* ``fraction``: the allocator's rounding and fragmentation, above the peak.
* ``fixed``: what does not grow with the image: the CUDA context, library handles.

The defaults (:func:`default_model`) are: on CUDA, ``fraction`` 10 % and ``fixed`` 1 GiB,
no workspace term (an assumption until ``memtrain calibrate`` measures it on the GPU);
on a CPU, oneDNN's working copy of the largest convolution operand (``CPU_WORKSPACE``, see there),
3 % for the heap and page rounding (``CPU_FRACTION``) and the process's own resident memory
(``CPU_FIXED``) as the fixed part; with glibc's mmap threshold fixed (:mod:`memtrain.memory.allocator`)
this is within 10 % above the measured increase of a CPU step's peak resident memory
(``benchmarks/results/cpu_bound.md``). ``memtrain calibrate`` writes a measured model to :func:`default_path`, which is
then used instead; ``--headroom-model FILE`` names another.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memtrain.errors import ConfigError
from memtrain.memory.scaling import cache_dir
from memtrain.memory.units import fmt_bytes
from memtrain.strategies.tile import ALIGN, auto_side, parse_variant

PHASE_NAMES = ("forward", "backward", "optimizer")
# oneDNN working memory of a CPU step, bytes per image pixel, per phase (a model file may add "<phase>@16-bit").
# A per-op term: while a convolution runs, oneDNN holds a copy of an operand in its blocked layout that never becomes a
# tensor. Measured one convolution at a time (512², 2 threads, glibc's mmap threshold fixed): the copy is the size of the
# input (32→16 channels: 31.7 MiB float32, 15.9 MiB bf16; 64→64 at 256²: 15.9 MiB; 1→64 stride 2: the output, 15.9 MiB),
# 2x the input for a 1-channel output (the head, 16→1: 30.8 MiB). The U-Net's largest is a full-resolution map of 32
# channels (decoder block 4's input; the head's 2 x 16): 32 x 4 = 128 bytes per pixel in float32, 64 in 16 bits.
# Only one convolution runs at a time, so the step's peak gains at most the largest copy.
# Under ``tile`` the full-resolution convolutions run on windows, but the middle of the U-Net stays whole: its largest
# convolution input is decoder block 2's (384 channels at 1/8 resolution: 24 bytes per image pixel in float32, 12 in 16
# bits), 24/128 of the full-resolution one per image pixel. Above ~740 px (one 320 px window) it is the largest copy.
UNTILED_SHARE = 24 / 128
CPU_WORKSPACE = {"forward": 128.0, "backward": 128.0, "optimizer": 0.0, "forward@16-bit": 64.0, "backward@16-bit": 64.0}
# What is left, measured over whole steps (512² minus 64², `benchmarks/cpu_bound.py`): small blocks on glibc's heap, page
# rounding of every mapping, the interpreter's objects. It is 1.0 % (none) and 2.5 % (amp) of the step's increase beyond
# the tensors and the copy above; 3 % covers it (CPU_FRACTION applies to the whole step peak).
CPU_FRACTION = 0.03
# A CPU process's resident memory that is not the step's tensors and does not grow with the image (torch, oneDNN
# and Lightning code and buffers, the interpreter): a real `none` step at 64² peaked at 1,152 MiB RSS for 390 MiB of tensors.
CPU_FIXED = 768 * 2**20
FORMAT = 1


@dataclass(kw_only=True)
class HeadroomModel:
    """The terms of ``needed`` (module docstring) for one device, and where they come from."""

    device: str = field(metadata={"help": "the device the model is for: cuda or cpu"})
    fraction: float = field(default=0.0, metadata={"help": "allocator rounding and fragmentation, a fraction of the step peak"})
    fixed: int = field(default=0, metadata={"help": "bytes that do not grow with the image (CUDA context, handles)"})
    workspace: dict[str, float] = field(default_factory=dict, metadata={"help": "per phase, kernel working memory in bytes per image pixel"})
    source: str = field(default="default", metadata={"help": "where the numbers come from: 'default', or the calibration that measured them"})

    def bound(self, memory) -> int:
        """The step's memory before fraction and fixed: the largest phase's tensor peak plus its workspace."""
        pixels = workspace_pixels(memory)
        low = any(s.split(":")[0] == "amp" for s in memory.strategies.split(","))
        return max(memory.peak(p) + math.ceil(self.per_pixel(p, low) * pixels) for p in PHASE_NAMES if p in memory.phases)

    def per_pixel(self, phase: str, low_precision: bool = False) -> float:
        """Workspace bytes per pixel of ``phase``; ``<phase>@16-bit`` for plans with amp where the model has it."""
        if low_precision and f"{phase}@16-bit" in self.workspace:
            return self.workspace[f"{phase}@16-bit"]
        return self.workspace.get(phase, 0.0)

    def needed(self, memory) -> int:
        return self.needed_for(self.bound(memory))

    def needed_for(self, bound: int) -> int:
        return math.ceil(bound * (1.0 + self.fraction)) + self.fixed

    def describe(self) -> str:
        ws = ", ".join(f"{p} {v:.0f}" for p, v in self.workspace.items() if v)
        ws = ws and ws + " B/px"
        return f"step peak{' + workspace (' + ws + ')' if ws else ''} x {1 + self.fraction:.2f} + {fmt_bytes(self.fixed)} ({self.source})"

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2)


def workspace_pixels(memory) -> int:
    """The pixels the workspace term scales with: the batch's, or under ``tile`` the larger of one tile's window per
    image and the untiled middle's share of the image (``UNTILED_SHARE``).

    ``tile`` runs the full-resolution convolutions on windows of the tile side plus a halo on each side
    (``memtrain.strategies.tile``: 32 px for ResNet18/34, 64 px in the lean form's decoder region), so their
    working copies are a window's, not the image's; the middle's convolutions still see the whole image.
    """
    pixels = memory.batch_size * memory.size * memory.size
    for spec in memory.strategies.split(","):
        name, _, variant = spec.partition(":")
        parsed = parse_variant(variant or "auto") if name == "tile" else None
        if parsed is not None:
            lean, tile = parsed
            halo = 2 * ALIGN if lean else ALIGN
            side = min(memory.size, (tile or auto_side(memory.size, memory.size)) + 2 * halo)
            pixels = max(memory.batch_size * side * side, math.ceil(pixels * UNTILED_SHARE))
    return pixels


def default_model(device: str) -> HeadroomModel:
    if device == "cuda":
        return HeadroomModel(device="cuda", fraction=0.10, fixed=2**30, source="default: x1.10 + 1 GiB, not measured on a GPU (run `memtrain calibrate`)")
    return HeadroomModel(
        device="cpu",
        workspace=dict(CPU_WORKSPACE),
        fraction=CPU_FRACTION,
        fixed=CPU_FIXED,
        source="default: oneDNN working copy + 3 %, measured on a 2-core CPU",
    )


def default_path(device: str) -> Path:
    return cache_dir() / f"headroom-{device}.json"


def load_model(path: str | Path, flag: str = "--headroom-model") -> HeadroomModel:
    """A model file written by `memtrain calibrate` (or by hand); ConfigError naming ``flag`` when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ConfigError(f"{flag} {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{flag} {path}: expected a headroom model written by `memtrain calibrate` (format {FORMAT})")
    try:
        model = HeadroomModel(
            device=str(data["device"]),
            fraction=float(data.get("fraction", 0.0)),
            fixed=int(data.get("fixed", 0)),
            workspace={str(k): float(v) for k, v in (data.get("workspace") or {}).items()},
            source=str(data.get("source", str(path))),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: expected the fields device, fraction, fixed, workspace ({e})") from None
    if model.device not in ("cuda", "cpu") or model.fraction < 0 or model.fixed < 0 or any(v < 0 for v in model.workspace.values()):
        raise ConfigError(f"{flag} {path}: expected device cuda or cpu and no negative terms")
    return model


def model_for(device: str, path: str | Path | None = None) -> HeadroomModel:
    """``path``'s model, else the calibrated one for ``device`` (default_path) if there is one, else the default."""
    if path is not None:
        model = load_model(path)
        if model.device != device:
            raise ConfigError(f"--headroom-model {path}: it is for {model.device}, the plan is for {device}")
        return model
    calibrated = default_path(device)
    if calibrated.is_file():
        return load_model(calibrated, flag=f"calibrated headroom model {calibrated} (delete it or rerun `memtrain calibrate`)")
    return default_model(device)

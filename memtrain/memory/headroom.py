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
on a CPU, the workspace measured on this project's machine (``CPU_WORKSPACE``, see there),
no fraction, and the process's own resident memory (``CPU_FIXED``) as the fixed part. ``memtrain calibrate`` writes a measured model to :func:`default_path`, which is
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

PHASE_NAMES = ("forward", "backward", "optimizer")
# oneDNN working memory of a CPU step, bytes per image pixel, per phase (a model file may add "<phase>@16-bit").
# Measured on this project's 2-core machine (torch 2.14.1, 2 threads, native bf16 CPU kernels): the process's
# peak RSS in a real step at 512² minus the same at 64² (one process, 64² first), less the tensor estimate's
# increase, over 512² − 64² pixels. The measured increase varies between identical runs (none: 523 and 552 MiB;
# amp,checkpoint:full: 155, 270 and 300 MiB), so one table bounds both plans' largest runs with about 10 % to spare:
#   none: forward 517 − 383 = 134 MiB (545 B/px), backward 552 − 306 = 246 MiB (1,000 B/px);
#   amp,checkpoint:full (300 MiB run): needs backward 300 + 390 − 412 = 278 MiB above its 512² tensors (1,112 B/px).
CPU_WORKSPACE = {"forward": 650.0, "backward": 1300.0, "optimizer": 0.0}
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
        pixels = memory.batch_size * memory.size * memory.size
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


def default_model(device: str) -> HeadroomModel:
    if device == "cuda":
        return HeadroomModel(device="cuda", fraction=0.10, fixed=2**30, source="default: x1.10 + 1 GiB, not measured on a GPU (run `memtrain calibrate`)")
    return HeadroomModel(device="cpu", workspace=dict(CPU_WORKSPACE), fixed=CPU_FIXED, source="default: oneDNN workspace measured on a 2-core CPU")


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

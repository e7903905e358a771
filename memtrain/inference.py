"""Inference with a trained model: load a checkpoint as one plain module, enhance images of any size.

**Loading** (:func:`load_trained`, :func:`load_model`). A checkpoint written by
``memtrain fit`` is read with ``torch.load(weights_only=True)`` — no pickled code ever
runs — and must carry the ``memtrain`` section (the run's configuration and its resolved
strategy specs). The network is rebuilt from the configuration alone:

1. ``build_model(cfg.model)`` (without the training-time ``encoder_weights`` file: the
   checkpoint's weights replace it anyway, and the file need not exist where the model
   is served);
2. the *architecture-changing* strategies recorded in the checkpoint — those whose
   :class:`~memtrain.strategies.base.Stage` is ``RESTRUCTURE`` or ``QUANTIZE`` — are
   resolved through the registry and their ``transform`` applied, in stage order;
   every other strategy (checkpoint, offload, precision, placement) is a training-time
   device that must not change ``state_dict`` keys, and is not applied;
3. ``load_state_dict(strict=True)`` with the LightningModule's ``model.`` prefix removed,
   then ``eval()``.

The contract for strategies, so that any trained model loads as one plain module:

* a strategy that does not change the network function keeps ``model.state_dict()``
  keys and shapes unchanged;
* a ``RESTRUCTURE``/``QUANTIZE`` strategy rebuilds the same modules (same keys, same
  buffers) from ``transform(build_model(cfg.model))`` after ``bind(Environment)``,
  without its ``check`` and without any training-only state; its variant is part of
  its recorded spec;
* a ``PLACEMENT`` strategy that shards the model across processes (rpc, pipeline)
  saves a *consolidated* state dict on rank 0, with the same keys as a single-process
  model (``model.<name>`` of the transformed, unsharded network);
* a strategy recorded in the checkpoint but unknown to this installation is an error,
  since it might have changed the architecture.

**Enhancing** (:class:`Enhancer`). An image (2-D, float32 in [0, 1], bone bright — what
:mod:`memtrain.data.readers` returns) is zero-padded at the bottom and right to a
multiple of 32, run through the model and cropped back; the output is clipped to
[0, 1]. Images too large for the memory at hand are processed in tiles, in one of two ways:

* **exact** (the default for a U-Net with a ResNet encoder): the machinery of the ``tile``
  strategy (:func:`memtrain.strategies.tile.tiled`). The full-resolution stages run tile by
  tile, each tile with the halo its receptive field needs (32 px for ResNet18/34, computed
  from the modules) on the stride grid; what crosses into the low-resolution middle of the
  U-Net (``f2`` at ¼, the decoder's input at ⅛) is assembled whole, and the middle runs whole.
  In eval mode BatchNorm uses its running statistics, so each region runs every tile once.
  The output equals whole-image inference up to float32 summation order (measured: max
  |diff| 0.0 at 256² with 64, 96 and 128 px tiles, ResNet18, CPU). Cost: the halo's overlap
  (a 256 px tile computes a 320² window: 1.56× the tiled stages' pixels; 128 px: 2.25×) and
  the whole ¼-resolution tensors, which set a floor: memory is not flat in the image area,
  only below whole-image inference's (tensor bytes at 256², ResNet18: whole 24.1 MiB, 128 px
  tiles 11.8 MiB, 64 px tiles 8.7 MiB; see :meth:`Enhancer.tiled_bytes`).
* **blend**: the whole U-Net on overlapping tiles blended with raised-cosine weights (see
  :func:`blend_weights`): no seams, but not the whole-image output (the deepest features see
  ~400 px, more than any overlap). Used for models exact tiling does not support (``quant:qat``
  fuses BatchNorm into the convolutions), or on request.

Memory rule for automatic tiling: inference holds no autograd graph, so its working
memory is linear in the pixel count. :meth:`Enhancer.bytes_per_pixel` measures it once
per model (and precision) with fake tensors at 256² — exactly what the real forward
allocates as tensors (ResNet34 U-Net: 386 B/px in float32, 195 B/px under bf16
autocast, counted as 195 + 386 on CPUs where the 16-bit convs run on float32 kernels)
— and the need for an H×W input is ``SAFETY × bytes_per_pixel × H × W``,
``SAFETY = 1.25`` covering allocator and kernel workspaces (a real 2048² ResNet34
forward on CPU raised the process RSS by 455 B/px). The budget is ``--memory-budget``
when given, else 90 % of the free CUDA memory, or on CPU half of ``MemAvailable``.
The whole image is processed in one piece when it fits; otherwise the largest square
tile (multiple of 32) that fits is used. For exact tiles the need of each candidate side
(1024, 512, 256, 128, 64 px) is the tiled forward itself measured with fake tensors at the
image's size (:meth:`Enhancer.tiled_bytes`), times ``SAFETY``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.ao.quantization import FakeQuantizeBase, disable_observer
from torch.ao.quantization.observer import ObserverBase

from memtrain.config import SIZE_MULTIPLE, FitConfig, from_dict
from memtrain.errors import CheckpointError, ConfigError, MemtrainError, StrategyError
from memtrain.memory.tensor import LiveTensorBytes, TensorBytesMode
from memtrain.model import build_model, state_dict_mismatch
from memtrain.strategies.base import Environment, Stage, Strategy
from memtrain.strategies.registry import available, create
from memtrain.strategies.tf32 import fp32_precision
from memtrain.strategies.tile import make_tiles, tiled, unsupported

SECTION = "memtrain"
STATE_PREFIX = "model."
#: Strategy stages whose transform changes the network and so is replayed at load time.
ARCHITECTURE_STAGES = (Stage.RESTRUCTURE, Stage.QUANTIZE)
#: Headroom over the tensor bytes measured with fake tensors (allocator, kernel workspaces).
SAFETY = 1.25
#: Side of the fake-tensor probe that measures bytes per pixel.
PROBE = 256
DEFAULT_OVERLAP = 64
#: How images too large for memory are tiled: exact when the model supports it (auto), exact, or blended.
TILINGS = ("auto", "exact", "blend")
#: Exact tile sides tried, largest first, when the whole image does not fit.
EXACT_SIDES = (1024, 512, 256, 128, 64)


# --------------------------------------------------------------------------- loading


@dataclass
class Trained:
    """A trained model rebuilt from its checkpoint, ready for inference."""

    model: nn.Module
    config: FitConfig
    strategies: list[Strategy]  # every strategy recorded in the checkpoint, bound, in stage order
    path: Path

    @property
    def specs(self) -> list[str]:
        return [s.spec for s in self.strategies] or ["none"]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint as a dict, loaded weights-only; CheckpointError naming the file otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a file (expected a .ckpt written by `memtrain fit`, e.g. RUN/checkpoints/best.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        found = re.search(r"Unsupported global: (GLOBAL \S+)", text)
        if found:
            raise CheckpointError(
                f"{path}: refused: loading it would run pickled code ({found.group(1)} is not plain tensor data); "
                "memtrain loads checkpoints weights-only — expected a .ckpt written by `memtrain fit`"
            ) from None
        detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({(detail.group(1) if detail else text)[:120]})") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is not a file (expected a .ckpt written by `memtrain fit`)") from None
    except PermissionError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        first = " ".join(str(e).split())[:160]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt? {e.__class__.__name__}: {first})") from None
    except Exception as e:  # any other decoding failure of foreign bytes (a text file gives KeyError) is the file's fault
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (a text file or another format? {e.__class__.__name__} while decoding); expected a .ckpt written by `memtrain fit`"
        ) from None
    if not isinstance(ckpt, dict) or SECTION not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a memtrain checkpoint (no '{SECTION}' section and state_dict; expected a .ckpt written by `memtrain fit`)")
    section = ckpt[SECTION]
    if not isinstance(section, dict) or not isinstance(section.get("config"), dict):
        raise CheckpointError(f"{path}: its '{SECTION}' section has no run configuration")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], path: Path) -> FitConfig:
    try:
        # Checkpoints written before a key was renamed load silently: the reader cannot edit them.
        return from_dict(ckpt[SECTION]["config"], f"{path} (saved configuration)", warn_renamed=False)
    except ConfigError as e:
        raise CheckpointError(f"{e} — the checkpoint was written by another memtrain version") from None


def checkpoint_strategies(ckpt: dict[str, Any], path: Path, env: Environment) -> list[Strategy]:
    """The strategies recorded in the checkpoint, instantiated through the registry, bound, in stage order."""
    specs = ckpt[SECTION].get("strategies") or ckpt[SECTION]["config"].get("strategies") or ["none"]
    found: list[Strategy] = []
    for spec in specs:
        try:
            strategy = create(str(spec))
        except StrategyError:
            raise CheckpointError(
                f"{path}: trained with strategy '{spec}', which this memtrain does not provide (available: {', '.join(available())}); "
                "it may change the architecture, so the model cannot be rebuilt"
            ) from None
        if strategy.name != "none":
            strategy.bind(env)
            found.append(strategy)
    return sorted(found, key=lambda s: s.stage)


def load_trained(path: str | Path, *, device: str | torch.device = "cpu") -> Trained:
    """Rebuild the trained network of a ``memtrain fit`` checkpoint as one plain module in eval mode."""
    path = Path(path).expanduser()
    ckpt = read_checkpoint(path)
    cfg = checkpoint_config(ckpt, path)
    env = Environment(device=torch.device(device).type)
    strategies = checkpoint_strategies(ckpt, path, env)
    # The checkpoint's weights replace any initial encoder weights; the file need not exist here.
    model = build_model(dataclasses.replace(cfg.model, encoder_weights=None))
    for strategy in strategies:
        if strategy.stage in ARCHITECTURE_STAGES:
            model = strategy.transform(model)
    state = ckpt["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: its state_dict is not a mapping of parameter names to tensors")
    weights = {k[len(STATE_PREFIX) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(STATE_PREFIX)}
    _check_keys(model, weights, path, strategies)
    model.load_state_dict(weights, strict=True)
    model.eval().requires_grad_(False)
    freeze_observers(model)
    return Trained(model.to(device), cfg, strategies, path)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, FitConfig]:
    """``(model, config)`` of a ``memtrain fit`` checkpoint: one plain module, eval mode, no gradients."""
    trained = load_trained(path, device=device)
    return trained.model, trained.config


def _check_keys(model: nn.Module, weights: dict[str, torch.Tensor], path: Path, strategies: list[Strategy]) -> None:
    parts = state_dict_mismatch(model.state_dict(), weights, skip_shape=_self_resizing_prefixes(model))
    if parts:
        label = ",".join(s.spec for s in strategies) or "none"
        raise CheckpointError(f"{path}: weights do not match the rebuilt model (strategies: {label}): " + "; ".join(parts))


def freeze_observers(model: nn.Module) -> nn.Module:
    """Stop ``torch.ao`` fake-quant observers (``quant:qat``) from updating: inference must be a pure function.

    A ``FakeQuantize`` observes whenever its ``observer_enabled`` flag is set, in eval mode
    too, so without this every forward would move the quantization ranges and the same
    image would enhance differently depending on what ran before. The trained ranges are
    kept, and fake quantization stays on (it is what the int8 model computes).
    """
    return model.apply(disable_observer)


def _self_resizing_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of modules that resize their own buffers on load.

    ``torch.ao`` fake-quant modules and observers start with 1-element ``scale`` /
    ``zero_point`` / ``min_val`` / ``max_val`` buffers that become per-channel after the
    first training forward; their ``_load_from_state_dict`` resizes them to the saved
    shapes (a ``quant:qat`` checkpoint), so a shape difference there is not a mismatch.
    """
    return tuple(f"{name}." for name, mod in model.named_modules() if name and isinstance(mod, (FakeQuantizeBase, ObserverBase)))


# --------------------------------------------------------------------------- memory


def available_memory(device: torch.device) -> int:
    """Bytes inference may use: 90 % of free CUDA memory, or half of the CPU's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(0.9 * free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def pad_amount(n: int, multiple: int = SIZE_MULTIPLE) -> int:
    return -n % multiple


# --------------------------------------------------------------------------- tiling


def tile_starts(n: int, tile: int, overlap: int, align: int = SIZE_MULTIPLE) -> list[int]:
    """Evenly spaced tile offsets covering ``n`` px: multiples of ``align``, neighbours overlapping by at least ``overlap``.

    Offsets are multiples of 32 so that every tile's stride-2 grids (the U-Net
    downsamples five times) coincide with the whole image's.
    """
    if tile >= n:
        return [0]
    count = math.ceil((n - tile) / max(1, tile - overlap)) + 1
    while True:
        starts = [min(n - tile, round(i * (n - tile) / (count - 1) / align) * align) for i in range(count)]
        starts[-1] = n - tile
        if all(b - a <= tile - overlap for a, b in itertools.pairwise(starts)):
            return starts
        count += 1


def _axis_weights(starts: list[int], tile: int, n: int) -> list[np.ndarray]:
    """Per-tile 1-D weights along one axis.

    Where two tiles overlap by k px, the middle half of the overlap is a blending band
    in which one tile ramps down as cos² and the other up as sin² (they sum to one), and
    the quarter of the overlap beyond each tile's band gets weight zero: pixels that
    close to a tile's inner edge are computed only as context for the others. At the
    image border a tile keeps full weight. The result is divided by the weight sum, so
    any uneven overlap stays normalised.
    """
    length = min(tile, n)
    out = []
    for i, s in enumerate(starts):
        w = np.ones(length, np.float64)
        k = starts[i - 1] + length - s if i > 0 else 0
        if k > 0:  # band shared with the previous tile, in this tile's coordinates
            b = max(1, k // 2)
            m = (k - b) // 2
            w[:m] = 0.0
            w[m : m + b] *= np.sin(0.5 * np.pi * (np.arange(b) + 0.5) / b) ** 2
        k = s + length - starts[i + 1] if i + 1 < len(starts) else 0
        if k > 0:  # band shared with the next tile
            b = max(1, k // 2)
            m = (k - b) // 2
            first = length - k + m
            w[first : first + b] *= np.cos(0.5 * np.pi * (np.arange(b) + 0.5) / b) ** 2
            w[first + b :] = 0.0
        out.append(w)
    return out


def blend_weights(starts_y: list[int], starts_x: list[int], tile: int, h: int, w: int) -> list[tuple[int, int, np.ndarray]]:
    """``(top, left, 2-D weight)`` for every tile of the grid (separable raised-cosine windows)."""
    wy, wx = _axis_weights(starts_y, tile, h), _axis_weights(starts_x, tile, w)
    return [(top, left, np.outer(a, b).astype(np.float32)) for top, a in zip(starts_y, wy) for left, b in zip(starts_x, wx)]


@dataclass(frozen=True)
class Tiling:
    """How one image is processed: whole (``tile`` None) or in ``tiles`` tiles of ``tile``² px."""

    tile: int | None
    overlap: int
    tiles: int
    need_bytes: int  # estimated working memory of one forward
    reason: str
    exact: bool = False  # exact tiles (tile's machinery, halo ``halo``) rather than blended ones
    halo: int = 0

    def describe(self) -> str:
        if self.tile is None:
            return "whole image"
        if self.exact:
            return f"{self.tiles} exact tile{'' if self.tiles == 1 else 's'} of {self.tile}² px, halo {self.halo} ({self.reason})"
        return f"{self.tiles} tile{'' if self.tiles == 1 else 's'} of {self.tile}² px, overlap {self.overlap} ({self.reason})"


class Enhancer:
    """Runs a trained model on whole images of any size, tiling when memory requires it.

    ``amp``: autocast to 16 bits (bf16 on CPU and on GPUs with native bf16, else fp16);
    on CPUs without native bf16 kernels the convolutions run on float32 kernels
    (:class:`~memtrain.strategies.amp.LowPrecisionConvOnFloat32`), numerically the
    same as a native kernel and ~30x faster than PyTorch's fallback.

    ``tiling``: ``"exact"`` tiles equal to whole-image inference (the ``tile`` strategy's
    regions; a U-Net with a ResNet encoder and BatchNorm, see the module docstring), ``"blend"``
    overlapping whole-model tiles blended with raised-cosine weights, or ``"auto"``: exact
    when the model supports it, else blend.
    """

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu", amp: bool = False, max_memory: int | None = None, tiling: str = "auto") -> None:
        if tiling not in TILINGS:
            raise ConfigError(f"--tiling {tiling}: expected one of {', '.join(TILINGS)}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.amp = None
        if amp:
            self.amp = create("amp")
            self.amp.bind(Environment.detect(self.device.type))
        self.max_memory = max_memory
        problem = unsupported(self.model)
        if tiling == "exact" and problem is not None:
            raise ConfigError(f"--tiling exact: this model cannot be tiled exactly ({problem}); use --tiling blend")
        self.exact = tiling == "exact" or (tiling == "auto" and problem is None)
        self.fallback = tiling == "auto"  # blended tiles when exact ones cannot fit
        self._bpp: float | None = None
        self._halo: int | None = None
        self._tiled_need: dict[tuple[int, int, int], int] = {}

    # -- contexts ------------------------------------------------------------------------
    def session(self) -> contextlib.AbstractContextManager:
        """Process-wide settings for inference (IEEE float32; the CPU 16-bit conv router under amp)."""
        stack = contextlib.ExitStack()
        stack.enter_context(fp32_precision("ieee"))
        if self.amp is not None:
            stack.enter_context(self.amp.session())
        return stack

    def _autocast(self) -> contextlib.AbstractContextManager:
        # The weight-cast cache stays on (torch's default): as before the precision became declared data.
        return self.amp.precision().autocast(cache_enabled=True) if self.amp is not None else contextlib.nullcontext()

    @property
    def precision(self) -> str:
        return f"{self.amp.precision().name} autocast" if self.amp is not None else "float32"

    # -- memory --------------------------------------------------------------------------
    def bytes_per_pixel(self) -> float:
        """Tensor bytes per input pixel of one inference forward, measured once with fake tensors.

        Under ``--amp`` on a CPU without native 16-bit kernels, the session's conv router
        (:class:`~memtrain.strategies.amp.LowPrecisionConvOnFloat32`) computes every conv in
        float32 from 16-bit inputs, holding float32 copies next to the 16-bit tensors; it
        does not run under fake tensors, so the bound used is the 16-bit forward's bytes
        plus the float32 forward's (measured: 1024² ResNet34, real peak RSS increase
        2.5x the 16-bit tensor bytes, 1.06x the float32 ones; see
        ``benchmarks/results/inference_memory_cpu.md``).
        """
        if self._bpp is None:
            self._bpp = self._probe(autocast=self.amp is not None)
            if self.amp is not None and self.device.type == "cpu" and not self.amp.env.native_bf16:
                self._bpp += self._probe(autocast=False)
        return self._bpp

    def _probe(self, *, autocast: bool) -> float:
        counter = LiveTensorBytes()
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.empty(1, 1, PROBE, PROBE, device=self.device)
            with torch.no_grad(), self._autocast() if autocast else contextlib.nullcontext(), TensorBytesMode(counter):
                counter.track(x)
                out = self.model(x)
                del out
        return counter.peak / (PROBE * PROBE)

    def tiled_bytes(self, h: int, w: int, side: int) -> int:
        """Tensor bytes of one exact tiled forward of an ``h``×``w`` image in ``side``² tiles, measured with fake tensors.

        The tiled forward runs for real on fake tensors (every tile of both regions), so this
        is what it allocates: the whole tensors that cross the regions (image, ``f2`` at ¼
        with 64 channels, the middle's features, the decoder's ⅛ input, the output) plus one
        tile window's working set. Under ``--amp`` on a CPU without native 16-bit kernels the
        float32 forward's bytes are added, as for :meth:`bytes_per_pixel`.
        """
        key = (h, w, side)
        if key not in self._tiled_need:  # measured once per image size (a folder of scans usually shares one)
            need = self._probe_tiled(h, w, side, autocast=self.amp is not None)
            if self.amp is not None and self.device.type == "cpu" and not self.amp.env.native_bf16:
                need += self._probe_tiled(h, w, side, autocast=False)
            self._tiled_need[key] = need
        return self._tiled_need[key]

    def _probe_tiled(self, h: int, w: int, side: int, *, autocast: bool) -> int:
        counter = LiveTensorBytes()
        with FakeTensorMode(allow_non_fake_inputs=True), tiled(self.model, side):
            x = torch.empty(1, 1, h, w, device=self.device)
            with torch.no_grad(), self._autocast() if autocast else contextlib.nullcontext(), TensorBytesMode(counter):
                counter.track(x)
                out = self.model(x)
                del out
        return counter.peak

    def halo(self) -> int:
        """Full-resolution halo of exact tiles (the receptive radius of the tiled regions, rounded up to 32 px)."""
        if self._halo is None:
            with tiled(self.model, None) as t:
                self._halo = t.halo
        return self._halo

    def need_bytes(self, h: int, w: int) -> int:
        return int(SAFETY * self.bytes_per_pixel() * h * w)

    def budget(self) -> int:
        return self.max_memory if self.max_memory is not None else available_memory(self.device)

    def plan(self, h: int, w: int, *, tile: int | None = None, overlap: int = DEFAULT_OVERLAP) -> Tiling:
        """Whole image or tiles for an ``h``×``w`` image (sizes after padding to a multiple of 32)."""
        if overlap < 0:
            raise ConfigError(f"--overlap {overlap}: expected 0 or more pixels")
        if tile is not None:
            return self._exact(h, w, tile, "--tile") if self.exact else self._tiling(h, w, tile, overlap, "--tile")
        need = self.need_bytes(h, w)
        budget = self.budget()
        if need <= budget:
            return Tiling(None, 0, 1, need, "fits")
        reason = f"whole image needs ~{_gib(need)}, {_gib(budget)} available"
        if self.exact:
            smallest = need
            for side in (s for s in EXACT_SIDES if s < max(h, w)):
                tiling = self._exact(h, w, side, reason)
                if tiling.need_bytes <= budget:
                    return tiling
                if tiling.need_bytes >= smallest:
                    break  # the floor: the whole ¼-resolution tensors and the middle, which smaller tiles do not shrink
                smallest = tiling.need_bytes
            if not self.fallback:
                raise MemtrainError(
                    f"not enough memory for exact tiles of a {w}x{h} image (at least {_gib(smallest)} needed: the whole ¼-resolution "
                    f"tensors stay; {_gib(budget)} available); free memory, use --amp, set --max-memory, or use --tiling blend"
                )
            reason = f"exact tiles need at least ~{_gib(smallest)}, {_gib(budget)} available"
        side = int(math.sqrt(budget / (SAFETY * self.bytes_per_pixel()))) // SIZE_MULTIPLE * SIZE_MULTIPLE
        smallest = max(SIZE_MULTIPLE * 4, 2 * overlap + SIZE_MULTIPLE)
        if side < smallest:
            raise MemtrainError(
                f"not enough memory for even a {smallest}² tile ({_gib(self.need_bytes(smallest, smallest))} needed, {_gib(budget)} available); "
                "free memory, use --amp, or set --memory-budget"
            )
        return self._tiling(h, w, side, overlap, reason)

    @staticmethod
    def _check_tile(tile: int) -> None:
        if tile < SIZE_MULTIPLE or tile % SIZE_MULTIPLE:
            lower = max(SIZE_MULTIPLE, tile // SIZE_MULTIPLE * SIZE_MULTIPLE)
            raise ConfigError(f"--tile {tile}: expected a multiple of {SIZE_MULTIPLE} (the U-Net downsamples 5 times); e.g. {lower}")

    def _exact(self, h: int, w: int, tile: int, reason: str) -> Tiling:
        self._check_tile(tile)
        halo = self.halo()
        n = len(make_tiles(h, w, tile, halo))
        return Tiling(tile, 0, n, int(SAFETY * self.tiled_bytes(h, w, tile)), reason, exact=True, halo=halo)

    def _tiling(self, h: int, w: int, tile: int, overlap: int, reason: str) -> Tiling:
        self._check_tile(tile)
        if 2 * overlap > tile:
            raise ConfigError(f"--overlap {overlap}: expected at most half the tile ({tile // 2} for --tile {tile})")
        n = len(tile_starts(h, tile, overlap)) * len(tile_starts(w, tile, overlap))
        return Tiling(tile, overlap, n, self.need_bytes(min(tile, h), min(tile, w)), reason)

    # -- running -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on a (N, 1, H, W) batch with H, W multiples of 32; float32 output on the CPU."""
        with torch.no_grad(), self._autocast():
            return self.model(x.to(self.device)).float().cpu()

    def __call__(self, image: np.ndarray, *, tile: int | None = None, overlap: int = DEFAULT_OVERLAP) -> tuple[np.ndarray, Tiling]:
        """Enhance one 2-D image in [0, 1]; returns the output (same shape, clipped to [0, 1]) and how it was tiled."""
        img = np.asarray(image, dtype=np.float32)
        if img.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {img.shape}")
        h, w = img.shape
        ph, pw = pad_amount(h), pad_amount(w)
        padded = torch.from_numpy(np.pad(img, ((0, ph), (0, pw))))
        H, W = padded.shape
        tiling = self.plan(H, W, tile=tile, overlap=overlap)
        with self.session():
            if tiling.tile is None:
                out = self.forward(padded[None, None])[0, 0]
            elif tiling.exact:
                out = self.exact_tiled(padded[None, None], tiling.tile)[0, 0]
            else:
                out = self._tiled(padded, tiling.tile, tiling.overlap)
        return out[:h, :w].clamp(0.0, 1.0).numpy(), tiling

    def exact_tiled(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        """The model on a (N, 1, H, W) batch in exact ``tile``² tiles: whole-image inference, summed in another order."""
        with tiled(self.model, tile):
            return self.forward(x)

    def _tiled(self, padded: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        H, W = padded.shape
        th, tw = min(tile, H), min(tile, W)
        acc = torch.zeros(H, W)
        total = torch.zeros(H, W)
        for top, left, weight in blend_weights(tile_starts(H, tile, overlap), tile_starts(W, tile, overlap), tile, H, W):
            piece = self.forward(padded[None, None, top : top + th, left : left + tw])[0, 0]
            wt = torch.from_numpy(weight)
            acc[top : top + th, left : left + tw] += piece * wt
            total[top : top + th, left : left + tw] += wt
        return acc / total


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"

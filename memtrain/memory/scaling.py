"""A step's tensor memory at any size from fake-tensor traces at three small sizes, cached on disk.

In a fully convolutional network every tensor's shape is linear in the image side ``s``
on the stride grid (multiples of 32): ``s/2^k`` for the U-Net, ``s/2^k − c`` for the
loss's 'valid' Gaussian filters — above 160 px, where the loss's window stops shrinking with
the size (memtrain.loss.window_for), hence :data:`SIZES` from 192 px. So each storage's bytes, and the live bytes at each
event of the step, are a polynomial of degree ≤ 2 in ``s``, exactly (integer arithmetic).

:func:`memtrain.memory.estimate.measure_sizes` records, per phase, the local maxima of the
live bytes (one snapshot before every release that follows an allocation; their maximum is
the phase's peak) at :data:`SIZES`. When the three event sequences have the same length,
each event is the quadratic through its three values (Lagrange, exact), the phase peak at
size ``s`` is the maximum over the events at ``s``, and the peak's breakdown by category is
that event's. The model is checked against a trace at :data:`VERIFY_SIZE` — every event,
exactly — and refused (``None``: estimate directly at the target size) when the sequences
differ or the check fails.

A strategy whose event sequence depends on the size (``Strategy.size_polynomial = False``)
is never extrapolated.

Models are cached as JSON under ``$MEMTRAIN_CACHE_DIR`` (default
``$XDG_CACHE_HOME/memtrain`` or ``~/.cache/memtrain``), keyed by the torch, smp and memtrain
versions, the encoder, the combination, the batch size and the target environment.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from memtrain.memory.tracker import PHASES

SIZES = (192, 224, 256)
VERIFY_SIZE = 320
CATEGORY_KEYS = ("tensor_peak_parameters", "tensor_peak_gradients", "tensor_peak_optimizer_state", "tensor_peak_activations")
FORMAT = 1


def _quadratic(values: tuple[int, int, int], s: int, xs: tuple[int, int, int] = SIZES) -> int:
    """The quadratic through (xs[i], values[i]) at ``s``, in exact integer arithmetic (rounded when not integral)."""
    (x0, x1, x2), (v0, v1, v2) = xs, values
    d0, d1, d2 = (x0 - x1) * (x0 - x2), (x1 - x0) * (x1 - x2), (x2 - x0) * (x2 - x1)
    value = Fraction(v0 * (s - x1) * (s - x2), d0) + Fraction(v1 * (s - x0) * (s - x2), d1) + Fraction(v2 * (s - x0) * (s - x1), d2)
    return round(value)


@dataclass
class SizeModel:
    """Per phase, each event's [current, *categories] at the three :data:`SIZES`; plus the step's starting bytes."""

    events: dict[str, list[list[list[int]]]]  # phase -> event -> size index -> [current, p, g, o, a]
    step_start: tuple[int, int, int]

    @classmethod
    def fit(cls, traces) -> SizeModel | None:
        """From three StepMemory (measure_sizes at SIZES); None if their event sequences differ."""
        if [t.size for t in traces] != list(SIZES):
            raise ValueError(f"expected traces at {SIZES}")
        events = {}
        for phase in PHASES:
            seqs = [t.events.get(phase, []) for t in traces]
            if len({len(q) for q in seqs}) != 1 or not seqs[0]:
                return None
            events[phase] = [list(map(list, zip(*rows))) for rows in zip(*seqs)]
        return cls(events, tuple(t.step_start for t in traces))

    def phase_at(self, phase: str, size: int) -> dict[str, int]:
        """``tensor_peak``, ``tensor_increase`` and the peak's breakdown of ``phase`` at ``size``."""
        best = None
        for ev in self.events[phase]:
            current = _quadratic(tuple(ev[0]), size)
            if best is None or current > best[0]:
                best = (current, ev)
        current, ev = best
        start = _quadratic(self.step_start, size)
        out = {"tensor_peak": current, "tensor_increase": current - start}
        out.update({k: _quadratic(tuple(ev[1 + i]), size) for i, k in enumerate(CATEGORY_KEYS)})
        return out

    def event_values(self, phase: str, size: int) -> list[int]:
        return [_quadratic(tuple(ev[0]), size) for ev in self.events[phase]]

    def matches(self, trace) -> bool:
        """Whether every event of ``trace`` (a StepMemory with events, at another size) is what the model predicts."""
        for phase in PHASES:
            got = [e[0] for e in trace.events.get(phase, [])]
            if got != self.event_values(phase, trace.size):
                return False
        return _quadratic(self.step_start, trace.size) == trace.step_start

    def at(self, size: int, *, strategies: str, batch_size: int, device: str):
        from memtrain.memory.estimate import StepMemory

        phases = {p: self.phase_at(p, size) for p in PHASES}
        return StepMemory(strategies, size, batch_size, True, phases, device=device, step_start=_quadratic(self.step_start, size))

    def to_json(self) -> dict:
        return {"format": FORMAT, "events": self.events, "step_start": list(self.step_start)}

    @classmethod
    def from_json(cls, data: dict) -> SizeModel:
        return cls({p: data["events"][p] for p in PHASES}, tuple(data["step_start"]))


def cache_dir() -> Path:
    """Where size models are cached: $MEMTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/memtrain, else ~/.cache/memtrain."""
    if os.environ.get("MEMTRAIN_CACHE_DIR"):
        return Path(os.environ["MEMTRAIN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memtrain"


def cache_key(combo: str, *, batch_size: int, encoder: str, loss: str = "msssim", env) -> str:
    """A hash of everything the traces depend on: versions, model, combination, batch and target."""
    import segmentation_models_pytorch as smp
    import torch

    import memtrain

    what = {
        "format": FORMAT,
        "sizes": [*SIZES, VERIFY_SIZE],
        "torch": torch.__version__,
        "smp": smp.__version__,
        "memtrain": memtrain.__version__,
        "encoder": encoder,
        "loss": loss,
        "combo": combo,
        "batch_size": batch_size,
        "device": env.device,
        "native_bf16": env.native_bf16,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def _cache_path(key: str) -> Path:
    return cache_dir() / "plan" / f"{key}.json"


def load(key: str) -> SizeModel | str | None:
    """The cached model, the cached reason it cannot be extrapolated (str), or None when not cached (or unreadable)."""
    try:
        data = json.loads(_cache_path(key).read_text())
        if data.get("format") != FORMAT:
            return None
        return data["direct"] if "direct" in data else SizeModel.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(key: str, model: SizeModel | str) -> None:
    """Cache ``model`` (or the reason it cannot be extrapolated); a cache that cannot be written is skipped."""
    from memtrain.rundir import atomic_write_text

    data = model.to_json() if isinstance(model, SizeModel) else {"format": FORMAT, "direct": model}
    try:
        path = _cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, separators=(",", ":")))
    except OSError:
        pass


def size_model(combo: str, *, batch_size: int, encoder: str, loss: str = "msssim", env, verify: bool = True) -> SizeModel | str:
    """The size model of ``combo`` (from the cache, else traced at SIZES and VERIFY_SIZE), or why there is none."""
    key = cache_key(combo, batch_size=batch_size, encoder=encoder, loss=loss, env=env)
    cached = load(key)
    if cached is not None:
        return cached
    from memtrain.memory.estimate import measure_sizes

    sizes = [*SIZES, VERIFY_SIZE] if verify else list(SIZES)
    traces = measure_sizes(combo, sizes=sizes, batch_size=batch_size, encoder=encoder, loss=loss, env=env)
    model = SizeModel.fit(traces[:3])
    if model is None:
        result: SizeModel | str = f"event sequences differ between sizes {', '.join(map(str, SIZES))}"
    elif verify and not model.matches(traces[3]):
        result = f"the quadratic fit does not predict size {VERIFY_SIZE} exactly"
    else:
        result = model
    store(key, result)
    return result


def _direct_path(key: str, size: int) -> Path:
    return cache_dir() / "plan" / f"{key}-{size}.json"


def load_direct(key: str, size: int):
    """A cached estimate measured at ``size`` itself (StepMemory), or None."""
    from memtrain.memory.estimate import StepMemory

    try:
        data = json.loads(_direct_path(key, size).read_text())
        if data.get("format") != FORMAT:
            return None
        return StepMemory(data["strategies"], size, data["batch_size"], True, data["phases"], device=data["device"], step_start=data["step_start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_direct(key: str, memory) -> None:
    """Cache an estimate measured at its size (skipped when the cache cannot be written)."""
    from memtrain.rundir import atomic_write_text

    data = {
        "format": FORMAT,
        "strategies": memory.strategies,
        "batch_size": memory.batch_size,
        "device": memory.device,
        "phases": memory.phases,
        "step_start": memory.step_start,
    }
    try:
        path = _direct_path(key, memory.size)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, separators=(",", ":")))
    except OSError:
        pass

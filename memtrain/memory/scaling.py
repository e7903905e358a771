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

A verified model is *pruned* (:meth:`SizeModel.prune`): only the events that can be a
phase's maximum at some size ≥ ``SIZES[0]`` are kept (the upper envelope of the events'
quadratics, :mod:`memtrain.memory.envelope`, exact integer arithmetic) — typically 1 to 3 of
several hundred per phase — so :meth:`SizeModel.phase_at` gives the same answer at every
integer size ≥ ``SIZES[0]`` from a few hundred bytes of JSON.

A strategy whose event sequence depends on the size (``Strategy.size_polynomial = False``)
is never extrapolated from these sizes; from 1024 px on, :mod:`memtrain.memory.large_sizes`
fits such combinations at larger sizes (exact, or within a stated bound, or refused).

Models are cached as JSON under ``$MEMTRAIN_CACHE_DIR`` (default
``$XDG_CACHE_HOME/memtrain`` or ``~/.cache/memtrain``), keyed by the torch, smp and memtrain
versions, the encoder, the combination, the batch size and the target environment. What the
disk cache does not hold is looked up in the models shipped with memtrain
(:mod:`memtrain.memory.shipped`: the default combinations of ``memtrain plan``, generated with
``python -m memtrain.memory.shipped``); a key made with other versions misses there and is traced.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import segmentation_models_pytorch as smp
import torch

import memtrain
from memtrain.memory.envelope import coefficients, envelope
from memtrain.memory.estimate import StepMemory, measure_sizes
from memtrain.memory.shipped import lookup
from memtrain.memory.tracker import PHASES
from memtrain.rundir import atomic_write_text

SIZES = (192, 224, 256)
VERIFY_SIZE = 320
CATEGORY_KEYS = ("tensor_peak_parameters", "tensor_peak_gradients", "tensor_peak_optimizer_state", "tensor_peak_activations")
FORMAT = 2  # 2: models are pruned to their upper envelope


def _quadratic(values: tuple[int, int, int], s: int, xs: tuple[int, int, int] = SIZES) -> int:
    """The quadratic through (xs[i], values[i]) at ``s``, in exact integer arithmetic (rounded when not integral)."""
    (x0, x1, x2), (v0, v1, v2) = xs, values
    d0, d1, d2 = (x0 - x1) * (x0 - x2), (x1 - x0) * (x1 - x2), (x2 - x0) * (x2 - x1)
    value = Fraction(v0 * (s - x1) * (s - x2), d0) + Fraction(v1 * (s - x0) * (s - x2), d1) + Fraction(v2 * (s - x0) * (s - x1), d2)
    return round(value)


@dataclass
class SizeModel:
    """Per phase, each event's [current, *categories] at the three fit sizes (:data:`SIZES` by default); plus the step's starting bytes.

    ``sizes`` other than :data:`SIZES` are the larger fit sizes of :mod:`memtrain.memory.large_sizes`
    (strategies whose events depend on the size only below them); the model is valid from ``sizes[0]`` on.
    """

    events: dict[str, list[list[list[int]]]]  # phase -> event -> [current, p, g, o, a] -> value at each of sizes
    step_start: tuple[int, int, int]
    pruned: bool = False  # only the events on the upper envelope are kept (prune())
    sizes: tuple[int, int, int] = SIZES  # the fit sizes

    @classmethod
    def fit(cls, traces, sizes: tuple[int, int, int] = SIZES) -> SizeModel | None:
        """From three StepMemory (measure_sizes at ``sizes``); None if their event sequences differ."""
        if [t.size for t in traces] != list(sizes):
            raise ValueError(f"expected traces at {sizes}")
        events = {}
        for phase in PHASES:
            seqs = [t.events.get(phase, []) for t in traces]
            if len({len(q) for q in seqs}) != 1 or not seqs[0]:
                return None
            events[phase] = [list(map(list, zip(*rows))) for rows in zip(*seqs)]
        return cls(events, tuple(t.step_start for t in traces), sizes=tuple(sizes))

    def phase_at(self, phase: str, size: int) -> dict[str, int]:
        """``tensor_peak``, ``tensor_increase`` and the peak's breakdown of ``phase`` at ``size``."""
        best = None
        for ev in self.events[phase]:
            current = _quadratic(tuple(ev[0]), size, self.sizes)
            if best is None or current > best[0]:
                best = (current, ev)
        current, ev = best
        start = _quadratic(self.step_start, size, self.sizes)
        out = {"tensor_peak": current, "tensor_increase": current - start}
        out.update({k: _quadratic(tuple(ev[1 + i]), size, self.sizes) for i, k in enumerate(CATEGORY_KEYS)})
        return out

    def event_values(self, phase: str, size: int) -> list[int]:
        return [_quadratic(tuple(ev[0]), size, self.sizes) for ev in self.events[phase]]

    def prune(self) -> SizeModel:
        """The same model with only the events that can be their phase's peak at some size ≥ its first fit size.

        Exact: :meth:`phase_at` (peak, increase and the peak's breakdown) is the same at every
        integer size ≥ ``self.sizes[0]`` (:func:`memtrain.memory.envelope.envelope`).
        """
        events = {}
        for phase, evs in self.events.items():
            fitted = [coefficients(ev[0], self.sizes) for ev in evs]
            keep = envelope([poly for poly, _ in fitted], fitted[0][1], self.sizes[0]) if evs else []
            events[phase] = [evs[i] for i in keep]
        return SizeModel(events, self.step_start, pruned=True, sizes=self.sizes)

    def matches(self, trace) -> bool:
        """Whether every event of ``trace`` (a StepMemory with events, at another size) is what the model predicts (unpruned models only)."""
        if self.pruned:
            raise ValueError("a pruned model keeps only its envelope's events; verify before pruning")
        for phase in PHASES:
            got = [e[0] for e in trace.events.get(phase, [])]
            if got != self.event_values(phase, trace.size):
                return False
        return _quadratic(self.step_start, trace.size, self.sizes) == trace.step_start

    def at(self, size: int, *, strategies: str, batch_size: int, device: str):
        phases = {p: self.phase_at(p, size) for p in PHASES}
        return StepMemory(strategies, size, batch_size, True, phases, device=device, step_start=_quadratic(self.step_start, size, self.sizes))

    def to_json(self) -> dict:
        out = {"format": FORMAT, "pruned": self.pruned, "events": self.events, "step_start": list(self.step_start)}
        return out if self.sizes == SIZES else out | {"sizes": list(self.sizes)}

    @classmethod
    def from_json(cls, data: dict) -> SizeModel:
        sizes = tuple(int(s) for s in data.get("sizes", SIZES))
        if len(sizes) != 3:
            raise ValueError("a size model has three fit sizes")
        return cls({p: data["events"][p] for p in PHASES}, tuple(data["step_start"]), pruned=bool(data.get("pruned", False)), sizes=sizes)


def entry(model: SizeModel | str) -> dict:
    """The JSON the cache holds for ``model`` (or for the reason there is none)."""
    return model.to_json() if isinstance(model, SizeModel) else {"format": FORMAT, "direct": model}


def cache_dir() -> Path:
    """Where size models are cached: $MEMTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/memtrain, else ~/.cache/memtrain."""
    if os.environ.get("MEMTRAIN_CACHE_DIR"):
        return Path(os.environ["MEMTRAIN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memtrain"


def installed_versions() -> dict[str, str]:
    """The versions a trace depends on: torch, segmentation-models-pytorch and memtrain as installed."""
    return {"torch": torch.__version__, "smp": smp.__version__, "memtrain": memtrain.__version__}


def cache_key(combo: str, *, batch_size: int, encoder: str, loss: str = "msssim", env, versions: dict[str, str] | None = None) -> str:
    """A hash of everything the traces depend on: versions (default: :func:`installed_versions`), model, combination, batch and target."""
    what = {
        "format": FORMAT,
        "sizes": [*SIZES, VERIFY_SIZE],
        **(versions or installed_versions()),
        "encoder": encoder,
        "loss": loss,
        "combo": combo,
        "batch_size": batch_size,
        "device": env.device,
        "native_bf16": env.native_bf16,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def _cache_path(name: str) -> Path:
    return cache_dir() / "plan" / f"{name}.json"


def read_entry(name: str, *, shipped: bool = True) -> tuple[dict, str] | None:
    """The JSON stored under ``name`` (a cache key, or key-size) and where it came from ("cached" or "shipped"); None if neither has it.

    The disk cache first, then (``shipped``) the models shipped with memtrain. Entries of
    another :data:`FORMAT` are ignored.
    """
    try:
        data = json.loads(_cache_path(name).read_text())
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return data, "cached"
    except (OSError, ValueError):
        pass
    if shipped:
        data = lookup(name)
        if isinstance(data, dict) and data.get("format") == FORMAT:
            return data, "shipped"
    return None


def write_entry(name: str, data: dict) -> None:
    """Write ``data`` to the disk cache under ``name`` (atomic); a cache that cannot be written is skipped."""
    try:
        path = _cache_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, separators=(",", ":")))
    except OSError:
        pass


def find(key: str, *, shipped: bool = True) -> tuple[SizeModel | str, str] | None:
    """The stored model (or the reason it cannot be extrapolated, str) and where it came from ("cached" or "shipped"); None if none."""
    found = read_entry(key, shipped=shipped)
    if found is None:
        return None
    data, source = found
    try:
        return (data["direct"] if "direct" in data else SizeModel.from_json(data)), source
    except (KeyError, TypeError, ValueError):
        return None


def load(key: str, *, shipped: bool = True) -> SizeModel | str | None:
    """The stored model, the stored reason it cannot be extrapolated (str), or None when neither cached nor shipped (or unreadable)."""
    found = find(key, shipped=shipped)
    return None if found is None else found[0]


def store(key: str, model: SizeModel | str) -> None:
    """Cache ``model`` (or the reason it cannot be extrapolated); a cache that cannot be written is skipped."""
    write_entry(key, entry(model))


def trace(combo: str, *, batch_size: int, encoder: str, loss: str = "msssim", env, verify: bool = True) -> SizeModel | str:
    """``combo``'s pruned size model traced at SIZES (and checked at VERIFY_SIZE), or why there is none; nothing is cached."""
    sizes = [*SIZES, VERIFY_SIZE] if verify else list(SIZES)
    traces = measure_sizes(combo, sizes=sizes, batch_size=batch_size, encoder=encoder, loss=loss, env=env)
    model = SizeModel.fit(traces[:3])
    if model is None:
        return f"event sequences differ between sizes {', '.join(map(str, SIZES))}"
    if verify and not model.matches(traces[3]):
        return f"the quadratic fit does not predict size {VERIFY_SIZE} exactly"
    return model.prune()


def size_model(combo: str, *, batch_size: int, encoder: str, loss: str = "msssim", env, verify: bool = True, shipped: bool = True) -> SizeModel | str:
    """The size model of ``combo`` (cached, else shipped, else traced by :func:`trace` and cached), or why there is none."""
    key = cache_key(combo, batch_size=batch_size, encoder=encoder, loss=loss, env=env)
    cached = load(key, shipped=shipped)
    if cached is not None:
        return cached
    result = trace(combo, batch_size=batch_size, encoder=encoder, loss=loss, env=env, verify=verify)
    store(key, result)
    return result


def load_direct(key: str, size: int):
    """A cached (or shipped) estimate measured at ``size`` itself (StepMemory), or None."""
    found = read_entry(f"{key}-{size}")
    if found is None:
        return None
    data = found[0]
    try:
        return StepMemory(data["strategies"], size, data["batch_size"], True, data["phases"], device=data["device"], step_start=data["step_start"])
    except (KeyError, TypeError):
        return None


def store_direct(key: str, memory) -> None:
    """Cache an estimate measured at its size (skipped when the cache cannot be written)."""
    data = {
        "format": FORMAT,
        "strategies": memory.strategies,
        "batch_size": memory.batch_size,
        "device": memory.device,
        "phases": memory.phases,
        "step_start": memory.step_start,
    }
    write_entry(f"{key}-{memory.size}", data)

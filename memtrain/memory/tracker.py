"""Per-phase peak memory of training steps.

A step is split into phases — ``forward`` (model and loss), ``backward`` and
``optimizer`` — and every backend reports, for each phase, its peak and its increase
over the step's start. Backends and their metric names (each says what it measures):

* ``tensor`` (always; CPU, CUDA and fake tensors — :mod:`memtrain.memory.tensor`):
  ``tensor_peak`` (live tensor bytes), ``tensor_increase``, and the peak's breakdown
  ``tensor_peak_parameters``, ``tensor_peak_gradients``, ``tensor_peak_optimizer_state``,
  ``tensor_peak_activations`` (they sum to ``tensor_peak``); plus, at the end of each
  forward phase, the activation bytes each block of the model still holds
  (:attr:`MemoryTracker.blocks`, see :mod:`memtrain.memory.blocks`).
* ``cuda`` (CUDA devices — :mod:`memtrain.memory.cuda`): ``alloc_peak``,
  ``alloc_increase``, ``reserved_peak``, ``active_peak``, ``alloc_retries``, ``ooms``.
* ``nvml`` (NVIDIA GPUs with NVML — :mod:`memtrain.memory.nvml`): ``nvml_used_peak``,
  ``nvml_used_increase``, ``nvml_process_peak``, ``nvml_samples``.
* ``process`` (CPU devices — :mod:`memtrain.memory.process`): ``process_peak`` (peak
  resident memory of the process in the phase: tensors plus kernel workspaces, allocator
  caches and everything else) and ``process_increase``.

A backend that cannot run where it is asked for (``cuda`` or ``nvml`` on a CPU
machine, NVML missing) is left out with a line in :attr:`MemoryTracker.notes`; it never
fails the run.

Usage in any loop::

    tracker = MemoryTracker(device)
    with tracker.step(model, optimizer, batch):
        with tracker.phase("forward"):
            loss = loss_fn(model(x), y)
        with tracker.phase("backward"):
            loss.backward()
        with tracker.phase("optimizer"):
            optimizer.step(); optimizer.zero_grad()
    tracker.records  # one PhaseRecord per (step, phase)
    tracker.close()  # removes block hooks, stops the NVML sampler

or mark style, for hooks that cannot hold a ``with`` block: ``start_step(step, *objs)``,
``begin("forward")``, ``begin("backward")``, ..., ``end_step()``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from memtrain.memory.cuda import CudaBackend
from memtrain.memory.nvml import NvmlBackend, open_nvml
from memtrain.memory.process import ProcessBackend
from memtrain.memory.tensor import TensorBackend

PHASES = ("forward", "backward", "optimizer")
BACKENDS = ("tensor", "cuda", "nvml", "process")
MIB = 2**20


@dataclass
class PhaseRecord:
    """What one phase of one step measured, in bytes (counts for ``*_retries``, ``ooms``, ``nvml_samples``)."""

    step: int
    phase: str
    metrics: dict[str, int] = field(default_factory=dict)


class MemoryTracker:
    """Records per-phase peaks of each step with every backend available on ``device``.

    ``backends`` defaults to every backend that applies to ``device``: ``tensor``, plus
    ``cuda`` and ``nvml`` on a CUDA device, ``process`` on a CPU. ``blocks=False`` turns off the per-block
    breakdown (its forward hooks).
    """

    def __init__(self, device: torch.device | str = "cpu", *, backends: tuple[str, ...] | None = None, blocks: bool = True, events: bool = False) -> None:
        self.device = torch.device(device)
        if backends is None:
            backends = ("tensor", "cuda", "nvml") if self.device.type == "cuda" else ("tensor", "process")
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown memory backend(s) {unknown}; known: {', '.join(BACKENDS)}")
        self.notes: list[str] = []
        self.events = events  # the tensor backend records each phase's local maxima (memtrain.memory.scaling)
        self.backends: list = []
        for name in backends:
            backend = self._make(name, blocks)
            if backend is not None:
                self.backends.append(backend)
        self.records: list[PhaseRecord] = []
        self.blocks: dict[int, dict[str, int]] = {}  # step -> block -> activation bytes held at the end of forward
        self.last_phase: str | None = None  # the phase begun last (where an exception happened)
        self._step: int | None = None
        self._phase: str | None = None

    def _make(self, name: str, blocks: bool):
        if name == "tensor":
            return TensorBackend(self.device, blocks=blocks, events=self.events)
        if name == "cuda":
            if self.device.type != "cuda" or not torch.cuda.is_available():
                self.notes.append(f"cuda: skipped (device is {self.device.type}; allocator statistics exist on CUDA only)")
                return None

            return CudaBackend(self.device)
        if name == "process":
            if not ProcessBackend.available():
                self.notes.append("process: skipped (the resident memory of this process cannot be read here)")
                return None
            return ProcessBackend()

        nvml, why = open_nvml(self.device)
        if nvml is None:
            self.notes.append(why)
            return None
        return NvmlBackend(nvml)

    @property
    def backend_names(self) -> list[str]:
        return [b.name for b in self.backends]

    # -- mark style (for hooks that cannot hold a `with` block, e.g. Lightning callbacks)
    def start_step(self, step: int, *objs) -> None:
        """Begin step ``step``; ``objs`` (modules, optimizers, batches) hold tensors that exist already."""
        if self._step is not None:
            self.end_step()
        self._step = step
        for b in self.backends:
            b.start_step(objs)

    def begin(self, phase: str) -> None:
        """End the current phase (if any) and begin ``phase``."""
        if self._step is None:
            return
        self._end_phase()
        self._phase = self.last_phase = phase
        for b in self.backends:
            b.begin_phase()

    def end_step(self) -> None:
        if self._step is None:
            return
        self._end_phase()
        for b in self.backends:
            b.end_step()
        self._step = None

    def _end_phase(self) -> None:
        if self._phase is None:
            return
        metrics: dict[str, int] = {}
        for b in self.backends:
            metrics.update(b.end_phase(self._phase))
            if self._phase == "forward" and isinstance(b, TensorBackend) and b.blocks:
                self.blocks[self._step] = dict(b.block_bytes)
        self.records.append(PhaseRecord(self._step, self._phase, metrics))
        self._phase = None

    def close(self) -> None:
        """End the step in progress, remove block hooks and stop background samplers."""
        self.end_step()
        for b in self.backends:
            b.close()
            self.notes.extend(n for n in getattr(b, "notes", []) if n not in self.notes)

    # -- context-manager style
    @contextlib.contextmanager
    def step(self, *objs, step: int | None = None):
        self.start_step(len({r.step for r in self.records}) if step is None else step, *objs)
        try:
            yield self
        finally:
            self.end_step()

    @contextlib.contextmanager
    def phase(self, name: str):
        self.begin(name)
        try:
            yield
        finally:
            self._end_phase()

    # -- results
    def kept_steps(self, skip_steps: int = 0) -> list[int]:
        """Recorded steps after the first ``skip_steps`` (all of them if that leaves none)."""
        steps = sorted({r.step for r in self.records})
        return steps[skip_steps:] or steps

    def summary(self, skip_steps: int = 0) -> dict[str, dict[str, int]]:
        """Per phase, the maximum of every metric over the steps after the first ``skip_steps``.

        The ``tensor_peak_<category>`` breakdown is taken from the step whose
        ``tensor_peak`` is the maximum, so it still sums to ``tensor_peak``.
        """
        keep = set(self.kept_steps(skip_steps))
        out: dict[str, dict[str, int]] = {}
        best: dict[str, PhaseRecord] = {}
        for r in self.records:
            if r.step not in keep:
                continue
            row = out.setdefault(r.phase, {})
            for k, v in r.metrics.items():
                row[k] = max(row.get(k, v), v)
            if r.phase not in best or r.metrics.get("tensor_peak", 0) > best[r.phase].metrics.get("tensor_peak", 0):
                best[r.phase] = r
        for phase, r in best.items():
            out[phase].update({k: v for k, v in r.metrics.items() if k.startswith("tensor_peak_")})
        return out

    def block_summary(self, skip_steps: int = 0) -> dict[str, int]:
        """Per block, the most activation bytes it held at the end of a forward phase (steps after ``skip_steps``)."""
        keep = set(self.kept_steps(skip_steps))
        out: dict[str, int] = {}
        for step, held in self.blocks.items():
            if step in keep:
                for name, v in held.items():
                    out[name] = max(out.get(name, 0), v)
        return out

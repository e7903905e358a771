"""Per-phase peak memory of training steps.

A step is split into phases — ``forward`` (model and loss), ``backward`` and
``optimizer`` — and every backend reports, for each phase, its peak and its increase
over the step's start. Metric names say what they measure:

=====================  ===============================================================
``tensor_peak``        live tensor bytes (dispatch-mode count; CPU, CUDA, fake tensors)
``tensor_increase``    ``tensor_peak`` minus live tensor bytes when the step began
``alloc_peak``         CUDA caching allocator: peak bytes allocated to tensors
``alloc_increase``     ``alloc_peak`` minus bytes allocated when the step began
``reserved_peak``      CUDA caching allocator: peak bytes reserved from the driver
=====================  ===============================================================

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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from memtrain.memory.tensor import LiveTensorBytes, TensorBytesMode, module_tensors

PHASES = ("forward", "backward", "optimizer")
MIB = 2**20


@dataclass
class PhaseRecord:
    """What one phase of one step measured, in bytes."""

    step: int
    phase: str
    metrics: dict[str, int] = field(default_factory=dict)


class _TensorBackend:
    name = "tensor"

    def __init__(self) -> None:
        self.counter = LiveTensorBytes()
        self._mode: TensorBytesMode | None = None
        self._step_start = 0

    def start_step(self, objs) -> None:
        self.counter.track_all(module_tensors(*objs))
        self._step_start = self.counter.current
        self._mode = TensorBytesMode(self.counter)
        self._mode.__enter__()

    def begin_phase(self) -> None:
        self.counter.reset_peak()

    def end_phase(self) -> dict[str, int]:
        return {"tensor_peak": self.counter.peak, "tensor_increase": self.counter.peak - self._step_start}

    def end_step(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None


class _CudaBackend:
    name = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._step_start = 0

    def start_step(self, objs) -> None:
        torch.cuda.synchronize(self.device)
        self._step_start = torch.cuda.memory_allocated(self.device)

    def begin_phase(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def end_phase(self) -> dict[str, int]:
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return {
            "alloc_peak": peak,
            "alloc_increase": peak - self._step_start,
            "reserved_peak": torch.cuda.max_memory_reserved(self.device),
        }

    def end_step(self) -> None:
        pass


class MemoryTracker:
    """Records per-phase peaks of each step with every backend available on ``device``."""

    def __init__(self, device: torch.device | str = "cpu", *, backends: tuple[str, ...] | None = None) -> None:
        self.device = torch.device(device)
        if backends is None:
            backends = ("tensor", "cuda") if self.device.type == "cuda" else ("tensor",)
        self.backends = [_TensorBackend() if b == "tensor" else _CudaBackend(self.device) for b in backends]
        self.records: list[PhaseRecord] = []
        self._step: int | None = None
        self._phase: str | None = None

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
        self._phase = phase
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
            metrics.update(b.end_phase())
        self.records.append(PhaseRecord(self._step, self._phase, metrics))
        self._phase = None

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
    def summary(self, skip_steps: int = 0) -> dict[str, dict[str, int]]:
        """Per phase, the maximum of every metric over the steps after the first ``skip_steps``."""
        steps = sorted({r.step for r in self.records})
        keep = set(steps[skip_steps:]) or set(steps)
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            if r.step in keep:
                row = out.setdefault(r.phase, {})
                for k, v in r.metrics.items():
                    row[k] = max(row.get(k, v), v)
        return out

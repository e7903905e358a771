"""The ``cuda`` backend (PyTorch's caching allocator) and allocator snapshots for the memory viewer.

At every phase boundary the device is synchronized and the allocator's peak statistics
are reset, so each phase reports the peaks reached inside it:

=====================  ===============================================================
``alloc_peak``         peak bytes allocated to tensors (``max_memory_allocated``)
``alloc_increase``     ``alloc_peak`` minus bytes allocated when the step began
``reserved_peak``      peak bytes the allocator held from the driver (``max_memory_reserved``)
``active_peak``        peak bytes in active blocks (allocated plus blocks freed on one
                       stream but still in use on another: ``active_bytes.all.peak``)
``alloc_retries``      allocations that failed, freed the cache and were retried (slow)
``ooms``               out-of-memory errors the allocator raised in the phase
=====================  ===============================================================
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path

import torch

from memtrain.rundir import atomic_write_bytes


class CudaBackend:
    name = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._step_start = 0
        self._retries = 0
        self._ooms = 0

    def _counts(self) -> tuple[int, int]:
        stats = torch.cuda.memory_stats(self.device)
        return int(stats.get("num_alloc_retries", 0)), int(stats.get("num_ooms", 0))

    def start_step(self, objs) -> None:
        torch.cuda.synchronize(self.device)
        self._step_start = torch.cuda.memory_allocated(self.device)

    def begin_phase(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._retries, self._ooms = self._counts()

    def end_phase(self, phase: str) -> dict[str, int]:
        try:
            torch.cuda.synchronize(self.device)
        except RuntimeError:  # a failed kernel must not hide the phase's numbers
            pass
        stats = torch.cuda.memory_stats(self.device)
        peak = int(stats.get("allocated_bytes.all.peak", 0))
        retries, ooms = self._counts()
        return {
            "alloc_peak": peak,
            "alloc_increase": peak - self._step_start,
            "reserved_peak": int(stats.get("reserved_bytes.all.peak", 0)),
            "active_peak": int(stats.get("active_bytes.all.peak", 0)),
            "alloc_retries": retries - self._retries,
            "ooms": ooms - self._ooms,
        }

    def end_step(self) -> None:
        pass

    def close(self) -> None:
        pass


class AllocatorSnapshot:
    """Record CUDA allocator history while the block runs; write ``path`` for https://pytorch.org/memory_viz.

    The snapshot (a pickle of ``torch.cuda.memory._snapshot()``: every allocation with
    its Python/C++ stack) is written when the block ends — also when it ends with an
    exception such as an out-of-memory error, when it is most useful. Recording costs
    some speed (stack capture on every allocation). On a machine without CUDA it is a
    no-op that warns once that no snapshot will be written.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cuda", *, max_entries: int = 100_000) -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        self.max_entries = max_entries
        self.active = self.device.type == "cuda" and torch.cuda.is_available()
        self.written: Path | None = None

    def __enter__(self) -> AllocatorSnapshot:
        if not self.active:
            warnings.warn(f"--memory-snapshot {self.path}: needs a CUDA device (this run is on {self.device.type}); no snapshot is written", stacklevel=2)
            return self
        torch.cuda.memory._record_memory_history(max_entries=self.max_entries)
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        try:
            snapshot = torch.cuda.memory._snapshot()
            atomic_write_bytes(self.path, pickle.dumps(snapshot))
            self.written = self.path
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)


def allocator_snapshot(path: str | Path | None, device: torch.device | str):
    """An :class:`AllocatorSnapshot`, or a no-op context when no path is given."""
    return AllocatorSnapshot(path, device) if path else contextlib.nullcontext()

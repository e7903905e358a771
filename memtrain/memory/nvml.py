"""The ``nvml`` backend: device memory as the driver sees it (nvidia-ml-py), sampled during each phase.

NVML reports what is in use *now*, with no peak counter, so a background thread
samples it every ``interval`` seconds while a step runs (and once more at every phase
boundary); a phase's peak is the largest sample taken in it, so a spike shorter than
the interval can be missed — ``nvml_samples`` says how many samples a phase got.

=========================  ============================================================
``nvml_used_peak``         device memory in use by every process, plus the driver's own
                           reservation (``nvmlDeviceGetMemoryInfo().used``); includes
                           the CUDA context and the caching allocator's reserve
``nvml_used_increase``     ``nvml_used_peak`` minus the value when the step began
``nvml_process_peak``      this process's usage (``usedGpuMemory`` of its entry in the
                           compute-process list); absent where NVML cannot tell it
                           (e.g. containers with their own PID namespace)
``nvml_samples``           samples taken during the phase
=========================  ============================================================

Where NVML is not usable — a CPU machine, no ``pynvml`` module, a driver without NVML
(some Jetsons) — :func:`open_nvml` returns ``None`` and the reason, and the tracker
records the reason as a note instead of failing.
"""

from __future__ import annotations

import os
import threading

import torch

DEFAULT_INTERVAL_S = 0.002


def open_nvml(device: torch.device) -> tuple[object | None, str | None]:
    """(pynvml module, device handle) ready to query, or (None, why not)."""
    if device.type != "cuda":
        return None, f"nvml: skipped (device is {device.type}, NVML reports NVIDIA GPUs only)"
    try:
        import pynvml  # lazy (optional dependency): NVIDIA machines only; absent or broken is a skip, not an error
    except ImportError:
        return None, "nvml: skipped (nvidia-ml-py is not installed: pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"nvml: skipped (NVML is not available: {e})"
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        if not uuid.startswith(("GPU-", "MIG-")):
            uuid = "GPU-" + uuid
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except Exception as e:
        return None, f"nvml: skipped (cannot find {device} in NVML: {e})"
    return (pynvml, handle), None


class NvmlBackend:
    name = "nvml"

    def __init__(self, nvml: tuple[object, object], *, interval: float = DEFAULT_INTERVAL_S) -> None:
        self.pynvml, self.handle = nvml
        self.interval = interval
        self.pid = os.getpid()
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._running = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._used_peak = 0
        self._proc_peak: int | None = None
        self._samples = 0
        self._generation = 0  # bumped at phase boundaries: a sample begun before one is dropped
        self._step_start = 0
        self._process_known = True

    # -- sampling
    def _sample(self) -> None:
        generation = self._generation
        used = int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        proc = self._process_usage() if self._process_known else None
        with self._lock:
            if generation != self._generation:
                return
            self._used_peak = max(self._used_peak, used)
            if proc is not None:
                self._proc_peak = max(self._proc_peak or 0, proc)
            self._samples += 1

    def _process_usage(self) -> int | None:
        try:
            for p in self.pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if p.pid == self.pid and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
        except Exception:
            pass
        self._process_known = False
        self.notes.append("nvml: this process is not in NVML's process list (a container PID namespace?); nvml_process_peak omitted")
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._running.wait(timeout=0.1):
                continue
            try:
                self._sample()
            except Exception as e:  # never let the sampler take the run down
                self.notes.append(f"nvml: sampling stopped ({e})")
                return
            self._stop.wait(self.interval)

    # -- backend protocol
    def start_step(self, objs) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="memtrain-nvml", daemon=True)
            self._thread.start()
        self._step_start = int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        self._running.set()

    def begin_phase(self) -> None:
        with self._lock:
            self._used_peak, self._proc_peak, self._samples = 0, None, 0
            self._generation += 1
        self._sample()

    def end_phase(self, phase: str) -> dict[str, int]:
        self._sample()
        with self._lock:
            metrics = {"nvml_used_peak": self._used_peak, "nvml_used_increase": self._used_peak - self._step_start, "nvml_samples": self._samples}
            if self._proc_peak is not None:
                metrics["nvml_process_peak"] = self._proc_peak
        return metrics

    def end_step(self) -> None:
        self._running.clear()

    def close(self) -> None:
        self._stop.set()
        self._running.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None


def driver_version() -> str | None:
    """The NVIDIA driver version, or None without NVML."""
    try:
        import pynvml  # lazy (optional dependency): NVIDIA machines only; absent or broken is a skip, not an error

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return None

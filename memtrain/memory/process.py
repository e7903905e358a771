"""The ``process`` backend: the process's peak resident memory in each phase (CPU runs).

Tensor bytes (the ``tensor`` backend) miss what a CPU step really takes: kernel working
memory that never becomes a tensor (oneDNN convolution workspaces, reorders), the
allocator's free lists and the interpreter. This backend reports what the operating system
charges the process:

======================  ================================================================
``process_peak``        peak resident set size of the whole process within the phase
``process_increase``    ``process_peak`` minus the resident set size when the step began
======================  ================================================================

On Linux the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``) is reset at
each phase start by writing ``5`` to ``/proc/self/clear_refs``, and read at the phase end:
exact, and free. Where that is not possible a thread samples the resident size every
millisecond (:class:`_Sampler`), which can miss a peak shorter than that.

Measurements (``compare`` cells, real ``measure_step`` runs, the benchmarks) fix glibc's mmap
threshold first (:mod:`memtrain.memory.allocator`): with glibc's dynamic threshold the same
step's peak varied by 2x between identical runs. ``fit`` leaves it dynamic unless asked.
"""

from __future__ import annotations

import re
import threading

from memtrain.memory import allocator

_HWM = re.compile(r"VmHWM:\s+(\d+)\s+kB")
_RSS = re.compile(r"VmRSS:\s+(\d+)\s+kB")


def _status(pattern: re.Pattern) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = pattern.search(f.read())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def rss_bytes() -> int | None:
    """The resident set size now (None where it cannot be read)."""
    value = _status(_RSS)
    if value is not None:
        return value
    try:
        import psutil  # lazy (optional dependency): not a memtrain requirement, /proc is read first
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status(_HWM) is not None


class _Sampler:
    """A thread reading the RSS every ``interval`` seconds, keeping the maximum since :meth:`reset`."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memtrain-rss-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            value = rss_bytes() or 0
            if value > self.peak:
                self.peak = value

    def reset(self) -> None:
        self.peak = rss_bytes() or 0

    def read(self) -> int:
        return max(self.peak, rss_bytes() or 0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


class ProcessBackend:
    """Tracker backend: ``process_peak`` and ``process_increase`` per phase (see the module docstring)."""

    name = "process"

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.mmap_threshold = allocator.applied()
        if self.mmap_threshold is None:
            self.notes.append(f"process: glibc's mmap threshold dynamic (fixed only for measurements or with {allocator.ENV}=131072): peaks vary between runs")
        self.method = "clear_refs" if _reset_hwm() else "sampling"
        self._sampler = _Sampler() if self.method == "sampling" else None
        if self._sampler is not None:
            self.notes.append("process: /proc/self/clear_refs unavailable; peak resident memory sampled every 1 ms (may miss shorter peaks)")
        self._step_start = 0

    @staticmethod
    def available() -> bool:
        return rss_bytes() is not None

    def start_step(self, objs) -> None:
        self._step_start = rss_bytes() or 0

    def begin_phase(self) -> None:
        if self._sampler is None:
            _reset_hwm()
        else:
            self._sampler.reset()

    def end_phase(self, phase: str) -> dict[str, int]:
        peak = self._sampler.read() if self._sampler is not None else max(_status(_HWM) or 0, rss_bytes() or 0)
        return {"process_peak": peak, "process_increase": peak - self._step_start}

    def end_step(self) -> None:
        pass

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()

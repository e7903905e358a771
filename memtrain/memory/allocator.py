"""A fixed mmap threshold for glibc's malloc: CPU memory that is the same from run to run.

glibc serves a block of at least ``M_MMAP_THRESHOLD`` bytes (128 KiB by default) with its own
``mmap`` and gives it back to the operating system when it is freed. By default the threshold
is *dynamic*: each time such a block is freed, the threshold rises to its size (up to 32 MiB).
After the first large free of a training step, later activations of that size come from the
heap instead, and the heap keeps freed memory resident. Which blocks are heap blocks then
depends on the order of frees, so the peak resident memory of the same step varied between
identical runs (``amp,checkpoint:full`` at 512² minus 64²: 155, 270, 300, 305–312 MiB).

Setting the threshold with ``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` keeps it at glibc's initial
value and turns the dynamic adjustment off: every block of 128 KiB or more is mapped on
allocation and unmapped on free, and the same step measures the same within 0.7 MiB
(``benchmarks/results/cpu_bound.md``).
This is what ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment does before a process
starts; memtrain calls ``mallopt`` itself so that no launcher has to set it.

Where it applies: at the start of every CPU run that memtrain measures or trains — ``fit`` on a
CPU, the tracker's ``process`` backend (:mod:`memtrain.memory.process`), and so every
measurement subprocess of ``compare`` and the benchmarks. Elsewhere than Linux with glibc it
does nothing. ``MEMTRAIN_MMAP_THRESHOLD=default`` in the environment leaves glibc's dynamic
threshold alone (another number sets that threshold in bytes).

Time cost: every large tensor is a fresh mapping whose pages the kernel zero-fills on first
touch (a heap block is reused without that). The choice and its measured cost are documented
in one place: docs/memory.md, "CPU memory that is the same from run to run".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from memtrain.errors import ConfigError

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial value
ENV = "MEMTRAIN_MMAP_THRESHOLD"

_applied: int | None = None


def threshold_from_env() -> int | None:
    """The threshold asked for by ``MEMTRAIN_MMAP_THRESHOLD`` (bytes), None for ``default`` (glibc's dynamic one)."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return DEFAULT_THRESHOLD
    if value in ("default", "dynamic", "off", "0"):
        return None
    try:
        threshold = int(value)
    except ValueError:
        raise ConfigError(f"{ENV}={value!r}: expected a number of bytes or 'default'") from None
    if threshold <= 0:
        return None
    return threshold


def fix_mmap_threshold() -> int | None:
    """Fix glibc's mmap threshold (module docstring); the threshold in force, None where nothing was set.

    Idempotent; a no-op off Linux/glibc and where ``MEMTRAIN_MMAP_THRESHOLD=default``.
    """
    global _applied
    if _applied is not None:
        return _applied
    threshold = threshold_from_env()
    if threshold is None or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it: musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        return None
    _applied = threshold
    return threshold

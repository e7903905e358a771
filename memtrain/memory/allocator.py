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

Where it applies: measurements — every ``compare`` cell, real (not fake) ``measure_step`` runs,
and the benchmarks — so that their process peaks can be compared with estimates. ``fit`` leaves
glibc's dynamic threshold unless ``MEMTRAIN_MMAP_THRESHOLD`` is set (a number of bytes, e.g.
131072): the fixed threshold costs step time. ``MEMTRAIN_MMAP_THRESHOLD=default`` leaves it dynamic
everywhere. Elsewhere than Linux with glibc it does nothing.

Time cost: every large tensor is a fresh mapping whose pages the kernel zero-fills on first
touch (a heap block is reused without that). The choice and its measured cost are documented
in one place: docs/memory.md, "CPU memory that is the same from run to run".
"""

from __future__ import annotations

import ctypes
import os
import sys

from memtrain.errors import ConfigError

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial value
MAX_THRESHOLD = 2**31 - 1  # mallopt takes a C int: larger values would wrap around
ENV = "MEMTRAIN_MMAP_THRESHOLD"

_applied: int | None = None


def threshold_from_env(default: int | None = DEFAULT_THRESHOLD) -> int | None:
    """The threshold asked for by ``MEMTRAIN_MMAP_THRESHOLD`` (bytes), None for ``default`` (glibc's dynamic one); ``default`` when unset."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return default
    if value in ("default", "dynamic", "off", "0"):
        return None
    try:
        threshold = int(value)
    except ValueError:
        raise ConfigError(f"{ENV}={value!r}: expected a number of bytes or 'default'") from None
    if threshold <= 0:
        return None
    if threshold > MAX_THRESHOLD:
        raise ConfigError(f"{ENV}={value!r}: expected at most {MAX_THRESHOLD} bytes (glibc's mallopt takes a C int)")
    return threshold


def fix_mmap_threshold(default: int | None = DEFAULT_THRESHOLD) -> int | None:
    """Fix glibc's mmap threshold (module docstring); the threshold in force, None where nothing was set.

    ``default``: the threshold when ``MEMTRAIN_MMAP_THRESHOLD`` is unset (measurements: 128 KiB;
    ``fit``: None, glibc's dynamic threshold, because the fixed one costs step time). Idempotent;
    a no-op off Linux/glibc and where ``MEMTRAIN_MMAP_THRESHOLD=default``.
    """
    global _applied
    if _applied is not None:
        return _applied
    threshold = threshold_from_env(default)
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


def applied() -> int | None:
    """The threshold :func:`fix_mmap_threshold` set in this process, None if none."""
    return _applied

"""Byte sizes as people type them (8GiB, 8GB, 512MiB, 1e9) and as memtrain prints them."""

from __future__ import annotations

import re

from memtrain.errors import ConfigError

# Binary units (KiB, MiB, GiB, TiB, and the bare K/M/G/T that most tools treat as binary)
# and SI units (kB/KB, MB, GB, TB: powers of 1000, as disk and GPU vendors use them).
_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tib": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(text: str | int | float, flag: str = "--memory-budget") -> int:
    """``'8GiB'`` → 8589934592; ``'8GB'`` → 8000000000; a bare number is bytes. ConfigError naming ``flag`` otherwise."""
    if isinstance(text, bool):
        raise ConfigError(f"{flag} {text!r}: expected a size like 8GiB, 8GB, 512MiB or a number of bytes")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        if _PATTERN.match(str(text).strip().lstrip("-")) and str(text).strip().startswith("-"):
            raise ConfigError(f"{flag} {text}: expected a size above zero, not a negative one")
        m = _PATTERN.match(str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{flag} {text}: expected a size like 8GiB, 8GB, 512MiB or a number of bytes")
        value, unit = float(m.group(1)), m.group(2).lower()
    nbytes = int(value * _UNITS[unit])
    if nbytes <= 0:
        raise ConfigError(f"{flag} {text}: expected a size above zero")
    return nbytes


def fmt_bytes(n: float) -> str:
    """Binary units, three significant figures: 512 MiB, 8.00 GiB."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.3g} {unit}" if v >= 100 else f"{v:.2f} {unit}"
    return f"{int(n)} B"

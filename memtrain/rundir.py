"""The run directory and atomic writes.

Everything memtrain writes (config, metrics, memory tables, sample images) is written
to a temporary file in the same folder and renamed over the target, so a killed run
never leaves a half-written file and never loses the previous complete one.
Checkpoints are written by Lightning, whose saver is atomic in the same way.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from memtrain.errors import ConfigError

CONFIG_NAME = "config.yaml"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def default_run_dir(root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


def new_run_dir(out: str | None) -> Path:
    """Create the run directory; refuse one that already holds a run, so nothing is overwritten."""
    path = Path(out).expanduser() if out else default_run_dir()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: exists and is not a folder")
    if (path / CONFIG_NAME).exists():
        raise ConfigError(f"--out {path}: already holds a run; continue it with --resume {path} or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path

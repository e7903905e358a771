"""The run directory and atomic writes.

Everything memtrain writes (config, metrics, memory tables, sample images, checkpoints,
exported models) goes through :func:`atomic_open`: a temporary file in the destination
folder itself (never in ``$TMPDIR``, which may be another filesystem, where a rename
becomes a copy), fsync'd, given the mode the umask allows (0644 under umask 022), then
renamed over the target, and the folder fsync'd. A killed process never leaves a
half-written file and never loses the previous complete one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from memtrain.errors import ConfigError, OutputError

CONFIG_NAME = "config.yaml"
#: What a fresh run directory may hold when a failed start is cleaned up (see :func:`discard_failed_start`).
RUN_OUTPUTS = ("config.yaml", "metrics.csv", "memory.csv", "memory_blocks.csv", "samples", "checkpoints")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """``with atomic_open(path) as f: f.write(...)``: ``path`` holds either its old content or all of the new one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write it ({e.__class__.__name__}: {e.strerror or e})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; files are shared like any other output
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(path: str | Path, flag: str) -> Path:
    """Raise OutputError naming ``flag`` unless folder ``path`` exists writable or can be created; creates nothing.

    The nearest existing ancestor must be a folder in which a file can be created (probed
    with a temporary file, removed at once: ``os.access`` is no answer for root).
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: exists and is not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{flag} {path}: cannot be created: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write into {probe} ({e.__class__.__name__}: {e.strerror or e})") from None
    return path


def default_run_dir(root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / stamp
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{stamp}-{n}"
    return path


def check_new_run_dir(out: str | None) -> Path:
    """The run directory a fresh run will use; refuse one that already holds a run or cannot be written. Creates nothing."""
    path = Path(out).expanduser() if out else default_run_dir()
    check_writable(path, "--out")
    if (path / CONFIG_NAME).exists():
        if not any((path / "checkpoints").glob("*.ckpt")):
            raise ConfigError(
                f"--out {path}: already holds a run that stopped before its first checkpoint; remove {path} to start it again"
                f" (its settings: --config {path / CONFIG_NAME}) or choose another --out"
            )
        raise ConfigError(f"--out {path}: already holds a run; continue it with --resume {path} or choose another --out")
    return path


def new_run_dir(out: str | None) -> Path:
    """Create the run directory; refuse one that already holds a run, so nothing is overwritten."""
    path = check_new_run_dir(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {path}: cannot create it ({e.__class__.__name__}: {e.strerror or e})") from None
    return path


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files of writes that a killed process left behind (``.NAME.*.tmp``, never read)."""
    stale = [p for p in Path(run_dir).rglob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def discard_failed_start(run_dir: Path, created: bool) -> None:
    """Remove what a fresh run wrote when it failed before its first checkpoint, so its --out can be used again.

    A folder the run created is removed whole; in a folder that existed before, only the
    run's own outputs (:data:`RUN_OUTPUTS`) are.
    """
    if any((run_dir / "checkpoints").glob("*.ckpt")):
        return
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in RUN_OUTPUTS:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

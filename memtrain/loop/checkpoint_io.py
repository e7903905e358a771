"""Lightning's checkpoint IO, made atomic on any filesystem and weights-only on load.

Lightning's default saver is replaced (``Trainer(plugins=[AtomicCheckpointIO()])``) so that
a checkpoint is written like every other memtrain output (:func:`memtrain.rundir.atomic_open`):
into a temporary file in the checkpoint folder itself, fsync'd, renamed over the target.
A kill at any moment, including during the write and with ``$TMPDIR`` on another
filesystem, leaves either the previous complete ``last.ckpt`` or the new one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO

from memtrain.rundir import atomic_open


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` through an atomic temp-file-and-rename in the destination folder; ``torch.load(weights_only=True)``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_open(Path(path)) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(Path(path), map_location=map_location if map_location is not None else "cpu", weights_only=True)

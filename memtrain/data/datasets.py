"""Data sets of (input, target) radiograph pairs at the training size.

* :class:`PhantomDataset` — built-in synthetic radiographs, no files.
* :class:`FolderDataset` — images from a folder, targets from a paired folder or
  computed with conventional enhancement.

Both return ``(input, target)`` float32 tensors of shape ``(1, size, size)`` in [0, 1].
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from memtrain.data.enhance import conventional_enhance
from memtrain.data.phantom import phantom_radiograph
from memtrain.data.readers import IMAGE_SUFFIXES, is_image_file, read_image
from memtrain.data.transforms import fit_pair
from memtrain.errors import DataError

CLAHE = "clahe"


def _pair_tensors(inp: np.ndarray, tgt: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(inp))[None], torch.from_numpy(np.ascontiguousarray(tgt))[None]


class PhantomDataset(Dataset):
    """Phantom radiographs ``first .. first+count-1`` of generator ``seed`` at ``size``²."""

    def __init__(self, *, seed: int, first: int, count: int, size: int) -> None:
        self.seed, self.first, self.count, self.size = seed, first, count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        if not 0 <= i < self.count:
            raise IndexError(i)
        raw = phantom_radiograph(self.seed, self.first + i, self.size)
        return _pair_tensors(raw, conventional_enhance(raw))


@dataclass(frozen=True)
class Pair:
    """One input file and its target: a file path, or None for computed (CLAHE) targets."""

    input: Path
    target: Path | None


class FolderDataset(Dataset):
    """Pairs from disk, fitted to ``size`` by 'resize' (letterbox) or 'crop' (random when ``train``)."""

    def __init__(self, pairs: list[Pair], *, size: int, fit: str, train: bool) -> None:
        self.pairs, self.size, self.fit, self.train = pairs, size, fit, train

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        pair = self.pairs[i]
        inp = read_image(pair.input)
        tgt = conventional_enhance(inp) if pair.target is None else read_image(pair.target)
        # Random crops draw from torch's generator, which Lightning seeds per worker.
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item())) if self.train and self.fit == "crop" else None
        inp, tgt = fit_pair(inp, tgt, self.size, self.fit, rng)
        return _pair_tensors(inp, tgt)


def scan_folder(folder: str | Path, flag: str = "--data") -> list[Path]:
    """Image files directly in ``folder``, sorted by name; DataError if missing or empty."""
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"{flag} {folder}: no such folder")
    if not root.is_dir():
        raise DataError(f"{flag} {folder}: expected a folder of images, got a file")
    files = sorted((p for p in root.iterdir() if is_image_file(p)), key=lambda p: p.name)
    if not files:
        raise DataError(f"{flag} {folder}: no images found (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for p in files:
        if p.stem in stems:
            raise DataError(f"{flag} {folder}: two images share the name '{p.stem}' ({stems[p.stem].name}, {p.name}); stems must be unique to pair targets")
        stems[p.stem] = p
    return files


def pair_targets(inputs: list[Path], targets: str) -> list[Pair]:
    """Match inputs to ``targets`` ('clahe' or a folder) by file stem."""
    if targets.lower() == CLAHE:
        return [Pair(p, None) for p in inputs]
    by_stem = {p.stem: p for p in scan_folder(targets, flag="--targets")}
    missing = [p.stem for p in inputs if p.stem not in by_stem]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"--targets {targets}: no target for {len(missing)} of {len(inputs)} input(s): {shown} (targets are paired by file stem)")
    return [Pair(p, by_stem[p.stem]) for p in inputs]


def split(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Deterministic split: rank files by a hash of (seed, name); the first fraction is validation."""
    if len(pairs) < 2:
        raise DataError(f"--data {pairs[0].input.parent}: found 1 image; need at least 2 (one for training, one for validation)")

    def rank(p: Pair) -> str:
        return hashlib.sha256(f"{seed}:{p.input.name}".encode()).hexdigest()

    ordered = sorted(pairs, key=rank)
    n_val = min(len(pairs) - 1, max(1, round(len(pairs) * val_fraction)))
    val = sorted(ordered[:n_val], key=lambda p: p.input.name)
    train = sorted(ordered[n_val:], key=lambda p: p.input.name)
    return train, val


def check_readable(pairs: list[Pair]) -> None:
    """Decode every file once so a corrupt image fails before training, naming the file."""
    for pair in pairs:
        read_image(pair.input)
        if pair.target is not None:
            read_image(pair.target)

"""The Lightning data module: builds and checks the data sets before any training starts."""

from __future__ import annotations

import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from memtrain.config import DataConfig
from memtrain.data.datasets import FolderDataset, PhantomDataset, check_readable, pair_targets, scan_folder, split
from memtrain.errors import ConfigError
from memtrain.memory.units import fmt_bytes

PHANTOM = "phantom"
#: Peak host bytes per pixel of generating one phantom pair (radiograph + CLAHE target): tracemalloc
#: peak of ``PhantomDataset(...)[0]`` is 109 B/px at 256, 512 and 1024 px.
PHANTOM_BYTES_PER_PIXEL = 110


def host_memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(cfg: DataConfig, pin_memory: bool = False, available: int | None = None) -> None:
    """Reject a phantom --size whose generation alone cannot fit in the host memory available now.

    Each loading process (the training process, or each worker) generates one phantom at a
    time, needing ``PHANTOM_BYTES_PER_PIXEL × size²``. Whether the training step fits is
    the planner's question (``memtrain plan``); this check only catches a size that could
    never even produce its data, before anything is written.
    """
    if cfg.source.lower() != PHANTOM:
        return
    available = host_memory_available() if available is None else available
    need = PHANTOM_BYTES_PER_PIXEL * cfg.size * cfg.size * max(1, loader_workers(cfg, pin_memory))
    if available is not None and need > available:
        raise ConfigError(
            f"--size {cfg.size}: generating {cfg.size}x{cfg.size} phantom radiographs needs about {fmt_bytes(need)} of host memory,"
            f" more than the {fmt_bytes(available)} available; choose a smaller --size (see `memtrain plan --size N` for what training at a size needs)"
        )


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(train, val) data sets for ``cfg``; folder data is fully decoded once here to fail early."""
    if cfg.source.lower() == PHANTOM:
        train = PhantomDataset(seed=cfg.data_seed, first=0, count=cfg.train_images, size=cfg.size)
        val = PhantomDataset(seed=cfg.data_seed, first=cfg.train_images, count=cfg.val_images, size=cfg.size)
        return train, val
    pairs = pair_targets(scan_folder(cfg.source), cfg.targets)
    check_readable(pairs)
    train_pairs, val_pairs = split(pairs, cfg.val_fraction, cfg.data_seed)
    return (
        FolderDataset(train_pairs, size=cfg.size, fit=cfg.fit, train=True),
        FolderDataset(val_pairs, size=cfg.size, fit=cfg.fit, train=False),
    )


def loader_workers(cfg: DataConfig, pin_memory: bool) -> int:
    """``--workers``, with -1 resolved: up to 4 when feeding a GPU, none on a CPU."""
    if cfg.workers >= 0:
        return cfg.workers
    # On a GPU, generating/decoding large radiographs in the training process starves
    # the device; on a CPU the workers would take cores from the training itself.
    return min(4, max(1, (os.cpu_count() or 2) - 1)) if pin_memory else 0


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of epoch ``epoch``: a permutation drawn from (seed, epoch) alone."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class EpochSampler(Sampler[int]):
    """The order of :func:`epoch_order` for the epoch Lightning sets, so that a resumed run sees the same order.

    ``skip`` leaves the first indices out of the next pass only: a run resumed mid-epoch
    continues the epoch's order where it stopped.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch)[self.skip :]
        self.skip = 0
        return iter(order)


class ResumableLoader(DataLoader):
    """The training loader: an :class:`EpochSampler` plus Lightning's ``state_dict``/``load_state_dict`` loader protocol.

    Its state (saved in every checkpoint) is the epoch and the number of batches handed
    out in it; a checkpoint written mid-epoch resumes with the batches that were not
    trained yet, in the same order, and an end-of-epoch one with the next epoch.
    """

    def __init__(self, dataset: Dataset, *, seed: int, **kwargs) -> None:
        super().__init__(dataset, sampler=EpochSampler(len(dataset), seed), **kwargs)
        self.delivered = 0
        self.start = 0

    def __iter__(self):
        self.delivered, self.start = self.start, 0
        for batch in super().__iter__():
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batches * self.batch_size
        self.start = batches


class RadiographDataModule(L.LightningDataModule):
    """Train/validation loaders over phantom or folder radiographs.

    With ``resumable`` (single-process runs) the training loader is a :class:`ResumableLoader`
    seeded by ``seed``; otherwise a shuffling DataLoader that Lightning may give a
    distributed sampler.
    """

    def __init__(self, cfg: DataConfig, *, batch_size: int, pin_memory: bool = False, seed: int = 0, resumable: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.batch_size = batch_size
        self.pin_memory = pin_memory
        self.seed = seed
        self.resumable = resumable
        self.train_set, self.val_set = build_datasets(cfg)

    @property
    def workers(self) -> int:
        return loader_workers(self.cfg, self.pin_memory)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        workers = self.workers
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if not self.resumable:
            return self._loader(self.train_set, shuffle=True)
        workers = self.workers
        return ResumableLoader(
            self.train_set, seed=self.seed, batch_size=self.batch_size, num_workers=workers, pin_memory=self.pin_memory, persistent_workers=workers > 0
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

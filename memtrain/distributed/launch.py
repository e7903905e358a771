"""The torchrun environment of a process, its device, and the process group / store bootstrap."""

from __future__ import annotations

import os
import random
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from memtrain.errors import StrategyError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun job (from the variables torchrun sets)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, strategy: str, processes: str, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read RANK, WORLD_SIZE, ... ; StrategyError with the launch command when they are missing."""
        environ = os.environ if environ is None else environ
        missing = [k for k in TORCHRUN_VARS if k not in environ]
        if missing:
            raise StrategyError(
                f"--strategies {strategy}: runs as {processes} started by torchrun ({', '.join(missing)} not set); "
                f"launch it as: torchrun --nproc-per-node N -m memtrain fit --strategies {strategy} ..."
            )
        try:
            rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
            local_rank = int(environ.get("LOCAL_RANK", rank))
            local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
            port = int(environ["MASTER_PORT"])
        except ValueError as e:
            raise StrategyError(f"--strategies {strategy}: malformed torchrun environment ({e})") from None
        return cls(rank, world, local_rank, local_world, environ["MASTER_ADDR"], port)

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def require_world(self, strategy: str, sizes: tuple[int, ...] | range, processes: str) -> None:
        if self.world_size not in sizes:
            raise StrategyError(
                f"--strategies {strategy}: needs {processes}; this job has WORLD_SIZE={self.world_size} (set torchrun's --nnodes × --nproc-per-node)"
            )


def announce(denv: DistEnv, role: str, device: torch.device) -> None:
    """One line per process, so operators (and tests) can tell which process plays which role."""
    print(f"memtrain: rank {denv.rank}/{denv.world_size} ({role}) pid {os.getpid()} on {socket.gethostname()}, device {device}", flush=True)


def quiet_distributed_warnings() -> None:
    """torch.distributed's own deprecation notices, which say nothing about the user's run."""
    warnings.filterwarnings("ignore", message=r".*as a ProcessGroup\. This usage is deprecated.*")


def rank_device(denv: DistEnv, device_type: str) -> torch.device:
    """CPU, or the GPU ``LOCAL_RANK`` (modulo the GPUs visible) made current."""
    if device_type != "cuda":
        return torch.device("cpu")
    index = denv.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def rendezvous_store(denv: DistEnv, timeout: float = 300.0) -> torch.distributed.Store:
    """A client of the job's key-value store (torchrun's agent store, or rank 0's TCPStore outside torchrun)."""
    store, _, _ = next(dist.rendezvous("env://", rank=denv.rank, world_size=denv.world_size, timeout=timedelta(seconds=timeout)))
    return dist.PrefixStore("memtrain", store)


def init_process_group(denv: DistEnv, device_type: str, timeout: float = 1800.0) -> None:
    """The default process group: gloo on CPU, NCCL on CUDA."""
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=denv.rank, world_size=denv.world_size, timeout=timedelta(seconds=timeout))


def seed_all(seed: int) -> None:
    """What ``lightning.seed_everything`` seeds, without importing Lightning (shard processes need only torch)."""
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

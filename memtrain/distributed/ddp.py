"""``ddp``: data parallel with DistributedDataParallel, through Lightning's DDP strategy, under torchrun.

Every rank is a replica running the single-process Lightning loop (same module, same
callbacks) on its share of each epoch (Lightning's DistributedSampler); DDP averages
the gradients across replicas in buckets during the backward, so all replicas take the
same optimizer step. Rank 0 creates the run directory and tells the others its path,
and writes config.yaml, metrics.csv (training loss and validation metrics over every rank's images), samples
and checkpoints; every rank records its own memory, gathered to rank 0 into
``memory.csv`` / ``memory.rank<R>.csv``. Gradients are views into DDP's communication
buckets (``gradient_as_bucket_view``), so they take no second copy.

Learning rate: not rescaled. With N replicas of ``--batch-size`` B a step averages the
gradient over N·B images — single-process training with batch N·B at the same ``--lr``.
Resuming reads ``last.ckpt`` on every rank: on several nodes the run directory must be on
a shared filesystem (or copied to every node).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch.distributed
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from memtrain.config import FitConfig, to_dict
from memtrain.distributed.heartbeat import Heartbeat
from memtrain.distributed.launch import DistEnv, announce, init_process_group, quiet_distributed_warnings, rank_device, rendezvous_store
from memtrain.distributed.memory import RankRecords, earlier_rows, format_rank_table, memory_file, summarize_ranks, write_rank_files
from memtrain.errors import MemtrainError, StrategyError
from memtrain.loop.fit import LightningRunner, open_run_dir
from memtrain.memory.lightning import MemoryCallback

NAME = "ddp"
ROLE = "replica"


class RankMemoryCallback(MemoryCallback):
    """Per-rank memory of a data-parallel run: every rank records, rank 0 writes one file per rank."""

    def __init__(self, tracker, run_dir: Path, *, rank: int, warmup_steps: int) -> None:
        super().__init__(tracker, None, warmup_steps=warmup_steps, print_summary=False)
        self.run_dir = Path(run_dir)
        self.rank = rank
        self._first_step = 0
        self._kept: dict[int, list[str]] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._first_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.tracker.end_step()  # no gathering here: the other ranks may not get to this point

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write()
        if self.rank == 0 and self.tracker.records:
            print(format_rank_table(summarize_ranks(self.run_dir, skip_steps=self.warmup_steps)), flush=True)

    def _write(self) -> None:
        gathered = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(RankRecords(self.rank, ROLE, list(self.tracker.records)), gathered, dst=0)
        if self.rank != 0:
            return
        if self._kept is None:
            self._kept = {rr.rank: earlier_rows(memory_file(self.run_dir, rr.rank), self._first_step) for rr in gathered}
        write_rank_files(self.run_dir, gathered, self._kept)


class DDPRunner(LightningRunner):
    """The single-process Lightning run, replicated on every rank of the torchrun job."""

    def run(self, cfg: FitConfig, plan, env, *, resume: Path | None) -> Path | None:
        self.denv = DistEnv.from_environ(NAME, "one process per replica")
        if self.denv.world_size % self.denv.local_world_size:
            raise StrategyError(
                f"--strategies {NAME}: every node must run the same number of processes (WORLD_SIZE {self.denv.world_size}, this node {self.denv.local_world_size})"
            )
        quiet_distributed_warnings()
        announce(self.denv, ROLE, rank_device(self.denv, env.device))
        init_process_group(self.denv, env.device)
        heartbeat = Heartbeat(rendezvous_store(self.denv), rank=self.denv.rank, timeout=cfg.dist.master_timeout, label=f"rank {self.denv.rank} ({ROLE})")
        heartbeat.start()
        ok = False
        try:
            if self.is_main():
                n = self.denv.world_size
                print(
                    f"memtrain: ddp: {n} replicas × --batch-size {cfg.train.batch_size} = {n * cfg.train.batch_size} images per step at --lr {cfg.train.lr:g} (not rescaled)",
                    flush=True,
                )
            run_dir = super().run(cfg, plan, env, resume=resume)
            ok = True
            return run_dir
        finally:
            if ok:
                heartbeat.finish()
                # Tear the process group down before the interpreter does: no C++ thread may outlive it (see
                # memtrain.distributed.heartbeat for what one still working at exit does).
                with contextlib.suppress(Exception):
                    torch.distributed.destroy_process_group()
            else:
                heartbeat.stop()

    resumable_data = False  # Lightning gives the plain loader its DistributedSampler

    def open_run_dir(self, cfg: FitConfig, resume: Path | None) -> Path:
        box: list = [None]
        if self.is_main():
            try:
                box = [("ok", str(open_run_dir(cfg, resume)), to_dict(cfg))]
            except MemtrainError as e:
                box = [("error", str(e), None)]
        dist.broadcast_object_list(box, src=0)
        status, value, _ = box[0]
        if status == "error":
            raise MemtrainError(value)
        cfg.run.out = value
        return Path(value)

    def trainer_options(self, env) -> dict:
        return {
            "accelerator": "gpu" if env.device == "cuda" else "cpu",
            "devices": self.denv.local_world_size,
            "num_nodes": self.denv.world_size // self.denv.local_world_size,
            "strategy": DDPStrategy(gradient_as_bucket_view=True, find_unused_parameters=False),
        }

    def memory_callback(self, tracker, run_dir: Path, cfg: FitConfig):
        return RankMemoryCallback(tracker, run_dir, rank=self.denv.rank, warmup_steps=cfg.memory.warmup_steps)

    def is_main(self) -> bool:
        return self.denv.rank == 0

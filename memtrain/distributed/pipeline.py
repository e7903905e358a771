"""``pipeline``: the U-Net as two pipeline stages with torch.distributed.pipelining.

Two ranks, by ``RANK``: 0 runs the **encoder stage** and the data, the training loop and
the run directory; 1 runs the **decoder stage** (decoder and segmentation head) and the
loss. Each batch is split into ``--microbatches`` M; the schedule (``--pipeline-schedule``:
GPipe, or 1F1B which starts backwards early and keeps fewer microbatches' activations
alive) passes each microbatch's skip features from stage 0 to stage 1 and their
gradients back, and scales the summed gradients by 1/M — gradient accumulation over M
microbatches. Each stage steps its own Adam, at the learning rate of the run's one schedule.

Known break fixed here: the gradient of a skip feature is a slice of the gradient of the
decoder's concatenation — non-contiguous — and gloo refuses to send non-contiguous
tensors ("input tensor has to be contiguous"). The decoder shard passes received
features through :class:`memtrain.distributed.split.ContiguousGrad`.

BatchNorm sees microbatches: with M > 1 every BatchNorm normalises a microbatch with that
microbatch's statistics and updates its running statistics M times per step (as
single-process gradient accumulation over the same microbatches does). With M = 1 the
pipeline computes exactly what single-process training computes.

A batch of b images with b not divisible by M (the last, partial batch of an epoch) runs
with the largest divisor of b not above M.

Rank 0 runs the same Lightning loop as single-process ``memtrain fit``
(:mod:`memtrain.distributed.sharded`), with this module's engine behind it. Rank 1 follows
rank 0's commands (forward and backward, optimizer step at the schedule's rate, predict,
train/eval mode, state, load, memory records, stop), broadcast on a gloo group; tensors travel point to
point (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from memtrain.config import FitConfig
from memtrain.distributed.heartbeat import Heartbeat
from memtrain.distributed.launch import DistEnv, announce, init_process_group, quiet_distributed_warnings, rank_device, rendezvous_store
from memtrain.distributed.memory import RankRecords, rank_memory
from memtrain.distributed.shard import Shard
from memtrain.distributed.sharded import ShardedRunner
from memtrain.distributed.split import DECODER, ENCODER, check_splittable, merge_optimizer_states, merge_state_dicts, split_optimizer_state, split_state_dict
from memtrain.errors import ConfigError
from memtrain.loss import build_loss

NAME = "pipeline"
STAGES = (ENCODER, DECODER)


def microbatches_for(batch: int, m: int) -> int:
    """The largest divisor of ``batch`` that is at most ``m``."""
    return max(d for d in range(1, min(batch, m) + 1) if batch % d == 0)


class _InContext(nn.Module):
    """Runs the stage's module under the training-forward contexts (autocast, the plan's forward context)."""

    def __init__(self, inner: nn.Module, context) -> None:
        super().__init__()
        self.inner = inner
        self._context = context

    def forward(self, *args):
        with self._context():
            return self.inner(*args)


def _stage_class():
    class TrackedStage(PipelineStage):
        """A PipelineStage that tells the memory records when its first backward microbatch starts."""

        def __init__(self, *args, on_backward, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._on_backward = on_backward

        def backward_one_chunk(self, *args, **kwargs):
            self._on_backward()
            return super().backward_one_chunk(*args, **kwargs)

    return TrackedStage


class PipelineEngine:
    """This rank's stage. On rank 0 the engine behind Lightning's loop (a ShardEngine); on rank 1 :meth:`serve` follows rank 0."""

    label = NAME

    def __init__(self, cfg: FitConfig, plan, device: torch.device, memory, denv: DistEnv) -> None:
        self.cfg, self.plan, self.device, self.memory, self.rank = cfg, plan, device, memory, denv.rank
        self.step = 0
        self.part = STAGES[denv.rank]
        self.shard = Shard(cfg, plan, self.part, device, memory, NAME)
        self.loss_fn = plan.wrap_loss(build_loss(cfg.loss))
        # Commands and objects go over gloo even when activations go over NCCL.
        self.ctrl = dist.new_group(backend="gloo") if device.type == "cuda" else None
        self._schedules: dict[tuple, object] = {}
        self._in_backward = False

    # -- plumbing ------------------------------------------------------------------------
    def _command(self, *cmd):
        box = [cmd if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        return box[0]

    def _peer(self) -> int:
        return 1 - self.rank

    def _schedule(self, shape: tuple[int, ...]):
        m = microbatches_for(shape[0], self.cfg.dist.microbatches)
        key = (*shape, m)
        if key not in self._schedules:
            stage = _stage_class()(
                _InContext(self.shard.module, self.shard.train_forward), self.rank, len(STAGES), self.device, on_backward=self._mark_backward
            )
            kind = Schedule1F1B if self.cfg.dist.pipeline_schedule == "1f1b" and m >= len(STAGES) else ScheduleGPipe
            self._schedules[key] = kind(stage, m, loss_fn=self.loss_fn)
        return self._schedules[key]

    def _mark_backward(self) -> None:
        if not self._in_backward:
            self._in_backward = True
            self.memory.begin("backward")

    # -- the step, on both ranks ---------------------------------------------------------------
    def _train(self, step: int, shape: tuple[int, ...], x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward of every microbatch (the schedule interleaves them); the batch's mean loss, on both ranks."""
        schedule = self._schedule(shape)
        mem = self.memory
        if self.rank == 0:
            dist.send(y.contiguous(), dst=1)  # the last stage computes the loss
        else:
            y = torch.empty(shape, dtype=torch.float32, device=self.device)
            dist.recv(y, src=0)
        mem.start_step(step, self.shard.module, self.shard.optimizer, x, y)
        mem.begin("forward")
        self._in_backward = False
        losses: list[torch.Tensor] = []
        with self.shard.work():
            if self.rank == 0:
                schedule.step(x, return_outputs=False)
            else:
                schedule.step(target=y, losses=losses, return_outputs=False)
        loss = torch.stack(losses).float().mean().detach() if losses else torch.zeros((), device=self.device)
        dist.broadcast(loss, src=1)
        return loss

    def _optimizer_step(self, lr: float) -> None:
        self.memory.begin("optimizer")
        with self.shard.work():
            self.shard.optimizer_step(lr)
        self.memory.end_step()

    @torch.no_grad()
    def _predict(self, shape: tuple[int, ...], x: torch.Tensor | None = None) -> torch.Tensor | None:
        shard = self.shard
        if self.rank == 0:
            with shard.work(), shard.eval_forward():
                features = shard.module(x)
            meta = [(tuple(f.shape), f.dtype) for f in features]
            dist.broadcast_object_list([meta], src=0, group=self.ctrl)
            for f in features:
                dist.send(f.contiguous(), dst=1)
            out = torch.empty(shape, dtype=torch.float32, device=self.device)
            dist.recv(out, src=1)
            return out
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.ctrl)
        features = [torch.empty(s, dtype=dt, device=self.device) for s, dt in box[0]]
        for f in features:
            dist.recv(f, src=0)
        with shard.work(), shard.eval_forward():
            out = shard.module(*features).float().contiguous()
        dist.send(out, dst=0)
        return None

    def _gather_states(self, part: str):
        states = [None, None] if self.rank == 0 else None
        dist.gather_object(self.shard.state(part), states, dst=0, group=self.ctrl)
        return states

    def _scatter_states(self, parts):
        box = [None]
        dist.scatter_object_list(box, parts if self.rank == 0 else None, src=0, group=self.ctrl)
        self.shard.load(box[0])

    def _gather_memory(self):
        records = [None, None] if self.rank == 0 else None
        dist.gather_object(list(self.memory.records), records, dst=0, group=self.ctrl)
        return records

    # -- rank 0: the ShardEngine that Lightning's loop drives (memtrain.distributed.sharded) ---------
    def step_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
        """The schedule's forward *and* backward of the batch (it interleaves microbatches); the loss, computed on rank 1."""
        self._command("train", self.step, tuple(x.shape))
        return self._train(self.step, tuple(x.shape), x=x, y=y)

    def backward(self, loss: torch.Tensor) -> None:
        """Nothing: :meth:`forward_loss`'s schedule ran the backward already."""

    def optimizer_step(self, lr: float) -> None:
        self._command("step", lr)
        self._optimizer_step(lr)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], 1, *x.shape[2:])
        self._command("predict", shape)
        return self._predict(shape, x)

    def set_training(self, mode: bool) -> None:
        self._command("mode", mode)
        self.shard.set_training(mode)

    def state_dict(self) -> dict:
        self._command("state", "module")
        return merge_state_dicts(*self._gather_states("module"))

    def load_state_dict(self, state: dict) -> None:
        self._command("load")
        modules = split_state_dict(state)
        self._scatter_states([{"module": modules[p]} for p in STAGES])

    def optimizer_state(self) -> dict:
        self._command("state", "optimizer")
        return merge_optimizer_states(*self._gather_states("optimizer"))

    def load_optimizer_state(self, state: dict) -> None:
        self._command("load")
        optims = split_optimizer_state(state, self.shard.n_params())
        self._scatter_states([{"optimizer": optims[p]} for p in STAGES])

    def memory_records(self) -> list[RankRecords]:
        self._command("memory")
        return [RankRecords(r, STAGES[r], recs) for r, recs in enumerate(self._gather_memory())]

    def close(self) -> None:
        self._command("stop")

    # -- rank 1 ---------------------------------------------------------------------------------
    def serve(self) -> None:
        """Follow rank 0's commands until it says stop."""
        while True:
            cmd = self._command()
            op = cmd[0]
            if op == "stop":
                return
            if op == "train":
                self._train(cmd[1], cmd[2])
            elif op == "step":
                self._optimizer_step(cmd[1])
            elif op == "predict":
                self._predict(cmd[1])
            elif op == "mode":
                self.shard.set_training(cmd[1])
            elif op == "state":
                self._gather_states(cmd[1])
            elif op == "load":
                self._scatter_states(None)
            elif op == "memory":
                self._gather_memory()
            else:  # pragma: no cover - a programming error
                raise RuntimeError(f"pipeline: unknown command {op!r}")


class PipelineRunner:
    """Starts this process's stage of a pipeline run: rank 0 trains, rank 1 follows."""

    def run(self, cfg: FitConfig, plan, env, *, resume: Path | None) -> Path | None:
        denv = DistEnv.from_environ(NAME, "2 processes (one per stage)")
        denv.require_world(NAME, (2,), "2 processes: the encoder stage (with the data) and the decoder stage")
        check_splittable(cfg.model.encoder, NAME)
        if cfg.dist.pipeline_schedule == "1f1b" and cfg.dist.microbatches < len(STAGES):
            raise ConfigError(f"--pipeline-schedule 1f1b: needs --microbatches {len(STAGES)} or more (one per stage), got {cfg.dist.microbatches}")
        quiet_distributed_warnings()
        device = rank_device(denv, env.device)
        announce(denv, f"{STAGES[denv.rank]} stage", device)
        init_process_group(denv, env.device)
        heartbeat = Heartbeat(rendezvous_store(denv), rank=denv.rank, timeout=cfg.dist.master_timeout, label=f"rank {denv.rank} ({STAGES[denv.rank]} stage)")
        heartbeat.start()
        ok = False
        try:
            if denv.is_master:
                engine = PipelineEngine(cfg, plan, device, rank_memory(device, cfg.memory.track), denv)
                run_dir = ShardedRunner(engine, device).run(cfg, plan, env, resume=resume)
                engine.close()
            else:
                engine = PipelineEngine(cfg, plan, device, rank_memory(device, cfg.memory.track), denv)
                with heartbeat.verdict(), plan.session():
                    engine.serve()
                run_dir = None
            ok = True
            return run_dir
        finally:
            if ok:
                heartbeat.finish()
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
            else:
                heartbeat.stop()

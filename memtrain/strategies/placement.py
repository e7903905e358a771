"""Placement strategies: where the (fully transformed) model runs — several processes, launched with torchrun.

``rpc`` and ``pipeline`` cut the U-Net into encoder and decoder shards on different
processes (model parallel: less memory per device); ``ddp`` replicates it (data
parallel: more images per second). They apply last, after every single-process
transform, so the shards are cut from (or the replicas copy) the final model and each
shard runs the plan's other strategies (amp, checkpoint, momentum, quantization) on its
own process. Exactly one placement strategy per run. Each names its runner
(``runner_name``); the loop layer maps the name to the runner (``memtrain.loop.runners``).
"""

from __future__ import annotations

from memtrain.errors import StrategyError
from memtrain.strategies.base import Stage, Strategy
from memtrain.strategies.registry import register


class Placement(Strategy):
    """Common checks of the placement strategies."""

    stage = Stage.PLACEMENT
    shards_model = True  # rpc/pipeline cut the model into shards on other processes (rank 0 drives them from the one loop)

    @classmethod
    def plan_options(cls, env) -> tuple[tuple[str, ...], str]:
        return (), "runs several processes launched with torchrun; plans estimate one process's step"

    def check(self, plan) -> None:
        others = [s.spec for s in plan.strategies if s.stage == Stage.PLACEMENT and s is not self]
        if others:
            raise StrategyError(
                f"--strategies {plan.label}: '{self.name}' and '{others[0]}' both decide which processes run the model "
                "(rpc and pipeline split it, ddp replicates it); pick one"
            )
        if self.shards_model and plan.precision().loss_scaling:
            owner = next(s.spec for s in plan.strategies if s.precision() is not None)
            raise StrategyError(
                f"--strategies {plan.label}: {owner} needs one loss scaler whose overflow check spans all shards, "
                f"which {self.name} does not have; use amp:bf16 (GPUs of compute capability 8.0+) or no amp"
            )


@register
class RPC(Placement):
    """Model parallel over torch.distributed.rpc: master (data, loss, logging) + encoder worker + decoder worker.

    Memory saved: each device holds one shard — parameters, gradients, optimizer state and
    activations of the encoder, or of the decoder and head — instead of the whole model;
    the master holds only the batch and the output. Time paid: the shards run one after
    the other, plus sending skip features (encoder to decoder directly), the output and
    the gradients between processes. Accuracy risk: none (same arithmetic; BatchNorm
    updates on its own shard). Launch: ``torchrun --nproc-per-node 3 -m memtrain fit
    --strategies rpc ...`` (3 processes; any split over nodes). See memtrain.distributed.rpc.
    """

    name = "rpc"
    runner_name = "rpc"
    summary = "encoder and decoder on two worker processes + a master, over torch.distributed.rpc (torchrun, 3 processes): one shard per device"


@register
class Pipeline(Placement):
    """Pipeline parallel with torch.distributed.pipelining: encoder stage and decoder stage, microbatches.

    Memory saved: as ``rpc`` (one shard per device), and with ``--microbatches M`` the
    activations in flight are those of microbatches (``--pipeline-schedule 1f1b`` keeps
    fewer of them alive than ``gpipe``). Time paid: pipeline bubbles; with M > 1 the stages
    overlap on different microbatches. Accuracy risk: with M > 1, BatchNorm normalises each
    microbatch with its own statistics (and updates its running statistics M times per
    step) — the same as gradient accumulation over microbatches, not as one big batch;
    with M = 1 it is single-process training exactly. Launch: ``torchrun --nproc-per-node 2
    -m memtrain fit --strategies pipeline --microbatches M ...``. See memtrain.distributed.pipeline.
    """

    name = "pipeline"
    runner_name = "pipeline"
    summary = "encoder and decoder as two pipeline stages with microbatches (torchrun, 2 processes; --microbatches, --pipeline-schedule)"


@register
class DDP(Placement):
    """Data parallel (DistributedDataParallel through Lightning): every process holds the whole model.

    Memory saved: none per device (each replica is a whole single-process run; gradients are
    views into DDP's communication buckets, so no second copy). Time paid: one gradient
    all-reduce per step, overlapped with the backward. Throughput: N replicas train on N ×
    --batch-size images per step. Learning rate: memtrain does not rescale --lr — DDP
    averages the gradients, so N replicas of batch B take the step single-process training
    takes with batch N·B at the same --lr; scale --lr yourself if you want the linear
    (× N) or square-root (× √N, usual for Adam) rule. Accuracy risk: BatchNorm statistics
    are per replica (batch B each). Launch: ``torchrun --nproc-per-node N -m memtrain fit
    --strategies ddp ...``. See memtrain.distributed.ddp.
    """

    name = "ddp"
    runner_name = "ddp"
    summary = "data parallel replicas (DistributedDataParallel; torchrun, N processes): N × --batch-size images per step, no memory saved"
    shards_model = False

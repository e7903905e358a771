"""Per-rank memory of a model-parallel step (rpc, pipeline), estimated in one process, with fake tensors or real ones.

:func:`measure_shard_steps` builds every rank's :class:`~memtrain.distributed.shard.Shard`
(the plan-transformed U-Net cut into encoder and decoder, with its own Adam) and runs the
step each rank runs, in the order the ranks run it, each counted by its own
:class:`~memtrain.distributed.memory.RankMemory` — a rank counts only the operator outputs of
its own work and the tensors it receives (copies: another process's tensors are not
shared storage). The phases are those the real runs record:

* ``rpc`` (3 ranks): the master holds the batch, receives the output, computes the loss and
  its backward (the output's gradient goes to the decoder); the encoder keeps its
  activations and its skip features through the step and receives their gradients; the
  decoder receives the skip features and the output's gradient;
* ``pipeline`` with one microbatch (2 ranks): the encoder stage holds the batch (it sends the
  target on), the decoder stage receives the target and computes the loss.

Each shard steps its optimizer and sets its gradients to None right after, so no
gradients are alive during the next forward (unlike Lightning's single-process order).
With fake tensors (``torch._subclasses.FakeTensorMode``) nothing is allocated: a 2048²
ResNet34 step takes seconds on a CPU. A CUDA target on a machine without CUDA runs on CPU
fake tensors of the same dtypes, as :func:`memtrain.memory.estimate.measure_step` does;
a CPU target counts amp's float32 convolution working copies on the rank that makes them.
Microbatches (``--microbatches`` > 1) are not modelled.
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memtrain.config import from_dict
from memtrain.distributed.memory import RankMemory, RankRecords
from memtrain.distributed.shard import Shard
from memtrain.distributed.split import DECODER, ENCODER
from memtrain.errors import StrategyError
from memtrain.loss import build_loss
from memtrain.memory.estimate import execution_plan
from memtrain.strategies import Environment
from memtrain.strategies.amp import count_working_copies

MASTER = "master"
LAYOUTS = {"rpc": (MASTER, ENCODER, DECODER), "pipeline": (ENCODER, DECODER)}


def _received(t: torch.Tensor, memory: RankMemory, *, grad: bool = False) -> torch.Tensor:
    """What the receiving rank holds: its own copy of ``t`` (made outside any rank's counting), counted there."""
    copy = t.detach().clone()
    if grad:
        copy.requires_grad_(True)
    memory.track(copy)
    return copy


def measure_shard_steps(
    strategies: str,
    *,
    size: int,
    batch_size: int = 1,
    encoder: str = "resnet34",
    loss: str = "msssim",
    steps: int = 2,
    env=None,
    fake: bool = True,
) -> list[RankRecords]:
    """``steps`` steps of the rpc or pipeline run ``strategies`` names, at ``size``²; every rank's phase records.

    ``env`` is the target environment (default: a CPU without native bf16, as
    :func:`memtrain.memory.estimate.measure_step`). The records of every step are returned; the
    first step has no optimizer state yet, so peaks are usually read from the last.
    """
    env = env or Environment(device="cpu", native_bf16=False)
    plan, run_plan, torch_device = execution_plan(strategies, env, fake)
    layout = plan.runner_name
    if layout not in LAYOUTS:
        raise StrategyError(f"--strategies {plan.label}: per-shard estimates need rpc or pipeline (a placement that cuts the model)")
    cfg = from_dict({"model": {"encoder": encoder}, "train": {"batch_size": batch_size}, "loss": loss}, "measure_shard_steps")
    roles = LAYOUTS[layout]
    memories = {role: RankMemory(torch_device) for role in roles}
    active: list[RankMemory] = [memories[roles[0]]]  # the rank whose work runs now (amp's CPU working copies count there)

    @contextlib.contextmanager
    def on(role: str):
        active.append(memories[role])
        try:
            yield
        finally:
            active.pop()

    copies = count_working_copies(lambda t: active[-1].track(t)) if env.device == "cpu" else contextlib.nullcontext()
    with FakeTensorMode() if fake else contextlib.nullcontext(), copies:
        shards = {part: Shard(cfg, run_plan, part, torch_device, memories[part], layout) for part in (ENCODER, DECODER)}
        loss_fn = run_plan.wrap_loss(build_loss(cfg.loss))
        enc, dec = shards[ENCODER], shards[DECODER]
        m_enc, m_dec = memories[ENCODER], memories[DECODER]
        m_loss = memories[MASTER] if layout == "rpc" else m_dec
        for step in range(steps):
            x = torch.rand(batch_size, 1, size, size, device=torch_device)
            y = torch.rand(batch_size, 1, size, size, device=torch_device)
            if layout == "rpc":
                memories[MASTER].start_step(step, x, y)
                m_enc.start_step(step, enc.module, enc.optimizer)
                xe = _received(x, m_enc)
            else:
                m_enc.start_step(step, enc.module, enc.optimizer, x, y)
                xe = x
            m_dec.start_step(step, dec.module, dec.optimizer)
            y_loss = _received(y, m_dec) if layout == "pipeline" else y
            for m in memories.values():
                m.begin("forward")
            with on(ENCODER), enc.work(), enc.train_forward():
                features = enc.module(xe)
            del xe
            skips = [_received(f, m_dec, grad=True) for f in features]
            with on(DECODER), dec.work(), dec.train_forward():
                out = dec.module(*skips)
            if layout == "rpc":
                pred = _received(out, m_loss, grad=True)
                with on(MASTER), m_loss.counting():
                    step_loss = loss_fn(pred, y_loss)
            else:
                with on(DECODER), dec.work():
                    step_loss = loss_fn(out, y_loss)
            for m in memories.values():
                m.begin("backward")
            if layout == "rpc":
                with on(MASTER), m_loss.counting():
                    step_loss.backward()
                grad_out = _received(pred.grad, m_dec)
                del pred, step_loss
                with on(DECODER), dec.work():
                    out.backward(grad_out)
                del grad_out
            else:
                with on(DECODER), dec.work():
                    step_loss.backward()
                del step_loss
            del out
            grads = [_received(s.grad, m_enc) for s in skips]
            del skips
            with on(ENCODER), enc.work():
                torch.autograd.backward(features, grads)
            del features, grads
            for m in memories.values():
                m.begin("optimizer")
            for role, shard in ((ENCODER, enc), (DECODER, dec)):
                with on(role), shard.work():
                    shard.optimizer_step()
            del x, y, y_loss
            for m in memories.values():
                m.end_step()
    return [RankRecords(rank, role, list(memories[role].records)) for rank, role in enumerate(roles)]


def step_peak(records: RankRecords, step: int, metric: str = "tensor_peak") -> int:
    """The largest ``metric`` over the phases of ``step`` in one rank's records (bytes)."""
    return max(r.metrics[metric] for r in records.records if r.step == step)

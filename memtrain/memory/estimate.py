"""Measure one training step's per-phase memory for any strategies and size — for real, or with fake tensors.

With ``fake=True`` the model, the batch and every intermediate are fake tensors
(``torch._subclasses.FakeTensorMode``): shapes, dtypes and the autograd graph are real,
nothing is allocated, and the ``tensor`` backend counts exactly the bytes a real run
would hold. A 4096² U-Net ResNet34 step is estimated in seconds on a CPU.

The step is the one :class:`memtrain.loop.module.EnhancementModule` trains: strategies
applied by the plan, forward under the plan's forward context and the precision
plugin's autocast, 1 − MS-SSIM in float32, backward, Adam step, ``zero_grad``. Two
steps run so the optimizer state exists; the last one is reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from memtrain.config import ModelConfig
from memtrain.memory.tracker import PHASES, MemoryTracker


@dataclass
class StepMemory:
    """Per-phase metrics (bytes) of a measured step, and how it was measured."""

    strategies: str
    size: int
    batch_size: int
    fake: bool
    phases: dict[str, dict[str, int]]

    def peak(self, phase: str, metric: str = "tensor_peak") -> int:
        return self.phases[phase][metric]

    @property
    def step_peak(self) -> int:
        return max(self.phases[p]["tensor_peak"] for p in PHASES if p in self.phases)


def measure_step(
    strategies: str | Iterable[str] = "none",
    *,
    size: int,
    batch_size: int = 1,
    encoder: str = "resnet34",
    fake: bool = True,
    steps: int = 2,
    env=None,
) -> StepMemory:
    """Run ``steps`` training steps of the U-Net under ``strategies`` and return the last one's phases."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memtrain.loss import MSSSIMLoss
    from memtrain.model import build_model
    from memtrain.strategies import Environment, Plan

    env = env or Environment(device="cpu", native_bf16=False)
    plan = Plan.resolve(strategies, env)
    precision = plan.precision_plugin()
    autocast = precision.forward_context if precision is not None else contextlib.nullcontext
    tracker = MemoryTracker("cpu", backends=("tensor",))
    fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with plan.session(), fake_mode:
        model = plan.apply(build_model(ModelConfig(encoder=encoder)))
        loss_fn = plan.wrap_loss(MSSSIMLoss())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.rand(batch_size, 1, size, size)
        y = torch.rand(batch_size, 1, size, size)
        for step in range(steps):
            with tracker.step(model, optimizer, (x, y), step=step):
                with tracker.phase("forward"):
                    with autocast(), plan.forward_context():
                        out = model(x)
                    loss = loss_fn(out, y)
                    del out
                with tracker.phase("backward"):
                    loss.backward()
                    del loss
                with tracker.phase("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
    last = max(r.step for r in tracker.records)
    phases = {r.phase: dict(r.metrics) for r in tracker.records if r.step == last}
    return StepMemory(plan.label, size, batch_size, fake, phases)

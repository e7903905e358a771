"""Measure one training step's per-phase memory for any strategies and size — for real, or with fake tensors.

With ``fake=True`` the model, the batch and every intermediate are fake tensors
(``torch._subclasses.FakeTensorMode``): shapes, dtypes and the autograd graph are real,
nothing is allocated, and the ``tensor`` backend counts exactly the bytes a real run
would hold. A 4096² U-Net ResNet34 step is estimated in seconds on a CPU.

The step is :class:`memtrain.memory.step.TrainStep`, the one ``memtrain fit`` trains
(Lightning's order: forward and loss, ``zero_grad``, backward, Adam step). Two steps run
so the optimizer state and the previous step's gradients exist; the last one is
reported.

The *target* environment ``env`` decides how strategies resolve (``amp`` → bf16 or
fp16, which combinations are rejected) and Adam's implementation (``foreach`` on
CUDA). Fake tensors run on the target device where it exists; a CUDA target on a
machine without CUDA is estimated with CPU fake tensors of the same dtypes (CPU
autocast casts the same convolutions and matmuls to 16 bits), counting the tensors the
CUDA run would hold on the GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

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
    blocks: dict[str, int] = field(default_factory=dict)  # activation bytes each block holds at the end of forward
    block_params: dict[str, int] = field(default_factory=dict)  # parameter + buffer bytes per block
    device: str = "cpu"  # the target device the step was measured for
    loss: float | None = None  # the last step's loss (real runs only)

    def peak(self, phase: str, metric: str = "tensor_peak") -> int:
        return self.phases[phase][metric]

    def metric_peak(self, metric: str = "tensor_peak") -> int:
        """The largest ``metric`` over the step's phases."""
        return max(self.phases[p][metric] for p in PHASES if p in self.phases and metric in self.phases[p])

    @property
    def step_peak(self) -> int:
        return self.metric_peak("tensor_peak")


def _execution_device(env, fake: bool) -> str:
    if env.device == "cuda" and not torch.cuda.is_available():
        if not fake:
            from memtrain.errors import ConfigError

            raise ConfigError("measuring a CUDA step for real needs a CUDA device (use fake=True to estimate it)")
        return "cpu"
    return env.device


def measure_step(
    strategies: str | Iterable[str] = "none",
    *,
    size: int,
    batch_size: int = 1,
    encoder: str = "resnet34",
    loss: str = "msssim",
    fake: bool = True,
    steps: int = 2,
    env=None,
    blocks: bool = True,
    backends: tuple[str, ...] | None = None,
) -> StepMemory:
    """Run ``steps`` training steps of the U-Net under ``strategies`` with the loss named ``loss`` and return the last one's phases.

    ``env`` is the target environment (default: a CPU without native bf16). Real runs
    (``fake=False``) use every backend of the device (``tensor``, and ``cuda`` and
    ``nvml`` on a GPU) unless ``backends`` says otherwise; fake runs only ``tensor``.
    """
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from memtrain.memory.blocks import block_parameters
    from memtrain.memory.step import TrainStep
    from memtrain.strategies import Environment, Plan

    env = env or Environment(device="cpu", native_bf16=False)
    plan = Plan.resolve(strategies, env)
    device = _execution_device(env, fake)
    run_plan = plan
    if device != env.device:
        # Same resolved strategies (e.g. amp:fp16 for a pre-Ampere GPU), executed on CPU fake tensors.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_plan = Plan.resolve(plan.specs, Environment(device=device, native_bf16=False))
    torch_device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    if backends is None:
        backends = ("tensor",) if fake else None
    tracker = MemoryTracker(torch_device, backends=backends, blocks=blocks)
    fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    try:
        with fake_mode, run_plan.session():
            train = TrainStep(run_plan, model_cfg=ModelConfig(encoder=encoder), loss=loss, device=torch_device, foreach=env.device == "cuda", scaler=not fake)
            x = torch.rand(batch_size, 1, size, size, device=torch_device)
            y = torch.rand(batch_size, 1, size, size, device=torch_device)
            for step in range(steps):
                loss = train(tracker, x, y, step=step)
            params = block_parameters(train.model) if blocks else {}
            loss_value = None if fake else float(loss)
    finally:
        tracker.close()
    last = max(r.step for r in tracker.records)
    phases = {r.phase: dict(r.metrics) for r in tracker.records if r.step == last}
    return StepMemory(plan.label, size, batch_size, fake, phases, tracker.blocks.get(last, {}), params, env.device, loss_value)

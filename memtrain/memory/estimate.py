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

import contextlib
import gc
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memtrain.config import ModelConfig
from memtrain.errors import ConfigError
from memtrain.memory.allocator import fix_mmap_threshold
from memtrain.memory.blocks import block_parameters
from memtrain.memory.step import TrainStep
from memtrain.memory.tensor import LiveTensorBytes, TensorBytesMode
from memtrain.memory.tracker import PHASES, MemoryTracker
from memtrain.strategies import Environment, Plan
from memtrain.strategies.amp import count_working_copies
from memtrain.strategies.tile import sampled_tiles


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
    events: dict[str, list[list[int]]] = field(default_factory=dict)  # per phase, the live bytes' local maxima (measure_sizes)
    step_start: int = 0  # tensor bytes alive when the step began (what tensor_increase is above)

    def peak(self, phase: str, metric: str = "tensor_peak") -> int:
        return self.phases[phase][metric]

    def metric_peak(self, metric: str = "tensor_peak") -> int:
        """The largest ``metric`` over the step's phases."""
        return max(self.phases[p][metric] for p in PHASES if p in self.phases and metric in self.phases[p])

    @property
    def step_peak(self) -> int:
        return self.metric_peak("tensor_peak")


def execution_device(env, fake: bool) -> str:
    """Where a step for target ``env`` runs: the target device, or CPU fake tensors for a CUDA target on a machine without CUDA."""
    if env.device == "cuda" and not torch.cuda.is_available():
        if not fake:
            raise ConfigError("measuring a CUDA step for real needs a CUDA device (use fake=True to estimate it)")
        return "cpu"
    return env.device


def execution_plan(strategies, env, fake: bool):
    """``strategies`` resolved for target ``env``, the plan that runs it here, and the torch device it runs on.

    For a CUDA target on a machine without CUDA the same resolved strategies (e.g. amp:fp16 for a
    pre-Ampere GPU) run on CPU fake tensors.
    """
    plan = Plan.resolve(strategies, env)
    device = execution_device(env, fake)
    run_plan = plan
    if device != env.device:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_plan = Plan.resolve(plan.specs, Environment(device=device, native_bf16=False, stands_in_for=env.device))
    torch_device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    return plan, run_plan, torch_device


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
    sizes = [size] * steps
    return _run_steps(
        strategies, sizes=sizes, batch_size=batch_size, encoder=encoder, loss=loss, fake=fake, env=env, blocks=blocks, backends=backends, first=steps - 1
    )[0]


def measure_sizes(
    strategies: str | Iterable[str] = "none", *, sizes: Iterable[int], batch_size: int = 1, encoder: str = "resnet34", loss: str = "msssim", env=None
) -> list[StepMemory]:
    """One fake-tensor estimate per size in ``sizes``, with each phase's :attr:`StepMemory.events`, from one model.

    A warm-up step at the first size creates the optimizer state and the gradients; then one
    step runs at each size. Parameters, gradients and the optimizer state do not depend on
    the image size, so each of these steps holds what :func:`measure_step` measures at its size
    (:mod:`memtrain.memory.scaling` checks it against a further size; the tests against
    :func:`measure_step`).
    """
    sizes = list(sizes)
    return _run_steps(
        strategies, sizes=[sizes[0], *sizes], batch_size=batch_size, encoder=encoder, loss=loss, fake=True, env=env, blocks=False, events=True, first=1
    )


def _run_steps(strategies, *, sizes, batch_size, encoder, loss="msssim", fake, env, blocks, backends=None, events=False, first=0) -> list[StepMemory]:
    """Steps at ``sizes`` (one each) on one model; the StepMemory of each step from index ``first`` on."""
    env = env or Environment(device="cpu", native_bf16=False)
    plan, run_plan, torch_device = execution_plan(strategies, env, fake)
    if not fake and torch_device.type == "cpu":
        fix_mmap_threshold()  # a real measurement: the same resident memory from run to run (memtrain.memory.allocator)
    if backends is None:
        backends = ("tensor",) if fake else None
    tracker = MemoryTracker(torch_device, backends=backends, blocks=blocks, events=events)
    tensor = next((b for b in tracker.backends if b.name == "tensor"), None)
    fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    # Fake runs of a tiled step run the tiles that reach its peak, not all of them (memtrain.strategies.tile.sampled_tiles).
    tiles = sampled_tiles() if fake else contextlib.nullcontext()
    # A CPU target's 16-bit convolutions run as float32 ones (memtrain.strategies.amp): count those copies.
    copies = count_working_copies(tensor.counter.track) if env.device == "cpu" and tensor is not None else contextlib.nullcontext()
    out: list[StepMemory] = []
    train = None
    try:
        with fake_mode, tiles, copies, run_plan.session():
            train = TrainStep(run_plan, model_cfg=ModelConfig(encoder=encoder), loss=loss, device=torch_device, foreach=env.device == "cuda", scaler=not fake)
            params = block_parameters(train.model) if blocks else {}
            for step, size in enumerate(sizes):
                x = torch.rand(batch_size, 1, size, size, device=torch_device)
                y = torch.rand(batch_size, 1, size, size, device=torch_device)
                step_loss = train(tracker, x, y, step=step)
                del x, y
                if step < first:
                    continue
                phases = {r.phase: dict(r.metrics) for r in tracker.records if r.step == step}
                loss_value = None if fake else float(step_loss)
                out.append(
                    StepMemory(
                        plan.label,
                        size,
                        batch_size,
                        fake,
                        phases,
                        tracker.blocks.get(step, {}),
                        params,
                        env.device,
                        loss_value,
                        dict(tensor.phase_events) if events else {},
                        tensor.step_start_bytes if tensor is not None else 0,
                    )
                )
    finally:
        tracker.close()
        if not fake:
            # A checkpointed model is freed only by the cycle collector: without this its parameters, gradients and
            # Adam state (~370 MiB) stay resident through the next real measurement in this process.
            train = None
            gc.collect()
    return out


def loss_memory(loss_fn, size: int, dtype: torch.dtype = torch.float32) -> tuple[int, int, int]:
    """(forward peak, held after forward, backward peak) of ``loss_fn`` alone, in bytes above its two inputs (fake tensors, batch 1)."""
    with FakeTensorMode():
        pred = torch.rand(1, 1, size, size, dtype=dtype).requires_grad_(True)
        target = torch.rand(1, 1, size, size, dtype=dtype)
        counter = LiveTensorBytes()
        counter.track(pred)
        counter.track(target)
        base = counter.current
        counter.reset_peak()
        with TensorBytesMode(counter):
            loss = loss_fn(pred, target)
            forward, held = counter.peak - base, counter.current - base
            counter.reset_peak()
            loss.backward()
            backward = counter.peak - base
    return forward, held, backward

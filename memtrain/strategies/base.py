"""What a memory strategy is, and the fixed order in which strategies apply.

A strategy can act at six points, each a no-op by default so a strategy only
overrides what it changes:

* :meth:`Strategy.transform` — rewrite the model once, before training;
* :meth:`Strategy.transform_loss` — wrap the loss function once;
* :meth:`Strategy.forward_context` — a context around each training forward of the
  *model* (saved-tensor hooks live here; the loss runs outside it);
* :meth:`Strategy.session` — process-wide settings for the whole run (e.g. TF32),
  restored afterwards;
* :meth:`Strategy.precision` — the numeric precision of the step (autocast dtype, loss
  scaling), as plain data (:class:`Precision`), when the strategy owns it; the default,
  float32, is a no-op :class:`Precision`;
* :attr:`Strategy.runner_name` — which runner executes the run: ``None`` (the default)
  keeps one process; placement strategies (rpc, pipeline, ddp) name theirs.

Strategies declare *what*; the layers above decide *how*. The training loop maps a
:class:`Precision` to Lightning's precision plugin (:mod:`memtrain.loop.precision`) and a
runner name to the runner that starts the run's processes (:mod:`memtrain.loop.runners`);
no module of this package imports the loop, the distributed runners, the CLI or Lightning
(tests/test_strategies_core.py checks it).

Model transforms apply in :class:`Stage` order. The order is not a convention but a
dependency chain, written next to each stage.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from memtrain.config import FitConfig
    from memtrain.strategies.plan import Plan


class Stage(IntEnum):
    """Where a strategy sits in the fixed transform order (lower applies first)."""

    # Restructure first: replacing residual stages (MomentumNet) changes which modules
    # exist, so everything after must see the final architecture.
    RESTRUCTURE = 10
    # Quantize next: QAT fuses conv+bn and inserts fake-quant observers into the final
    # modules, and saved-tensor quantization must know which tensors it may touch.
    QUANTIZE = 20
    # Tile after restructuring and quantization (it runs layer1 as momentum left it, and rejects
    # quant:qat's fused ConvBn), and before checkpointing: checkpoint must see which stages tile
    # owns (they already recompute everything per tile) and wrap only the whole-image middle.
    TILE = 25
    # Checkpoint after quantization so that recomputation replays the fake-quant ops
    # too, and after restructuring so regions follow the final block boundaries.
    CHECKPOINT = 30
    # Offload moves what the (possibly checkpointed, quantized) graph still saves.
    OFFLOAD = 35
    # Precision last among single-process strategies: autocast wraps the whole step at
    # run time and must also cover recomputation, which non-reentrant checkpointing
    # replays under the autocast state recorded in the forward.
    PRECISION = 40
    # Placement (model / pipeline / data parallel) shards or replicates the final,
    # fully transformed model.
    PLACEMENT = 50


@dataclass(frozen=True)
class Precision:
    """The numeric precision of a training step, as data: what autocast computes in and whether the loss is scaled.

    ``dtype=None`` is plain float32: no autocast, no loss scaler (the no-op every plan has
    when no strategy sets the precision). The training loop applies it (Lightning's
    precision plugin, :mod:`memtrain.loop.precision`); code that runs a step outside
    Lightning (memory estimates, model-parallel shards) uses :meth:`autocast` and
    :meth:`grad_scaler`, which are what that plugin does.
    """

    device: str = "cpu"
    dtype: torch.dtype | None = None  # autocast dtype (torch.bfloat16, torch.float16); None: float32
    loss_scaling: bool = False  # fp16: a dynamic GradScaler scales the loss and skips steps with inf/NaN gradients

    @property
    def name(self) -> str:
        """'fp32', 'bf16' or 'fp16'."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, *, cache_enabled: bool = False) -> contextlib.AbstractContextManager[Any]:
        """The autocast of the step's forward (Lightning's MixedPrecision uses it without the weight-cast cache)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.dtype, cache_enabled=cache_enabled)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A new dynamic loss scaler when the precision needs one, else None."""
        return torch.amp.GradScaler(self.device) if self.loss_scaling else None


@dataclass(frozen=True)
class Environment:
    """Facts about where training runs that decide how strategies resolve."""

    device: str = "cpu"  # "cpu" or "cuda"
    native_bf16: bool = False  # bf16 kernels exist in hardware (CUDA >= sm80, or a CPU with AVX512-BF16/AMX)
    stands_in_for: str | None = None  # the device a step run here models (a CUDA step's memory estimate on CPU fake tensors); None: this one

    @property
    def target(self) -> str:
        """The device whose step this is: :attr:`stands_in_for`, else :attr:`device` (e.g. whose kernels' rounding ``tile`` mirrors)."""
        return self.stands_in_for or self.device

    @classmethod
    def detect(cls, accelerator: str = "auto") -> Environment:
        if accelerator == "auto":
            accelerator = "cuda" if torch.cuda.is_available() else "cpu"
        if accelerator == "cuda":
            return cls(device="cuda", native_bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
        return cls(device="cpu", native_bf16=bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()))


class Runner(Protocol):
    """Executes a whole `memtrain fit` run: builds the model, trains, writes the run directory.

    Returns the run directory on the process that wrote it, ``None`` on other processes.
    Runners live in the layers above (``memtrain.loop.runners`` maps :attr:`Strategy.runner_name`
    to one); this is the interface they implement.
    """

    def run(self, cfg: FitConfig, plan: Plan, env: Environment, *, resume: Path | None) -> Path | None: ...


class Strategy:
    """Base class. Subclasses set the class attributes and override only the hooks they need.

    The class docstring of each strategy states its trade-off: memory saved, time paid,
    accuracy risk. ``memtrain strategies`` prints it.
    """

    name: ClassVar[str]
    stage: ClassVar[Stage]
    summary: ClassVar[str]  # one line for `memtrain strategies`
    variants: ClassVar[tuple[str, ...]] = ()  # accepted ':variant' suffixes; the first is the default
    # Expected step time relative to `none` (1.0; 1.3 = 30 % slower, 0.6 = 40 % faster) on a
    # CUDA GPU, and on a CPU where that differs (None: the same), for every variant; a strategy whose
    # variants differ overrides `declared_time`. `memtrain plan` orders combinations by the product
    # over their strategies and `memtrain strategies` lists it: both read `declared_time`. State the
    # basis next to the numbers.
    time_cost: ClassVar[float] = 1.0
    time_cost_cpu: ClassVar[float | None] = None
    # Whether the step's tensor events are the same at every size, each a quadratic in the image side, so that
    # `memtrain plan` may extrapolate its estimate from small sizes (memtrain.memory.scaling); False: estimated at the size.
    size_polynomial: ClassVar[bool] = True
    # The runner that executes the whole run (a key of memtrain.loop.runners.RUNNERS), or None: one process.
    # Placement strategies (rpc, pipeline, ddp) name theirs; a plan has at most one.
    runner_name: ClassVar[str | None] = None

    @classmethod
    def accepts_variant(cls, variant: str) -> bool:
        """Whether ``name:variant`` is valid (default: one of ``variants``; parameterised variants override)."""
        return variant in cls.variants

    @classmethod
    def variant_error(cls, text: str) -> str:
        """The one-line error for a rejected ``name:variant``."""
        if not cls.variants:
            return f"--strategies: '{cls.name}' takes no ':variant', got '{text}'"
        return f"--strategies: unknown variant '{text}' (available: {', '.join(f'{cls.name}:{v}' for v in cls.variants)})"

    @classmethod
    def plan_options(cls, env: Environment) -> tuple[tuple[str, ...], str]:
        """The specs `memtrain plan` and `fit --strategies auto` consider for ``env``, and why the others are left out.

        Default: the default variant only. A strategy overrides this to offer several
        variants (e.g. checkpoint granularities) or none (an empty tuple, with the reason).
        """
        return (cls.name,), ""

    @classmethod
    def fallback_variant(cls, variant: str | None) -> str | None:
        """The variant plans try in place of ``variant`` only where no combination fits the budget (slower, less memory), or None: none.

        `memtrain plan` and `fit --strategies auto` try it for the few combinations with the
        smallest step peaks (:meth:`memtrain.memory.planner.Planner.fallbacks`). Default: None.
        """
        return None

    def __init__(self, variant: str | None = None) -> None:
        self.variant = variant if variant is not None else (self.variants[0] if self.variants else None)
        self.env = Environment()

    @property
    def spec(self) -> str:
        """The canonical ``name[:variant]`` string."""
        return f"{self.name}:{self.variant}" if self.variant else self.name

    def __repr__(self) -> str:
        return f"<strategy {self.spec}>"

    @classmethod
    def declared_time(cls, variant: str | None, device: str) -> float:
        """Expected step time relative to `none` of ``name:variant`` on ``device`` ('cuda' or 'cpu').

        The one source of a strategy's time cost: the planner (through :meth:`relative_time`)
        and the ``memtrain strategies`` listing read it. Default: ``time_cost_cpu`` on a CPU
        when set, else ``time_cost``, whatever the variant.
        """
        if device == "cpu" and cls.time_cost_cpu is not None:
            return cls.time_cost_cpu
        return cls.time_cost

    def relative_time(self) -> float:
        """:meth:`declared_time` of this variant on the bound environment's device."""
        return self.declared_time(self.variant, self.env.device)

    # -- resolution --------------------------------------------------------------
    def bind(self, env: Environment) -> None:
        """Resolve environment-dependent choices (e.g. 'auto' variants) before checks."""
        self.env = env

    def check(self, plan: Plan) -> None:
        """Raise StrategyError, with the reason, if this strategy cannot be faithful in ``plan``."""

    # -- hooks (no-ops by default) --------------------------------------------------
    def transform(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def transform_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return loss_fn

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def session(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def precision(self) -> Precision | None:
        """The step's numeric precision when this strategy sets it, else None (the plan keeps float32)."""
        return None

"""``amp``: automatic mixed precision (bf16 or fp16 autocast)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import torch
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from memtrain.errors import StrategyError
from memtrain.strategies.base import Precision, Stage, Strategy
from memtrain.strategies.registry import register

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Set by count_working_copies(): called with each float32 working copy of the CPU routing while it is alive.
_COPY_OBSERVER: contextvars.ContextVar[Callable[[torch.Tensor], None] | None] = contextvars.ContextVar("memtrain_copy_observer", default=None)


@contextlib.contextmanager
def count_working_copies(observer: Callable[[torch.Tensor], None]):
    """Route 16-bit CPU convolutions under fake tensors too, and hand ``observer`` each float32 working copy.

    Memory estimates for a CPU target use it so that the copies (input, weight and output in
    float32, and the same in backward) are counted while they exist; they are not tensors of
    the model and a tracker above the routing does not see them otherwise.
    """
    token = _COPY_OBSERVER.set(observer)
    try:
        yield
    finally:
        _COPY_OBSERVER.reset(token)


@register
class AMP(Strategy):
    """Autocast eligible ops (convolutions, matmuls) to 16 bits; keep the weights in float32.

    Memory saved: activations saved for backward are stored in 16 bits, roughly halving
    the activation memory (the paper measured ~50 % less in forward). Time paid: none on
    GPUs with tensor cores (usually faster). On CPUs without native bf16/fp16 kernels
    (no AVX512-BF16/AMX) PyTorch's 16-bit convolutions fall back to reference loops ~30x
    slower than float32; there memtrain runs them as float32 convolutions of the
    16-bit inputs, rounded to 16 bits (:class:`LowPrecisionConvOnFloat32`) — what a
    native kernel computes (16-bit inputs, float32 accumulation, 16-bit output), with the
    same 16-bit tensors saved for backward, at about float32 speed.
    Accuracy risk: bf16 keeps float32's range with an 8-bit mantissa (coarser
    activations); fp16 has more mantissa but overflows above 65504, so fp16 runs use a
    dynamic GradScaler that skips steps with inf/NaN gradients. The MS-SSIM loss always
    runs in float32 (see memtrain.loss).

    Variants: ``amp`` (bf16 where the device supports it natively, else fp16 with a
    GradScaler; bf16 on CPU), ``amp:bf16``, ``amp:fp16``.
    """

    name = "amp"
    stage = Stage.PRECISION
    summary = "16-bit autocast (bf16 where supported, else fp16 + GradScaler): ~half the activation memory"
    # GPUs: tensor-core convolutions; mixed-precision U-Net training steps typically take
    # 0.5-0.7 of the float32 time on Volta and newer. CPU (no native bf16): convolutions run on
    # float32 kernels plus casts: measured x1.18 (benchmarks/results/strategy_time_cpu.md).
    time_cost = 0.6
    time_cost_cpu = 1.2
    variants = ("auto", "bf16", "fp16")

    def bind(self, env) -> None:
        super().bind(env)
        if self.variant == "auto":
            # CPU autocast only has bf16 as a first-class dtype; on CUDA prefer bf16 (no
            # loss scaling needed) when the GPU has native bf16 (Ampere and newer).
            self.resolved = "bf16" if (env.device == "cpu" or env.native_bf16) else "fp16"
        else:
            self.resolved = self.variant

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.resolved]

    @property
    def spec(self) -> str:
        return f"amp:{self.resolved}" if hasattr(self, "resolved") else super().spec

    def check(self, plan) -> None:
        if self.env.device == "cuda" and self.resolved == "bf16" and not self.env.native_bf16:
            raise StrategyError("amp:bf16: this GPU has no native bf16 (needs compute capability 8.0+); use amp:fp16")

    def session(self):
        # Under fake tensors (memory estimates) no kernel runs, so there is nothing to reroute,
        # and the extra dispatch layer would only slow the estimate down, unless the estimate
        # counts the routing's working copies (count_working_copies).
        if self.env.device == "cpu" and not self.env.native_bf16 and (active_fake_mode() is None or _COPY_OBSERVER.get() is not None):
            return LowPrecisionConvOnFloat32()
        return contextlib.nullcontext()

    def precision(self) -> Precision:
        """16-bit autocast in the resolved dtype; fp16 with dynamic loss scaling."""
        return Precision(device=self.env.device, dtype=self.dtype, loss_scaling=self.resolved == "fp16")


_aten = torch.ops.aten
_LOW = (torch.bfloat16, torch.float16)


def _real_cpu(*tensors) -> bool:
    """CPU tensors that are real, or fake ones while an estimate counts the working copies."""
    fake_ok = _COPY_OBSERVER.get() is not None
    return all(t is None or (t.device.type == "cpu" and (fake_ok or not isinstance(t, FakeTensor))) for t in tensors)


def _observe(*tensors) -> None:
    observer = _COPY_OBSERVER.get()
    if observer is not None:
        for t in tensors:
            if t is not None:
                observer(t)


class LowPrecisionConvOnFloat32(TorchDispatchMode):
    """Run 16-bit CPU convolutions (forward and backward) as float32 convolutions of the 16-bit inputs.

    Sits below autograd, so the graph, the tensors it saves (16-bit) and every hook or
    checkpoint see exactly what native 16-bit kernels would produce; only the arithmetic
    is routed to the fast float32 kernels. Outputs are rounded to the 16-bit dtype, as
    native kernels (which accumulate in float32) round theirs. Its float32 working
    copies live only inside one operator and are not tensors of the model, so a memory
    tracker entered after this mode does not count them.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _aten.convolution.default:
            x, w, b = args[0], args[1], args[2]
            if x.dtype in _LOW and _real_cpu(x, w, b):
                x32, w32, b32 = x.float(), w.float(), None if b is None else b.float()
                _observe(x32, w32, b32)
                out = func(x32, w32, b32, *args[3:], **kwargs)
                _observe(out)
                return out.to(x.dtype)
        elif func is _aten.convolution_backward.default:
            grad, x, w = args[0], args[1], args[2]
            if grad.dtype in _LOW and _real_cpu(grad, x, w):
                g32, x32, w32 = grad.float(), x.float(), w.float()
                _observe(g32, x32, w32)
                grads = func(g32, x32, w32, *args[3:], **kwargs)
                _observe(*grads)
                dtypes = (x.dtype, w.dtype, grad.dtype)
                return tuple(None if g is None else g.to(dt) for g, dt in zip(grads, dtypes))
        return func(*args, **kwargs)

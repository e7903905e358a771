"""``amp``: automatic mixed precision (bf16 or fp16 autocast)."""

from __future__ import annotations

import contextlib
import warnings

import torch

from memtrain.errors import StrategyError
from memtrain.strategies.base import Stage, Strategy
from memtrain.strategies.registry import register

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@register
class AMP(Strategy):
    """Autocast eligible ops (convolutions, matmuls) to 16 bits; keep the weights in float32.

    Memory saved: activations saved for backward are stored in 16 bits, roughly halving
    the activation memory (the paper measured ~50 % less in forward). Time paid: none on
    GPUs with tensor cores (usually faster); on CPUs without native bf16/fp16 kernels
    (no AVX512-BF16/AMX) PyTorch falls back to reference convolutions that are
    ~30x slower than float32 — there amp is for checking behaviour, not for speed.
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
        if self.env.device == "cpu" and not self.env.native_bf16:
            warnings.warn(
                "amp on a CPU without native bf16/fp16 kernels (needs AVX512-BF16 or AMX): PyTorch uses reference "
                "convolutions, about 30x slower than float32. Memory behaviour is the same as on a GPU.",
                stacklevel=2,
            )

    def precision_plugin(self):
        from lightning.pytorch.plugins.precision import MixedPrecision

        scaler = torch.amp.GradScaler(self.env.device) if self.resolved == "fp16" else None
        return MixedPrecision("bf16-mixed" if self.resolved == "bf16" else "16-mixed", device=self.env.device, scaler=scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context, for code that runs outside Lightning (e.g. remote shards)."""
        return torch.autocast(self.env.device, dtype=self.dtype)

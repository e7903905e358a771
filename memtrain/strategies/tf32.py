"""``tf32``: TensorFloat-32 for float32 convolutions and matmuls on NVIDIA GPUs."""

from __future__ import annotations

import contextlib
import warnings

import torch

from memtrain.strategies.base import Stage, Strategy
from memtrain.strategies.registry import register


@contextlib.contextmanager
def fp32_precision(mode: str):
    """Set cuDNN-convolution and CUDA-matmul float32 precision ('ieee' or 'tf32'); restore on exit."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    conv.fp32_precision, matmul.fp32_precision = mode, mode
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


@register
class TF32(Strategy):
    """Let float32 convolutions and matmuls use TF32 tensor cores (Ampere and newer).

    Memory saved: none — tensors stay float32; TF32 only changes how products are
    computed (10-bit mantissa inputs, float32 accumulation). Time paid: none; convs and
    matmuls run several times faster on tensor cores. Accuracy risk: small (relative
    error ~1e-3 per product); no effect at all on CPUs. Combine with ``amp`` to also
    speed up the ops autocast leaves in float32.
    """

    name = "tf32"
    stage = Stage.PRECISION
    summary = "TF32 tensor cores for float32 convs/matmuls: faster on Ampere+ GPUs, no memory change, no effect on CPU"
    # Ampere+: float32 convolutions and matmuls on tensor cores; the whole step (which also
    # has memory-bound elementwise work and the float32 loss) gains less than the GEMMs.
    time_cost = 0.85
    time_cost_cpu = 1.0

    def check(self, plan) -> None:
        if self.env.device != "cuda":
            warnings.warn("tf32 has no effect on CPU (TF32 is an NVIDIA tensor-core format)", stacklevel=2)

    def session(self):
        return fp32_precision("tf32")

"""Lightning's side of the precision axis: the plugin that applies a plan's declared :class:`~memtrain.strategies.base.Precision`.

Strategies declare the precision as data (autocast dtype, loss scaling) and never import
Lightning; this module maps it to Lightning's ``MixedPrecision`` plugin, whose forward
context is the same ``torch.autocast`` (weight-cast cache off) that
:meth:`Precision.autocast` gives the code that runs a step outside Lightning.
"""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from memtrain.strategies.base import Precision

_LIGHTNING = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}


def lightning_plugins(precision: Precision) -> list:
    """Lightning plugins applying ``precision``: none for float32 (Lightning's default '32-true'), else ``MixedPrecision``."""
    if precision.dtype is None:
        return []
    return [MixedPrecision(_LIGHTNING[precision.dtype], device=precision.device, scaler=precision.grad_scaler())]

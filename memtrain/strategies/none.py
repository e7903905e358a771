"""``none``: the plain float32 model — the reference every strategy is measured against."""

from __future__ import annotations

from memtrain.strategies.base import Stage, Strategy
from memtrain.strategies.registry import register


@register
class NoStrategy(Strategy):
    """The plain model in IEEE float32.

    Memory saved: none. Time paid: none. Accuracy risk: none — this is the reference.
    (memtrain also turns off PyTorch's default TF32 for cuDNN convolutions here, so the
    baseline is true float32; TF32 is the explicit ``tf32`` strategy.)
    """

    name = "none"
    stage = Stage.PRECISION
    summary = "plain float32 model; the reference for memory and accuracy"
    time_cost = 1.0

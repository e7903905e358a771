"""Memory strategies: a registry of composable transforms of the model and the step.

Import this package to register the built-in strategies. Resolve a run's strategies
with :meth:`Plan.resolve`, which orders them by :class:`Stage` and rejects
combinations that cannot be faithful before any work is done.
"""

from memtrain.strategies import amp, checkpoint, momentum, none, offload, placement, quant, tf32, tile  # noqa: F401  (registers the built-ins)
from memtrain.strategies.base import Environment, Stage, Strategy
from memtrain.strategies.plan import Plan
from memtrain.strategies.registry import available, create, register, registered

__all__ = ["Environment", "Plan", "Stage", "Strategy", "available", "create", "register", "registered"]

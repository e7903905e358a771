"""Memory tracking: per-phase peaks of training steps from several backends.

See :mod:`memtrain.memory.tracker` for the metrics and the API,
:class:`memtrain.memory.lightning.MemoryCallback` for Lightning,
:func:`memtrain.memory.estimate.measure_step` for estimates with fake tensors and
:mod:`memtrain.memory.planner` for choosing strategies under a memory budget.
"""

from memtrain.memory.cuda import AllocatorSnapshot
from memtrain.memory.tensor import CATEGORIES, LiveTensorBytes, TensorBytesMode
from memtrain.memory.tracker import BACKENDS, PHASES, MemoryTracker, PhaseRecord

__all__ = ["BACKENDS", "CATEGORIES", "PHASES", "AllocatorSnapshot", "LiveTensorBytes", "MemoryTracker", "PhaseRecord", "TensorBytesMode"]

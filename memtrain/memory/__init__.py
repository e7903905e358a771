"""Memory tracking: per-phase peaks of training steps from several backends.

See :mod:`memtrain.memory.tracker` for the metrics and the API, and
:class:`memtrain.memory.lightning.MemoryCallback` for Lightning.
"""

from memtrain.memory.tensor import LiveTensorBytes, TensorBytesMode
from memtrain.memory.tracker import PHASES, MemoryTracker, PhaseRecord

__all__ = ["PHASES", "LiveTensorBytes", "MemoryTracker", "PhaseRecord", "TensorBytesMode"]

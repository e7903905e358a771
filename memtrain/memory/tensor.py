"""The ``tensor`` backend: live tensor bytes counted by a dispatch mode.

Every tensor an operator returns while :class:`TensorBytesMode` is active is counted by
its *storage* (views and in-place results share one storage and count once) until that
storage is freed, which a weak reference reports. Tensors that existed before the mode
was entered (parameters, optimizer state, the batch) are added with
:meth:`LiveTensorBytes.track`.

It measures what PyTorch itself allocates as tensors, on any device and under fake
tensors (where nothing is allocated at all), so it is the backend that works on CPU
and the one that lets sizes be estimated without memory. It does not see allocator
rounding, caching or kernel workspaces that never become tensors; the ``cuda``
backend does.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes:
    """Bytes held by distinct live storages that were seen, with a resettable peak."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage if it is not counted yet (``meta`` tensors hold no memory and are not counted)."""
        if t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or storage-less tensors
            return
        key = storage._cdata
        nbytes = storage.nbytes()
        with self._lock:
            if key in self._refs:
                return
            self._refs[key] = (weakref.ref(storage, lambda _ref, key=key: self._release(key)), nbytes)
            self.current += nbytes
            if self.current > self.peak:
                self.peak = self.current

    def track_all(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.track(t)

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._refs.pop(key, None)
            if entry is not None:
                self.current -= entry[1]

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.current


class TensorBytesMode(TorchDispatchMode):
    """Counts every operator output into a :class:`LiveTensorBytes`."""

    def __init__(self, counter: LiveTensorBytes) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.counter.track(t)
        return out


def module_tensors(*objs) -> list[torch.Tensor]:
    """Tensors held by modules (parameters, grads, buffers), optimizers (state) and nested containers."""
    found: list[torch.Tensor] = []
    for obj in objs:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                found.append(p)
                if p.grad is not None:
                    found.append(p.grad)
            found.extend(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                found.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        else:
            found.extend(t for t in tree_leaves(obj) if isinstance(t, torch.Tensor))
    return found

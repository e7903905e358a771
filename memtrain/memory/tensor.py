"""The ``tensor`` backend: live tensor bytes counted by a dispatch mode, by category and by block.

Every tensor an operator returns while :class:`TensorBytesMode` is active is counted by
its *storage* (views and in-place results share one storage and count once) until that
storage is freed, which a weak reference reports. Tensors that existed before the mode
was entered (parameters, optimizer state, the batch) are added with
:meth:`LiveTensorBytes.track`.

Each storage belongs to one :data:`CATEGORIES` entry. A new operator output starts as
``activations`` (activations, temporaries and the batch); at step and phase boundaries
the tracker walks the model and the optimizer and moves the storages it finds to
``parameters`` (parameters and buffers), ``gradients`` (``.grad``) or
``optimizer_state``. A storage that was already alive when the phase's peak happened
is moved in the peak's breakdown too, so a phase reports the exact composition of its
peak: the four ``tensor_peak_<category>`` values always sum to ``tensor_peak``.

Each new storage also records the innermost *block* (see :mod:`memtrain.memory.blocks`)
whose forward was running when it was created, so the activations a block still holds
at the end of the forward phase can be reported per block.

It measures what PyTorch itself allocates as tensors, on any device and under fake
tensors (where nothing is allocated at all), so it is the backend that works on CPU
and the one that lets sizes be estimated without memory. It does not see allocator
rounding, caching or kernel workspaces that never become tensors; the ``cuda``
backend does. With ``device_type`` set (the tracker sets it to its device's type), only
storages on that device type count, so host copies made by offloading are not counted
against a GPU.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PARAMETERS = "parameters"
GRADIENTS = "gradients"
OPTIMIZER_STATE = "optimizer_state"
ACTIVATIONS = "activations"
CATEGORIES = (PARAMETERS, GRADIENTS, OPTIMIZER_STATE, ACTIVATIONS)
OUTSIDE = "(outside blocks)"


@dataclass
class _Entry:
    ref: weakref.ref
    nbytes: int
    category: str
    seq: int  # creation order: alive at the peak iff seq <= the peak's seq (it is alive now)
    owner: str


class LiveTensorBytes:
    """Bytes held by distinct live storages that were seen, by category, with a resettable peak."""

    def __init__(self, device_type: str | None = None) -> None:
        self.device_type = device_type
        self._lock = threading.Lock()
        self._refs: dict[int, _Entry] = {}
        self._seq = 0
        self.current = 0
        self.peak = 0
        self.current_by_category = dict.fromkeys(CATEGORIES, 0)
        self.peak_by_category = dict.fromkeys(CATEGORIES, 0)
        self._peak_seq = 0
        self.owner = OUTSIDE  # set by block hooks while a block's forward runs
        # Local maxima of the live bytes while recording (start_events .. finish_events): one
        # snapshot [current, *current_by_category] at the start, before every release that
        # follows an allocation, and at the end. Their maximum is the peak over that interval.
        self.events: list[list[int]] | None = None
        self._event_seqs: list[int] = []
        self._rising = False

    def _storage(self, t: torch.Tensor):
        if t.device.type == "meta":  # meta tensors (e.g. offload's host copies under fake tensors) hold no memory
            return None
        if self.device_type is not None and t.device.type != self.device_type:
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or storage-less tensors
            return None

    def track(self, t: torch.Tensor, category: str = ACTIVATIONS) -> None:
        """Count ``t``'s storage (as ``category``) if it is not counted yet."""
        storage = self._storage(t)
        if storage is None:
            return
        key = storage._cdata
        nbytes = storage.nbytes()
        with self._lock:
            if key in self._refs:
                return
            self._seq += 1
            ref = weakref.ref(storage, lambda _ref, key=key: self._release(key))
            self._refs[key] = _Entry(ref, nbytes, category, self._seq, self.owner)
            self.current += nbytes
            self.current_by_category[category] += nbytes
            self._rising = True
            if self.current > self.peak:
                self.peak = self.current
                self.peak_by_category = dict(self.current_by_category)
                self._peak_seq = self._seq

    def track_all(self, tensors: Iterable[torch.Tensor], category: str = ACTIVATIONS) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.track(t, category)

    def classify(self, t: torch.Tensor, category: str) -> None:
        """Put ``t``'s storage in ``category`` (tracking it if new); the peak's breakdown follows if it was alive then."""
        storage = self._storage(t)
        if storage is None:
            return
        with self._lock:
            entry = self._refs.get(storage._cdata)
            if entry is not None and entry.category != category:
                self.current_by_category[entry.category] -= entry.nbytes
                self.current_by_category[category] += entry.nbytes
                if entry.seq <= self._peak_seq:
                    self.peak_by_category[entry.category] -= entry.nbytes
                    self.peak_by_category[category] += entry.nbytes
                if self.events is not None:  # snapshots it was alive at move with it, as the peak's breakdown does
                    a, b = 1 + CATEGORIES.index(entry.category), 1 + CATEGORIES.index(category)
                    for i in range(bisect.bisect_left(self._event_seqs, entry.seq), len(self.events)):
                        self.events[i][a] -= entry.nbytes
                        self.events[i][b] += entry.nbytes
                entry.category = category
        if entry is None:
            self.track(t, category)

    def _snapshot(self) -> None:
        self.events.append([self.current, *(self.current_by_category[c] for c in CATEGORIES)])
        self._event_seqs.append(self._seq)
        self._rising = False

    def start_events(self) -> None:
        """Begin recording the local maxima of the live bytes (see :attr:`events`)."""
        with self._lock:
            self.events, self._event_seqs = [], []
            self._snapshot()

    def finish_events(self) -> list[list[int]]:
        """Stop recording; the snapshots ``[current, parameters, gradients, optimizer_state, activations]`` taken."""
        with self._lock:
            self._snapshot()
            events, self.events, self._event_seqs = self.events, None, []
            return events

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._refs.pop(key, None)
            if entry is not None and self.events is not None and self._rising:
                self._snapshot()
            if entry is not None:
                self.current -= entry.nbytes
                self.current_by_category[entry.category] -= entry.nbytes

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.current
            self.peak_by_category = dict(self.current_by_category)
            self._peak_seq = self._seq

    def live_by_owner(self, category: str = ACTIVATIONS) -> dict[str, int]:
        """Bytes of live storages of ``category`` per block that created them."""
        out: dict[str, int] = {}
        with self._lock:
            for e in self._refs.values():
                if e.category == category:
                    out[e.owner] = out.get(e.owner, 0) + e.nbytes
        return out


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


def classified_tensors(*objs) -> list[tuple[torch.Tensor, str]]:
    """(tensor, category) for what modules (parameters, buffers, grads), optimizers (state) and other containers hold."""
    found: list[tuple[torch.Tensor, str]] = []
    for obj in objs:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                found.append((p, PARAMETERS))
                if p.grad is not None:
                    found.append((p.grad, GRADIENTS))
            found.extend((b, PARAMETERS) for b in obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                found.extend((v, OPTIMIZER_STATE) for v in state.values() if isinstance(v, torch.Tensor))
        else:
            found.extend((t, ACTIVATIONS) for t in tree_leaves(obj) if isinstance(t, torch.Tensor))
    return found


def module_tensors(*objs) -> list[torch.Tensor]:
    """Tensors held by modules (parameters, grads, buffers), optimizers (state) and nested containers."""
    return [t for t, _ in classified_tensors(*objs)]


class TensorBackend:
    """Tracker backend: ``tensor_peak``, ``tensor_increase`` and the peak's breakdown by category."""

    name = "tensor"

    def __init__(self, device: torch.device | None = None, *, blocks: bool = True, events: bool = False) -> None:
        self.counter = LiveTensorBytes(device.type if device is not None else None)
        self.blocks = blocks
        self.record_events = events
        self.phase_events: dict[str, list[list[int]]] = {}  # events=True: the last step's snapshots per phase
        self.step_start_bytes = 0
        self._mode: TensorBytesMode | None = None
        self._step_start = 0
        self._objs: tuple = ()
        self._hooks: dict[int, object] = {}  # id(model) -> BlockHooks
        self.block_bytes: dict[str, int] = {}  # activations held per block at the end of the last forward phase

    def start_step(self, objs) -> None:
        self._objs = tuple(objs)
        self._classify()
        self._step_start = self.step_start_bytes = self.counter.current
        if self.blocks:
            from memtrain.memory.blocks import BlockHooks  # (cycle: tensor <-> blocks)

            for obj in self._objs:
                if isinstance(obj, torch.nn.Module) and id(obj) not in self._hooks:
                    self._hooks[id(obj)] = BlockHooks(obj, self.counter)
        self._mode = TensorBytesMode(self.counter)
        self._mode.__enter__()

    def _classify(self) -> None:
        for t, category in classified_tensors(*self._objs):
            self.counter.classify(t, category)

    def begin_phase(self) -> None:
        self.counter.reset_peak()
        if self.record_events:
            self.counter.start_events()

    def end_phase(self, phase: str) -> dict[str, int]:
        self._classify()
        if self.record_events:
            self.phase_events[phase] = self.counter.finish_events()
        c = self.counter
        metrics = {"tensor_peak": c.peak, "tensor_increase": c.peak - self._step_start}
        metrics.update({f"tensor_peak_{k}": v for k, v in c.peak_by_category.items()})
        if phase == "forward" and self.blocks:
            self.block_bytes = c.live_by_owner(ACTIVATIONS)
        return metrics

    def end_step(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._objs = ()

    def close(self) -> None:
        for hooks in self._hooks.values():
            hooks.remove()
        self._hooks.clear()

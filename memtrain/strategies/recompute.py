"""Recomputation that sees exactly the module state of the forward it replays.

Strategies that recompute part of the forward during backward — activation
checkpointing, and MomentumNet's inverted stages — must compute *bit for bit* what the
forward computed, and must not change module state a second time. Two kinds of module
state get in the way:

* BatchNorm running statistics (``running_mean``, ``running_var``,
  ``num_batches_tracked``): a recompute in training mode updates them again, so they
  end the step 2–3× updated. Fused QAT ``ConvBn2d`` modules also *read*
  ``running_var`` in their forward, so a recompute after the update computes with
  different numbers than the forward did.
* Quantization observers and fake-quant modules (QAT): the forward updates their
  min/max and derives a scale from it; a recompute would observe again and could use
  another scale.

:class:`StateSnapshot` solves both generally, without knowing module types: it copies
the buffers of a module tree *before* the forward (a few floats per channel — no
activations), and :meth:`StateSnapshot.replayed` puts those values back for the
duration of the recompute, which therefore sees what the forward saw and updates
state exactly as the forward did, and then restores the values the forward left. So
the state advances exactly once per step, and the recompute is exact.

API (for any strategy that recomputes):

* ``snap = StateSnapshot(module)`` right before the forward of ``module`` (or of a list
  of modules); ``with snap.replayed(): <recompute>`` around the recompute.
* :func:`checkpoint_context_fn` — the same, packaged as the ``context_fn`` of
  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False, context_fn=...)``.
* :func:`is_recomputing` — True while a recompute runs in this thread (inside
  :meth:`StateSnapshot.replayed` or :func:`recomputing`), for code that must behave
  differently then (e.g. skip a check, not count a forward).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

import torch
from torch import nn

_state = threading.local()


def is_recomputing() -> bool:
    """True while this thread is recomputing a forward for backward."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark this thread as recomputing (nests)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


class StateSnapshot:
    """The buffers of one or more module trees, captured before a forward so a recompute can replay them.

    Buffers are looked up by (module, name) at replay time, so modules that reassign a
    buffer attribute are handled; buffers that did not exist at capture are left alone.
    """

    def __init__(self, modules: nn.Module | Iterable[nn.Module]) -> None:
        roots = [modules] if isinstance(modules, nn.Module) else list(modules)
        self._entries: list[tuple[nn.Module, str, torch.Tensor]] = []
        seen: set[int] = set()
        with torch.no_grad():
            for root in roots:
                for mod in root.modules():
                    if id(mod) in seen:
                        continue
                    seen.add(id(mod))
                    for name, buf in mod._buffers.items():
                        if buf is not None:
                            self._entries.append((mod, name, buf.detach().clone()))

    def __len__(self) -> int:
        return len(self._entries)

    def _load(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for (mod, name, _), value in zip(self._entries, values):
                buf = mod._buffers.get(name)
                if buf is None:
                    continue
                if buf.shape != value.shape:  # observers may resize scale/zero_point on first use
                    buf.resize_(value.shape)
                buf.copy_(value)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Inside: buffers hold their values from before the forward; after: the values the forward left."""
        with torch.no_grad():
            live = [mod._buffers[name].detach().clone() if mod._buffers.get(name) is not None else value for mod, name, value in self._entries]
        self._load([value for _, _, value in self._entries])
        try:
            with recomputing():
                yield
        finally:
            self._load(live)


def checkpoint_context_fn(module: nn.Module | Iterable[nn.Module]):
    """A ``context_fn`` for non-reentrant ``torch.utils.checkpoint.checkpoint`` of ``module`` (or modules).

    The forward context captures the modules' buffers; the recompute context replays
    them (see :class:`StateSnapshot`). Usage::

        checkpoint(module, x, use_reentrant=False, context_fn=checkpoint_context_fn(module))
    """

    def context_fn():
        holder: dict[str, StateSnapshot] = {}

        @contextlib.contextmanager
        def forward_ctx():
            holder["snap"] = StateSnapshot(module)
            yield

        @contextlib.contextmanager
        def recompute_ctx():
            snap = holder.get("snap")
            with snap.replayed() if snap is not None else recomputing():
                yield

        return forward_ctx(), recompute_ctx()

    return context_fn

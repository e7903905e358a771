"""``offload``: tensors saved for backward are kept in (pinned) CPU memory and copied back when backward needs them."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_map
from torch.utils.weak import WeakIdKeyDictionary

from memtrain.strategies.base import Stage, Strategy
from memtrain.strategies.registry import register


def _is_fake(t: torch.Tensor) -> bool:
    return is_fake(t)


def _outer_hooks():
    """The (pack, unpack) pair active before ours (e.g. saved-tensor quantization), or None."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


class OffloadSavedTensors(saved_tensors_hooks):
    """Saved-tensor hooks moving what autograd saves to host memory; composes with hooks already active.

    * On CUDA the host copy is pinned and both copies are asynchronous (``torch.autograd.graph.save_on_cpu``'s
      scheme); on a CPU the tensor already is in host memory and is kept as it is.
    * Parameters (leaves that require grad) are not copied: their owner keeps them on the device anyway, so
      a host copy would free nothing.
    * A tensor saved by several operators (a U-Net skip feature, a checkpoint region's input) is copied once.
    * Hooks that were active when this context was entered (e.g. saved-tensor quantization) run first; the
      tensors they pack (also inside tuples, lists, dicts and dataclasses) are what is moved to the host, and
      they unpack what is moved back. (PyTorch itself applies only the innermost saved-tensor hooks.)
    * Under fake tensors (memory estimates) the host copy is a ``meta`` tensor: estimates then count the
      device-side bytes a GPU would hold.
    """

    def __init__(self, device_type: str = "cuda") -> None:
        self.pin = device_type == "cuda" and torch.cuda.is_available()
        self.outer = None
        self._copies: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._outer_copies: WeakIdKeyDictionary = WeakIdKeyDictionary()
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        self.outer = _outer_hooks()
        self._copies, self._outer_copies = WeakIdKeyDictionary(), WeakIdKeyDictionary()
        return super().__enter__()

    def __exit__(self, *exc):
        self._copies, self._outer_copies = WeakIdKeyDictionary(), WeakIdKeyDictionary()  # the graph holds the copies it needs
        return super().__exit__(*exc)

    # -- one tensor ------------------------------------------------------------------
    def _to_host(self, t):
        if dataclasses.is_dataclass(t) and not isinstance(t, type):  # e.g. a quantized tensor and its scale
            return dataclasses.replace(t, **{f.name: self._to_host(getattr(t, f.name)) for f in dataclasses.fields(t) if f.init})
        if not isinstance(t, torch.Tensor) or isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad):
            return t
        if t.device.type == "cpu" and not _is_fake(t):
            return t  # already in host memory
        cached = self._copies.get(t)
        if cached is not None and cached[0] == t._version:
            return cached[1]
        if _is_fake(t):  # contiguous, as the real host copy below (a strided view's copy holds only its elements)
            host = torch.empty_strided(t.size(), _contiguous_stride(t.size()), dtype=t.dtype, device="meta")
        else:
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=self.pin and not t.is_sparse)
            host.copy_(t, non_blocking=self.pin)
        packed = _Host(t.device, host)
        self._copies[t] = (t._version, packed)
        return packed

    def _to_device(self, p):
        if dataclasses.is_dataclass(p) and not isinstance(p, type):
            return dataclasses.replace(p, **{f.name: self._to_device(getattr(p, f.name)) for f in dataclasses.fields(p) if f.init})
        if not isinstance(p, _Host):
            return p
        if _is_fake(p.tensor):
            return torch.empty_strided(p.tensor.size(), p.tensor.stride(), dtype=p.tensor.dtype, device=p.device)
        return p.tensor.to(p.device, non_blocking=self.pin)

    # -- hooks -------------------------------------------------------------------------
    def _pack(self, t):
        if self.outer is None:
            return self._to_host(t)
        # Packed once per saved tensor (a skip feature is saved by several operators), keyed weakly by it: the
        # outer hooks' device-side result (e.g. quant's 8-bit copy) is freed once moved, so it cannot be the key.
        cached = self._outer_copies.get(t)
        if cached is not None and cached[0] == t._version:
            return cached[1]
        packed = tree_map(self._to_host, self.outer[0](t))
        self._outer_copies[t] = (t._version, packed)
        return packed

    def _unpack(self, packed):
        if self.outer is not None:
            return self.outer[1](tree_map(self._to_device, packed))
        return self._to_device(packed)


def _contiguous_stride(size) -> tuple[int, ...]:
    """The strides of ``torch.empty(size)``."""
    stride, step = [], 1
    for n in reversed(size):
        stride.append(step)
        step *= max(n, 1)
    return tuple(reversed(stride))


class _Host:
    """A saved tensor's host copy and the device it came from."""

    __slots__ = ("device", "tensor")

    def __init__(self, device: torch.device, tensor: torch.Tensor) -> None:
        self.device = device
        self.tensor = tensor


@register
class Offload(Strategy):
    """Keep the activations saved for backward in (pinned) CPU memory instead of GPU memory.

    Memory saved: on a GPU, every tensor the forward saves for backward (the whole activation
    memory of the model and the loss, or only the region inputs under ``checkpoint``) leaves
    device memory; the device keeps parameters, optimizer state, the tensors of the op being
    computed and, in backward, the saved tensors of one node at a time. Time paid: two
    PCIe copies of the saved activations per step (about 2 × their size ÷ ~20 GB/s;
    asynchronous from pinned memory, so partly hidden behind compute) and host RAM of
    the same size. Combined with ``checkpoint`` only the region inputs travel; with ``quant``
    the 8-bit copies travel (quantized first, then moved). Accuracy
    risk: none — the same tensors come back bit for bit.

    On a CPU the activations already live in host memory: offload changes nothing there
    (it warns and runs, so the same configuration works on both).
    """

    name = "offload"
    stage = Stage.OFFLOAD
    summary = "saved activations in pinned CPU memory, copied back for backward: GPU keeps ~params + one node's tensors; costs PCIe copies"
    # GPU: an assumption, not measured — two PCIe copies of the saved activations per step (~2 x their bytes at
    # ~25 GB/s, partly hidden behind compute) against a compute-bound fp32 step. CPU: no effect (measured x1.01).
    time_cost = 1.5
    time_cost_cpu = 1.0

    @classmethod
    def plan_options(cls, env) -> tuple[tuple[str, ...], str]:
        if env.device != "cuda":
            return (), "no effect on a CPU (saved activations already live in host memory)"
        return (cls.name,), ""

    def check(self, plan) -> None:
        if self.env.device != "cuda":
            warnings.warn("offload has no effect on CPU: saved activations already live in CPU memory", stacklevel=2)

    def forward_context(self):
        return OffloadSavedTensors(self.env.device)

    def transform_loss(self, loss_fn):
        return OffloadedLoss(loss_fn, self.env.device)


class OffloadedLoss(nn.Module):
    """The loss under the same offloading as the model forward (MS-SSIM saves full-resolution maps)."""

    def __init__(self, loss_fn, device_type: str) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.device_type = device_type

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with OffloadSavedTensors(self.device_type):
            return self.loss_fn(pred, target)

"""``quant``: quantize what autograd saves (``quant:int8``, ``quant:fp8``), or quantization-aware training (``quant:qat``).

**Saved-tensor quantization** (``quant:int8`` — the default of plain ``quant`` — and
``quant:fp8``) changes nothing in the forward: the network computes exactly what it
computes without it. Only the copies autograd keeps for backward are stored in 8 bits
(``torch.autograd.graph.saved_tensors_hooks`` around the model forward) and expanded
again when backward needs them, so gradients are computed from slightly perturbed
activations. Per-channel symmetric scales (``amax / 127`` for int8, ``amax / 448`` for
``float8_e4m3fn``) keep every channel's range.

What is left alone, and why:

* **parameters** (and their autocast copies): a saved weight multiplies every gradient
  flowing back through its layer, so quantizing it perturbs all of them, and it saves
  nothing — the parameter is in memory anyway, a quantized copy would *add* bytes;
* non-float tensors (max-pool indices), tensors under :data:`MIN_NUMEL` elements (BN
  statistics, tiny maps: nothing to gain), and 0/1-D tensors;
* MomentumNet's exact state: it never passes through saved-tensor hooks
  (``memtrain/strategies/momentum.py``), because the inversion needs it bit-exact;
* the loss: hooks wrap the model forward only; 1 − MS-SSIM runs outside them.

Rounding keeps zero and sign: a nonzero value never rounds to 0 (it becomes ±1 quantum),
so ReLU masks recovered from saved outputs are exact. A tensor saved by several ops
(a ReLU output is saved by the ReLU and by the next convolution) is quantized once.

Default ``int8``: for the same byte per element, both formats give gradients within
float32 noise of the unquantized ones on the U-Net tests (1 − cosine ≈ 1e-6 at 64²);
int8's error is bounded uniformly (half a step of channel max / 127, zero and sign
exact), and int8 storage is supported by every PyTorch backend and version, while
``float8_e4m3fn`` (3-bit mantissa: ≤ 1/16 relative error, wider dynamic range) needs
torch ≥ 2.1. Pick ``quant:fp8`` for channels with heavy-tailed values.

Memory saved: saved activations ×¼ in float32, ×½ under bf16/fp16 autocast (scales are
per channel, a few bytes). Time paid: one quantize and one dequantize pass per saved
tensor (memory-bound, small next to convolutions). Accuracy risk: gradients from
~0.4 %-of-range (int8) or ~3 %-relative (fp8) perturbed activations; the forward and
the loss are unchanged.

**Quantization-aware training** (``quant:qat``): eager-mode ``torch.ao.quantization``.
Conv+BatchNorm pairs are fused into ``ConvBn2d`` (BN folded into the weights as int8
inference will), conv+BN+ReLU in the decoder into ``ConvBnReLU2d``; torchvision's
BasicBlock/Bottleneck ReLU is *one module used twice* (after bn1 and after the residual
add), so it is left unfused — fusing it would silently delete the second ReLU. Weights
get per-channel symmetric int8 fake quantization, module outputs per-tensor affine
uint8 fake quantization with moving-average observers, so the trained model can be
converted to an int8 model (:func:`convert_int8`, x86/fbgemm kernels). Residual blocks
get torchvision's quantizable forward (the add+ReLU becomes an observed
``FloatFunctional``) and the model input/output get Quant/DeQuant stubs. **QAT raises
training memory** (every fake-quant op saves a mask, the fused ConvBn saves extra
intermediates: +36 % step peak for the U-Net ResNet34 at 256², 412 → 563 MiB, real tensors,
``measure_step("quant:qat", size=256, fake=False)``) and time; use it for a deployable int8 model,
not to save memory. It changes the network function (quantization noise), so it is
compared with the float model in cosine terms. Recomputes (checkpoint, MomentumNet)
replay observer and BN state from before the forward
(:mod:`memtrain.strategies.recompute`), so observers and BN statistics update exactly
once per step and the recompute equals the forward. With bf16/fp16 autocast, PyTorch's
fused fake-quant op rejects 16-bit inputs ("expected scalar type Float"); memtrain's
activation fake-quant observes and rounds in float32 and returns the input's dtype.
``torch.ao.quantization`` is deprecated upstream in favour of torchao; its deprecation
warnings are silenced here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import (
    DeQuantStub,
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QuantStub,
    convert,
    fuse_modules_qat,
    prepare_qat,
)

from memtrain.errors import StrategyError
from memtrain.strategies.base import Stage, Strategy
from memtrain.strategies.momentum import momentum_stages, resnet_encoder
from memtrain.strategies.registry import register

if TYPE_CHECKING:
    from memtrain.strategies.plan import Plan

MIN_NUMEL = 1024
FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
_FP8_TINY = 2.0**-9  # smallest e4m3fn subnormal


# ---------------------------------------------------------------------------------------
# saved-tensor quantization
# ---------------------------------------------------------------------------------------
@dataclass
class Quantized:
    """An 8-bit copy of a saved tensor with its per-channel scale."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        return (self.data.to(torch.float32) * self.scale).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


CHUNK_NUMEL = 1 << 20  # quantize in slices of about this many elements: float32 temporaries stay ~4 MiB


def _quantize_slice(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, qmax: float) -> torch.Tensor:
    y = x.float() / scale
    lost = (x != 0) & (y.abs() < (0.5 if dtype == torch.int8 else _FP8_TINY))  # nonzero values that would round to 0
    if dtype == torch.int8:
        y = y.round_()
    y = torch.where(lost, torch.sign(x).float() * (1.0 if dtype == torch.int8 else _FP8_TINY), y)
    return y.clamp_(-qmax, qmax).to(dtype)


def quantize(t: torch.Tensor, fmt: str = "int8") -> Quantized:
    """Per-channel (dim 1) symmetric 8-bit quantization that keeps zero and sign.

    Works slice by slice along the channels so its float32 temporaries stay small next
    to the tensor (the forward peak would otherwise grow by several copies of the
    largest activation).
    """
    dtype, qmax = FORMATS[fmt]
    x = t.detach()
    dims = tuple(d for d in range(x.dim()) if d != 1)
    amax = torch.maximum(x.amax(dim=dims, keepdim=True), -x.amin(dim=dims, keepdim=True)).float()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    channels = x.shape[1]
    step = max(1, CHUNK_NUMEL * channels // max(1, x.numel()))
    for c in range(0, channels, step):
        q[:, c : c + step] = _quantize_slice(x[:, c : c + step], scale[:, c : c + step], dtype, qmax)
    return Quantized(q, scale, t.dtype)


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter, or autocast's cast of one (a copy whose only input is a leaf parameter)."""
    if t.is_leaf:
        return t.requires_grad
    fn = t.grad_fn
    if fn is not None and type(fn).__name__ == "ToCopyBackward0":
        nxt = fn.next_functions
        return len(nxt) == 1 and nxt[0][0] is not None and type(nxt[0][0]).__name__ == "AccumulateGrad"
    return False


class SavedTensorQuantizer:
    """Pack/unpack hooks quantizing eligible saved tensors; counts what it stored (for tests and reports)."""

    def __init__(self, fmt: str = "int8", min_numel: int = MIN_NUMEL) -> None:
        self.fmt = fmt
        self.min_numel = min_numel
        # Weak on both sides: autograd keeps what it saved; an outer hook (offload) that moves the 8-bit copy
        # away must be able to free the device copy, so the cache never keeps it alive.
        self._cache: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}
        self.quantized_bytes = 0  # bytes of the 8-bit copies made
        self.original_bytes = 0  # bytes of the tensors they replaced

    def eligible(self, t: torch.Tensor) -> bool:
        return (
            t.is_floating_point()
            and t.dim() >= 2
            and t.numel() >= self.min_numel
            and t.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not _is_parameter(t)
        )

    def pack(self, t: torch.Tensor):
        if not self.eligible(t):
            return t
        storage = t.untyped_storage()
        key = (storage._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version, t.dtype)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is storage and (packed := hit[1]()) is not None:
            return packed
        packed = quantize(t, self.fmt)
        self._cache[key] = (weakref.ref(storage), weakref.ref(packed))
        self.quantized_bytes += packed.nbytes
        self.original_bytes += t.numel() * t.element_size()
        return packed

    @staticmethod
    def unpack(packed):
        return packed.dequantize() if isinstance(packed, Quantized) else packed

    @contextlib.contextmanager
    def hooks(self):
        self._cache.clear()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield self
        finally:
            self._cache.clear()


# ---------------------------------------------------------------------------------------
# quantization-aware training
# ---------------------------------------------------------------------------------------
class Float32FakeQuantize(FakeQuantize):
    """FakeQuantize that observes and rounds in float32 and returns the input's dtype.

    PyTorch's fake-quant kernels reject bf16 inputs ("expected scalar type Float but
    found BFloat16"); under autocast, conv outputs are 16-bit. Values on the int8 grid
    are then rounded to the 16-bit dtype, as the 16-bit model would see them.
    """

    def forward(self, X):
        if X.dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(X.device.type, enabled=False):
                return super().forward(X.float()).to(X.dtype)
        return super().forward(X)


def _qat_qconfig() -> QConfig:
    act = Float32FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=True
    )
    wt = Float32FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
    )
    return QConfig(activation=act, weight=wt)


def _fuse_groups(model: nn.Module) -> list[list[str]]:
    """Names to fuse: conv+bn in residual blocks (shared ReLU unfused), conv+bn+relu where the ReLU is used once."""
    # lazy (startup): smp/torchvision load when a model is transformed, not for `memtrain strategies` or flag checks
    from torchvision.models.resnet import BasicBlock, Bottleneck

    groups: list[list[str]] = []
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, BasicBlock):
            groups += [[f"{prefix}conv1", f"{prefix}bn1"], [f"{prefix}conv2", f"{prefix}bn2"]]
        elif isinstance(mod, Bottleneck):
            groups += [[f"{prefix}conv1", f"{prefix}bn1"], [f"{prefix}conv2", f"{prefix}bn2"], [f"{prefix}conv3", f"{prefix}bn3"]]
        if isinstance(mod, (BasicBlock, Bottleneck)) and mod.downsample is not None:
            groups.append([f"{prefix}downsample.0", f"{prefix}downsample.1"])
        elif (
            isinstance(mod, nn.Sequential)
            and len(mod) == 3
            and isinstance(mod[0], nn.Conv2d)
            and isinstance(mod[1], nn.BatchNorm2d)
            and isinstance(mod[2], nn.ReLU)
        ):
            groups.append([f"{prefix}0", f"{prefix}1", f"{prefix}2"])  # smp Conv2dReLU: its own ReLU
    encoder = getattr(model, "encoder", None)
    if encoder is not None and all(isinstance(getattr(encoder, n, None), t) for n, t in (("conv1", nn.Conv2d), ("bn1", nn.BatchNorm2d), ("relu", nn.ReLU))):
        groups.append(["encoder.conv1", "encoder.bn1", "encoder.relu"])  # the stem ReLU is used once
    return groups


def _quantizable_blocks(model: nn.Module) -> None:
    """Give torchvision residual blocks their quantizable forward (torchvision.models.quantization), in place.

    Same math; the residual add+ReLU becomes a ``FloatFunctional`` so it is observed in
    training and becomes an int8 op at conversion. No parameters or buffers are added.
    """
    # lazy (startup): smp/torchvision load when a model is transformed, not for `memtrain strategies` or flag checks
    from torchvision.models.quantization.resnet import QuantizableBasicBlock, QuantizableBottleneck
    from torchvision.models.resnet import BasicBlock, Bottleneck

    for mod in model.modules():
        if type(mod) is BasicBlock:
            mod.__class__ = QuantizableBasicBlock
            mod.add_relu = FloatFunctional()
        elif type(mod) is Bottleneck:
            mod.__class__ = QuantizableBottleneck
            mod.skip_add_relu = FloatFunctional()
            mod.relu1 = nn.ReLU(inplace=False)
            mod.relu2 = nn.ReLU(inplace=False)


def _quant_input(module, args):
    return (module.quant(args[0]), *args[1:])


def _dequant_output(module, args, out):
    return module.dequant(out)


def prepare_qat_model(model: nn.Module, who: str = "quant:qat") -> nn.Module:
    """Make ``model`` (an smp U-Net with a ResNet encoder) quantization-aware, in place.

    Residual blocks get torchvision's quantizable forward; the encoder input gets a
    ``QuantStub`` and the segmentation head's output a ``DeQuantStub`` (as children
    called from hooks, so the model keeps its structure and attribute paths); conv+BN
    pairs are fused; fake-quant modules are inserted by ``prepare_qat``.
    """
    encoder = resnet_encoder(model, who)
    if momentum_stages(model):
        raise StrategyError(f"{who}: MomentumNet stages compute their velocity in float between blocks and have no int8 form; use quant:int8/fp8 with momentum")
    head = model.segmentation_head
    was_training = model.training
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        _quantizable_blocks(model)
        fuse_modules_qat(model, _fuse_groups(model), inplace=True)
        encoder.quant = QuantStub()
        encoder.register_forward_pre_hook(_quant_input)
        head.dequant = DeQuantStub()
        head.register_forward_hook(_dequant_output)
        model.qconfig = _qat_qconfig()
        prepare_qat(model, inplace=True)
    model.train(was_training)
    return model


def convert_int8(model: nn.Module) -> nn.Module:
    """The int8 inference model of a ``quant:qat``-trained model (a converted copy, in eval mode, CPU x86/fbgemm kernels)."""
    q = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        convert(q, inplace=True)
    return q


@register
class Quant(Strategy):
    """8-bit storage of what autograd saves (``int8`` default, ``fp8``), or quantization-aware training (``qat``).

    ``quant:fp8`` / ``quant:int8``: memory saved — saved activations ×¼ (float32) or ×½
    (16-bit autocast); time paid — a quantize/dequantize pass per saved tensor; accuracy
    risk — gradients from perturbed activations (fp8: 3-bit mantissa, int8: per-channel amax/127 steps), the
    forward and loss unchanged. Parameters, non-float and tiny tensors, MomentumNet's
    exact state and the loss are never quantized. Works with any model.

    ``quant:qat``: quantization-aware training for an int8 deployment (fused conv-bn,
    torchvision's shared ReLU left unfused, per-channel int8 weights, uint8
    activations; ``convert_int8`` gives the int8 model). It **raises training memory and
    time** — it is for deployment, not for saving memory. Not with ``momentum``. Works under bf16/fp16 autocast (fake-quant in float32). Needs an smp
    U-Net with a ResNet encoder. Full text: ``memtrain/strategies/quant.py``.
    """

    name = "quant"
    stage = Stage.QUANTIZE
    summary = "int8 (default) / fp8 storage of saved activations (x1/4 fp32, x1/2 amp); :qat = quantization-aware training for int8 deployment (RAISES memory)"
    variants = ("int8", "fp8", "qat")
    # int8: measured on CPU (benchmarks/results/strategy_time_cpu.md, x1.29; fp8 x1.33); GPU assumed the same, not measured.
    time_cost = 1.3
    # Saved tensors are quantized in slices of about CHUNK_NUMEL elements: how many slices (and so the
    # step's tensor events) depends on the image size, so `memtrain plan` estimates it at the size itself.
    size_polynomial = False

    @classmethod
    def plan_options(cls, env) -> tuple[tuple[str, ...], str]:
        return (cls.name,), "quant:fp8 keeps as many bytes as quant:int8 (1 per element); quant:qat raises training memory (it is for int8 deployment)"

    def __init__(self, variant: str | None = None) -> None:
        super().__init__(variant)
        self.quantizer = SavedTensorQuantizer(self.variant) if self.variant in FORMATS else None

    def check(self, plan: Plan) -> None:
        if self.variant == "qat" and plan.get("momentum") is not None:
            raise StrategyError(
                f"--strategies {plan.label}: quant:qat trains a model for int8 deployment, and MomentumNet stages compute their velocity in float "
                "between blocks (no int8 form); use quant:int8 or quant:fp8 with momentum"
            )
        # offload (Stage.OFFLOAD, entered after — inside — these hooks): PyTorch applies only the innermost saved-tensor
        # hooks, so offload calls the hooks active when it is entered (ours) first and moves the 8-bit copies and
        # their scales to the host (memtrain.strategies.offload.OffloadSavedTensors): quantized, then offloaded.
        # checkpoint: tensors inside checkpointed regions are recomputed, the rest are quantized — exact composition.
        # quant:qat + checkpoint/momentum: their recomputes replay observer/BN state (memtrain.strategies.recompute).
        # amp (bf16/fp16): saved 16-bit tensors are quantized from 16 bits; QAT fake-quant runs in float32.

    def transform(self, model: nn.Module) -> nn.Module:
        if self.variant == "qat":
            return prepare_qat_model(model, self.spec)
        return model

    def export_int8(self, model: nn.Module, example: torch.Tensor, fmt: str, float_bytes: bytes) -> bytes:
        """The int8 model of a ``quant:qat``-trained ``model`` (:func:`convert_int8`, the trained ranges), as traced TorchScript.

        Only TorchScript: the converted model runs PyTorch's quantized x86/fbgemm kernels,
        which torch.export (the ONNX exporter) cannot capture.
        """
        if self.variant != "qat":
            raise StrategyError(f"--int8: {self.spec} only changes what training saves; int8 export needs a model trained with quant:qat")
        if fmt != "torchscript":
            raise StrategyError(
                f"--int8 --format {fmt}: a quant:qat int8 model exports as TorchScript only (PyTorch quantized kernels); use --format torchscript"
            )
        q = convert_int8(model)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(q, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        return buf.getvalue()

    def forward_context(self):
        if self.quantizer is None:
            return contextlib.nullcontext()
        return self.quantizer.hooks()


__all__ = ["FORMATS", "MIN_NUMEL", "Float32FakeQuantize", "Quant", "Quantized", "SavedTensorQuantizer", "prepare_qat_model", "quantize"]

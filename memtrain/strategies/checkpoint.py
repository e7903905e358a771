"""``checkpoint``: activation checkpointing of U-Net regions — keep region inputs, recompute the inside in backward.

Regions of an smp U-Net with a ResNet encoder (``model.encoder`` a smp ``ResNetEncoder``:
``conv1/bn1/relu/maxpool/layer1..4``; ``model.decoder`` a smp ``UnetDecoder``:
``blocks[i].conv1/conv2``; ``model.segmentation_head``):

| granularity | regions |
|---|---|
| ``stages`` | maxpool + ``layer1``, ``layer2``, ``layer3``, ``layer4``; every decoder block whole |
| ``blocks`` | maxpool + the first residual block, then every residual block; the low-resolution decoder blocks whole; the two high-resolution decoder blocks split into (upsample + concat + ``conv1``) and ``conv2`` |
| ``full`` | ``blocks`` + the stem (``conv1``/``bn1``/``relu``), the segmentation head and the MS-SSIM loss |
| ``selective`` | the regions of ``full`` except the loss, with a selective policy: convolution outputs are kept, only cheap ops (BatchNorm, ReLU, add, upsample, concat, pool) are recomputed |

Why granularity decides: a checkpointed step's backward peak is the tensors kept at region
boundaries plus the recompute of the biggest region (its saved tensors and gradients live at
the same time). Checkpointing the whole encoder and decoder as two regions just moves the
peak to backward; small regions at high resolution keep it low. The upsampled input of a
high-resolution decoder block is twice the size of its output, so the upsample is inside the
first region, whose kept input is the small pre-upsample tensor.

Faithfulness: ``torch.utils.checkpoint`` non-reentrant, RNG state and autocast state of the
forward restored for the recompute, so outputs and gradients are those of the plain model
(bitwise on CPU in float32). Recomputation would run every stateful module a second time —
plain ``torch.utils.checkpoint`` updates BatchNorm ``running_mean``/``running_var`` and
``num_batches_tracked`` twice per step. memtrain snapshots each region's buffers before its
forward and replays that snapshot during the recompute (:mod:`memtrain.strategies.recompute`,
shared with MomentumNet): the recompute sees exactly the state the forward saw (observers and
fake-quant modules included), and afterwards the buffers hold what the forward left, so they
are updated once, as without checkpointing.

Modules that already manage their activation memory (a momentumnet ``MomentumNet``, or any
module with ``manages_activation_memory = True``) are left as they are, and so are the stages
``tile`` runs tile by tile (:func:`memtrain.strategies.tile.tiled_modules`: they recompute
everything per tile already); on a tiled model the encoder stages 2..4 get their regions as
their own instance forwards, since the tiled program calls them one by one. The model's
``state_dict()`` keys and modules do not change: regions are installed as instance-level
``forward`` replacements, which :func:`remove_checkpointing` removes again.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from momentumnet import MomentumNet
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from memtrain.errors import StrategyError
from memtrain.strategies.base import Stage, Strategy
from memtrain.strategies.recompute import checkpoint_context_fn
from memtrain.strategies.registry import register
from memtrain.strategies.tile import tiled_modules

_aten = torch.ops.aten
# Ops whose outputs the selective policy keeps: the expensive ones. Everything else in a region
# (BatchNorm, ReLU, add, upsample, concat, pooling, casts) is recomputed.
KEPT_OPS = frozenset({_aten.convolution.default, _aten.mm.default, _aten.addmm.default, _aten.bmm.default})
_HAS_RESPECT_HOOKS = "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters
_MARK = "_memtrain_checkpoint"


@dataclass(frozen=True)
class Granularity:
    """Which parts of the U-Net are regions, and how they are recomputed."""

    stem: bool  # conv1 + bn1 + relu as one region
    blocks: bool  # residual blocks / decoder conv units (else whole stages / blocks)
    head: bool  # the segmentation head
    loss: bool  # the loss function
    selective: bool  # keep conv outputs, recompute cheap ops only


GRANULARITIES = {
    "stages": Granularity(stem=False, blocks=False, head=False, loss=False, selective=False),
    "blocks": Granularity(stem=False, blocks=True, head=False, loss=False, selective=False),
    "full": Granularity(stem=True, blocks=True, head=True, loss=True, selective=False),
    "selective": Granularity(stem=True, blocks=True, head=True, loss=False, selective=True),
}

# Expected step time relative to `none`, per granularity: (CUDA GPU, CPU). CPU: measured by
# benchmarks/strategy_time.py (benchmarks/results/strategy_time_cpu.md: process CPU time,
# 256², resnet34, interleaved). GPU: assumed equal to the CPU ratio — the recompute is the
# same arithmetic as the forward it repeats — not measured on a GPU.
TIME_COST = {"selective": (1.07, 1.07), "blocks": (1.44, 1.44), "stages": (1.30, 1.30), "full": (1.41, 1.41)}


# -- one region ------------------------------------------------------------------------------
def _keep_expensive(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def _entered(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def _stateful(modules) -> tuple[nn.Module, ...]:
    seen: dict[int, nn.Module] = {}
    for root in modules:
        for m in root.modules():
            if any(b is not None for b in m._buffers.values()):
                seen.setdefault(id(m), m)
    return tuple(seen.values())


class Region:
    """A callable run as one non-reentrant checkpoint region, buffers of ``modules`` protected from the recompute."""

    def __init__(self, fn, modules, *, selective: bool = False, name: str = "") -> None:
        self.fn = fn
        self.stateful = _stateful(modules)
        self.selective = selective
        self.name = name

    def __repr__(self) -> str:
        return f"<checkpoint region {self.name}{' (selective)' if self.selective else ''}>"

    def _contexts(self):
        # The recompute replays the buffers the forward saw (see strategies/recompute.py), so BatchNorm
        # statistics advance exactly once per step and QAT observers do not observe twice.
        forward_ctx, recompute_ctx = checkpoint_context_fn(self.stateful)()
        if self.selective:
            caching, cached = create_selective_checkpoint_contexts(_keep_expensive)
            return _entered(forward_ctx, caching), _entered(recompute_ctx, cached)
        return forward_ctx, recompute_ctx

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # validation / inference: nothing is saved anyway
            return self.fn(*args, **kwargs)
        extra = {"respect_saved_tensors_hooks": True} if (self.selective and _HAS_RESPECT_HOOKS) else {}
        return checkpoint(self.fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=self._contexts, **extra, **kwargs)


# -- U-Net region programs ------------------------------------------------------------------------
def _manages_own_memory(module: nn.Module) -> bool:
    """A module whose backward already recomputes instead of storing (checkpointing it would recompute twice)."""
    if getattr(module, "manages_activation_memory", False):
        return True
    # momentumnet's MomentumNet inverts its stage in backward; a subclass may switch that off (`invertible = False`).
    return isinstance(module, MomentumNet) and getattr(module, "invertible", True)


def _stem(enc, x):
    return enc.relu(enc.bn1(enc.conv1(x)))


def _chain(*fns):
    def run(x):
        for f in fns:
            x = f(x)
        return x

    return run


def _stage_regions(layer: nn.Module, pre: nn.Module | None, g: Granularity, name: str) -> list:
    """The callables one encoder stage runs, in order: Regions, or modules left as they are."""
    # A stage holding a module that manages its own memory (e.g. MomentumNet) is split into its units
    # whatever the granularity, so that module is left alone and the rest is still checkpointed.
    split = g.blocks or any(_manages_own_memory(m) for m in layer.modules())
    units = list(layer) if (split and isinstance(layer, nn.Sequential)) else [layer]
    steps: list = []
    for i, unit in enumerate(units):
        fns = [pre, unit] if (i == 0 and pre is not None) else [unit]
        if _manages_own_memory(unit):
            steps.extend(fns)
            continue
        mods = [f for f in fns if isinstance(f, nn.Module)]
        steps.append(Region(_chain(*fns) if len(fns) > 1 else unit, mods, selective=g.selective, name=f"{name}[{i}]" if len(units) > 1 else name))
    return steps


class _EncoderProgram:
    """``ResNetEncoder.forward`` with checkpoint regions (installed as the encoder's instance forward)."""

    def __init__(self, enc: nn.Module, g: Granularity) -> None:
        self.enc = enc
        depth = enc._depth
        self.stem = Region(functools.partial(_stem, enc), [enc.conv1, enc.bn1, enc.relu], selective=g.selective, name="stem") if g.stem else None
        self.stages = []
        for i in range(1, depth):
            layer = getattr(enc, f"layer{i}")
            self.stages.append(_stage_regions(layer, enc.maxpool if i == 1 else None, g, f"encoder.layer{i}"))

    def __call__(self, x):
        enc = self.enc
        features = [x]
        if enc._depth >= 1:
            x = self.stem(x) if self.stem is not None else _stem(enc, x)
            features.append(x)
        for steps in self.stages:
            for step in steps:
                x = step(x)
            features.append(x)
        return features


class _StageProgram:
    """One encoder stage's regions, installed as the stage's instance forward (used when ``tile`` runs the model program)."""

    def __init__(self, steps: list) -> None:
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


class _OwnGradient(torch.autograd.Function):
    """Identity whose backward copies the incoming gradient.

    ``torch.cat``'s backward hands each input a slice (a view) of the concatenated gradient.
    The skip connection's slice is consumed only at the end of the encoder's backward, and
    as a view it keeps the whole concatenated gradient (upsampled part included) alive until
    then. Copying it frees the rest at once; the values are the same.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def _upsample_conv1(block, feature_map, target_height, target_width, skip_connection=None):
    # smp UnetDecoderBlock.forward up to conv1.
    feature_map = F.interpolate(feature_map, size=(target_height, target_width), mode=block.interpolation_mode)
    if skip_connection is not None:
        if skip_connection.requires_grad:
            skip_connection = _OwnGradient.apply(skip_connection)
        feature_map = torch.cat([feature_map, skip_connection], dim=1)
        feature_map = block.attention1(feature_map)
    return block.conv1(feature_map)


def _conv2(block, feature_map):
    # smp UnetDecoderBlock.forward after conv1.
    return block.attention2(block.conv2(feature_map))


class _DecoderBlockUnits:
    """A high-resolution ``UnetDecoderBlock.forward`` as two regions: (upsample, concat, conv1) and conv2."""

    def __init__(self, block: nn.Module, g: Granularity, name: str) -> None:
        self.first = Region(functools.partial(_upsample_conv1, block), [block.attention1, block.conv1], selective=g.selective, name=f"{name}.conv1")
        self.second = Region(functools.partial(_conv2, block), [block.conv2, block.attention2], selective=g.selective, name=f"{name}.conv2")

    def __call__(self, feature_map, target_height, target_width, skip_connection=None):
        return self.second(self.first(feature_map, target_height, target_width, skip_connection))


class _WholeModule:
    """A module's own class forward as one region."""

    def __init__(self, module: nn.Module, g: Granularity, name: str) -> None:
        self.region = Region(functools.partial(type(module).forward, module), [module], selective=g.selective, name=name)

    def __call__(self, *args, **kwargs):
        return self.region(*args, **kwargs)


# -- finding the regions ----------------------------------------------------------------------------
NEEDS = "an smp U-Net with a ResNet encoder (model.encoder.conv1/bn1/relu/maxpool/layer1..4, model.decoder.blocks[i].conv1/conv2, model.segmentation_head)"
_DECODER_BLOCK_ARGS = ["self", "feature_map", "target_height", "target_width", "skip_connection"]


def _supported(model: nn.Module) -> str | None:
    """None if ``model`` has the U-Net structure the regions need, else what is missing."""
    # lazy (startup): smp/torchvision load when a model is transformed, not for `memtrain strategies` or flag checks
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder, UnetDecoderBlock
    from segmentation_models_pytorch.encoders.resnet import ResNetEncoder

    enc, dec = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if not isinstance(enc, ResNetEncoder):
        return f"model.encoder is {type(enc).__name__ if enc is not None else 'missing'}, not an smp ResNetEncoder"
    if type(enc).forward is not ResNetEncoder.forward:
        return f"model.encoder ({type(enc).__name__}) overrides ResNetEncoder.forward"
    if not isinstance(dec, UnetDecoder):
        return f"model.decoder is {type(dec).__name__ if dec is not None else 'missing'}, not an smp UnetDecoder"
    if not isinstance(getattr(model, "segmentation_head", None), nn.Module):
        return "model.segmentation_head is missing"
    for i, block in enumerate(dec.blocks):
        if not isinstance(block, UnetDecoderBlock) or list(inspect.signature(type(block).forward).parameters) != _DECODER_BLOCK_ARGS:
            return f"model.decoder.blocks[{i}] is not an smp UnetDecoderBlock with forward{tuple(_DECODER_BLOCK_ARGS[1:])}"
    return None


def apply_checkpointing(model: nn.Module, variant: str) -> nn.Module:
    """Install the checkpoint regions of ``variant`` into ``model`` (in place); StrategyError if it is not a U-Net/ResNet."""
    g = GRANULARITIES[variant]
    problem = _supported(model)
    if problem is not None:
        raise StrategyError(f"checkpoint:{variant}: needs {NEEDS}; {problem}")
    if getattr(model, _MARK, None) is not None:
        raise StrategyError(f"checkpoint:{variant}: the model is already checkpointed ({getattr(model, _MARK)})")
    enc, dec = model.encoder, model.decoder
    # Stages that `tile` runs tile by tile already recompute everything per tile: left alone. The tiled
    # program calls the other stages one by one, so they get their regions as their own forwards.
    tiled = {id(m) for m in tiled_modules(model)}
    if tiled:
        for i in range(2, enc._depth):
            layer = getattr(enc, f"layer{i}")
            steps = _stage_regions(layer, None, g, f"encoder.layer{i}")
            steps = [
                Region(functools.partial(type(layer).forward, layer), [layer], selective=g.selective, name=s.name)
                if (isinstance(s, Region) and s.fn is layer)
                else s
                for s in steps
            ]
            layer.forward = _StageProgram(steps)
    else:
        enc.forward = _EncoderProgram(enc, g)
    if not isinstance(dec.center, nn.Identity):
        dec.center.forward = _WholeModule(dec.center, g, "decoder.center")
    n = len(dec.blocks)
    for i, block in enumerate(dec.blocks):
        if id(block) in tiled:
            continue
        name = f"decoder.blocks[{i}]"
        high_res = i >= n - 2  # the last two blocks run at 1/2 and full resolution
        block.forward = _DecoderBlockUnits(block, g, name) if (g.blocks and high_res) else _WholeModule(block, g, name)
    if g.head and id(model.segmentation_head) not in tiled:
        model.segmentation_head.forward = _WholeModule(model.segmentation_head, g, "segmentation_head")
    object.__setattr__(model, _MARK, variant)
    return model


def remove_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_checkpointing`: every module runs its own class forward again."""
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), (_EncoderProgram, _StageProgram, _DecoderBlockUnits, _WholeModule)):
            del m.forward
    model.__dict__.pop(_MARK, None)
    return model


def regions(model: nn.Module) -> list[Region]:
    """The checkpoint regions installed in ``model``, in forward order."""
    found: list[Region] = []
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, _EncoderProgram):
            found += ([fwd.stem] if fwd.stem else []) + [s for steps in fwd.stages for s in steps if isinstance(s, Region)]
        elif isinstance(fwd, _StageProgram):
            found += [s for s in fwd.steps if isinstance(s, Region)]
        elif isinstance(fwd, _DecoderBlockUnits):
            found += [fwd.first, fwd.second]
        elif isinstance(fwd, _WholeModule):
            found.append(fwd.region)
    return found


class CheckpointedLoss(nn.Module):
    """A loss computed as one checkpoint region: its intermediates are recomputed in backward."""

    def __init__(self, loss_fn) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.region = Region(loss_fn, [loss_fn] if isinstance(loss_fn, nn.Module) else [], name="loss")

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.region(pred, target)


@register
class Checkpoint(Strategy):
    """Activation checkpointing: keep each region's inputs, recompute its inside during backward.

    Memory saved: the activations inside regions (measured with fake tensors, resnet34,
    batch 1, fp32; see benchmarks/results/strategies.md): ``blocks`` cuts the step peak to
    0.47× of the float32 baseline at 2048² and 0.46× at 4096² (0.26× and 0.24× with ``amp``),
    ``full`` a little further (stem, head and MS-SSIM too),
    ``stages`` less because whole stages are recomputed at once. Time paid: about one extra
    forward pass of the checkpointed regions (``selective`` recomputes only BatchNorm,
    ReLU, adds, upsampling — keeps conv outputs — so it saves less and costs least).
    Accuracy risk: none — gradients are those of the plain model (bitwise in float32 on
    CPU), BatchNorm running statistics and ``num_batches_tracked`` are updated exactly once
    per step, RNG and autocast state are replayed in the recompute.

    Needs an smp U-Net with a ResNet encoder; other models get a one-line error naming what
    is missing. Variants: ``checkpoint`` (= ``checkpoint:blocks``), ``checkpoint:stages``,
    ``checkpoint:blocks``, ``checkpoint:full``, ``checkpoint:selective``.
    """

    name = "checkpoint"
    stage = Stage.CHECKPOINT
    summary = "recompute activations in backward, per residual block / conv unit: 0.47x the fp32 step peak at 2048² (blocks) for ~1 extra forward"
    variants = ("blocks", "stages", "full", "selective")

    @classmethod
    def plan_options(cls, env) -> tuple[tuple[str, ...], str]:
        return tuple(f"{cls.name}:{v}" for v in ("selective", "blocks", "stages", "full")), ""

    @classmethod
    def declared_time(cls, variant: str | None, device: str) -> float:
        gpu, cpu = TIME_COST[variant or cls.variants[0]]
        return cpu if device == "cpu" else gpu

    def transform(self, model: nn.Module) -> nn.Module:
        return apply_checkpointing(model, self.variant)

    def transform_loss(self, loss_fn):
        return CheckpointedLoss(loss_fn) if GRANULARITIES[self.variant].loss else loss_fn

"""``momentum``: invertible MomentumNet encoder stages (Sander et al., ICML 2021, package ``momentumnet``).

Each residual stage of the ResNet encoder becomes a Momentum ResNet:

    v_0 = 0
    v_{t+1} = γ v_t + (1 − γ) (B_t(x_t) − x_t)
    x_{t+1} = x_t + v_{t+1}

where ``B_t`` is the stage's t-th torchvision block (which already contains its own
skip connection and final ReLU, hence the ``− x_t``) and γ = 0.9. With γ = 0 this is the
ResNet exactly; with γ = 0.9 **the network computes a different function**: each
block's update is damped and carried forward as a velocity. Pretrained ResNet weights
still load, but they compute something else. The forward equations can be run
backwards, ``x_t = x_{t+1} − v_{t+1}``, ``v_t = (v_{t+1} − (1 − γ) f_t(x_t)) / γ``, so
the stage keeps no activations for backward: only its output and velocity, in an
exact 2^-52 fixed point (int64, plus the velocity's int64 remainder store), and each
block is recomputed once in backward from the reconstructed input.

Faithfulness is therefore measured against the *same architecture without the memory
trick* (``momentum:reference``: the same equations with ordinary autograd, which saves
every block's activations). The first block of a stage that downsamples or changes the
channel count cannot be inverted and stays an ordinary block.

Defects of ``momentumnet`` 0.10 and what memtrain does about each:

* **fp16 overflow.** Its exact representation scales values by 2^52 *in the input's
  dtype*: under fp16 autocast every value overflows to ±inf and becomes a constant
  (−2048) — the forward is garbage (why the paper's AMP+checkpoint+MomentumNet run
  diverged). Fixed: the exact arithmetic always runs in float64 → int64, outside the
  16-bit dtype, so ``amp:fp16`` and ``amp:bf16`` work.
* **Velocity wrap.** Values ≥ 2048 do not fit 2^52-scaled int64 and wrap silently.
  Guarded: v is a convex combination of the block updates f, so |v| < 2048 whenever
  every |f| < 2048; the forward tracks max |f| (and NaN/inf) and raises
  :class:`~memtrain.errors.StrategyError` naming the stage before the step is used.
* **Inexact division for negative values.** Its rational multiply pairs a floor
  remainder with a truncating division, so negative velocities come back off by a few
  units in the last place and the remainder store drifts. Fixed: floor division.
* **Inexact position update.** ``x + v`` undone as ``x − v`` in floating point is off by
  an ulp; under bf16 autocast that flips the 16-bit rounding of some block inputs and
  the inversion drifts by whole bf16 units. Fixed: x is carried in the same exact fixed
  point as v, so every recomputed block sees its forward input bit for bit.
* **BatchNorm statistics updated 2–3× per step** (forward, recompute, and again under
  checkpointing). Fixed: the stage's buffers are captured before the forward and
  replayed during the recompute (:class:`memtrain.strategies.recompute.StateSnapshot`),
  so running statistics and ``num_batches_tracked`` advance exactly once per step, as
  in ``momentum:reference``; QAT observers are replayed the same way.
* **Recompute in float32 after a bf16 forward.** The backward ran outside autocast, so
  the recomputed blocks did not match the forward and the inversion drifted. Fixed:
  the forward's autocast state (device, enabled, dtype) is recorded and restored for
  the recompute.

Reconstruction is checked every step at almost no cost: after inverting a stage, the
velocity must be back to exactly zero and the stage input is compared with a 1/64
subsample kept from the forward; a relative error above
:data:`RECONSTRUCTION_TOLERANCE` raises :class:`~memtrain.errors.StrategyError`.
The latest error of each stage is in ``stage.last_reconstruction_error``.

Memory saved: the activations saved by every invertible block (~4 feature maps per
BasicBlock, 16 B/element in float32) become three int64 maps per stage (24 B/element);
it pays off for stages of 2+ invertible blocks (ResNet34: 3, 3, 5, 2), not for
ResNet18's one-block stages. On a U-Net the encoder holds ~30 % of the saved activations.
Time paid: every invertible block runs its forward twice (~+1/3 encoder compute).
Accuracy risk: a different network (γ); inversion error is ~1e-7 relative in float32.

Under fake tensors (``memtrain.memory.estimate``) the data-dependent guards are
skipped; shapes and saved bytes are exact.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
from momentumnet import MomentumNet
from momentumnet.exact_rep_pytorch import RADIX_SCALE, BitStore, TorchExactRep
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from memtrain.errors import StrategyError
from memtrain.strategies.base import Stage, Strategy
from memtrain.strategies.recompute import StateSnapshot
from memtrain.strategies.registry import register

if TYPE_CHECKING:
    from memtrain.strategies.plan import Plan

GAMMA = 0.9
# |v| * 2**52 must fit an int64: |v| < 2**11.
VELOCITY_LIMIT = float(2**63 / RADIX_SCALE)
# Relative error of the reconstructed stage input (and leftover velocity) above which training stops.
RECONSTRUCTION_TOLERANCE = 1e-4
PROBE_STRIDE = 8


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor)


class ExactVelocity(TorchExactRep):
    """``momentumnet``'s exact fixed-point velocity with its defects fixed.

    * values are scaled to int64 in float64, never in the caller's (16-bit) dtype;
    * the rational multiply uses floor division throughout, so it is exactly invertible
      for negative values too.
    """

    def float_to_intrep(self, x):
        if isinstance(x, torch.Tensor):
            return (x.double() * RADIX_SCALE).long()
        return int(x * RADIX_SCALE)

    def rational_mul(self, n, d):
        self.aux.push(torch.remainder(self.intrep, d), d)
        self.intrep = torch.div(self.intrep, d, rounding_mode="floor") * n + self.aux.pop(n)

    @property
    def val(self):
        return self.intrep.double().div_(RADIX_SCALE).float()


class _FloorBitStore(BitStore):
    def pop(self, M):
        N = torch.remainder(self.store, M)
        self.store = torch.div(self.store, M, rounding_mode="floor")
        return N


def _new_velocity(like: torch.Tensor) -> ExactVelocity:
    v = ExactVelocity(0, shape=like.shape, device=like.device)
    v.aux = _FloorBitStore(like.shape, like.device)
    return v


def _velocity_from(intrep: torch.Tensor, store: torch.Tensor) -> ExactVelocity:
    v = ExactVelocity(0, from_representation=(intrep, store))
    v.aux = _FloorBitStore(0, 0, store=store)
    return v


def max_blocks(gamma: float) -> int:
    """How many blocks the int64 remainder store of the exact velocity can undo at this γ."""
    d = 2**16 // int(gamma + 1)  # TorchExactRep.float_to_rational
    n = int(gamma * d + 1)
    bits_per_block = abs(math.log2(d / n))  # the store grows by d/n per block
    return int((62 - 16) / bits_per_block) if bits_per_block > 0 else 10**9


def _autocast_state(device_type: str) -> dict:
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if enabled else None
    return {"device_type": device_type, "enabled": enabled, "dtype": dtype}


def to_fixed(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the exact 2^-52 fixed point of the velocity (int64; computed in float64)."""
    return (x.double() * RADIX_SCALE).long()


def from_fixed(q: torch.Tensor) -> torch.Tensor:
    """The float32 value of a fixed-point tensor (a deterministic function of ``q``)."""
    return q.double().div_(RADIX_SCALE).float()


class _InvertibleMomentum(torch.autograd.Function):
    """The memory-saving forward/backward of one momentum stage.

    Both the velocity *and the position* x are carried in the exact fixed point, so
    ``x_t = x_{t+1} − v_{t+1}`` is exact in integers (in floating point it is not, and
    under bf16 autocast a last-bit difference in a block's input flips its 16-bit
    rounding and the inversion drifts by whole bf16 units). Every block therefore sees
    bit for bit the same input in the recompute as in the forward.

    Its state (fixed-point output and velocity, input probe, buffer snapshot) is kept on
    ``ctx`` rather than passed through ``save_for_backward``, so saved-tensor hooks
    (quantization, offload, checkpointing) never see it: the inversion needs it bit-exact.
    """

    @staticmethod
    def forward(ctx, x, net: InvertibleMomentumNet, *params):
        ctx.net = net
        ctx.autocast = _autocast_state(x.device.type)
        ctx.in_dtype = x.dtype
        ctx.snapshot = StateSnapshot(net.functions)
        fake = _is_fake(x)
        ctx.fake = fake
        gamma = net.gamma
        with torch.no_grad():
            q = to_fixed(x)
            x = from_fixed(q).to(ctx.in_dtype)  # identical to x except below 2^-52
            ctx.probe = x[..., ::PROBE_STRIDE, ::PROBE_STRIDE].float().clone()
            v = _new_velocity(x)
            peak = x.abs().amax().float()
            for function in net.functions:
                f = (function(x) - x).float()
                v *= gamma
                v += (1 - gamma) * f
                q = q + v.intrep
                x = from_fixed(q)
                peak = torch.maximum(peak, torch.maximum(f.abs().amax(), x.abs().amax()))
        if not fake:
            net.check_range(peak.item())
        ctx.state = (q, v.intrep, v.aux.store)
        return x

    @staticmethod
    def backward(ctx, grad_out):
        net: InvertibleMomentumNet = ctx.net
        gamma = net.gamma
        functions = net.functions
        q, v_int, store = ctx.state
        del ctx.state
        v = _velocity_from(v_int, store)
        grad_x = grad_out.float()
        grad_v = torch.zeros_like(grad_x)
        grads: list[torch.Tensor | None] = []
        with ctx.snapshot.replayed(), torch.autocast(**ctx.autocast):
            for i in range(len(functions) - 1, -1, -1):
                function = functions[i]
                q = q - v.intrep
                x = from_fixed(q)
                if i == 0:
                    x = x.to(ctx.in_dtype)
                params = [p for p in function.parameters() if p.requires_grad]
                with torch.enable_grad():
                    x_req = x.detach().requires_grad_(True)
                    f = (function(x_req) - x_req).float()
                    grad_combi = grad_x + grad_v
                    vjps = torch.autograd.grad(f, (x_req, *params), grad_combi * (1 - gamma), allow_unused=True)
                with torch.no_grad():
                    v += -(1 - gamma) * f.detach()
                    v /= gamma
                del f
                grad_x = grad_x + vjps[0].float()
                grad_v = gamma * grad_combi
                it = iter(vjps[1:])
                grads[:0] = [next(it) if p.requires_grad else None for p in function.parameters()]
        if not ctx.fake:
            net.check_reconstruction(x, v, ctx.probe)
        return (grad_x.to(ctx.in_dtype), None, *grads)


class InvertibleMomentumNet(MomentumNet):
    """A ``momentumnet.MomentumNet`` of residual blocks, invertible when ``invertible`` is True.

    ``state_dict`` keys are the package's (``network.<i>.<block params>``), identical in
    both modes, so a model trained with ``momentum`` loads into ``momentum:reference`` and back.
    When gradients are not needed (validation, inference) both modes run the plain
    equations, which need no exact arithmetic.
    """

    def __init__(self, blocks, gamma: float = GAMMA, *, invertible: bool = True, name: str = "") -> None:
        blocks = list(blocks)
        if not 0 < gamma < 1:
            raise StrategyError(f"momentum: γ must be in (0, 1), got {gamma}")
        if invertible and len(blocks) > max_blocks(gamma):
            raise StrategyError(f"momentum: {name} has {len(blocks)} blocks; the exact velocity can invert at most {max_blocks(gamma)} at γ={gamma}")
        super().__init__(blocks, gamma=gamma, use_backprop=False, is_residual=False)
        self.invertible = invertible
        self.stage_name = name
        self.last_reconstruction_error: float | None = None
        self.last_peak: float | None = None

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, blocks={len(self.functions)}, invertible={self.invertible}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.invertible and torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            params = [p for f in self.functions for p in f.parameters()]
            return _InvertibleMomentum.apply(x, self, *params)
        return self.plain_forward(x)

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same equations with ordinary autograd (velocity in float32)."""
        v = None
        for function in self.functions:
            f = (function(x) - x).float()
            v = (1 - self.gamma) * f if v is None else self.gamma * v + (1 - self.gamma) * f
            x = x.float() + v
        return x

    # -- guards ------------------------------------------------------------------------
    def check_range(self, peak: float) -> None:
        self.last_peak = peak
        if not peak < VELOCITY_LIMIT:
            raise StrategyError(
                f"momentum: an activation or block update in {self.stage_name} reached {peak:.4g} "
                f"(the exact representation holds values below {VELOCITY_LIMIT:g}; beyond it int64 wraps): "
                "training has diverged — lower --lr, or train without momentum"
            )

    def check_reconstruction(self, x0: torch.Tensor, v0: ExactVelocity, probe: torch.Tensor) -> None:
        with torch.no_grad():
            got = x0[..., ::PROBE_STRIDE, ::PROBE_STRIDE].float()
            scale = probe.abs().amax().clamp_min(1e-6)
            # Exact arithmetic: both terms are 0 unless a recomputed block differed from its forward.
            err = torch.maximum((got - probe).abs().amax(), v0.val.abs().amax()) / scale
            error = err.item()
        self.last_reconstruction_error = error
        if not error <= RECONSTRUCTION_TOLERANCE:
            raise StrategyError(
                f"momentum: inverting {self.stage_name} reconstructed its input with relative error {error:.3g} "
                f"(> {RECONSTRUCTION_TOLERANCE:g}); gradients would be wrong — the recomputed blocks differ from the forward "
                "(a module whose output is not a deterministic function of its input and state?)"
            )


def _blocks_of(encoder) -> list[tuple[str, nn.Sequential]]:
    return [(f"layer{k}", getattr(encoder, f"layer{k}")) for k in range(1, 5) if isinstance(getattr(encoder, f"layer{k}", None), nn.Sequential)]


def resnet_encoder(model: nn.Module, who: str):
    """The torchvision ResNet encoder of an smp model, or StrategyError naming what is needed."""
    # lazy (startup): smp/torchvision load when a model is transformed, not for `memtrain strategies` or flag checks
    from torchvision.models.resnet import ResNet

    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, ResNet):
        got = type(encoder).__name__ if encoder is not None else f"{type(model).__name__} without .encoder"
        raise StrategyError(f"{who}: needs an smp U-Net with a ResNet encoder (--encoder resnet18/34/50/...), got {got}")
    return encoder


def to_momentum(model: nn.Module, *, gamma: float = GAMMA, invertible: bool = True, who: str = "momentum") -> nn.Module:
    """Replace every residual stage of the ResNet encoder by [first block +] a MomentumNet of the rest, in place."""
    # lazy (startup): smp/torchvision load when a model is transformed, not for `memtrain strategies` or flag checks
    from torchvision.models.resnet import BasicBlock, Bottleneck

    encoder = resnet_encoder(model, who)
    for name, stage in _blocks_of(encoder):
        blocks = list(stage)
        if any(isinstance(b, InvertibleMomentumNet) for b in blocks):
            raise StrategyError(f"{who}: encoder.{name} is already a MomentumNet")
        if not all(isinstance(b, (BasicBlock, Bottleneck)) for b in blocks):
            raise StrategyError(f"{who}: encoder.{name} is not a stage of torchvision residual blocks")
        head = [b for b in blocks[:1] if b.downsample is not None]  # changes shape: cannot be inverted
        rest = blocks[len(head) :]
        if not rest:
            continue
        mnet = InvertibleMomentumNet(rest, gamma, invertible=invertible, name=f"encoder.{name}")
        setattr(encoder, name, nn.Sequential(*head, mnet))
    return model


def momentum_stages(model: nn.Module) -> list[InvertibleMomentumNet]:
    return [m for m in model.modules() if isinstance(m, InvertibleMomentumNet)]


@register
class Momentum(Strategy):
    """Invertible MomentumNet encoder stages: activations of the encoder's residual blocks are recomputed, not stored.

    Memory saved: the saved activations of every shape-preserving encoder block (for a
    U-Net ResNet34, 12 of 16 blocks), replaced by one output and one exact velocity per
    stage. Time paid: those blocks run forward twice. Accuracy risk: **the network
    function changes** (momentum residual, γ = 0.9), so it is compared with
    ``momentum:reference`` — the same architecture with ordinary backprop — not with the
    plain ResNet; the inversion itself is exact to ~1e-7 and checked every step. The
    package's fp16 overflow, velocity wrap, negative-value rounding, repeated BatchNorm
    updates and float32 recompute after a bf16 forward are fixed or guarded (see
    ``memtrain/strategies/momentum.py``). Needs an smp U-Net with a ResNet encoder.
    """

    name = "momentum"
    stage = Stage.RESTRUCTURE
    summary = "invertible MomentumNet encoder stages (changes the network: momentum residual, γ=0.9; :reference = same net, normal backprop)"
    variants = ("invertible", "reference")
    # Measured on CPU (benchmarks/results/strategy_time_cpu.md); GPU assumed the same (the second forward of the blocks).
    time_cost = 1.46
    # Measured: the exact fixed-point stores' bytes are not exactly quadratic in the image side (a quadratic through
    # 192, 224 and 256 px misses 320 px by 26 KB in the optimizer phase), so `memtrain plan` estimates it at the size.
    size_polynomial = False

    @classmethod
    def plan_options(cls, env) -> tuple[tuple[str, ...], str]:
        return (cls.name,), "momentum:reference saves no memory (it is the reference for momentum's accuracy)"

    def check(self, plan: Plan) -> None:
        # fp16, bf16: the exact arithmetic runs in float64/int64 and the recompute under the forward's autocast.
        # quant:int8/fp8: the stage state is kept off the saved-tensor hooks, so it is never quantized.
        # checkpoint: recomputes replay BatchNorm state from before the forward (memtrain.strategies.recompute).
        # quant:qat is rejected by quant's check (no int8 form of the velocity arithmetic).
        # offload: moves what autograd saves; the stage's exact state stays where it is.
        return None

    def transform(self, model: nn.Module) -> nn.Module:
        return to_momentum(model, invertible=self.variant == "invertible", who=self.spec)


def reference_of(model: nn.Module) -> nn.Module:
    """``momentum:reference`` of an already-transformed model's architecture: same weights, ordinary autograd."""
    ref = copy.deepcopy(model)
    for m in momentum_stages(ref):
        m.invertible = False
    return ref


__all__ = [
    "GAMMA",
    "RECONSTRUCTION_TOLERANCE",
    "VELOCITY_LIMIT",
    "ExactVelocity",
    "InvertibleMomentumNet",
    "Momentum",
    "momentum_stages",
    "reference_of",
    "to_momentum",
]

"""``tile``: exact tiled training of the U-Net's full-resolution stages.

Two tiled regions, each one :class:`torch.autograd.Function` whose forward returns whole
tensors and saves only its whole inputs (nothing inside a region is kept between forward
and backward):

* **E** (encoder, stride 4): image ``x`` → ``conv1/bn1/relu`` → ``maxpool`` → ``layer1`` →
  ``f2`` (whole, ¼ resolution). The stem output ``f1`` (½ resolution, 64 channels) is not kept.
* **D** (decoder): ``d1`` (output of ``decoder.blocks[1]``, ⅛, whole), ``f2`` (¼, whole skip),
  ``x`` (full) → ``blocks[2]`` → ``blocks[3]`` (skip ``f1`` recomputed per tile from ``x`` by the
  stem, ``bn1`` with the batch statistics E computed this step) → ``blocks[4]`` →
  ``segmentation_head`` → output (whole, one channel).

The middle (``layer2..4``, ``decoder.blocks[0..1]``) runs whole, as without tiling (so
``checkpoint`` still wraps it). The loss runs on the whole one-channel output.

**Lean** (``tile:lean``, training only): D takes ``d1`` and ``x`` only and recomputes E per tile
(``f1`` and ``f2`` from ``x``, with the batch statistics E computed this step), so ``f2`` is read
only by ``layer2`` and dropped once it has; the middle drops each whole tensor once the next
stage has read it; ``layer2``'s first block runs as :class:`_DownsampleFirst` (same values, a
smaller backward). No ¼-resolution tensor is alive while the middle runs, and D's backward
neither unpacks ``f2`` nor returns an ``f2``-sized gradient. The price: D's sweeps run the stem
and ``layer1`` too, D's backward has one more sweep per BatchNorm of E (it sums its own
corrections for them), and D's halo covers E's receptive field as well (64 px for ResNet18/34).
Inference (:func:`tiled`) always takes ``f2`` whole: nothing is kept for backward there.

**Tiles.** Interior squares of side T (full-resolution pixels, a multiple of 32) partition
the image; each tile's computation window is the interior ± a halo, clipped at the image
border. Window origins are multiples of 32, so every strided convolution, pooling and
nearest upsampling lands on the whole image's grid, and clipping at the border reproduces
the whole image's zero / −inf padding. The halo is the region's receptive radius
(:func:`receptive_radius`, computed from the modules: Σ dilation·(k−1)/2 · stride over the
convolutions/pools on the longest path, plus one source pixel per upsampling) rounded up to
a multiple of 32 — 32 px for ResNet18/34. That radius suffices for the backward too: a
gradient injected at a tile's interior reaches back at most r_after(l) from it at layer l,
and the forward value at layer l is exact at least r_before(l) inside the window, with
r_after + r_before ≤ r; values further out are wrong but multiplied by zero gradients.

**BatchNorm** (exact, statistics of the whole batch): see :class:`_BNSession`. Forward: for each
BatchNorm k in execution order one no-grad sweep runs every tile up to BN k (earlier BNs use
their already fixed statistics), accumulates Σx, Σx² of BN k's input over the tile's interior
at that resolution (interiors partition every layer: the sums are exact; float64), and aborts
the tile; training on a CPU in float32, a second such sweep sums Σ(x − mean)² as ATen's CPU
kernel does (:class:`_StatsSums`). Then BN k's mean/biased variance are fixed, rounded as that
kernel rounds them, and its running statistics updated as ``nn.BatchNorm2d`` does. A last sweep
produces the output. With the CPU rounding each BN applies ``x·α + β`` with ``addcmul``, which
rounds as the kernel does (once where both fuse the multiply-add), so on a CPU the float32 tiled
forward equals the untiled forward bit for bit (convolutions give the same bits on a window as on
the whole image; measured, tests/test_tile.py); the backward sums in another order. Backward, by linearity: with fixed
statistics ``dx = γ/σ·(g − S1/N − x̂·S2/N)``, S1 = Σg, S2 = Σg·x̂. Per tile the region output's
gradient masked to the tile's interior is injected, and at each BN the correction
``−γ/σ·(S1/N + x̂·S2/N)`` masked to the tile's interior; summed over tiles this is the exact
backward. For BN j from last to first, one sweep recomputes every tile (no grad up to BN j,
with grad after it) and backpropagates to BN j's output only, accumulating S1_j, S2_j over
the window; a final sweep backpropagates to parameters and region inputs. ``bn1`` is owned by
E (E updates its running statistics); D borrows its statistics and gets its own correction
sums from D's gradient (the skip path) — correct because the backward is linear in g. In the
lean form D borrows all of E's BatchNorms (``bn1`` and ``layer1``'s) the same way.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from memtrain.errors import StrategyError
from memtrain.strategies.base import Environment, Stage, Strategy
from memtrain.strategies.momentum import InvertibleMomentumNet
from memtrain.strategies.registry import register

ALIGN = 32  # window origins and tile sides: the U-Net's total stride
# `tile` without a variant: 256 px tiles from 512² up (window 320² with the 32 px halo: 1.56× the interior;
# measured: amp,tile,checkpoint:full,quant at 2048² holds 639 MiB with 256 px tiles, 1,563 MiB with 1024 px
# tiles, whose per-tile working set dominates), smaller images the largest side giving ≥ 2 tiles per side.
AUTO_SIDES = (256, 128, 64, 32)
_MARK = "_memtrain_tile"


# -- geometry -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileWindow:
    """One tile in full-resolution pixels: interior [iy0, iy1) × [ix0, ix1), window [wy0, wy1) × [wx0, wx1)."""

    iy0: int
    iy1: int
    ix0: int
    ix1: int
    wy0: int
    wy1: int
    wx0: int
    wx1: int

    def window(self, t: torch.Tensor, stride: int) -> torch.Tensor:
        """The window of a whole tensor at ``stride`` (full-resolution px per pixel)."""
        return t[..., self.wy0 // stride : self.wy1 // stride, self.wx0 // stride : self.wx1 // stride]

    def interior(self, local: torch.Tensor) -> tuple[slice, slice]:
        """The interior's index slices inside a window-local tensor (its stride follows from its size)."""
        s = (self.wy1 - self.wy0) // local.shape[-2]
        return (slice((self.iy0 - self.wy0) // s, (self.iy1 - self.wy0) // s), slice((self.ix0 - self.wx0) // s, (self.ix1 - self.wx0) // s))

    def whole_interior(self, stride: int) -> tuple[slice, slice]:
        return (slice(self.iy0 // stride, self.iy1 // stride), slice(self.ix0 // stride, self.ix1 // stride))


def make_tiles(height: int, width: int, side: int, halo: int) -> list[TileWindow]:
    """Interiors of ``side`` partitioning height × width (the last ones clipped), each with its halo window."""
    out = []
    for y0 in range(0, height, side):
        y1 = min(height, y0 + side)
        for x0 in range(0, width, side):
            x1 = min(width, x0 + side)
            out.append(TileWindow(y0, y1, x0, x1, max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo)))
    return out


def representative_tiles(tiles: list[TileWindow]) -> list[TileWindow]:
    """For memory estimates: the first tile, then one with the largest window (see :func:`sampled_tiles`)."""
    widest = max(tiles, key=lambda t: (t.wy1 - t.wy0, t.wx1 - t.wx0))
    return [tiles[0], widest] if len(tiles) > 1 else tiles


def all_tiles(tiles: list[TileWindow]) -> list[TileWindow]:
    return tiles


_SELECT = contextvars.ContextVar("memtrain_tile_select", default=all_tiles)


@contextlib.contextmanager
def sampled_tiles():
    """Within this context every region runs only :func:`representative_tiles` per sweep — for fake-tensor estimates only.

    A tile's run holds only its window's tensors; what outlives it is whole and allocated once
    (the region's output, the input gradients) or of fixed size (the BatchNorm sums, the
    parameter-gradient accumulators, which need a second tile to show their add). Every tile's
    memory is that of its window, and the largest window is the largest in both axes at once,
    so the first tile plus the widest one reach the same peak in every phase as all tiles do —
    at any size, in a few seconds instead of minutes (tests/test_tile.py checks equality with the
    full trace and with a real step). The values computed are meaningless: use it with fake tensors.
    """
    token = _SELECT.set(representative_tiles)
    try:
        yield
    finally:
        _SELECT.reset(token)


def auto_side(height: int, width: int) -> int:
    """``tile`` without a variant: the largest of 256/128/64/32 giving ≥ 2 tiles along the shorter side (see AUTO_SIDES)."""
    short = min(height, width)
    return next((s for s in AUTO_SIDES if math.ceil(short / s) >= 2), AUTO_SIDES[-1])


def receptive_radius(path: list) -> int:
    """Full-resolution receptive radius of a chain: ``path`` items are modules (convs/pools counted, others ignored) or ('up', source_stride)."""
    stride, radius = 1, 0
    for item in path:
        if isinstance(item, tuple):
            _, src = item
            radius += src  # nearest upsampling: one source pixel of slack
            stride = src // 2
            continue
        for m in item.modules() if isinstance(item, nn.Module) else ():
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
                k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
                d = m.dilation if isinstance(m.dilation, tuple) else (m.dilation, m.dilation)
                s = m.stride if isinstance(m.stride, tuple) else (m.stride, m.stride)
                radius += max(di * (ki - 1) // 2 for di, ki in zip(d, k)) * stride
                stride *= max(s)
    return radius


def halo_for(radius: int) -> int:
    return ALIGN * math.ceil(radius / ALIGN)


# -- BatchNorm with fixed statistics -------------------------------------------------------------
class _Abort(Exception):
    """Private control flow: a stats sweep stops the tile at its target BN."""


class _FixedBN(torch.autograd.Function):
    """BatchNorm with fixed (batch) statistics; its backward adds the global correction on the tile interior.

    ``st`` holds the statistics and the affine parameters as ``(1, C, 1, 1)`` tensors in the
    compute dtype, prepared once per step (:class:`_Stats`), so a tile's BatchNorm is four
    elementwise ops. ``corr`` is ``(S1/N, S2/N, interior slices)`` (``(1, C, 1, 1)``) or ``None``
    (no correction: eval-mode BN, or a BN whose sums are not yet known because the backward
    stops at its output). ``weight`` and ``bias`` are inputs so that autograd returns their gradients.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, st, corr):
        # CPU rounding (beta4 set): x·α + β in one rounding, as ATen's CPU kernel (α = scale4); else (x − mean)·scale + bias
        cd = st.mean4.dtype
        y = torch.addcmul(st.beta4, x.to(cd), st.scale4) if st.beta4 is not None else (x.to(cd) - st.mean4) * st.scale4 + st.bias4
        ctx.save_for_backward(x)
        ctx.st, ctx.corr, ctx.wdtype = st, corr, weight.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        st = ctx.st
        cd = st.mean4.dtype
        g32 = g.to(cd)
        xhat = (x.to(cd) - st.mean4) * st.invstd4
        dweight = (g32 * xhat).sum((0, 2, 3)).to(ctx.wdtype) if ctx.needs_input_grad[1] else None
        dbias = g32.sum((0, 2, 3)).to(ctx.wdtype) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g32 * st.scale4
            if ctx.corr is not None:
                m1, m2, (ys, xs) = ctx.corr
                dx[..., ys, xs] -= st.scale4 * (m1 + xhat[..., ys, xs] * m2)
            dx = dx.to(x.dtype)
        return dx, dweight, dbias, None, None


@dataclass
class _Stats:
    """One batch-dependent BN's statistics for this step, and what its tiles need as ``(1, C, 1, 1)`` tensors."""

    mean: torch.Tensor  # compute dtype (float32, float64 for a float64 model)
    invstd: torch.Tensor
    count: int  # N·H·W at the BN's resolution
    mean4: torch.Tensor = field(init=False)
    invstd4: torch.Tensor = field(init=False)
    scale4: torch.Tensor = field(init=False)  # γ·invstd (1 without affine)
    bias4: torch.Tensor = field(init=False)  # β (0 without affine)
    beta4: torch.Tensor | None = field(init=False)  # CPU rounding: the forward's constant term β − mean·α in one rounding (α = scale4)

    def prepare(self, bn: nn.BatchNorm2d, cpu_rounding: bool) -> _Stats:
        """Fix the per-channel tensors from ``bn``'s current affine parameters (they do not change within a step)."""
        cd = self.mean.dtype
        self.mean4, self.invstd4 = self.mean.view(1, -1, 1, 1), self.invstd.view(1, -1, 1, 1)
        with torch.no_grad():
            w = bn.weight.detach().to(cd).view(1, -1, 1, 1) if bn.weight is not None else torch.ones_like(self.mean4)
            self.scale4 = w * self.invstd4
            self.bias4 = bn.bias.detach().to(cd).view(1, -1, 1, 1) if bn.bias is not None else torch.zeros_like(self.mean4)
            self.beta4 = torch.addcmul(self.bias4, self.mean4, self.scale4, value=-1) if cpu_rounding else None
        return self


@dataclass
class _BNSession:
    """What every BatchNorm of a region does during one tile's run.

    ``mode``: ``"stats"`` — BNs before ``target`` normalise with fixed statistics, ``target``
    accumulates Σx, Σx² over the tile interior and aborts the tile; ``"apply"`` — every BN
    normalises with fixed statistics (its backward adds the correction where ``sums`` has
    it); in ``"apply"`` with ``start`` set, the tile runs without grad up to ``start``'s
    output, which becomes a leaf requiring grad (``captured``) and grad is on after it.
    Cost per forward: one partial no-grad sweep per batch-dependent BN, plus the output sweep;
    per backward: one recompute + partial backward per batch-dependent BN, plus the full one.
    """

    tile: TileWindow
    stats: dict
    mode: str = "apply"
    target: nn.Module | None = None
    acc: _StatsSums | None = None
    sums: dict = field(default_factory=dict)
    start: nn.Module | None = None
    captured: tuple | None = None

    def __call__(self, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        if not _batch_dependent(bn):
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        if self.mode == "stats" and bn is self.target:
            ys, xs = self.tile.interior(x)
            self.acc.add(x[..., ys, xs])
            raise _Abort
        st = self.stats[bn]
        corr = None
        if bn in self.sums:
            m1, m2 = self.sums[bn]
            corr = (m1, m2, self.tile.interior(x))
        if bn is self.start:
            with torch.no_grad():
                y = _FixedBN.apply(x, bn.weight, bn.bias, st, None)
            y = y.detach().requires_grad_(True)
            self.captured = (x.detach(), y)
            torch.set_grad_enabled(True)  # the rest of the tile is differentiated; the caller's no_grad restores
            return y.clone()  # not the leaf itself: the next op may be an in-place ReLU
        return _FixedBN.apply(x, bn.weight, bn.bias, st, corr)


def _batch_dependent(bn: nn.BatchNorm2d) -> bool:
    return bn.training or bn.running_mean is None


@dataclass
class _StatsSums:
    """One batch-dependent BN's statistics sweeps: Σx and Σx² (float64) over every tile's interior; on a CPU
    (:attr:`Tiling.cpu_rounding`) and for a float32 input, a second sweep for Σ(x − mean)² with each difference and
    square rounded to float32 (``mean`` set).

    Why the second sweep: it is how ATen's CPU kernel computes the variance (the mean summed in float64 and rounded to
    float32; each (x − mean)² in float32, summed in float64, the sum rounded to float32), so the statistics, and with
    :class:`_FixedBN`'s rounding the whole tiled forward, are the untiled forward's bit for bit (tests/test_tile.py).
    Σx² − N·mean² agrees to float64 rounding but lands a float32 ulp off now and then, and one ulp in one channel
    changes every later value a little. It costs one more partial no-grad sweep per BN (what that costs: :class:`Tile`).
    16-bit inputs (``amp``), float64 and GPUs (whose kernels round otherwise) keep the one sweep.
    """

    s1: torch.Tensor
    s2: torch.Tensor
    count: int = 0
    dtype: torch.dtype | None = None  # the BN input's dtype, seen by the first sweep
    mean: torch.Tensor | None = None  # (1, C, 1, 1) in float32: the second sweep's, once the first is done
    var_sum: torch.Tensor | None = None  # Σ(x − mean)² of the second sweep (float64)

    @classmethod
    def zeros(cls, like: torch.Tensor, channels: int) -> _StatsSums:
        return cls(like.new_zeros(channels, dtype=torch.float64), like.new_zeros(channels, dtype=torch.float64))

    def add(self, xi: torch.Tensor) -> None:
        if self.mean is None:
            xd = xi.double()
            self.s1 += xd.sum((0, 2, 3))
            self.s2 += (xd * xd).sum((0, 2, 3))
            self.count += xi.numel() // xi.shape[1]
            self.dtype = xi.dtype
        else:
            d = xi - self.mean
            self.var_sum += (d * d).double().sum((0, 2, 3))

    def second_sweep(self, cpu_rounding: bool) -> bool:
        """After the first sweep: whether a second one is due (``cpu_rounding`` and a float32 input), with its mean fixed."""
        if not cpu_rounding or self.dtype != torch.float32 or self.mean is not None:
            return False
        self.mean = (self.s1 / self.count).float().view(1, -1, 1, 1)
        self.var_sum = torch.zeros_like(self.s1)
        return True


def _update_running(bn: nn.BatchNorm2d, mean: torch.Tensor, unbiased: torch.Tensor, factor: float) -> None:
    """ATen's CPU update with its roundings: the momentum in the buffers' dtype, the mean's update in it too, the
    variance's sum widened (``m·var`` in double, ``(1 − m)·running_var`` in the buffer's dtype)."""
    rm, rv = bn.running_mean, bn.running_var
    m = torch.tensor(factor, dtype=rm.dtype)
    with torch.no_grad():
        rm.copy_(m * mean.to(rm.dtype) + (1 - m) * rm)
        rv.copy_((m.double() * unbiased.to(rv.dtype).double() + ((1 - m) * rv).double()).to(rv.dtype))


def _bn_dtype(bn: nn.BatchNorm2d) -> torch.dtype:
    return torch.float64 if bn.weight is not None and bn.weight.dtype == torch.float64 else torch.float32


def _finish_stats(bn: nn.BatchNorm2d, acc: _StatsSums, update: bool, cpu_rounding: bool) -> _Stats:
    """Mean and biased variance from the sums (after a second sweep rounded as ATen's CPU kernel rounds them, else in
    float64); running statistics updated as ``nn.BatchNorm2d`` does."""
    cd, n = _bn_dtype(bn), acc.count
    tracked = update and bn.training and bn.track_running_stats and bn.running_mean is not None
    if tracked:
        bn.num_batches_tracked.add_(1)
        factor = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
    if acc.var_sum is not None:
        mean, var_sum = acc.mean.view(-1), acc.var_sum.to(cd)
        if tracked:
            _update_running(bn, mean, var_sum / max(n - 1, 1), factor)
        return _Stats(mean, (1 / torch.sqrt((var_sum / n).double() + bn.eps)).to(cd), n).prepare(bn, cpu_rounding)
    mean = acc.s1 / n
    var = (acc.s2 / n - mean * mean).clamp_min(0)
    if tracked:
        with torch.no_grad():
            bn.running_mean.mul_(1 - factor).add_((mean * factor).to(bn.running_mean.dtype))
            bn.running_var.mul_(1 - factor).add_((var * (n / max(n - 1, 1)) * factor).to(bn.running_var.dtype))
    return _Stats(mean.to(cd), torch.rsqrt(var + bn.eps).to(cd), n).prepare(bn, cpu_rounding)


# -- regions --------------------------------------------------------------------------------------
@dataclass
class Counters:
    """How many tile runs each region did (mechanism tests read these)."""

    forward: dict = field(default_factory=dict)  # region name -> tile runs in forward (stats + output sweeps)
    backward: dict = field(default_factory=dict)  # region name -> tile runs in backward (sweeps + final)

    def add(self, kind: str, name: str, n: int = 1) -> None:
        d = getattr(self, kind)
        d[name] = d.get(name, 0) + n


class _Region:
    """One tiled region: ``fn(*windows)`` over inputs at ``in_strides``, output at ``out_stride``."""

    def __init__(self, tiling: Tiling, name: str, fn, bns: list, owned: list, modules: list, in_strides: tuple, out_stride: int, radius: int) -> None:
        self.tiling, self.name, self.fn = tiling, name, fn
        self.bns, self.owned = bns, owned  # execution order; owned: whose statistics this region computes
        self.params = list(dict.fromkeys(p for m in modules for p in m.parameters()))
        self.in_strides, self.out_stride = in_strides, out_stride
        self.radius, self.halo = radius, halo_for(radius)

    def tiles(self, inputs) -> list[TileWindow]:
        h, w = (inputs[0].shape[-2] * self.in_strides[0], inputs[0].shape[-1] * self.in_strides[0])
        return _SELECT.get()(make_tiles(h, w, self.tiling.side_for(h, w), self.halo))

    def _run(self, session: _BNSession, inputs, grad: bool):
        windows = [session.tile.window(t, s) for t, s in zip(inputs, self.in_strides)]
        if grad:
            windows = [w.detach().requires_grad_(w.is_floating_point()) for w in windows]
        tiling = self.tiling
        tiling.active = session
        try:
            with torch.set_grad_enabled(grad):
                return windows, self.fn(*windows)
        finally:
            tiling.active = None

    # forward ------------------------------------------------------------------------------------
    def forward(self, inputs, stats: dict, *, update: bool = True, count: str = "forward") -> torch.Tensor:
        """The region's whole output; fixes (and records in ``stats``) the statistics of its owned batch-dependent BNs."""
        tiles = self.tiles(inputs)
        for bn in self.owned:
            if not _batch_dependent(bn):
                continue
            acc = _StatsSums.zeros(inputs[0], bn.num_features)
            while True:  # Σx and Σx², then for a float32 input Σ(x − mean)² (_StatsSums)
                for t in tiles:
                    with contextlib.suppress(_Abort):
                        self._run(_BNSession(t, stats, mode="stats", target=bn, acc=acc), inputs, grad=False)
                self.tiling.counters.add(count, self.name, len(tiles))
                if not acc.second_sweep(self.tiling.cpu_rounding):
                    break
            stats[bn] = _finish_stats(bn, acc, update, self.tiling.cpu_rounding)
        out = None
        for t in tiles:  # each tile's body is a method call, so nothing of one tile is alive while the next runs
            out = self._output_tile(t, inputs, stats, out)
        self.tiling.counters.add(count, self.name, len(tiles))
        return out

    def _output_tile(self, t: TileWindow, inputs, stats: dict, out: torch.Tensor | None) -> torch.Tensor:
        _, y = self._run(_BNSession(t, stats), inputs, grad=False)
        if out is None:
            n, c = y.shape[:2]
            h, w = inputs[0].shape[-2] * self.in_strides[0] // self.out_stride, inputs[0].shape[-1] * self.in_strides[0] // self.out_stride
            out = y.new_empty((n, c, h, w))
        ys, xs = t.interior(y)
        wy, wx = t.whole_interior(self.out_stride)
        out[..., wy, wx] = y[..., ys, xs]
        return out

    # backward -----------------------------------------------------------------------------------
    def _masked(self, grad_out: torch.Tensor, t: TileWindow, like: torch.Tensor) -> torch.Tensor:
        g = torch.zeros_like(like)
        ys, xs = t.interior(like)
        wy, wx = t.whole_interior(self.out_stride)
        g[..., ys, xs] = grad_out[..., wy, wx]
        return g

    def backward(self, inputs, grad_out: torch.Tensor, stats: dict, needs: tuple):
        """Gradients of the region's inputs (None where not needed) and of ``self.params``."""
        tiles = self.tiles(inputs)
        sums: dict = {}
        for bn in reversed(self.bns):
            if not _batch_dependent(bn):
                continue
            st = stats[bn]
            acc = [st.mean.new_zeros(bn.num_features, dtype=torch.float64), st.mean.new_zeros(bn.num_features, dtype=torch.float64)]
            for t in tiles:
                self._sums_tile(t, bn, inputs, grad_out, stats, sums, acc)
            self.tiling.counters.add("backward", self.name, len(tiles))
            cd = st.mean4.dtype
            sums[bn] = ((acc[0] / st.count).to(cd).view(1, -1, 1, 1), (acc[1] / st.count).to(cd).view(1, -1, 1, 1))  # summed in float64
        grads_in = [torch.zeros_like(t) if need else None for t, need in zip(inputs, needs)]
        grads_p: list = [None] * len(self.params)
        for t in tiles:
            self._final_tile(t, inputs, grad_out, stats, sums, needs, grads_in, grads_p)
        self.tiling.counters.add("backward", self.name, len(tiles))
        return grads_in, grads_p

    def _sums_tile(self, t: TileWindow, bn: nn.BatchNorm2d, inputs, grad_out, stats: dict, sums: dict, acc: list) -> None:
        """Add this tile's S1 = Σg, S2 = Σg·x̂ at ``bn``'s output (float64) to ``acc``."""
        session = _BNSession(t, stats, sums=sums, start=bn)
        _, y = self._run(session, inputs, grad=False)
        if session.captured is None or not y.requires_grad:
            return
        x_bn, y_bn = session.captured
        (g,) = torch.autograd.grad(y, y_bn, self._masked(grad_out, t, y))
        st = stats[bn]
        xhat = (x_bn.double() - st.mean4.double()) * st.invstd4.double()
        gd = g.double()
        acc[0] += gd.sum((0, 2, 3))
        acc[1] += (gd * xhat).sum((0, 2, 3))

    def _final_tile(self, t: TileWindow, inputs, grad_out, stats: dict, sums: dict, needs: tuple, grads_in: list, grads_p: list) -> None:
        """Backpropagate this tile: input gradients added into their windows, parameter gradients accumulated."""
        windows, y = self._run(_BNSession(t, stats, sums=sums), inputs, grad=True)
        want = [w for w, need in zip(windows, needs) if need]
        params = [p for p in self.params if p.requires_grad]
        got = torch.autograd.grad(y, [*want, *params], self._masked(grad_out, t, y), allow_unused=True)
        it = iter(got)
        for i, need in enumerate(needs):
            if need:
                gw = next(it)
                if gw is not None:
                    t.window(grads_in[i], self.in_strides[i]).add_(gw)
        for j, p in enumerate(self.params):
            if p.requires_grad:
                gp = next(it)
                if gp is not None:
                    if grads_p[j] is None:
                        grads_p[j] = gp
                    else:
                        grads_p[j].add_(gp)


class _RegionFunction(torch.autograd.Function):
    """One tiled region as a whole-tensor op: saves only its whole inputs."""

    @staticmethod
    def forward(ctx, region: _Region, n_inputs: int, *args):
        inputs, params = args[:n_inputs], args[n_inputs:]
        device_type = inputs[0].device.type
        ctx.autocast = _autocast_state(device_type)
        ctx.region = region
        stats = region.tiling.step_stats
        out = region.forward(inputs, stats)
        ctx.stats = dict(stats)
        ctx.n_inputs = n_inputs
        ctx.save_for_backward(*inputs)
        del params
        return out

    @staticmethod
    def backward(ctx, grad_out):
        region: _Region = ctx.region
        inputs = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[2 : 2 + ctx.n_inputs])
        with torch.autocast(**ctx.autocast):
            grads_in, grads_p = region.backward(inputs, grad_out, ctx.stats, needs)
        return (None, None, *grads_in, *grads_p)


def _autocast_state(device_type: str) -> dict:
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)
    return {"device_type": device_type, "enabled": enabled, "dtype": dtype}


# -- the model program ----------------------------------------------------------------------------
class _TiledBN:
    """Instance-level forward of a BatchNorm inside a tiled region: the active session decides; outside, its own forward."""

    def __init__(self, bn: nn.BatchNorm2d, tiling: Tiling) -> None:
        self.bn, self.tiling = bn, tiling

    def __call__(self, x):
        session = self.tiling.active
        if session is None:
            return type(self.bn).forward(self.bn, x)
        return session(self.bn, x)


def _bns(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def _run_stage(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An encoder stage as momentum may have left it: MomentumNet children run their plain equations.

    Inside a tiled region nothing is stored between forward and backward anyway, so the
    inversion (which MomentumNet uses to avoid storing) has nothing to save; the plain
    equations are the same function (``momentum:reference``'s arithmetic).
    """
    for child in stage.children() if isinstance(stage, nn.Sequential) else [stage]:
        x = child.plain_forward(x) if isinstance(child, InvertibleMomentumNet) else child(x)
    return x


class _DownsampleFirst:
    """Instance forward of ``layer2``'s first block under ``tile:lean`` (a torchvision ``BasicBlock`` with a 1×1 strided ``downsample``).

    Its output and input gradient are ``BasicBlock.forward``'s bit for bit (measured on CPU;
    the downsample's weight gradient sums the same products in another order); what backward
    holds differs in two ways. The block reads E's output ``f2`` twice: its 3×3
    stride-2 ``conv1`` and its ``downsample``. Run as they are, the ``downsample`` branch's
    backward runs first and its ``f2``-sized input gradient waits while ``conv1``'s backward
    holds the unpacked ``f2`` (under ``offload``) and its own ``f2``-sized gradient: three
    ¼-resolution tensors at once, the lean step's backward peak at 4096². Here the ``downsample``
    runs first in forward, so its backward runs last, and its 1×1 convolution with stride s
    reads ``f2[..., ::s, ::s]``: it keeps (and unpacks) a quarter of ``f2``.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    @staticmethod
    def applies(block: nn.Module) -> bool:
        from torchvision.models.resnet import BasicBlock  # lazy (startup): torchvision loads when a model is transformed

        ds = getattr(block, "downsample", None)
        if type(block) is not BasicBlock or not isinstance(ds, nn.Sequential) or len(ds) != 2:
            return False
        conv = ds[0]
        return (
            isinstance(conv, nn.Conv2d)
            and isinstance(ds[1], nn.BatchNorm2d)
            and conv.kernel_size == (1, 1)
            and conv.padding == (0, 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.stride[0] == conv.stride[1]
        )

    def __call__(self, x):
        b = self.block
        conv, bn = b.downsample
        s = conv.stride[0]
        identity = bn(F.conv2d(x[..., ::s, ::s], conv.weight, conv.bias))
        out = b.relu(b.bn1(b.conv1(x)))
        out = b.bn2(b.conv2(out))
        out += identity
        return b.relu(out)


class Tiling:
    """The tiled program installed as ``model.forward`` (instance level; :func:`remove_tiling` restores).

    ``lean``: the decoder region recomputes E per tile instead of taking ``f2`` whole, and the
    middle drops its whole tensors once read (see the module docstring); False: ``tile``'s program.
    ``cpu_rounding``: BatchNorm rounds as ATen's CPU kernel: every BN's output as ``x·α + β``
    (:class:`_FixedBN`), and float32 statistics with the kernel's second variance sweep
    (:class:`_StatsSums`); the ``tile`` strategy sets it for a CPU target.
    """

    def __init__(self, model: nn.Module, side: int | None, *, lean: bool = False, cpu_rounding: bool = False) -> None:
        self.model = model
        self.side = side  # None: auto from the input size
        self.lean = lean
        self.cpu_rounding = cpu_rounding  # BatchNorm rounded as ATen's CPU kernel (see the class docstring): for CPU training
        self.active: _BNSession | None = None
        self.step_stats: dict = {}
        self.counters = Counters()
        enc, dec = model.encoder, model.decoder
        b2, b3, b4, head = dec.blocks[2], dec.blocks[3], dec.blocks[4], model.segmentation_head
        stem = [enc.conv1, enc.bn1, enc.relu]

        def run_e(x):
            return _run_stage(enc.layer1, enc.maxpool(enc.relu(enc.bn1(enc.conv1(x)))))

        def decode(d1, f2, f1, x):
            y = type(b2).forward(b2, d1, f2.shape[-2], f2.shape[-1], f2)
            y = type(b3).forward(b3, y, f1.shape[-2], f1.shape[-1], f1)
            y = type(b4).forward(b4, y, x.shape[-2], x.shape[-1], None)
            return type(head).forward(head, y)

        def run_d(d1, f2, x):
            y = type(b2).forward(b2, d1, f2.shape[-2], f2.shape[-1], f2)
            f1 = enc.relu(enc.bn1(enc.conv1(x)))  # the stem again, per tile, with E's statistics for bn1
            y = type(b3).forward(b3, y, f1.shape[-2], f1.shape[-1], f1)
            y = type(b4).forward(b4, y, x.shape[-2], x.shape[-1], None)
            return type(head).forward(head, y)

        def run_d_lean(d1, x):
            f1 = enc.relu(enc.bn1(enc.conv1(x)))  # E again, per tile, with E's statistics for its BatchNorms
            return decode(d1, _run_stage(enc.layer1, enc.maxpool(f1)), f1, x)

        e_bns = _bns(enc.bn1) + _bns(enc.layer1)
        dec_bns = [*_bns(b2), *_bns(b3), *_bns(b4), *_bns(head)]
        r_e = receptive_radius([enc.conv1, enc.maxpool, enc.layer1])
        r_d = max(
            receptive_radius([("up", 8), b2, ("up", 4), b3, ("up", 2), b4, head]),
            receptive_radius([enc.conv1, ("up", 2), b4, head]) + receptive_radius([b3]) * 2,
        )
        self.encoder_region = _Region(self, "encoder", run_e, e_bns, e_bns, [*stem, enc.maxpool, enc.layer1], (1,), 4, r_e)
        if lean:
            # E's path to the output through f2, recomputed per tile: stem, maxpool, layer1, then b2 onwards.
            r_d = max(r_d, receptive_radius([enc.conv1, enc.maxpool, enc.layer1, b2, ("up", 4), b3, ("up", 2), b4, head]))
            d_bns = [*e_bns, *dec_bns]  # execution order of run_d_lean
            modules = [b2, b3, b4, head, *stem, enc.maxpool, enc.layer1]
            self.decoder_region = _Region(self, "decoder", run_d_lean, d_bns, dec_bns, modules, (8, 1), 1, r_d)
            first = enc.layer2[0] if isinstance(enc.layer2, nn.Sequential) else None  # reads E's output f2
            if first is not None and _DownsampleFirst.applies(first):
                first.forward = _DownsampleFirst(first)
            self.program = self._lean_program
        else:
            d_bns = [*_bns(b2), enc.bn1, *_bns(b3), *_bns(b4), *_bns(head)]  # execution order of run_d
            self.decoder_region = _Region(self, "decoder", run_d, d_bns, dec_bns, [b2, b3, b4, head, *stem], (8, 4, 1), 1, r_d)
            self.program = self._program
        self.tiled_modules = (enc.conv1, enc.bn1, enc.layer1, b2, b3, b4, head)
        for bn in dict.fromkeys(e_bns + d_bns):
            bn.forward = _TiledBN(bn, self)

    def side_for(self, height: int, width: int) -> int:
        return self.side if self.side is not None else auto_side(height, width)

    @property
    def halo(self) -> int:
        """The widest halo of the two regions (full-resolution px)."""
        return max(self.encoder_region.halo, self.decoder_region.halo)

    def _region(self, region: _Region, *inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (any(t.requires_grad for t in inputs) or any(p.requires_grad for p in region.params)):
            return _RegionFunction.apply(region, len(inputs), *inputs, *region.params)
        return region.forward(inputs, self.step_stats)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.model.check_input_shape(x)
        return self.program(x)

    def _program(self, x: torch.Tensor) -> torch.Tensor:
        """``tile``: E, the middle whole, D with ``f2`` whole."""
        enc, dec = self.model.encoder, self.model.decoder
        f2 = self._region(self.encoder_region, x)
        f3 = enc.layer2(f2)
        f4 = enc.layer3(f3)
        f5 = enc.layer4(f4)
        y = dec.center(f5)
        y = dec.blocks[0](y, f4.shape[-2], f4.shape[-1], f4)
        d1 = dec.blocks[1](y, f3.shape[-2], f3.shape[-1], f3)
        return self._region(self.decoder_region, d1, f2, x)

    def _lean_program(self, x: torch.Tensor) -> torch.Tensor:
        """``tile:lean``: E, the middle whole with each tensor dropped once the next stage has read it, D recomputing E."""
        enc, dec = self.model.encoder, self.model.decoder
        f2 = self._region(self.encoder_region, x)
        f3 = enc.layer2(f2)
        del f2  # D recomputes f2 per tile: not alive through the middle
        f4 = enc.layer3(f3)
        y = dec.center(enc.layer4(f4))
        y = dec.blocks[0](y, f4.shape[-2], f4.shape[-1], f4)
        del f4
        d1 = dec.blocks[1](y, f3.shape[-2], f3.shape[-1], f3)
        del f3, y
        return self._region(self.decoder_region, d1, x)


NEEDS = "an smp U-Net with a ResNet encoder of depth 5 and 5 decoder blocks with BatchNorm, no classification head"


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` cannot be tiled (what :data:`NEEDS` asks for is missing), or None when it can."""
    from memtrain.strategies.checkpoint import _supported as unet_problem  # (cycle: checkpoint <-> tile)

    problem = unet_problem(model)
    if problem is not None:
        return problem
    if model.encoder._depth != 5 or len(model.decoder.blocks) != 5:
        return f"encoder depth {model.encoder._depth}, {len(model.decoder.blocks)} decoder blocks"
    if getattr(model, "classification_head", None) is not None:
        return "the model has a classification head"
    for name in ("conv1", "bn1"):
        if not isinstance(getattr(model.encoder, name), nn.Conv2d if name == "conv1" else nn.BatchNorm2d):
            return f"model.encoder.{name} is {type(getattr(model.encoder, name)).__name__} (fused by quant:qat?)"
    return None


def apply_tiling(model: nn.Module, side: int | None, *, lean: bool = False, cpu_rounding: bool = False) -> nn.Module:
    """Install the tiled program into ``model`` (in place); ``side`` None picks it from each input's size; ``lean``, ``cpu_rounding``: see :class:`Tiling`."""
    problem = unsupported(model)
    if problem is not None:
        raise StrategyError(f"tile: needs {NEEDS}; {problem}")
    if tiling_of(model) is not None:
        raise StrategyError("tile: the model is already tiled")
    tiling = Tiling(model, side, lean=lean, cpu_rounding=cpu_rounding)
    model.forward = tiling
    object.__setattr__(model, _MARK, tiling)
    return model


def tiling_of(model: nn.Module) -> Tiling | None:
    """The :class:`Tiling` installed in ``model``, or None."""
    found = model.__dict__.get(_MARK)
    return found if isinstance(found, Tiling) else None


def tiled_modules(model: nn.Module) -> tuple[nn.Module, ...]:
    """Modules run inside tiled regions (``checkpoint`` leaves them alone); empty when not tiled."""
    tiling = tiling_of(model)
    return tiling.tiled_modules if tiling is not None else ()


@contextlib.contextmanager
def tiled(model: nn.Module, side: int | None) -> Iterator[Tiling]:
    """``model`` runs tiled inside the block, untiled again after it (exact, see the module docstring).

    For inference (``memtrain enhance``): in eval mode every BatchNorm normalises with its
    running statistics, so no statistics sweep runs — each region runs every tile once
    (E: image → ``f2``; D: ``d1``, ``f2``, image → output) and the middle runs whole, which
    is whole-image inference summed in another order. Under ``torch.no_grad`` nothing is
    saved between tiles: the peak is the whole tensors that cross the regions plus one
    tile's window working set.
    """
    apply_tiling(model, side)
    tiling = tiling_of(model)
    try:
        yield tiling
    finally:
        remove_tiling(model)


def remove_tiling(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tiling`: the model and its BatchNorms run their class forwards again."""
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), (_TiledBN, Tiling, _DownsampleFirst)):
            del m.forward
    model.__dict__.pop(_MARK, None)
    return model


def parse_variant(variant: str) -> tuple[bool, int | None] | None:
    """``(lean, side)`` of a ``tile`` variant — ``auto``, ``PX``, ``lean``, ``lean-PX`` (side None: automatic) — or None when it is not one."""
    if variant in ("auto", "lean"):
        return variant == "lean", None
    side = variant.removeprefix("lean-")
    if side.isdigit() and int(side) > 0 and int(side) % ALIGN == 0:
        return variant.startswith("lean-"), int(side)
    return None


@register
class Tile(Strategy):
    """Exact tiled training of the U-Net's full-resolution stages (stem, layer1, decoder blocks 2–4, head).

    Memory saved: the activations at ¼ resolution and finer are never held for the whole
    image — only each tile's window while it runs. What remains grows with the area: the
    whole tensors that cross the regions (``f2`` at ¼, ``d1`` at ⅛, the image, the one-channel
    output), the loss and the untiled middle. Measured (benchmarks/results/tile.md, CUDA
    target, batch 1): ``amp,tile,checkpoint:full,quant`` holds 0.096× the float32 step at
    2048² and 1.46 GiB at 4096²; ``amp,tile,offload`` 0.083× and 1.07 GiB; the activation
    peak still grows ~11× from 1024² to 4096² (16× the pixels). Time paid: extra passes over
    the tiled stages — BatchNorm with whole-batch statistics costs one partial no-grad sweep
    per BN in forward and one recompute + partial backward per BN in backward, plus the halo:
    3.4× the FLOPs of the plain step at 512²; training on a CPU in float32, a second statistics
    sweep per BN (:class:`_StatsSums`) makes it 3.98× the FLOPs and 4.8× the CPU time. Accuracy
    risk: none — in float64 outputs, gradients and BatchNorm buffers equal the untiled step to
    1e-8; in float32 on a CPU the forward (output, loss, BatchNorm buffers) is the untiled forward
    bit for bit and the gradients differ by the backward's summation order only; on a GPU the
    statistics round differently from cuDNN's (see docs/strategies/tile.md).

    ``tile:lean`` (``tile:lean-PX`` with a given side) also keeps ``f2`` out of the middle: the
    decoder region recomputes the stem and ``layer1`` per tile (module docstring, "Lean").
    Memory saved on top of ``tile``: the ¼-resolution tensors alive while the middle and the
    decoder region run, from about 2048² on (below, the larger windows cost as much) —
    ``amp,tile:lean,offload`` 509 MiB at 2048², 917 MiB at 4096² (within a 2 GiB GPU by the
    planner's default headroom, where ``tile`` needs 2.17 GiB), 2,588 MiB at 8192² (``tile``:
    553, 1,093, 3,253); activation peak ~7.9× from 1024² to 4096² (``tile``: 10.6×). Time paid: the decoder region's sweeps run E again (one more
    backward sweep per BatchNorm of E) and its halo doubles to 64 px: 7.0× the FLOPs of the
    plain step at 512² (twice ``tile``'s; float32 on a CPU 8.0× the FLOPs and 9.7× the CPU time).
    Accuracy risk: none, as ``tile``.
    Plans try it only where nothing else fits (:meth:`plan_options`).
    """

    name = "tile"
    stage = Stage.TILE
    summary = (
        "the full-resolution stages tile by tile with exact BatchNorm: with amp,checkpoint:full,quant 0.096x the fp32 step at 2048², for ~3.4x its FLOPs;"
        " tile:lean also recomputes the ¼-res skip per tile (amp,offload: 917 MiB at 4096² vs 1,093) for ~7.0x"
    )
    variants = ("auto", "lean")
    size_polynomial: ClassVar[bool] = False

    @classmethod
    def plan_options(cls, env: Environment) -> tuple[tuple[str, ...], str]:
        """Plans try ``tile`` with its side picked from the size (:func:`auto_side`); a fake estimate runs two tiles per sweep (:func:`sampled_tiles`).

        ``tile:lean`` is not one of the combinations: it is :meth:`fallback_variant`, which the planner
        tries where no combination fits the budget, for the few tile combinations with the smallest
        step peaks (:meth:`memtrain.memory.planner.Planner.fallbacks`).
        """
        return (cls.name,), (
            "tile:PX and tile:lean-PX are tried only when named in --strategies; tile:lean (slower, less memory) when named,"
            " or in place of the few tile plans with the smallest step peaks when no plan fits the budget"
        )

    # CPU: measured by benchmarks/tile.py at 512² (auto side 256, 2 × 2 tiles; process time, interleaved), float32
    # with the CPU rounding's second statistics sweep: tile 4.78× `none` (FLOPs 3.98×), tile:lean 9.69× (FLOPs 8.04×);
    # under amp (one sweep) amp,tile,checkpoint:full,quant 3.04× (FLOPs 3.60×): declared_time sees only the variant, so
    # CPU plans with amp are ranked with the float32 figure, as before the second sweep.
    # GPU: assumed the FLOP ratio of the one-sweep form (3.39×, lean 6.98×; not measured on a GPU).
    time_cost = 3.4
    time_cost_cpu = 4.8
    lean_time_cost = 7.0
    lean_time_cost_cpu = 9.7

    @classmethod
    def declared_time(cls, variant: str | None, device: str) -> float:
        """``tile`` / ``tile:PX``: ``time_cost`` (``time_cost_cpu`` on a CPU); ``tile:lean`` / ``tile:lean-PX``: the lean ones."""
        parsed = parse_variant(variant or "auto")
        if parsed is not None and parsed[0]:
            return cls.lean_time_cost_cpu if device == "cpu" else cls.lean_time_cost
        return cls.time_cost_cpu if device == "cpu" else cls.time_cost

    @classmethod
    def accepts_variant(cls, variant: str) -> bool:
        return parse_variant(variant) is not None

    @classmethod
    def fallback_variant(cls, variant: str | None) -> str | None:
        """``tile`` → ``tile:lean``, ``tile:PX`` → ``tile:lean-PX``; the lean forms have none."""
        parsed = parse_variant(variant or "auto")
        if parsed is None or parsed[0]:
            return None
        return "lean" if parsed[1] is None else f"lean-{parsed[1]}"

    @classmethod
    def variant_error(cls, text: str) -> str:
        return (
            f"--strategies: '{text}': tile takes ':PX', the tile side in pixels, a positive multiple of {ALIGN} (e.g. tile:256),"
            " ':lean' (the decoder region recomputes the encoder's ¼-resolution skip: less memory, slower), ':lean-PX' (e.g. tile:lean-128),"
            " or no variant"
        )

    @property
    def lean(self) -> bool:
        return parse_variant(self.variant)[0]

    @property
    def side(self) -> int | None:
        return parse_variant(self.variant)[1]

    @property
    def spec(self) -> str:
        return self.name if self.variant == "auto" else f"{self.name}:{self.variant}"

    def check(self, plan) -> None:
        quant = plan.get("quant")
        if quant is not None and quant.variant == "qat":
            raise StrategyError(
                f"--strategies {plan.label}: quant:qat fuses BatchNorm into the convolutions and its observers update "
                "their ranges from every tile they see, so a tiled step cannot reproduce the whole-image step; use quant:int8/fp8 with tile"
            )
        for s in plan.strategies:
            if s.stage == Stage.PLACEMENT:
                raise StrategyError(
                    f"--strategies {plan.label}: tile with {s.name} is not supported: rpc and pipeline run the encoder and decoder "
                    "as separate shards, while tile's regions span both (the decoder region recomputes the encoder stem); "
                    "ddp with tile is not verified"
                )

    def transform(self, model: nn.Module) -> nn.Module:
        return apply_tiling(model, self.side, lean=self.lean, cpu_rounding=self.env.target == "cpu")


__all__ = [
    "Tile",
    "TileWindow",
    "Tiling",
    "apply_tiling",
    "auto_side",
    "make_tiles",
    "parse_variant",
    "receptive_radius",
    "remove_tiling",
    "sampled_tiles",
    "tiled",
    "tiled_modules",
    "tiling_of",
    "unsupported",
]

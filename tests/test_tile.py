"""``tile``: the tiled step equals the untiled one (outputs, loss, every gradient, BatchNorm buffers); tiles and sweeps happen as scheduled."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import phantom_batch, warmed_unet

from memtrain.errors import StrategyError
from memtrain.loss import MSSSIMLoss
from memtrain.strategies import Environment, Plan, create
from memtrain.strategies.tile import apply_tiling, auto_side, make_tiles, remove_tiling, tiling_of

# Relative to each tensor's largest magnitude; atol for tensors that are ~0 everywhere. float32: the 1e-5.
# float64: the tiled arithmetic is the same function summed in another order, so it must agree to rounding.
# Why both: this warmed U-Net's float32 gradients are ill-conditioned (BatchNorm backward cancels): the plain
# float32 step differs from the plain float64 step by up to 0.6 % (128 px) / 2.5 % (192 px) in some gradients,
# so a float32 tiled step can only match the float32 untiled step to 1e-5 where both round alike; float64
# shows the tiled step computes the same gradients with no tolerance games.
TOL = {torch.float32: (1e-5, 1e-7), torch.float64: (1e-7, 1e-12)}  # measured 1.2e-8 at 160 px, 3 × 3 tiles


def _step(model, x, y):
    out = model(x)
    loss = MSSSIMLoss()(out, y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.detach(), loss.detach(), grads, {n: b.detach().clone() for n, b in model.named_buffers()}


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    if not ref.is_floating_point():
        return torch.equal(got, ref)
    rtol, atol = TOL[ref.dtype]
    return bool((got - ref).abs().max() <= rtol * ref.abs().max() + atol)


@pytest.fixture(scope="module")
def warmed():
    model = warmed_unet("resnet18", size=128)
    return lambda: copy.deepcopy(model)


@pytest.mark.parametrize(("size", "side", "dtype"), [(128, 64, torch.float32), (96, 64, torch.float64)])
def test_tiled_step_equals_the_untiled_step(warmed, size, side, dtype):
    """One step: output, loss, every parameter gradient and BN buffer; 96 = 64 + 32 (a clipped tile)."""
    x, y = (t.to(dtype) for t in phantom_batch(size, n=2, first=5))
    plain, tiled = warmed().to(dtype), apply_tiling(warmed().to(dtype), side)
    ref, got = _step(plain, x, y), _step(tiled, x, y)
    assert _close(got[0], ref[0]) and _close(got[1], ref[1])
    assert got[2].keys() == ref[2].keys()
    bad = [n for n in ref[2] if not _close(got[2][n], ref[2][n])]
    assert not bad, bad
    assert all(ref[2][n].abs().sum() > 0 for n in ("encoder.conv1.weight", "encoder.bn1.weight", "decoder.blocks.4.conv2.0.weight"))
    bad = [n for n in ref[3] if not _close(got[3][n], ref[3][n])]
    assert not bad, bad


def test_sweep_schedule_and_tiles(warmed):
    """Each region runs every tile once per BN sweep plus once for its output (forward) / final backward."""
    model = apply_tiling(warmed(), 64)
    x, y = phantom_batch(96, n=1, first=1)
    MSSSIMLoss()(model(x), y).backward()
    counters = tiling_of(model).counters
    tiles = 4
    e_bns, d_bns = 1 + 4, 6  # stem + layer1 (2 BasicBlocks) ; decoder blocks 2..4, two BNs each
    assert counters.forward == {"encoder": (e_bns + 1) * tiles, "decoder": (d_bns + 1) * tiles}
    assert counters.backward == {"encoder": (e_bns + 1) * tiles, "decoder": (d_bns + 1 + 1) * tiles}  # + borrowed bn1
    assert len(make_tiles(160, 96, 64, 32)) == 3 * 2
    assert auto_side(4096, 4096) == 256 and auto_side(256, 256) == 128 and auto_side(64, 64) == 32


def test_remove_tiling_restores_the_model(warmed):
    model = warmed()
    keys = list(model.state_dict())
    apply_tiling(model, 64)
    assert list(model.state_dict()) == keys
    remove_tiling(model)
    assert "forward" not in model.__dict__ and all("forward" not in m.__dict__ for m in model.modules())


def test_variants_and_rejections():
    assert create("tile:96").side == 96 and create("tile").side is None
    for bad in ("tile:100", "tile:0", "tile:big"):
        with pytest.raises(StrategyError, match="multiple of 32"):
            create(bad)
    cpu = Environment(device="cpu")
    with pytest.raises(StrategyError, match="quant:qat"):
        Plan.resolve("tile,quant:qat", cpu)
    with pytest.raises(StrategyError, match="tile with pipeline"):
        Plan.resolve("tile,pipeline", cpu)


def test_fake_estimate_of_sampled_tiles_equals_the_real_step():
    """A fake estimate runs two tiles per sweep (tile.sampled_tiles); a real step runs all nine: every phase's peak is equal."""
    from memtrain.memory.estimate import measure_step
    from memtrain.memory.tracker import PHASES

    env = Environment.detect("cpu")
    real = measure_step("tile:64", size=160, encoder="resnet18", env=env, fake=False, blocks=False)
    fake = measure_step("tile:64", size=160, encoder="resnet18", env=env, fake=True, blocks=False)
    assert {p: fake.peak(p) for p in PHASES} == {p: real.peak(p) for p in PHASES}
    assert len(make_tiles(160, 160, 64, 32)) == 9

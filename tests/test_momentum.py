"""``momentum``: invertible MomentumNet encoder stages — faithful to the same architecture, defects of momentumnet fixed or guarded."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import phantom_batch, warmed_unet
from momentumnet import MomentumNet
from momentumnet.exact_rep_pytorch import TorchExactRep
from torchvision.models.resnet import BasicBlock

from memtrain.errors import StrategyError
from memtrain.loss import MSSSIMLoss
from memtrain.strategies import Environment, Plan
from memtrain.strategies.amp import LowPrecisionConvOnFloat32
from memtrain.strategies.momentum import ExactVelocity, InvertibleMomentumNet, momentum_stages, reference_of, to_momentum

CPU = Environment(device="cpu", native_bf16=False)


def _grads(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters()])


def _step(model, x, y, ctx=contextlib.nullcontext):
    model.zero_grad(set_to_none=True)
    with ctx():
        out = model(x)
    loss = MSSSIMLoss()(out, y)
    loss.backward()
    return out, loss


@pytest.fixture(scope="module")
def warmed():
    return warmed_unet("resnet18")


def test_momentum_equals_its_reference_architecture_in_float32(warmed):
    """Same outputs, gradients (max abs diff ≤ 1e-5) and BatchNorm buffers as ordinary backprop through the same network."""
    x, y = phantom_batch(64)
    mem = Plan.resolve("momentum", CPU).apply(copy.deepcopy(warmed))
    ref = Plan.resolve("momentum:reference", CPU).apply(copy.deepcopy(warmed))
    assert mem.state_dict().keys() == ref.state_dict().keys()
    stages = momentum_stages(mem)
    assert [s.stage_name for s in stages] == [f"encoder.layer{k}" for k in range(1, 5)]
    assert [len(s.functions) for s in stages] == [2, 1, 1, 1]  # resnet18: layer2-4 keep their downsampling first block
    out_m, loss_m = _step(mem, x, y)
    out_r, loss_r = _step(ref, x, y)
    assert (out_m - out_r).abs().max() <= 1e-5
    assert abs(loss_m.item() - loss_r.item()) <= 1e-6
    g_m, g_r = _grads(mem), _grads(ref)
    assert g_r.abs().max() > 0.1
    assert (g_m - g_r).abs().max() <= 1e-5
    for (name, b_m), (_, b_r) in zip(mem.named_buffers(), ref.named_buffers()):
        if b_r.dtype.is_floating_point:
            assert torch.allclose(b_m, b_r, rtol=0, atol=2e-6), name  # positions differ by float32 rounding only
        else:
            assert torch.equal(b_m, b_r), name  # num_batches_tracked: exactly one update per step
    # The inversion is exact: the reconstructed stage inputs equal the forward's bit for bit.
    assert [s.last_reconstruction_error for s in stages] == [0.0] * 4
    # Different network from the plain ResNet: the momentum residual changes the function.
    assert (out_r - warmed(x)).abs().max() > 1e-3


def test_recompute_happens_and_batchnorm_updates_once(warmed):
    """Mechanism: every invertible block runs twice per step; BN counters advance once (momentumnet's own code: twice)."""
    x, y = phantom_batch(64)
    mem = to_momentum(copy.deepcopy(warmed))
    calls = {}
    for name, mod in mem.named_modules():
        if isinstance(mod, BasicBlock):
            mod.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    before = {n: int(b) for n, b in mem.named_buffers() if n.endswith("num_batches_tracked")}
    _step(mem, x, y)
    inverted = [n for n in calls if ".network." in n]
    assert inverted and all(calls[n] == 2 for n in inverted), calls
    assert all(calls[n] == 1 for n in calls if n not in inverted), calls
    assert {n: int(b) for n, b in mem.named_buffers() if n.endswith("num_batches_tracked")} == {n: c + 1 for n, c in before.items()}

    # The package as shipped: its recompute updates the running statistics a second time.
    torch.manual_seed(0)
    blocks = [BasicBlock(8, 8) for _ in range(3)]
    stock = MomentumNet(blocks, gamma=0.9, use_backprop=False, is_residual=False)
    stock(torch.randn(2, 8, 8, 8, requires_grad=True)).sum().backward()
    assert int(blocks[0].bn1.num_batches_tracked) == 2


def test_fp16_autocast_overflow_is_fixed():
    """momentumnet scales by 2^52 in the input dtype: under fp16 every velocity becomes -2048. memtrain's arithmetic is exact."""
    f = torch.tensor([0.5, -0.25, 1e-3, 3.0], dtype=torch.float16)
    stock = TorchExactRep(torch.zeros(4))
    stock += f
    assert torch.all(stock.val == -2048)  # the defect: garbage, silently
    fixed = ExactVelocity(torch.zeros(4))
    fixed += f
    assert torch.equal(fixed.val, f.float())

    # A whole stage under fp16 autocast: stock output is garbage, memtrain's tracks float32.
    torch.manual_seed(0)
    blocks = [BasicBlock(8, 8) for _ in range(3)]
    x = torch.randn(2, 8, 16, 16).half()  # in a U-Net under fp16 autocast, a stage's input is the previous fp16 block output
    mine = InvertibleMomentumNet(copy.deepcopy(blocks), name="stage")
    ref32 = mine.plain_forward(x.float()).detach()
    stock = MomentumNet(copy.deepcopy(blocks), gamma=0.9, use_backprop=False, is_residual=False)
    with LowPrecisionConvOnFloat32(), torch.autocast("cpu", dtype=torch.float16):
        out_stock = stock(x.clone().requires_grad_(True))
        out_mine = mine(x.clone().requires_grad_(True))
    assert (out_stock.float() - ref32).abs().max() > 100
    assert (out_mine.float() - ref32).abs().max() < 0.05 * ref32.abs().max()
    with LowPrecisionConvOnFloat32():
        out_mine.sum().backward()
    assert mine.last_reconstruction_error == 0.0


def test_velocity_wrap_is_detected():
    """|v| ≥ 2048 wraps int64 silently in momentumnet; memtrain raises naming the stage."""
    stock = TorchExactRep(torch.zeros(1))
    stock += torch.tensor([3000.0])
    assert stock.val.item() == -2048.0  # the defect: wrapped, no error
    torch.manual_seed(0)
    block = BasicBlock(8, 8)
    with torch.no_grad():
        block.bn2.weight.fill_(1e4)
    stage = InvertibleMomentumNet([block, BasicBlock(8, 8)], name="encoder.layer3")
    with pytest.raises(StrategyError, match=r"encoder.layer3 reached .* int64 wraps"):
        stage(torch.randn(2, 8, 8, 8, requires_grad=True))
    with torch.no_grad():
        block.bn2.weight.fill_(float("nan"))
    with pytest.raises(StrategyError, match="reached nan"):
        stage(torch.randn(2, 8, 8, 8, requires_grad=True))


def test_reconstruction_error_fails_loudly():
    """A block that recomputes differently (dropout: new random mask) makes the inversion drift: the step raises."""
    torch.manual_seed(0)
    noisy = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Dropout(0.5))
    stage = InvertibleMomentumNet([noisy, torch.nn.Conv2d(8, 8, 3, padding=1)], name="encoder.layer1")
    out = stage(torch.randn(2, 8, 16, 16, requires_grad=True))
    with pytest.raises(StrategyError, match=r"inverting encoder.layer1 reconstructed its input with relative error"):
        out.sum().backward()


def test_amp_momentum_recomputes_under_the_forward_autocast(warmed):
    """amp (bf16) + momentum — the paper's diverged combination: exact inversion, gradients faithful to fp32."""
    x, y = phantom_batch(64)
    ref32 = reference_of(to_momentum(copy.deepcopy(warmed)))
    _step(ref32, x, y)
    plan = Plan.resolve("amp,momentum", CPU)
    mem = plan.apply(copy.deepcopy(warmed))
    with plan.session():
        out, _ = _step(mem, x, y, plan.precision().autocast)
    assert out.dtype == torch.bfloat16
    # A float32 recompute of a bf16 forward would not reproduce it and the inversion would fail loudly.
    assert [s.last_reconstruction_error for s in momentum_stages(mem)] == [0.0] * 4
    assert torch.nn.functional.cosine_similarity(_grads(mem), _grads(ref32), dim=0) > 0.99
    for (name, b_m), (_, b_r) in zip(mem.named_buffers(), ref32.named_buffers()):
        if not b_r.dtype.is_floating_point:
            assert torch.equal(b_m, b_r), name
        else:
            assert torch.allclose(b_m.float(), b_r, rtol=0.05, atol=0.02), name


def test_short_training_tracks_the_reference(warmed):
    """Three Adam steps: momentum tracks momentum:reference to float32 rounding; amp+momentum within bf16 error."""
    batches = [phantom_batch(64, first=10 * i) for i in range(3)]

    def train(model, plan, ctx=contextlib.nullcontext):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = []
        with plan.session():
            for x, y in batches:
                _, loss = _step(model, x, y, ctx)
                opt.step()
                losses.append(loss.item())
        return losses

    ref_plan, mem_plan, amp_plan = (Plan.resolve(s, CPU) for s in ("momentum:reference", "momentum", "amp,momentum"))
    ref = train(ref_plan.apply(copy.deepcopy(warmed)), ref_plan)
    mem = train(mem_plan.apply(copy.deepcopy(warmed)), mem_plan)
    amp = train(amp_plan.apply(copy.deepcopy(warmed)), amp_plan, amp_plan.precision().autocast)
    assert ref[-1] < ref[0]
    # Adam normalises updates, so float32-rounding differences in near-zero gradients grow a little.
    assert max(abs(a - b) for a, b in zip(ref, mem)) <= 2e-3, (ref, mem)
    assert max(abs(a - b) for a, b in zip(ref, amp)) <= 1e-2, (ref, amp)


def _encoder_graph_bytes(encoder, x):
    """Bytes of new tensors still alive after the encoder forward (its outputs and what autograd saved)."""
    from memtrain.memory.tensor import LiveTensorBytes, TensorBytesMode

    counter = LiveTensorBytes()
    with TensorBytesMode(counter):
        feats = encoder(x)
    held = counter.current
    del feats
    return held


def test_saved_memory_goes_down_and_estimates_under_fake_tensors():
    """Mechanism: what a ResNet34 encoder keeps for backward, momentum vs its reference (fake tensors, 512²)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memtrain.config import ModelConfig
    from memtrain.memory.estimate import measure_step
    from memtrain.model import build_model

    held = {}
    with FakeTensorMode():
        x = torch.rand(1, 1, 512, 512)
        for spec in ("momentum:reference", "momentum"):
            model = Plan.resolve(spec, CPU).apply(build_model(ModelConfig(encoder="resnet34")))
            held[spec] = _encoder_graph_bytes(model.encoder, x)
    assert held["momentum"] < 0.75 * held["momentum:reference"], held
    # The whole step can be estimated at any size without memory (the guards are skipped under fake tensors).
    step = measure_step("momentum", size=256, encoder="resnet18")
    assert step.peak("backward") > 0


def test_needs_a_resnet_encoder():
    with pytest.raises(StrategyError, match="needs an smp U-Net with a ResNet encoder"):
        Plan.resolve("momentum", CPU).apply(torch.nn.Conv2d(1, 1, 3))

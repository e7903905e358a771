"""checkpoint: faithful to the plain model (gradients, BatchNorm statistics, RNG, autocast) and it recomputes and saves memory."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_user_error, phantom_batch, run_cli, small_unet, warmed_unet
from torch.utils._python_dispatch import TorchDispatchMode

from memtrain.errors import StrategyError
from memtrain.loss import MSSSIMLoss
from memtrain.memory.estimate import measure_step
from memtrain.strategies import Environment, Plan
from memtrain.strategies.checkpoint import GRANULARITIES, Region, apply_checkpointing, regions, remove_checkpointing

CPU = Environment(device="cpu", native_bf16=False)
VARIANTS = sorted(GRANULARITIES)


def _steps(model, loss_fn, batches, lr=0.05):
    """Plain SGD steps; returns the gradients of the last step (before the update) and the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, grads = [], []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        losses.append(loss.item())
        opt.step()
    return losses, grads


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _assert_buffers_equal(ref, other):
    for (name, a), (_, b) in zip(ref.named_buffers(), other.named_buffers()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def batches():
    return [phantom_batch(64, n=2, first=i * 2) for i in range(2)]


@pytest.fixture(scope="module")
def warmed():
    """A factory of copies of one warmed-up U-Net ResNet18 (building one costs seconds of CPU)."""
    model = warmed_unet()
    return lambda: copy.deepcopy(model)


@pytest.fixture(scope="module")
def reference(warmed, batches):
    """The plain fp32 model after the same steps: losses, last gradients, buffers."""
    model = warmed()
    losses, grads = _steps(model, MSSSIMLoss(), batches)
    return losses, grads, model


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_is_exact_in_fp32_with_batchnorm_updated_once(variant, batches, warmed, reference):
    """Every granularity: same losses and gradients (≤ 1e-5; bitwise here), BN buffers identical after the steps."""
    ref_losses, ref_grads, ref = reference
    model = warmed()
    keys = list(model.state_dict())
    plan = Plan.resolve(f"checkpoint:{variant}", CPU)
    model = plan.apply(model)
    assert list(model.state_dict()) == keys  # inference loads it as the plain model
    losses, grads = _steps(model, plan.wrap_loss(MSSSIMLoss()), batches)
    assert all(g.abs().sum() > 0 for g in ref_grads)  # every parameter is in play
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert _max_diff(ref_grads, grads) <= 1e-5
    _assert_buffers_equal(ref, model)  # running_mean/var and num_batches_tracked: one update per step
    assert int(model.encoder.bn1.num_batches_tracked) == 1 + len(batches)  # warm-up step + ours


def test_cumulative_batchnorm_average_is_exact(batches, warmed):
    """momentum=None (cumulative average 1/num_batches_tracked) is where a double update shows most."""
    ref, model = warmed(), warmed()
    for m in (*ref.modules(), *model.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model = apply_checkpointing(model, "full")
    _steps(ref, MSSSIMLoss(), batches)
    _steps(model, MSSSIMLoss(), batches)
    _assert_buffers_equal(ref, model)


def test_plain_torch_checkpoint_would_update_batchnorm_twice(batches, warmed):
    """Why memtrain protects buffers: torch.utils.checkpoint alone re-runs BN in training mode during backward."""
    from torch.utils.checkpoint import checkpoint

    model = warmed()
    layer = model.encoder.layer1
    before = int(layer[0].bn1.num_batches_tracked)
    x, _ = batches[0]
    feats = model.encoder.conv1(x)
    out = checkpoint(layer, model.encoder.maxpool(feats), use_reentrant=False)
    out.sum().backward()
    assert int(layer[0].bn1.num_batches_tracked) == before + 2
    # memtrain's region: exactly one update.
    model = warmed()
    layer = model.encoder.layer1
    region = Region(layer, [layer])
    region(model.encoder.maxpool(model.encoder.conv1(x))).sum().backward()
    assert int(layer[0].bn1.num_batches_tracked) == before + 1


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = func.overloadpacket.__name__
        self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["blocks", "selective"])
def test_regions_are_recomputed_in_backward(variant, batches, warmed):
    model = apply_checkpointing(warmed(), variant)
    calls = {"encoder.layer2[1]": 0, "decoder.blocks[4].conv1": 0, "decoder.blocks[0].conv2": 0}
    modules = {
        "encoder.layer2[1]": model.encoder.layer2[1],
        "decoder.blocks[4].conv1": model.decoder.blocks[4].conv1,
        "decoder.blocks[0].conv2": model.decoder.blocks[0].conv2,
    }
    for name, m in modules.items():
        m.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    x, y = batches[0]
    loss = MSSSIMLoss()(model(x), y)
    assert all(v == 1 for v in calls.values()), calls
    counter = _OpCounter()
    with counter:
        loss.backward()
    assert all(v == 2 for v in calls.values()), calls  # each region ran again during backward
    if variant == "selective":
        # Convolution outputs were kept: backward ran no convolution forward, only cheap ops again.
        assert counter.counts.get("convolution", 0) == 0
        assert counter.counts.get("native_batch_norm", 0) > 0
    else:
        assert counter.counts.get("convolution", 0) > 10


def test_checkpoint_lowers_the_forward_peak():
    """Mechanism: what the forward keeps for backward (tensor_increase of the forward phase) goes down.

    Fake tensors: the same count a real step gives (memtrain.memory.estimate), at a fraction of the time.
    """
    kw = {"size": 128, "batch_size": 1, "encoder": "resnet18", "fake": True}
    base = measure_step("none", **kw).peak("forward", "tensor_increase")
    ratios = {v: measure_step(f"checkpoint:{v}", **kw).peak("forward", "tensor_increase") / base for v in VARIANTS}
    assert ratios["stages"] < 0.45 and ratios["blocks"] < 0.5 and ratios["full"] < 0.45 and ratios["selective"] < 0.75, ratios
    assert ratios["full"] < ratios["blocks"]  # stem, head and loss kept nothing either


def test_full_also_checkpoints_stem_head_and_loss(warmed):
    model = apply_checkpointing(warmed(), "full")
    names = [r.name for r in regions(model)]
    assert names[0] == "stem" and "segmentation_head" in names and "encoder.layer1[0]" in names
    assert "decoder.blocks[4].conv1" in names and "decoder.blocks[4].conv2" in names and "decoder.blocks[0]" in names
    loss_fn = Plan.resolve("checkpoint:full", CPU).wrap_loss(MSSSIMLoss())
    assert isinstance(loss_fn, torch.nn.Module) and not list(loss_fn.state_dict())
    stages = [r.name for r in regions(apply_checkpointing(warmed(), "stages"))]
    assert stages == ["encoder.layer1", "encoder.layer2", "encoder.layer3", "encoder.layer4", *(f"decoder.blocks[{i}]" for i in range(5))]


def test_rng_state_is_replayed_in_the_recompute():
    """A region with dropout: the recompute draws the same mask as the forward, so gradients match the plain module."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5), torch.nn.Conv2d(4, 1, 1))
    x = torch.randn(2, 2, 8, 8)
    grads = []
    for wrap in (False, True):
        net.zero_grad()
        run = Region(net, [net]) if wrap else net
        torch.manual_seed(1)
        run(x).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    assert _max_diff(*grads) == 0


def test_autocast_state_is_replayed_in_the_recompute(batches, warmed):
    """amp + checkpoint equals amp alone: the recompute ran in bf16 like the forward (backward runs outside autocast)."""
    x, y = batches[0]
    results = []
    for spec in ("amp", "amp,checkpoint:blocks"):
        plan = Plan.resolve(spec, CPU)
        model = plan.apply(warmed())
        with plan.session():
            with plan.precision().autocast():
                out = model(x)
            plan.wrap_loss(MSSSIMLoss())(out, y).backward()
        results.append([p.grad.float() for p in model.parameters()])
    assert _max_diff(*results) <= 1e-6


def test_other_encoders_of_the_family_and_no_grad():
    """A Bottleneck encoder (resnet50) works too; under no_grad (validation) regions just run."""
    ref = small_unet("resnet50", zero_head=False)
    model = apply_checkpointing(copy.deepcopy(ref), "blocks")
    x, _ = phantom_batch(64, n=2)
    with torch.no_grad():
        assert torch.equal(ref(x), model(x))
    ref(x).square().mean().backward()
    model(x).square().mean().backward()
    assert _max_diff([p.grad for p in ref.parameters()], [p.grad for p in model.parameters()]) <= 1e-5
    _assert_buffers_equal(ref, model)
    remove_checkpointing(model)
    assert not regions(model) and "forward" not in model.encoder.__dict__


def test_models_without_the_unet_structure_are_rejected_with_what_is_needed(warmed):
    import segmentation_models_pytorch as smp

    with pytest.raises(StrategyError, match=r"checkpoint:blocks: needs an smp U-Net with a ResNet encoder .*model.encoder is missing"):
        Plan.resolve("checkpoint", CPU).apply(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)))
    fpn = smp.FPN("resnet18", encoder_weights=None, in_channels=1, classes=1)
    with pytest.raises(StrategyError, match=r"model.decoder is FPNDecoder, not an smp UnetDecoder"):
        apply_checkpointing(fpn, "stages")
    model = apply_checkpointing(warmed(), "blocks")
    with pytest.raises(StrategyError, match="already checkpointed"):
        apply_checkpointing(model, "full")


@pytest.mark.slow
def test_cli_rejects_checkpoint_for_a_non_resnet_encoder_before_writing(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("fit", "--config", "configs/ci-tiny.yaml", "--strategies", "checkpoint", "--encoder", "mobilenet_v2", "--out", str(out))
    assert_user_error(proc, "checkpoint:blocks", "ResNet encoder", "MobileNetV2Encoder")
    assert not out.exists()

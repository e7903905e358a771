"""``quant``: 8-bit storage of saved activations (fp8, int8) and quantization-aware training; the recompute state replay."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import phantom_batch, warmed_unet

from memtrain.errors import StrategyError
from memtrain.loss import MSSSIMLoss
from memtrain.strategies import Environment, Plan
from memtrain.strategies.quant import SavedTensorQuantizer, convert_int8, quantize
from memtrain.strategies.recompute import StateSnapshot, checkpoint_context_fn, is_recomputing

CPU = Environment(device="cpu", native_bf16=False)


def _grads(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters()])


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def _run(spec, base, x, y):
    plan = Plan.resolve(spec, CPU)
    model = plan.apply(copy.deepcopy(base))
    autocast = plan.precision().autocast
    with plan.session():
        with autocast(), plan.forward_context():
            out = model(x)
        loss = MSSSIMLoss()(out, y)
        loss.backward()
    return model, out, loss, plan


@pytest.fixture(scope="module")
def setup():
    x, y = phantom_batch(64)
    base = warmed_unet("resnet18")
    ref, out, loss, _ = _run("none", base, x, y)
    return base, x, y, ref, out, loss


def test_quantize_keeps_zero_sign_and_error_bounds():
    torch.manual_seed(0)
    t = torch.randn(2, 8, 16, 16) * torch.logspace(-3, 2, 8).view(1, 8, 1, 1)
    t[t.abs() < 1e-3] = 0
    t[0, 0, 0, :4] = torch.tensor([1e-9, -1e-9, 0.0, 1e-30])  # tiny values must not become 0
    for fmt in ("int8", "fp8"):
        q = quantize(t, fmt)
        assert q.data.element_size() == 1 and q.scale.shape == (1, 8, 1, 1)
        back = q.dequantize()
        assert torch.equal(back == 0, t == 0) and torch.equal(torch.sign(back), torch.sign(t)), fmt
        amax = t.abs().amax(dim=(0, 2, 3), keepdim=True)
        if fmt == "int8":  # uniform grid: half a step, except tiny values lifted to one step
            assert ((back - t).abs() <= amax / 127 * 0.51 + (t.abs() < amax / 254) * amax / 127).all()
        else:  # 3-bit mantissa: 1/16 relative, for values above the subnormal range
            normal = t.abs() > amax / 448 * 2**-6
            assert ((back - t).abs() <= t.abs() / 16 + 1e-12)[normal].all()


def test_parameters_and_autocast_weight_copies_are_not_quantized():
    quantizer = SavedTensorQuantizer("int8", min_numel=1)
    conv = torch.nn.Conv2d(4, 4, 3)
    assert not quantizer.eligible(conv.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w16 = conv.weight.to(torch.bfloat16)
    assert not quantizer.eligible(w16)
    act = torch.relu(conv(torch.randn(1, 4, 8, 8)))
    assert quantizer.eligible(act) and not quantizer.eligible(act.long()) and not quantizer.eligible(act.flatten())


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_saved_tensor_quantization_is_faithful_and_saves_bytes(setup, fmt):
    """Forward and BN buffers unchanged bit for bit; gradient cosine ≥ 0.999; 8-bit copies a quarter of float32."""
    base, x, y, ref, out_ref, loss_ref = setup
    model, out, loss, plan = _run(f"quant:{fmt}", base, x, y)
    assert torch.equal(out, out_ref) and loss.item() == loss_ref.item()  # the forward is untouched
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, b_ref), name
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert _cos(_grads(model), _grads(ref)) > 0.999
    assert Plan.resolve("quant", CPU).get("quant").variant == "int8"
    q = plan.get("quant").quantizer
    assert q.original_bytes > 5e6 and q.quantized_bytes < 0.26 * q.original_bytes


def test_saved_bytes_go_down_in_a_whole_step():
    """Mechanism: forward tensor peak of a U-Net ResNet34 step at 512² (fake tensors), float32 and amp.

    Estimated for a CUDA target with native bf16: on a CPU without it, amp's transient float32 working copies of
    each convolution (counted by the estimate, not saved for backward) would dilute what quant saves.
    """
    from memtrain.memory.estimate import measure_step
    from memtrain.strategies import Environment

    gpu = Environment(device="cuda", native_bf16=True)
    peak = {s: measure_step(s, size=512, encoder="resnet34", env=gpu).phases["forward"]["tensor_increase"] for s in ("none", "quant", "amp", "amp,quant")}
    assert peak["quant"] < 0.5 * peak["none"], peak
    assert peak["amp,quant"] < 0.8 * peak["amp"], peak


def test_amp_quant_is_faithful(setup):
    """amp (bf16) + quant — the combination the paper could not run."""
    base, x, y, ref, _, _ = setup
    for spec in ("amp,quant:fp8", "amp,quant:int8"):
        model, out, loss, plan = _run(spec, base, x, y)
        assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
        assert _cos(_grads(model), _grads(ref)) > 0.99, spec
        assert plan.get("quant").quantizer.quantized_bytes > 0


def test_momentum_state_is_never_quantized(setup):
    """quant + momentum: the stage's exact state bypasses the hooks, so the inversion stays exact."""
    from memtrain.strategies.momentum import momentum_stages, reference_of, to_momentum

    base, x, y, _, _, _ = setup
    ref = reference_of(to_momentum(copy.deepcopy(base)))
    MSSSIMLoss()(ref(x), y).backward()
    model, _, _, _ = _run("momentum,quant:int8", base, x, y)
    assert [s.last_reconstruction_error for s in momentum_stages(model)] == [0.0] * 4
    assert _cos(_grads(model), _grads(ref)) > 0.999


def test_short_training_tracks_the_baseline(setup):
    base, *_ = setup
    batches = [phantom_batch(64, first=10 * i) for i in range(3)]
    losses = {}
    for spec in ("none", "quant", "amp,quant"):
        plan = Plan.resolve(spec, CPU)
        model = plan.apply(copy.deepcopy(base))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        autocast = plan.precision().autocast
        losses[spec] = []
        with plan.session():
            for x, y in batches:
                with autocast(), plan.forward_context():
                    out = model(x)
                loss = MSSSIMLoss()(out, y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses[spec].append(loss.item())
    assert losses["none"][-1] < losses["none"][0]
    drift = {spec: max(abs(a - b) for a, b in zip(losses[spec], losses["none"])) for spec in ("quant", "amp,quant")}
    # quant alone: measured 2.2e-3. amp,quant: measured 1.0e-2, which is amp's own drift — the bf16
    # forward alone drifts 0.5-1.0e-2 from float32 over 4-5 Adam steps (tests/test_matrix.py, -s report) —
    # so it gets the matrix's tolerance for 16-bit combinations.
    assert drift["quant"] < 5e-3, losses
    assert drift["amp,quant"] < 0.02, losses


def test_qat_fuses_conv_bn_keeps_the_shared_relu_and_converts_to_int8(setup):
    """QAT with fake quantization off computes the float model; with it on, gradients stay close; int8 conversion runs."""
    from torch.ao.nn.intrinsic.qat import ConvBn2d, ConvBnReLU2d

    base, x, y, ref, out_ref, _ = setup
    plan = Plan.resolve("quant:qat", CPU)
    model = plan.apply(copy.deepcopy(base))
    kinds = {type(m) for m in model.modules()}
    assert ConvBn2d in kinds and ConvBnReLU2d in kinds
    block = model.encoder.layer1[0]
    assert isinstance(block.conv1, ConvBn2d) and isinstance(block.relu, torch.nn.ReLU)  # the block's ReLU stays a ReLU
    # With fake quantization and observers off, the fused QAT model is the float model: no ReLU was lost in fusion.
    plain = copy.deepcopy(model)
    plain.apply(torch.ao.quantization.disable_fake_quant)
    plain.apply(torch.ao.quantization.disable_observer)
    assert (plain(x) - out_ref).abs().max() < 1e-4
    # Quantization-aware: a different (noisier) function, gradients still close to float32.
    with plan.forward_context():
        out = model(x)
    MSSSIMLoss()(out, y).backward()
    assert _cos(_grads(model), _grads(ref)) > 0.95
    int8 = convert_int8(model)
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in int8.modules())
    with torch.no_grad():
        fake_quant, real_int8 = model.eval()(x), int8(x)
    assert real_int8.dtype == torch.float32 and _cos(real_int8.flatten(), fake_quant.flatten()) > 0.9


def test_qat_with_bf16_works(setup):
    """amp + quant:qat: PyTorch's fused fake-quant rejects bf16; memtrain's fake-quant runs in float32."""
    base, x, y, ref, _, _ = setup
    model, out, loss, _ = _run("amp,quant:qat", base, x, y)
    assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert _cos(_grads(model), _grads(ref)) > 0.95


def test_rejected_combinations():
    with pytest.raises(StrategyError, match="no int8 form"):
        Plan.resolve("momentum,quant:qat", CPU)
    with pytest.raises(StrategyError, match="needs an smp U-Net with a ResNet encoder"):
        Plan.resolve("quant:qat", CPU).apply(torch.nn.Conv2d(1, 1, 3))
    assert Plan.resolve("quant:int8", CPU).apply(conv := torch.nn.Conv2d(1, 1, 3)) is conv  # structure-free: any model


def test_checkpoint_recompute_replays_batchnorm_and_observer_state(setup):
    """recompute.checkpoint_context_fn: a checkpointed QAT block recomputes exactly and updates its state once."""
    from torch.utils.checkpoint import checkpoint

    base, *_ = setup
    model = Plan.resolve("quant:qat", CPU).apply(copy.deepcopy(base))
    block = model.encoder.layer2[0]  # ConvBn2d reads running_var in its forward: a naive recompute differs
    x = torch.randn(2, 64, 16, 16)
    twin = copy.deepcopy(block)
    seen = []
    block.conv1.register_forward_hook(lambda *a: seen.append(is_recomputing()))
    xa = x.clone().requires_grad_(True)
    checkpoint(block, xa, use_reentrant=False, context_fn=checkpoint_context_fn(block)).square().sum().backward()
    xb = x.clone().requires_grad_(True)
    twin(xb).square().sum().backward()
    assert seen == [False, True]  # recomputed once, flagged as a recompute
    assert torch.equal(xa.grad, xb.grad)
    for (name, b), (_, b_twin) in zip(block.named_buffers(), twin.named_buffers()):
        assert torch.equal(b, b_twin), name
    for (name, p), (_, p_twin) in zip(block.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.grad, p_twin.grad), name
    assert len(StateSnapshot(block)) > 10

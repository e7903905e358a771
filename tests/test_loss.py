"""The loss: memtrain's 1 − MS-SSIM against pytorch-msssim (value, gradient), no dead zone, finiteness, memory, the registry.

Also: float32 whatever the autocast state; window adaptation for small images.
"""

from __future__ import annotations

import csv
import re

import pytest
import torch
import yaml
from pytorch_msssim import ms_ssim

from memtrain.errors import ConfigError
from memtrain.loss import LOSSES, MSSSIMLoss, ReferenceMSSSIMLoss, build_loss, image_metrics, window_for
from memtrain.loss import ms_ssim as own_ms_ssim


def _pair(size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(2, 1, size, size, generator=g)
    pred = (target + 0.2 * torch.randn(2, 1, size, size, generator=g)).requires_grad_(True)
    return pred, target


def test_loss_is_one_minus_pytorch_msssim():
    pred, target = _pair(192)
    loss = MSSSIMLoss()(pred, target)
    assert torch.allclose(loss, 1 - ms_ssim(pred, target, data_range=1.0, win_size=11))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_runs_in_float32_under_autocast(dtype):
    pred, target = _pair(64)
    ref = MSSSIMLoss()(pred, target)
    (g_ref,) = torch.autograd.grad(ref, pred)
    low = pred.detach().to(dtype).requires_grad_(True)  # what an autocast model would output
    with torch.autocast("cpu", dtype=dtype):
        loss = MSSSIMLoss()(low, target)
    assert loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, low)
    # Same value and gradient as float32 on the same (rounded) inputs: nothing ran in 16 bits.
    exact = MSSSIMLoss()(low.detach().float().requires_grad_(True), target)
    assert torch.allclose(loss, exact, atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(g.float().flatten(), g_ref.flatten(), dim=0)
    assert cos > 0.99


def test_bf16_msssim_would_be_wrong_without_the_guard():
    # Why the guard exists: the same loss evaluated in bf16 has a visibly different gradient.
    pred, target = _pair(64)
    (g32,) = torch.autograd.grad(1 - ms_ssim(pred, target, data_range=1.0, win_size=3), pred)
    p16 = pred.detach().bfloat16().requires_grad_(True)
    (g16,) = torch.autograd.grad(1 - ms_ssim(p16, target.bfloat16(), data_range=1.0, win_size=3), p16)
    cos = torch.nn.functional.cosine_similarity(g16.float().flatten(), g32.flatten(), dim=0)
    assert cos < 0.99


@pytest.mark.parametrize(("side", "win"), [(512, 11), (161, 11), (160, 9), (128, 7), (96, 5), (64, 3), (33, 3)])
def test_window_adapts_to_small_images(side, win):
    assert window_for(side) == win
    x = torch.rand(1, 1, side, side)
    MSSSIMLoss()(x, x.clone())  # five scales fit
    ReferenceMSSSIMLoss()(x, x.clone())  # pytorch-msssim accepts it


def test_too_small_for_msssim_is_a_clear_error():
    with pytest.raises(ConfigError, match="--size 32: too small for 5-scale MS-SSIM"):
        MSSSIMLoss()(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))


def test_metrics_identity_and_perfect_prediction():
    _, target = _pair(64)
    m = image_metrics(target, target)
    assert m["msssim"].item() == pytest.approx(1.0, abs=1e-5)
    assert m["ssim"].item() == pytest.approx(1.0, abs=1e-5)
    assert m["psnr"].item() > 100
    noisy = (target + 0.1 * torch.randn_like(target)).clamp(0, 1)
    assert 15 < image_metrics(noisy, target)["psnr"].item() < 25


# --------------------------------------------------------------------------- memtrain's MS-SSIM against pytorch-msssim


def _phantom_pair(size, dtype):
    from conftest import phantom_batch

    x, y = phantom_batch(size, n=2)
    return x.to(dtype), y.to(dtype)


def _random_pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(*shape, generator=g, dtype=dtype)
    return (target + 0.2 * torch.randn(*shape, generator=g, dtype=dtype)).clamp(-0.2, 1.2), target


@pytest.mark.parametrize(
    ("make", "shape", "dtype"),
    [
        ("phantom", (2, 1, 64, 64), torch.float64),
        ("phantom", (2, 1, 256, 256), torch.float64),
        ("random", (2, 1, 96, 96), torch.float64),
        ("random", (2, 1, 160, 160), torch.float64),
        ("random", (1, 2, 200, 200), torch.float64),  # two channels
        ("random", (2, 1, 177, 250), torch.float64),  # not square, odd sides (padded pooling)
        ("random", (1, 1, 640, 640), torch.float32),  # the training precision, several bands per scale
    ],
)
def test_value_and_gradient_equal_pytorch_msssim(make, shape, dtype):
    if make == "phantom":
        pred, target = _phantom_pair(shape[-1], dtype)
    else:
        pred, target = _random_pair(shape, dtype)
    pred.requires_grad_(True)
    target.requires_grad_(True)  # both gradients: the target's goes through the same code with x and y swapped
    win = window_for(min(shape[-2:]))
    ours = own_ms_ssim(pred, target, data_range=1.0, win_size=win)
    ref = ms_ssim(pred, target, data_range=1.0, win_size=win)
    assert 0.05 < ref.item() < 1  # every scale's term is positive: the region where both must agree
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    for g, g_ref in zip(torch.autograd.grad(ours, (pred, target)), torch.autograd.grad(ref, (pred, target))):
        scale = g_ref.abs().max()
        assert scale > 0
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5 * scale.item())


def test_anticorrelated_pair_has_no_dead_zone():
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    pred = (1 - x).requires_grad_(True)
    ref = ReferenceMSSSIMLoss()(pred, x)
    (g_ref,) = torch.autograd.grad(ref, pred)
    assert ref.item() == 1.0 and not g_ref.any()  # pytorch-msssim: flat, nothing to learn
    loss = MSSSIMLoss()(pred, x)
    (g,) = torch.autograd.grad(loss, pred)
    assert 0.99 < loss.item() < 1.0
    assert torch.isfinite(g).all() and g.abs().max() > 0
    # The gradient is informative: a small step along it raises MS-SSIM.
    with torch.no_grad():
        assert MSSSIMLoss()(pred - 1e-2 * g / g.abs().max(), x) < loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_and_gradient_are_finite_for_degenerate_images(dtype):
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    cases = {
        "constant": (torch.full_like(x, 0.5), x),
        "all zero": (torch.zeros_like(x), torch.zeros_like(x)),
        "all one": (torch.ones_like(x), torch.ones_like(x)),
        "zero vs image": (torch.zeros_like(x), x),
        "anti-correlated": (1 - x, x),
        "saturated": ((x * 50 - 25).clamp(0, 1), x),
        "far out of range": (x * 300 - 150, x),
    }
    for name, (pred, target) in cases.items():
        pred = pred.to(dtype).requires_grad_(True)
        loss = MSSSIMLoss()(pred, target.to(dtype))
        (g,) = torch.autograd.grad(loss, pred)
        assert loss.dtype == torch.float32, name
        assert torch.isfinite(loss) and 0 <= loss.item() <= 1, (name, loss)
        assert g.dtype == dtype and torch.isfinite(g).all(), name


def test_random_head_trains_from_the_first_step():
    """--no-zero-head: with memtrain's loss every parameter of a random U-Net gets a finite gradient at step one."""
    from conftest import phantom_batch, small_unet

    for size in (64,):  # 2048: benchmarks/loss.py (random head)
        model = small_unet("resnet18", zero_head=False)
        x, y = phantom_batch(size, n=2)
        loss = MSSSIMLoss()(model(x), y)
        loss.backward()
        assert 0 < loss.item() < 1
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert grads["segmentation_head.0.weight"].abs().max() > 0 and grads["encoder.conv1.weight"].abs().max() > 0


def _peaks(loss_fn, size, dtype=torch.float32):
    """Peak tensor bytes above the inputs in the loss's forward and in its backward, under fake tensors."""
    from memtrain.memory.estimate import loss_memory

    forward, _, backward = loss_memory(loss_fn, size, dtype)
    return forward, backward


@pytest.mark.parametrize("size", [2048, 4096])  # the sizes of the target; smaller images use a larger share per band
def test_peak_memory_is_a_few_images_and_far_below_pytorch_msssim(size):
    image = size * size * 4
    forward, backward = _peaks(MSSSIMLoss(), size)
    ref_forward, ref_backward = _peaks(ReferenceMSSSIMLoss(), size)
    assert forward <= 4 * image and backward <= 4 * image, (forward / image, backward / image)
    assert ref_forward > 15 * image and ref_backward > 10 * image  # what the reference holds (about 20x and 15x)
    assert forward * 5 < ref_forward and backward * 5 < ref_backward


def test_checkpointed_loss_recomputes_the_same_value_and_gradient():
    from memtrain.strategies import Environment, Plan

    pred, target = _random_pair((2, 1, 96, 96), torch.float32)
    pred.requires_grad_(True)
    plain = MSSSIMLoss()(pred, target)
    (g_plain,) = torch.autograd.grad(plain, pred)
    wrapped = Plan.resolve("checkpoint:full", Environment(device="cpu", native_bf16=False)).wrap_loss(MSSSIMLoss())
    loss = wrapped(pred, target)
    (g,) = torch.autograd.grad(loss, pred)
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(g, g_plain)


def test_metrics_msssim_is_pytorch_msssim_where_no_term_is_negative():
    pred, target = _random_pair((2, 1, 96, 96), torch.float32)
    got = image_metrics(pred, target)["msssim"]
    torch.testing.assert_close(got, ms_ssim(pred, target, data_range=1.0, win_size=window_for(96)), rtol=1e-5, atol=0)


def test_loss_registry_and_config_field_agree():
    from memtrain.config import LOSS_NAMES, FitConfig, from_dict

    assert tuple(LOSSES) == LOSS_NAMES
    assert FitConfig().loss == "msssim"
    assert isinstance(build_loss("msssim"), MSSSIMLoss) and isinstance(build_loss("msssim:reference"), ReferenceMSSSIMLoss)
    assert from_dict({"loss": "msssim:reference"}, "x.yaml").loss == "msssim:reference"
    with pytest.raises(ConfigError, match=re.escape("x.yaml: loss: expected one of msssim, msssim:reference, got 'ssim'")):
        from_dict({"loss": "ssim"}, "x.yaml")
    with pytest.raises(ConfigError, match="--loss ssim: expected one of"):
        build_loss("ssim")


@pytest.mark.slow
def test_fit_never_reports_a_flat_loss_and_reference_loss_still_runs(tmp_path):
    """`memtrain fit --strategies momentum --size 256` (ResNet34, zero head): pytorch-msssim's loss is flat at 1.0 from step 2, memtrain's trains.

    One step per epoch, so metrics.csv's per-epoch train_loss is each step's loss.
    """
    from conftest import ROOT, run_cli

    args = ["fit", "--config", str(ROOT / "configs" / "ci-tiny.yaml"), "--encoder", "resnet34", "--strategies", "momentum", "--size", "256"]
    args += ["--train-images", "2", "--val-images", "2", "--epochs", "3", "--max-steps", "3", "--samples", "0", "--no-memory"]
    losses = {}
    for name, extra in (("msssim", ["--val-every", "10"]), ("msssim:reference", ["--val-every", "3", "--loss", "msssim:reference"])):
        out = tmp_path / name.replace(":", "_")
        proc = run_cli(*args, *extra, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
        with (out / "metrics.csv").open() as f:
            losses[name] = [float(r["train_loss"]) for r in csv.DictReader(f)]
        assert yaml.safe_load((out / "config.yaml").read_text())["loss"] == name
    assert len(losses["msssim"]) == 3
    assert all(0 < v < 1.0 for v in losses["msssim"]), losses
    assert losses["msssim"][-1] < losses["msssim"][0]
    assert 1.0 in losses["msssim:reference"][1:], losses  # the defect the default loss removes
    ckpt = torch.load(tmp_path / "msssim_reference" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["memtrain"]["config"]["loss"] == "msssim:reference"


def test_step_estimate_accounts_for_the_chosen_loss():
    """`plan`, `compare` and `--strategies auto` estimate through TrainStep: the loss named in the config is the one measured."""
    from memtrain.memory.estimate import measure_step

    size = 512  # big enough for the loss to top the forward phase
    ours, ref = (measure_step("none", size=size, encoder="resnet18", loss=name, blocks=False, steps=1) for name in LOSSES)
    # The reference's ~20x-image forward transient tops the forward phase; memtrain's does not.
    assert ref.peak("forward") - ours.peak("forward") > 8 * size * size * 4

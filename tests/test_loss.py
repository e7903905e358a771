"""The loss: 1 − MS-SSIM in float32 whatever the autocast state; window adaptation for small images."""

from __future__ import annotations

import pytest
import torch
from pytorch_msssim import ms_ssim

from memtrain.errors import ConfigError
from memtrain.loss import MSSSIMLoss, image_metrics, window_for


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
    MSSSIMLoss()(x, x.clone())  # pytorch-msssim accepts it


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

"""Training loss: 1 − MS-SSIM (pytorch-msssim), always evaluated in float32.

MS-SSIM is a product of powers of small differences; in bfloat16 its gradient is badly
wrong (cosine ≈ 0.74 to the float32 gradient) and in float16 it overflows. The loss
therefore disables autocast and upcasts its inputs, whatever precision the model ran in.

Five scales with an 11-px Gaussian window need images larger than 160 px. Smaller
images keep all five scales and shrink the window to the largest odd size that fits
(9 at 150 px, 3 at 64 px); at 32 px or less no window fits and the loss raises.
"""

from __future__ import annotations

import torch
from pytorch_msssim import ms_ssim, ssim
from torch import nn

from memtrain.errors import ConfigError

LEVELS = 5
DEFAULT_WINDOW = 11


def window_for(side: int) -> int:
    """Largest odd Gaussian window ≤ 11 for which five MS-SSIM scales fit in ``side`` pixels."""
    # pytorch-msssim requires side > (win - 1) * 2**(levels - 1).
    win = min(DEFAULT_WINDOW, (side - 1) // 2 ** (LEVELS - 1) + 1)
    if win % 2 == 0:
        win -= 1
    if win < 3:
        raise ConfigError(f"--size {side}: too small for 5-scale MS-SSIM (needs more than {2 * 2 ** (LEVELS - 1)} px)")
    return win


class MSSSIMLoss(nn.Module):
    """``1 - MS-SSIM(pred, target)`` with ``data_range=1``, in float32 with autocast disabled."""

    def __init__(self, data_range: float = 1.0) -> None:
        super().__init__()
        self.data_range = data_range

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            win = window_for(min(pred.shape[-2:]))
            return 1.0 - ms_ssim(pred.float(), target.float(), data_range=self.data_range, win_size=win)


@torch.no_grad()
def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch means of MS-SSIM, SSIM and PSNR (dB) for [0, 1] images, computed in float32."""
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        win = window_for(min(pred.shape[-2:]))
        mse = torch.mean((pred.clamp(0, 1) - target) ** 2, dim=(1, 2, 3)).clamp_min(1e-12)
        return {
            "msssim": ms_ssim(pred, target, data_range=1.0, win_size=win),
            "ssim": ssim(pred.clamp(0, 1), target, data_range=1.0, win_size=win),
            "psnr": (10 * torch.log10(1.0 / mse)).mean(),
        }

"""Training loss: 1 − MS-SSIM, memtrain's own implementation (default) or pytorch-msssim's (``msssim:reference``).

**Definition.** Both compute the MS-SSIM of pytorch-msssim 1.0.0 (Wang et al. 2003): a Gaussian
window of 11 px with σ 1.5, K = (0.01, 0.03), ``data_range`` 1, five scales with weights
(0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2× average pooling (padding ``side % 2``) between scales,
'valid' filtering, the per-image mean of the contrast–structure map ``cs`` at scales 1–4 and of the
SSIM map at scale 5, the product of their powers, and the mean over the batch.

**No dead zone.** pytorch-msssim passes each scale's term through ReLU: a term ≤ 0 makes the product,
and its gradient, exactly 0 — the loss is 1.0 and the step teaches nothing. memtrain passes each term
``t`` through a C¹, positive, increasing map instead::

    f(t) = t                                  for t ≥ ε
    f(t) = ε · (1 + (ε − t)/(kε))^(−k)        for t < ε      (ε = 1e-6, k = 0.1: value ε, slope 1 at t = ε)

Where every term is ≥ ε, value and gradient equal pytorch-msssim's. ε is that small on purpose: the
zero-initialised head's first outputs have a coarsest-scale SSIM term of about 1e-5 (its luminance
part is C1/μ²), and there memtrain's loss must still be the paper's. Below ε the tail decays like a
power, ``f ≈ ε·(kε/|t|)^k``, so ``d log f / dt = k / (kε + ε − t)`` ≈ k/|t| stays of the order of the
positive terms' 1/t, and MS-SSIM ≥ ε·(kε)^k ≈ 2e-7 for terms ≥ −1: the loss stays below 1.0 in
float32 and its gradient raises the negative scale's term. ``k = 1`` (``ε²/(2ε − t)``) or an exponential
tail ``ε·exp((t − ε)/ε)`` would also be C¹, but they fall like ε²/|t| or faster: with an ε small
enough for the zero-head start, a few negative scales multiply to below float32's resolution at
1.0 (or underflow), and the flat 1.0 comes back.

**Precision.** Statistics are computed in float32 whatever the input's dtype (float64 inputs stay
float64), with autocast disabled; bf16 and fp16 inputs are upcast one band of rows at a time. The
per-image sums are accumulated in float64.

**Memory.** :class:`_MSSSIMTerms` is an autograd Function that keeps none of the filtered maps.
It filters each scale in bands of rows (a halo of ``win − 1`` rows), the five maps
(X, Y, X², Y², XY) in one grouped convolution per 1-D pass of the separable Gaussian, and sums each
band's ``cs``/SSIM map per image. When an input needs a gradient, the same pass forms the gradient of
each scale's per-image sum with respect to that scale's image (analytically, through the transposed
filter) and keeps it: one image-sized float32 tensor per scale, 4/3 of a float32 image in all. Its
backward only scales them by the per-image weights of the product and sums them fine-wards through
the average-pool adjoint. Peak bytes above the inputs are measured by ``benchmarks/loss.py``.

**Small images.** Five scales with an 11-px window need images larger than 160 px. Smaller images
keep all five scales and shrink the window to the largest odd size that fits (9 at 150 px, 3 at
64 px); at 32 px or less no window fits and the loss raises.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as reference_ms_ssim
from pytorch_msssim import ssim
from torch import nn

from memtrain.errors import ConfigError

LEVELS = 5
DEFAULT_WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
EPS = 1e-6  # below it a scale's term follows the power tail of the positive map (see the module docstring)
TAIL = 0.1  # k of the tail: d log f / dt = k / (kε + ε − t), ~k/|t| for negative terms
# Bands of rows per scale, a fixed number at every image size: each band is a fixed fraction of its scale
# (1/8 of the full-resolution image), so every tensor the loss makes has sides linear in the image side and
# the same sequence of them at every size. `memtrain plan` relies on that to extrapolate a step's memory from
# small sizes (memtrain.memory.scaling). A band needs more rows than the window's halo; smaller scales get fewer bands.
BANDS = (8, 4, 2, 1, 1)


def _bands(h: int, halo: int, level: int) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` of the input rows of one scale, BANDS[level] of them (fewer when a band would not exceed ``halo``)."""
    n = BANDS[min(level, len(BANDS) - 1)]
    while n > 1 and h // n <= halo:
        n //= 2
    edges = [round(j * h / n) for j in range(n + 1)]
    return list(itertools.pairwise(edges))


def window_for(side: int) -> int:
    """Largest odd Gaussian window ≤ 11 for which five MS-SSIM scales fit in ``side`` pixels."""
    # pytorch-msssim requires side > (win - 1) * 2**(levels - 1).
    win = min(DEFAULT_WINDOW, (side - 1) // 2 ** (LEVELS - 1) + 1)
    if win % 2 == 0:
        win -= 1
    if win < 3:
        raise ConfigError(f"--size {side}: too small for 5-scale MS-SSIM (needs more than {2 * 2 ** (LEVELS - 1)} px)")
    return win


def _gauss(win: int, dtype: torch.dtype, device) -> torch.Tensor:
    # Built as pytorch-msssim builds it (float32, then cast) so both filter with the same numbers.
    coords = torch.arange(win, dtype=torch.float) - win // 2
    g = torch.exp(-(coords**2) / (2 * SIGMA**2))
    return (g / g.sum()).to(device=device, dtype=dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _pool(x: torch.Tensor, dtype: torch.dtype, level: int) -> torch.Tensor:
    """pytorch-msssim's 2× average pool (padding ``side % 2``) of ``x`` upcast to ``dtype``; upcast in bands of rows where it can."""
    h, w = x.shape[-2:]
    pad = (h % 2, w % 2)
    if x.dtype == dtype or h % 2:
        return F.avg_pool2d(x.to(dtype), 2, padding=pad)
    out = x.new_empty((*x.shape[:-2], h // 2, (w + 2 * pad[1] - 2) // 2 + 1), dtype=dtype)
    for r0, r1 in _bands(h // 2, 0, level):
        r0, r1 = 2 * r0, 2 * r1
        out[..., r0 // 2 : r1 // 2, :] = F.avg_pool2d(x[..., r0:r1, :].to(dtype), 2, padding=(0, pad[1]))
    return out


def _unpool_add_(acc: torch.Tensor, g: torch.Tensor) -> None:
    """``acc += avg_pool2d``'s adjoint applied to ``g`` (the gradient of the image ``acc`` was pooled into), in place.

    Pixel r of a side with padding p (= side % 2) sits in pooled pixel (r + p) // 2 and every pooled pixel averages 4 (padding
    included), so each of the four row/column phases is one strided ``add_``: no upsampled copy.
    """
    h, w = acc.shape[-2:]
    ph, pw = h % 2, w % 2
    for r0 in (0, 1):
        rows = range(r0, h, 2)
        i0 = (r0 + ph) // 2
        for c0 in (0, 1):
            cols = range(c0, w, 2)
            j0 = (c0 + pw) // 2
            acc[..., r0::2, c0::2].add_(g[..., i0 : i0 + len(rows), j0 : j0 + len(cols)], alpha=0.25)


def _scale_pass(x, y, window, c1, c2, *, level: int, last: bool, grad_x: bool, grad_y: bool):
    """One scale: per-image sums of the cs map (or, ``last``, of the SSIM map), and their gradients w.r.t. x and y.

    ``x``/``y`` may be of a lower precision than ``window`` (the compute dtype); bands are upcast one at a time.
    """
    n, c, h, w = x.shape
    win = window.numel()
    dtype = window.dtype
    ho = h - win + 1
    kv = window.view(1, 1, win, 1)
    kh = window.view(1, 1, 1, win)
    sums = torch.zeros(n, c, dtype=torch.float64, device=x.device)
    gx = torch.zeros(n, c, h, w, dtype=dtype, device=x.device) if grad_x else None
    gy = torch.zeros(n, c, h, w, dtype=dtype, device=x.device) if grad_y else None
    # Band j covers output rows [r0, min(r1, ho)) and reads input rows [r0, min(r1, ho) + win - 1).
    for o0, o1 in _bands(h, win - 1, level):
        o1 = min(o1, ho)
        if o1 <= o0:
            continue
        xb = x[:, :, o0 : o1 + win - 1].to(dtype)
        yb = y[:, :, o0 : o1 + win - 1].to(dtype)
        maps = torch.cat([xb, yb, xb * xb, yb * yb, xb * yb], dim=1)
        filt = F.conv2d(maps, kv.expand(5 * c, 1, win, 1), groups=5 * c)
        del maps
        filt = F.conv2d(filt, kh.expand(5 * c, 1, 1, win), groups=5 * c)
        mu1, mu2, e11, e22, e12 = filt.split(c, dim=1)
        mu1_sq, mu2_sq, mu1_mu2 = mu1.pow(2), mu2.pow(2), mu1 * mu2
        den = (e11 - mu1_sq) + (e22 - mu2_sq) + c2
        cs = (2 * (e12 - mu1_mu2) + c2) / den
        if last:
            lden = mu1_sq + mu2_sq + c1
            lum = (2 * mu1_mu2 + c1) / lden
            m = lum * cs
        else:
            m = cs
        sums += m.sum(dim=(2, 3), dtype=torch.float64)
        if not (grad_x or grad_y):
            continue
        # d m / d(mu1, mu2, E[x²], E[y²], E[xy]) — see the derivation in tests/test_loss.py's gradient checks.
        inv = 1.0 / den
        parts = []
        if last:
            d_e = -m * inv  # d m / d E[x²] (= d E[y²])
            d_exy = 2 * lum * inv
            if grad_x:
                parts.append(cs * 2 * (mu2 - mu1 * lum) / lden + lum * (2 * mu1 * cs - 2 * mu2) * inv)
            if grad_y:
                parts.append(cs * 2 * (mu1 - mu2 * lum) / lden + lum * (2 * mu2 * cs - 2 * mu1) * inv)
        else:
            d_e = -cs * inv
            d_exy = 2 * inv
            if grad_x:
                parts.append((2 * mu1 * cs - 2 * mu2) * inv)
            if grad_y:
                parts.append((2 * mu2 * cs - 2 * mu1) * inv)
        del filt, mu1, mu2, e11, e22, e12, mu1_sq, mu2_sq, mu1_mu2, den, cs, m, inv
        parts += [d_e, d_exy]
        k = len(parts)
        d = torch.cat(parts, dim=1)
        del parts, d_e, d_exy
        d = F.conv_transpose2d(d, kv.expand(k * c, 1, win, 1), groups=k * c)
        d = F.conv_transpose2d(d, kh.expand(k * c, 1, 1, win), groups=k * c)
        t_e, t_exy = d[:, (k - 2) * c : (k - 1) * c], d[:, (k - 1) * c :]
        if grad_x:
            gx[:, :, o0 : o1 + win - 1] += d[:, :c] + 2 * xb * t_e + yb * t_exy
        if grad_y:
            gy[:, :, o0 : o1 + win - 1] += d[:, (k - 3) * c : (k - 2) * c] + 2 * yb * t_e + xb * t_exy
    return sums, gx, gy


class _MSSSIMTerms(torch.autograd.Function):
    """Per-image means of the cs maps of scales 1–4 and of the SSIM map of scale 5: a (5, N, C) float64 tensor.

    Keeps no filtered map: its forward forms each scale's gradient (per unit of the term) while it filters, and its
    backward weighs and pools them. See the module docstring.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, win: int, data_range: float, grad_enabled: bool) -> torch.Tensor:
        x_dtype, y_dtype = x.dtype, y.dtype
        dtype = _compute_dtype(x.dtype)
        window = _gauss(win, dtype, x.device)
        c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
        # needs_input_grad is True under no_grad too (checkpoint's first pass, validation): ask the caller's grad mode.
        grad_x, grad_y = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        terms, grads_x, grads_y, npix = [], [], [], []
        for level in range(LEVELS):
            last = level == LEVELS - 1
            s, gx, gy = _scale_pass(x, y, window, c1, c2, level=level, last=last, grad_x=grad_x, grad_y=grad_y)
            count = (x.shape[-2] - win + 1) * (x.shape[-1] - win + 1)
            terms.append(s / count)
            npix.append(count)
            grads_x.append(gx)
            grads_y.append(gy)
            if not last:
                x, y = _pool(x, dtype, level), _pool(y, dtype, level)
        ctx.npix = npix
        ctx.n_x, ctx.n_y = (LEVELS if grad_x else 0), (LEVELS if grad_y else 0)
        ctx.dtypes = (x_dtype, y_dtype)
        if grad_x or grad_y:
            ctx.save_for_backward(*(g for g in grads_x + grads_y if g is not None))
        return torch.stack(terms)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_terms: torch.Tensor):
        saved = list(ctx.saved_tensors)
        gxs, gys = saved[: ctx.n_x], saved[ctx.n_x :]
        out = []
        for grads, dtype in zip((gxs, gys), ctx.dtypes):
            if not grads:
                out.append(None)
                continue
            acc = None
            for level in reversed(range(LEVELS)):
                g = grads[level]
                g.mul_((grad_terms[level] / ctx.npix[level]).to(g.dtype)[:, :, None, None])
                if acc is not None:
                    _unpool_add_(g, acc)
                acc = g
            out.append(acc.to(dtype))
        return out[0], out[1], None, None, None


def _positive(t: torch.Tensor, eps: float | None = None, k: float | None = None) -> torch.Tensor:
    """The C¹ positive map: ``t`` for t ≥ ε, ``ε·(1 + (ε − t)/(kε))^(−k)`` below (see the module docstring)."""
    eps = EPS if eps is None else eps
    k = TAIL if k is None else k
    below = torch.minimum(t, t.new_tensor(eps))  # the unused branch stays finite (no NaN through torch.where)
    return torch.where(t >= eps, t, eps * (1 + (eps - below) / (k * eps)) ** (-k))


def ms_ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, win_size: int = DEFAULT_WINDOW) -> torch.Tensor:
    """memtrain's MS-SSIM of two (N, C, H, W) batches, the batch mean, in float32 (float64 for float64 inputs).

    Differentiable with respect to both inputs; never exactly 0 (see the module docstring).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ms_ssim: expected two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        terms = _MSSSIMTerms.apply(x, y, win_size, data_range, torch.is_grad_enabled())
        weights = torch.tensor(WEIGHTS, dtype=terms.dtype, device=terms.device).view(-1, 1, 1)
        value = torch.exp((weights * torch.log(_positive(terms))).sum(0)).mean()
        return value.to(_compute_dtype(x.dtype))


class MSSSIMLoss(nn.Module):
    """``1 − MS-SSIM(pred, target)`` (memtrain's: no dead zone, a few image-sizes of memory) with ``data_range=1``."""

    def __init__(self, data_range: float = 1.0) -> None:
        super().__init__()
        self.data_range = data_range

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        win = window_for(min(pred.shape[-2:]))
        return 1.0 - ms_ssim(pred, target, data_range=self.data_range, win_size=win)


class ReferenceMSSSIMLoss(nn.Module):
    """``1 − pytorch_msssim.ms_ssim(pred, target)`` in float32 with autocast disabled: the paper's exact loss (dead zone included)."""

    def __init__(self, data_range: float = 1.0) -> None:
        super().__init__()
        self.data_range = data_range

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=pred.device.type, enabled=False):
            win = window_for(min(pred.shape[-2:]))
            return 1.0 - reference_ms_ssim(pred.float(), target.float(), data_range=self.data_range, win_size=win)


# The loss registry: the config's ``loss`` names one of these; build_loss is the one place a loss is built.
LOSSES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "msssim": (MSSSIMLoss, "memtrain's 1 − MS-SSIM: no dead zone, float32 statistics, ~4/3 of a float32 image held for backward"),
    "msssim:reference": (
        ReferenceMSSSIMLoss,
        "pytorch-msssim's 1 − MS-SSIM (the paper's exact loss): zero gradient when a scale's term is ≤ 0, ~20× the image",
    ),
}
DEFAULT_LOSS = "msssim"


def build_loss(name: str = DEFAULT_LOSS) -> nn.Module:
    """The loss module named ``name`` (a key of :data:`LOSSES`); ConfigError naming ``--loss`` otherwise."""
    if name not in LOSSES:
        raise ConfigError(f"--loss {name}: expected one of {', '.join(LOSSES)}")
    return LOSSES[name][0]()


@torch.no_grad()
def image_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-batch means of MS-SSIM, SSIM and PSNR (dB) for [0, 1] images, computed in float32.

    MS-SSIM is memtrain's (equal to pytorch-msssim's wherever every scale's term is ≥ 1e-6); SSIM is pytorch-msssim's.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        win = window_for(min(pred.shape[-2:]))
        mse = torch.mean((pred.clamp(0, 1) - target) ** 2, dim=(1, 2, 3)).clamp_min(1e-12)
        return {
            "msssim": ms_ssim(pred, target, data_range=1.0, win_size=win),
            "ssim": ssim(pred.clamp(0, 1), target, data_range=1.0, win_size=win),
            "psnr": (10 * torch.log10(1.0 / mse)).mean(),
        }


__all__ = ["DEFAULT_LOSS", "LOSSES", "MSSSIMLoss", "ReferenceMSSSIMLoss", "build_loss", "image_metrics", "ms_ssim", "window_for"]

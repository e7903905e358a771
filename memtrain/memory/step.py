"""The training step of `memtrain fit`, in plain PyTorch, with phase marks — for estimates, sweeps and benchmarks.

It does what :class:`memtrain.loop.module.EnhancementModule` under Lightning's
automatic optimization does, in the same order, so its memory is the fit's memory:

* ``forward``: under the precision plugin's autocast, the model under the plan's forward
  context, then the loss (``loss``, a name of :data:`memtrain.loss.LOSSES`; 1 − MS-SSIM in
  float32) — :meth:`memtrain.loop.placement.LocalPlacement.forward_loss`, the fit's own code;
  then ``zero_grad(set_to_none=True)`` — Lightning
  zeroes gradients *after* the training step and before backward, so the previous
  step's gradients are still alive during the forward;
* ``backward``: ``loss.backward()`` (scaled by the GradScaler for fp16);
* ``optimizer``: Adam's step (through the GradScaler for fp16).

Adam uses its ``foreach`` implementation on CUDA and the per-parameter loop on CPU,
as PyTorch picks by default; ``foreach`` forces one (estimates for a CUDA target run
on CPU fake tensors and must use CUDA's choice).
"""

from __future__ import annotations

import torch

from memtrain.config import ModelConfig
from memtrain.loop.placement import LOCAL
from memtrain.loss import build_loss
from memtrain.model import build_model


class TrainStep:
    """Model, loss (named ``loss``) and Adam of one run under ``plan``, on ``device``; call it once per step."""

    def __init__(
        self,
        plan,
        *,
        model_cfg: ModelConfig | None = None,
        loss: str = "msssim",
        device: torch.device | str = "cpu",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        scaler: bool = True,
    ) -> None:
        self.plan = plan
        self.device = torch.device(device)
        self.model = plan.apply(build_model(model_cfg or ModelConfig()))
        if any(p.device != self.device for p in self.model.parameters()):
            self.model.to(self.device)
        self.loss_fn = plan.wrap_loss(build_loss(loss))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=weight_decay, foreach=foreach)
        precision = plan.precision()
        self.autocast = precision.autocast  # what Lightning's precision plugin enters around the forward
        self.scaler = precision.grad_scaler() if scaler else None

    def __call__(self, tracker, x: torch.Tensor, y: torch.Tensor, *, step: int | None = None) -> torch.Tensor:
        """One training step recorded by ``tracker``; returns the (detached) loss."""
        model, optimizer = self.model, self.optimizer
        with tracker.step(model, optimizer, (x, y), step=step):
            with tracker.phase("forward"):
                with self.autocast():
                    loss = LOCAL.forward_loss(model, self.loss_fn, x, y, self.plan.forward_context)
                optimizer.zero_grad(set_to_none=True)
            with tracker.phase("backward"):
                LOCAL.backward(self.scaler.scale(loss) if self.scaler is not None else loss)
            with tracker.phase("optimizer"):
                if self.scaler is not None:
                    self.scaler.step(optimizer)
                    self.scaler.update()
                else:
                    optimizer.step()
        return loss.detach()

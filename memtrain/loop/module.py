"""The LightningModule: one image-to-image model, its loss, its strategies and its metrics."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from memtrain.config import TrainConfig
from memtrain.loop.optim import build_optimizer
from memtrain.loss import DEFAULT_LOSS, build_loss, image_metrics
from memtrain.strategies import Plan


class EnhancementModule(L.LightningModule):
    """Trains ``model`` (already transformed by ``plan``) to map radiographs to their enhancement.

    Validation logs, for the model and for the identity map (input taken as the
    output), ``loss`` (1 − MS-SSIM), ``msssim``, ``ssim`` and ``psnr``: the identity row
    is the bar a model has to clear to have learned anything.
    """

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        train_cfg: TrainConfig,
        *,
        loss: str = DEFAULT_LOSS,
        samples: int = 0,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.train_cfg = train_cfg
        self.loss_fn = plan.wrap_loss(build_loss(loss))
        self.n_samples = samples
        self.config = config or {}
        self.sample_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        with self.plan.forward_context():
            out = self.model(x)
        loss = self.loss_fn(out, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.model(x)
        loss = self.loss_fn(out, y)
        model_m = image_metrics(out, y)
        ident_m = image_metrics(x, y)
        n = x.shape[0]
        self.log("val_loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("val_msssim", 1.0 - loss, batch_size=n, sync_dist=True)
        self.log("val_ssim", model_m["ssim"], batch_size=n, sync_dist=True)
        self.log("val_psnr", model_m["psnr"], prog_bar=True, batch_size=n, sync_dist=True)
        self.log("identity_loss", 1.0 - ident_m["msssim"], batch_size=n, sync_dist=True)
        self.log("identity_msssim", ident_m["msssim"], batch_size=n, sync_dist=True)
        self.log("identity_ssim", ident_m["ssim"], batch_size=n, sync_dist=True)
        self.log("identity_psnr", ident_m["psnr"], batch_size=n, sync_dist=True)
        self._keep_samples(x, y, out)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.sample_batch = None

    def _keep_samples(self, x, y, out) -> None:
        have = 0 if self.sample_batch is None else self.sample_batch[0].shape[0]
        take = min(self.n_samples - have, x.shape[0])
        if take <= 0:
            return
        new = tuple(t[:take].detach().float().cpu() for t in (x, y, out))
        self.sample_batch = new if self.sample_batch is None else tuple(torch.cat([a, b]) for a, b in zip(self.sample_batch, new))

    def configure_optimizers(self):
        optimizer, scheduler = build_optimizer(self.model.parameters(), self.train_cfg)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Enough to rebuild the model for inference without this run's code state.
        checkpoint["memtrain"] = {"config": self.config, "strategies": self.plan.specs}

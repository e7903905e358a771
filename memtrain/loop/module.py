"""The LightningModule: one image-to-image model, its loss, its strategies and its metrics."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn

from memtrain.config import TrainConfig
from memtrain.loop.placement import LOCAL, LocalPlacement
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
        placement: LocalPlacement = LOCAL,
    ) -> None:
        super().__init__()
        self.model = model
        self.plan = plan
        self.placement = placement
        self.train_cfg = train_cfg
        self.loss_fn = plan.wrap_loss(build_loss(loss))
        self.n_samples = samples
        self.config = config or {}
        self.sample_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.placement.forward_loss(self.model, self.loss_fn, x, y, self.plan.forward_context)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        return loss

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        # Lightning's hook for the backward of training_step's loss (after the precision plugin scaled it).
        self.placement.backward(loss, *args, **kwargs)

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
        optimizer, scheduler = self.placement.optimizers(self.model, self.train_cfg)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Enough to rebuild the model for inference without this run's code state.
        checkpoint["memtrain"] = {"config": self.config, "strategies": self.plan.specs}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resumed with another --epochs: the cosine schedule continues over the new length
        # (T_max = the new number of epochs, at the checkpoint's epoch), instead of the saved one.
        epochs = max(1, self.train_cfg.epochs)
        for i, sched in enumerate(checkpoint.get("lr_schedulers") or []):
            if self.train_cfg.scheduler != "cosine" or "T_max" not in sched or sched["T_max"] == epochs:
                continue
            t, eta = int(sched["last_epoch"]), float(sched.get("eta_min", 0.0))
            lrs = [eta + (float(b) - eta) * (1 + math.cos(math.pi * min(t, epochs) / epochs)) / 2 for b in sched["base_lrs"]]
            old = sched["T_max"]
            sched["T_max"], sched["_last_lr"] = epochs, lrs
            for group, lr in zip(checkpoint["optimizer_states"][i]["param_groups"], lrs):
                group["lr"] = lr
            print(
                f"memtrain: resumed with --epochs {epochs} (was {old}): the cosine schedule continues over {epochs} epochs, lr {lrs[0]:.6g} at epoch {t}",
                flush=True,
            )

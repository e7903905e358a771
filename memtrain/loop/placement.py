"""The placement axis of the loop: where the model's step runs, declared once with this process as the default.

memtrain has one training loop (Lightning's, driven by :class:`memtrain.loop.module.EnhancementModule`)
and one step: forward under the plan's contexts, loss, backward, optimizer step. What differs
between placements is *where* each part runs, and that is all a placement declares:

* :meth:`LocalPlacement.forward_loss` — the model's forward and the loss (default: the model in
  this process, under the plan's forward context);
* :meth:`LocalPlacement.backward` — the backward of that loss (default: ``loss.backward()``);
* :meth:`LocalPlacement.optimizers` — the optimizer and schedule Lightning steps (default: Adam
  over the model's parameters), whose ``step(closure)`` runs the step;
* :meth:`LocalPlacement.precision_plugins` — Lightning's side of the precision axis in this
  process (default: the plan's declared :class:`~memtrain.strategies.base.Precision`);
* :meth:`LocalPlacement.callbacks` — what else the run's process records (default: nothing).

The model-parallel placements (rpc, pipeline: :mod:`memtrain.distributed.sharded`) override
these to drive shards on other processes from rank 0, inside the same Lightning loop, so data
order, seeding, validation, ``--max-steps``, metrics, samples and checkpoints are the same code
in every placement. Data parallel (ddp) keeps every default: it changes how Lightning launches
and reduces, not the step. :class:`memtrain.memory.step.TrainStep` (estimates, ``compare``) runs
the same ``forward_loss`` and ``backward``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from memtrain.config import TrainConfig
from memtrain.loop.optim import build_optimizer
from memtrain.strategies.base import Precision


class LocalPlacement:
    """The whole model in this process: every hook is the plain single-process step."""

    def forward_loss(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        forward_context: Callable[[], AbstractContextManager],
    ) -> torch.Tensor:
        """The model's output for ``x`` under ``forward_context``, and its loss against ``y``."""
        with forward_context():
            out = model(x)
        return loss_fn(out, y)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        """Backpropagate ``loss`` (already scaled by the precision plugin where it scales)."""
        loss.backward(*args, **kwargs)

    def optimizers(self, model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The optimizer Lightning steps, and its per-epoch schedule (None for none)."""
        return build_optimizer(model.parameters(), cfg)

    def precision_plugins(self, precision: Precision) -> list:
        """Lightning plugins applying ``precision`` to this process's forward, backward and optimizer step."""
        # lazy (startup): Lightning loads only where a trainer is built; memory estimates import this module too (memory.step)
        from memtrain.loop.precision import lightning_plugins

        return lightning_plugins(precision)

    def callbacks(self) -> list:
        """Lightning callbacks this placement adds to the run (none here)."""
        return []


LOCAL = LocalPlacement()

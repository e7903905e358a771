"""Rank 0 of a model-parallel run (rpc, pipeline): the single-process Lightning run, with the shards as its model.

There is one training loop in memtrain, Lightning's, driving
:class:`memtrain.loop.module.EnhancementModule`. A model-parallel run does not get a second
one: rank 0 runs exactly the run ``memtrain fit`` runs in one process — the same
:class:`~memtrain.loop.fit.LightningRunner`, data module (data order from ``--seed`` and the
epoch, resumable mid-epoch), validation, ``--max-steps``, ``metrics.csv``, samples and
checkpoints — and only the placement differs (:class:`memtrain.loop.placement.LocalPlacement`'s
hooks, overridden here):

* the model is a :class:`ShardedModel`: rank 0's stand-in for the U-Net whose encoder and
  decoder live on other processes. Its ``state_dict`` is the shards' states merged under the
  plain model's keys, and loading one scatters it, so Lightning's checkpoints of a
  model-parallel run are single-process checkpoints (and either kind resumes in either
  placement); its train/eval mode reaches the shards (BatchNorm); its forward is inference.
* the optimizer is a :class:`ShardOptimizer`: its ``step(closure)`` is the step. It opens the
  engine's step context (rpc: a distributed-autograd context), runs Lightning's closure
  (training step and backward, through the placement's ``forward_loss`` and ``backward``) and
  has every shard step its own Adam at this optimizer's learning rate. The learning-rate
  schedule is Lightning's, on this optimizer (one schedule, not one per shard); its
  ``state_dict`` is the shards' Adam states merged into the single-process layout.

Why inside Lightning rather than a loop of memtrain's own: users keep everything Lightning gives
single-process training (progress bar, callbacks, SIGTERM handling, checkpoints and resume),
and a model-parallel run cannot drift from ``memtrain fit`` in data order, seeding,
validation or metrics, because that code is not written twice. What Lightning cannot see —
the shards' own step and memory — is behind the engine (:class:`ShardEngine`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch import nn

from memtrain.config import FitConfig, TrainConfig
from memtrain.distributed.memory import earlier_rows, format_rank_table, memory_file, summarize_ranks, write_rank_files
from memtrain.loop.fit import LightningRunner
from memtrain.loop.optim import build_scheduler
from memtrain.loop.placement import LocalPlacement
from memtrain.strategies.base import Precision


class ShardEngine(Protocol):
    """Rank 0's handle on the shards of a model-parallel run (implemented by rpc's and pipeline's engines)."""

    #: Global step number the shards' memory records carry; set before every step.
    step: int

    def step_context(self) -> contextlib.AbstractContextManager:
        """Around one whole step (Lightning's closure and the optimizer step)."""

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor, loss_fn) -> torch.Tensor:
        """The training forward of the batch through the shards, and its loss."""

    def backward(self, loss: torch.Tensor) -> None:
        """The backward of ``forward_loss``'s loss through the shards."""

    def optimizer_step(self, lr: float) -> None:
        """Every shard steps its optimizer at ``lr`` and drops its gradients."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Inference (no grad, eval-mode BatchNorm), float32."""

    def set_training(self, mode: bool) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shards' module states merged under the plain model's keys (CPU tensors)."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def optimizer_state(self) -> dict[str, Any]:
        """The shards' optimizer states merged into the single-process optimizer's layout."""

    def load_optimizer_state(self, state: dict[str, Any]) -> None: ...

    def memory_records(self) -> list:
        """Every rank's phase records (:class:`memtrain.distributed.memory.RankRecords`)."""


class ShardedModel(nn.Module):
    """Rank 0's stand-in for a model whose shards live on other processes; it holds no parameters."""

    def __init__(self, engine: ShardEngine) -> None:
        super().__init__()
        self.engine = engine
        self._shards_training: bool | None = None  # the mode last sent to the shards

    def sync_mode(self) -> None:
        """Send this module's train/eval mode to the shards (BatchNorm) if it changed since the last time.

        Checked at every use rather than in ``train()``: Lightning restores modes after validation by
        setting ``.training`` directly, which no override of ``train()`` would see.
        """
        if self._shards_training is not self.training:
            self.engine.set_training(self.training)
            self._shards_training = self.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Inference only: a training step goes through the placement (forward_loss), which the engine runs.
        self.sync_mode()
        return self.engine.predict(x)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
        destination = {} if destination is None else destination
        for key, value in self.engine.state_dict().items():
            destination[prefix + key] = value
        return destination

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        self.engine.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})


class ShardOptimizer(torch.optim.Optimizer):
    """The optimizer Lightning steps on rank 0: one step of every shard's own Adam, at this optimizer's learning rate.

    It holds no parameters (one empty parameter group carries the learning rate the schedule sets).
    """

    def __init__(self, engine: ShardEngine, lr: float) -> None:
        self.engine = engine
        super().__init__([{"params": []}], {"lr": lr})

    def step(self, closure=None):
        with self.engine.step_context():
            loss = closure() if closure is not None else None
            self.engine.optimizer_step(float(self.param_groups[0]["lr"]))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing here: each shard drops its gradients right after its optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        state = self.engine.optimizer_state()
        # The schedule's entries (lr, initial_lr) are this optimizer's, as in one process.
        state["param_groups"][0].update({k: v for k, v in self.param_groups[0].items() if k != "params"})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.param_groups[0].update({k: v for k, v in state_dict["param_groups"][0].items() if k in ("lr", "initial_lr")})
        self.engine.load_optimizer_state(state_dict)


class ShardedPlacement(LocalPlacement):
    """The placement hooks of a model-parallel run, on rank 0: the step goes to the shards through ``engine``."""

    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine

    def forward_loss(self, model: ShardedModel, loss_fn, x, y, forward_context) -> torch.Tensor:
        # The shards enter the plan's forward context (and autocast) around their own forwards.
        model.sync_mode()
        return self.engine.forward_loss(x, y, loss_fn)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        self.engine.backward(loss)

    def optimizers(self, model: nn.Module, cfg: TrainConfig):
        optimizer = ShardOptimizer(self.engine, cfg.lr)
        return optimizer, build_scheduler(optimizer, cfg)

    def precision_plugins(self, precision: Precision) -> list:
        # The shards run their forwards and backwards under the plan's precision; rank 0 computes the loss,
        # which is float32 whatever the precision (memtrain.loss). Loss scaling is rejected for these placements.
        return []

    def callbacks(self) -> list:
        return [_StepNumber(self.engine)]


class _StepNumber(L.Callback):
    """Tells the engine the global step each batch trains (the shards' memory records carry it)."""

    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.engine.step = trainer.global_step


class RankMemoryFiles(L.Callback):
    """Every rank's phase records, gathered by rank 0 into ``memory.csv`` and ``memory.rank<R>.csv``.

    Written with every checkpoint (so a resumed run has the rows of every step before it), at every
    epoch end and at the end of the run, which also prints the per-rank summary.
    """

    def __init__(self, engine: ShardEngine, run_dir: Path, *, warmup_steps: int) -> None:
        self.engine = engine
        self.run_dir = Path(run_dir)
        self.warmup_steps = warmup_steps
        self._first_step = 0
        self._kept: dict[int, list[str]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self._first_step = trainer.global_step

    def _write(self) -> None:
        ranks = self.engine.memory_records()
        for rr in ranks:
            if rr.rank not in self._kept:
                self._kept[rr.rank] = earlier_rows(memory_file(self.run_dir, rr.rank), self._first_step)
        write_rank_files(self.run_dir, ranks, self._kept)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._write()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._write()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write()
        print(format_rank_table(summarize_ranks(self.run_dir, skip_steps=self.warmup_steps)), flush=True)


class ShardedRunner(LightningRunner):
    """Rank 0's run of a model-parallel strategy: :class:`LightningRunner` with the shards behind its placement."""

    def __init__(self, engine: ShardEngine, device: torch.device) -> None:
        self.engine = engine
        self.device = device
        self.placement = ShardedPlacement(engine)

    def build_model(self, cfg: FitConfig, plan) -> nn.Module:
        return ShardedModel(self.engine)

    def trainer_options(self, env) -> dict:
        # (No model summary: it would count the stand-in's parameters, none.)
        if self.device.type == "cuda":
            return {"accelerator": "gpu", "devices": [self.device.index], "enable_model_summary": False}
        return {"accelerator": "cpu", "devices": 1, "enable_model_summary": False}

    def memory_callback(self, tracker, run_dir: Path, cfg: FitConfig):
        return RankMemoryFiles(self.engine, run_dir, warmup_steps=cfg.memory.warmup_steps)

"""Lightning integration: per-phase memory of every training step, for any LightningModule.

Phase boundaries come from Lightning's hooks: ``forward`` runs from the start of the
batch to ``on_before_backward`` (training_step: model and loss, then Lightning's
``zero_grad``), ``backward`` to ``on_after_backward``, and ``optimizer`` to the end of
the batch (the optimizer step). Works with any LightningModule::

    trainer = L.Trainer(callbacks=[MemoryCallback(MemoryTracker(device), "memory.csv")])

Writes ``memory.csv`` (one row per step and phase, every backend's metrics) as it goes
and, with ``blocks_csv_path``, ``memory_blocks.csv`` (per block of the model: parameter
bytes and the activation bytes it holds at the end of the forward, the most over the
steps after warm-up).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from memtrain.memory.blocks import block_parameters, block_table, model_blocks
from memtrain.memory.report import blocks_csv, format_blocks, format_summary, write_records
from memtrain.memory.tracker import MemoryTracker
from memtrain.rundir import atomic_write_text


class MemoryCallback(L.Callback):
    """Tracks every training step with a :class:`MemoryTracker`; writes ``csv_path`` as it goes."""

    def __init__(
        self,
        tracker: MemoryTracker,
        csv_path: str | Path | None = None,
        *,
        blocks_csv_path: str | Path | None = None,
        warmup_steps: int = 1,
        print_summary: bool = True,
    ) -> None:
        self.tracker = tracker
        self.csv_path = Path(csv_path) if csv_path else None
        self.blocks_csv_path = Path(blocks_csv_path) if blocks_csv_path else None
        self._module = None
        self.warmup_steps = warmup_steps
        self.print_summary = print_summary
        self._earlier_rows: list[str] = []  # rows of the run being resumed, kept in memory.csv

    def on_train_start(self, trainer, pl_module) -> None:
        # On resume, keep the rows of steps that happened before the checkpoint.
        if self.csv_path is not None and self.csv_path.exists() and trainer.global_step > 0:
            lines = self.csv_path.read_text().splitlines()
            header = lines[0].split(",") if lines else []
            if "step" in header:
                col = header.index("step")
                self._earlier_rows = [ln for ln in lines[1:] if ln and int(ln.split(",")[col]) < trainer.global_step]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        optimizers = [getattr(o, "optimizer", o) for o in trainer.optimizers]
        self._module = pl_module
        self.tracker.start_step(trainer.global_step, pl_module, *optimizers, batch)
        self.tracker.begin("forward")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.tracker.begin("backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self.tracker.begin("optimizer")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tracker.end_step()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.tracker.close()
        self._write()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._write()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # The rows of every step a checkpoint covers are on disk before it is: a resume keeps them.
        self._write()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.tracker.close()
        self._write()
        if self.print_summary and trainer.is_global_zero:
            print(self.summary_table())
            blocks = self.block_rows()
            if blocks:
                print(format_blocks(blocks, top=8, title="activations held after the forward, top blocks (all in memory_blocks.csv)"))

    def _skip(self) -> int:
        steps = len({r.step for r in self.tracker.records})
        return self.warmup_steps if steps > self.warmup_steps else 0

    def summary_table(self) -> str:
        steps = len({r.step for r in self.tracker.records})
        skip = self._skip()
        backends = ", ".join(self.tracker.backend_names)
        title = f"peak memory per phase (max over {steps - skip} of {steps} steps; backends: {backends})"
        return format_summary(self.tracker.summary(skip), title, self.tracker.notes)

    def block_rows(self) -> list[dict[str, object]]:
        held = self.tracker.block_summary(self._skip())
        if not held or self._module is None:
            return []
        return block_table(held, block_parameters(self._module), list(model_blocks(self._module)))

    def _write(self) -> None:
        if self.csv_path is not None and self.tracker.records:
            write_records(self.csv_path, self.tracker.records, earlier_rows=self._earlier_rows)
        if self.blocks_csv_path is not None:
            rows = self.block_rows()
            if rows:
                atomic_write_text(self.blocks_csv_path, blocks_csv(rows))

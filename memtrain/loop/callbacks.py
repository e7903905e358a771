"""Lightning callbacks for what Lightning does not write itself: metrics.csv and sample images."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from memtrain.rundir import atomic_write_bytes, atomic_write_text

METRIC_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "val_msssim",
    "val_ssim",
    "val_psnr",
    "identity_loss",
    "identity_msssim",
    "identity_ssim",
    "identity_psnr",
    "epoch_seconds",
)


def format_metric(v: float | None) -> str:
    """A metric as written in ``metrics.csv`` (empty when not measured)."""
    return "" if v is None else f"{v:.6f}"


class MetricsFile:
    """``metrics.csv``: one row per epoch in ``METRIC_COLUMNS``, rewritten atomically after each row (:class:`MetricsCSV`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, str]] = []

    def resume(self, first_epoch: int) -> None:
        """Keep the rows of epochs before ``first_epoch`` (the ones the resumed checkpoint covers)."""
        self.rows = []
        if self.path.exists():
            with self.path.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < first_epoch]

    def add(self, row: dict[str, str], *, write: bool = True) -> None:
        self.rows.append(row)
        if write:
            self.write()

    def write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


class MetricsCSV(L.Callback):
    """One row per epoch in ``metrics.csv``: losses, image metrics (model and identity), lr, seconds.

    The row of an epoch is written as soon as it is complete — at the end of its
    validation, or at the end of its training when it has none — and before Lightning
    writes that point's checkpoint (checkpoint callbacks run last). The rows, the running
    training-loss sum of the current epoch and its elapsed seconds are also part of every
    checkpoint (:meth:`state_dict`), so a run resumed from any checkpoint, even one written
    mid-epoch, continues with exactly the rows and sums the checkpoint covers.

    ``lr`` is the learning rate the epoch trained with; ``train_loss`` the mean of its
    training losses weighted by batch size, over every process's images (data parallel:
    the replicas' sums are added up when the row is written; a run resumed mid-epoch
    keeps rank 0's part of the sums from before the resume); ``epoch_seconds`` its
    training and validation time, summed over the processes that ran it.
    """

    def __init__(self, path: str | Path) -> None:
        self.file = MetricsFile(path)
        self._t0 = time.perf_counter()
        self._before = 0.0  # seconds of this epoch spent before a resume
        self._loss_sum = 0.0
        self._seen = 0
        self._lr: float | None = None
        self._written: tuple[int, int] = (-1, -1)  # (epoch, step) of the last row written
        self._restored = False

    @property
    def path(self) -> Path:
        return self.file.path

    # -- checkpointed state ------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "rows": [dict(r) for r in self.file.rows],
            "elapsed": self._before + time.perf_counter() - self._t0,
            "loss_sum": self._loss_sum,
            "seen": self._seen,
            "lr": self._lr,
            "written": list(self._written),
        }

    def load_state_dict(self, state: dict) -> None:
        self.file.rows = [dict(r) for r in state.get("rows", [])]
        self._before = float(state.get("elapsed", 0.0))
        self._loss_sum, self._seen = float(state.get("loss_sum", 0.0)), int(state.get("seen", 0))
        self._lr = state.get("lr")
        self._written = tuple(state.get("written", (-1, -1)))
        self._restored = True

    # -- hooks -------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # A resumed run continues the checkpoint's rows (and rewrites the file with them);
        # a fresh one starts empty. on_train_epoch_start is not called when resuming mid-epoch.
        if not self._restored:
            self.file.rows = []
        elif trainer.is_global_zero:
            self.file.write()  # drop rows of epochs the checkpoint does not cover
        else:  # data parallel: the checkpoint's sums are rank 0's; counted once, there
            self._loss_sum, self._seen = 0.0, 0
        self._t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0, self._before = time.perf_counter(), 0.0
        self._loss_sum, self._seen, self._lr = 0.0, 0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.optimizers:
            self._lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            n = int(batch[0].shape[0])
            self._loss_sum += float(loss.detach()) * n
            self._seen += n

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._write_row(trainer, ran_val=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Not again after this epoch's validation wrote it; again for an epoch that a resume (after --max-steps) completed.
        if self._written != (trainer.current_epoch, trainer.global_step):
            self._write_row(trainer, ran_val=False)

    def _write_row(self, trainer, *, ran_val: bool) -> None:
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        # Every process calls this at the same point: data parallel adds the replicas' sums (one process: unchanged).
        loss_sum, seen = trainer.strategy.reduce(
            torch.tensor([self._loss_sum, float(self._seen)], dtype=torch.float64, device=trainer.strategy.root_device), reduce_op="sum"
        ).tolist()
        row = {
            "epoch": str(trainer.current_epoch),
            "step": str(trainer.global_step),
            "lr": "" if self._lr is None else f"{self._lr:.6g}",
            "train_loss": format_metric(loss_sum / seen if seen else None),
            "epoch_seconds": f"{self._before + time.perf_counter() - self._t0:.2f}",
        }
        for col in METRIC_COLUMNS:
            if col.startswith(("val_", "identity_")):
                row[col] = format_metric(m.get(col)) if ran_val else ""
        self.file.rows = [r for r in self.file.rows if int(r["epoch"]) < trainer.current_epoch]
        self.file.add(row, write=trainer.is_global_zero)  # data parallel: one writer
        self._written = (trainer.current_epoch, trainer.global_step)


class LastCheckpoint(Checkpoint):
    """``last.ckpt``, the state to resume from, written atomically (see :mod:`memtrain.loop.checkpoint_io`).

    Lightning runs ``Checkpoint`` callbacks last, so every other output of that moment
    (metrics row, memory rows) is on disk before the checkpoint. It is written:

    * at the end of every epoch, after its validation and its ``metrics.csv`` row;
    * every ``every_n_steps`` optimizer steps when set, except on an epoch's last batch:
      there the epoch-end checkpoint follows (a checkpoint between the last batch and the
      validation would resume past a validation that never ran);
    * at the end of training, whatever stopped it (``--max-steps``, or the last epoch; a run
      ending before its first validation has no other checkpoint);
    * when the process receives SIGTERM (a scheduler preempting the job): Lightning stops
      after the current batch and this state is written, so ``--resume`` continues from
      it; the run then exits non-zero.
    """

    def __init__(self, path: str | Path, every_n_steps: int = 0) -> None:
        self.path = Path(path)
        self.every_n_steps = every_n_steps

    def _save(self, trainer) -> None:
        if trainer.global_step > 0:
            trainer.save_checkpoint(self.path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer)


class SampleImages(L.Callback):
    """``samples/epoch_N.png``: input | target | output for the first validation images."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        batch = getattr(pl_module, "sample_batch", None)
        if batch is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.folder / f"epoch_{trainer.current_epoch}.png", render_samples(*batch, title=f"epoch {trainer.current_epoch}"))


def render_samples(inputs, targets, outputs, title: str = "") -> bytes:
    """A PNG (bytes) with one row per image: input | target | output, all on a fixed [0, 1] scale."""
    import matplotlib  # lazy (startup): matplotlib loads when samples are drawn, not for every run

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # lazy (startup) too, after choosing the Agg backend above

    n = inputs.shape[0]
    fig = Figure(figsize=(9, 3 * n), dpi=100)
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        for j, (img, name) in enumerate(((inputs, "input"), (targets, "target"), (outputs, "output"))):
            ax = axes[i][j]
            ax.imshow(img[i, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

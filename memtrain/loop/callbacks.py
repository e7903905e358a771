"""Lightning callbacks for what Lightning does not write itself: metrics.csv and sample images."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import lightning as L

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
    """``metrics.csv``: one row per epoch in ``METRIC_COLUMNS``, rewritten atomically after each row.

    Shared by single-process runs (:class:`MetricsCSV`) and the distributed master loop.
    """

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
        if not write:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


class MetricsCSV(L.Callback):
    """One row per epoch in ``metrics.csv``: losses, image metrics (model and identity), lr, seconds.

    The file is rewritten atomically after every epoch. On resume, rows of epochs that
    the checkpoint does not cover are dropped and then written again.
    """

    def __init__(self, path: str | Path) -> None:
        self.file = MetricsFile(path)
        self._t0 = 0.0
        self._validated_epoch = -1

    @property
    def path(self) -> Path:
        return self.file.path

    def on_train_start(self, trainer, pl_module) -> None:
        self.file.resume(trainer.current_epoch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Runs after the epoch's validation, so val_* of this epoch are in callback_metrics.
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        ran_val = self._validated_epoch == trainer.current_epoch
        row = {
            "epoch": str(trainer.current_epoch),
            "step": str(trainer.global_step),
            "lr": f"{trainer.optimizers[0].param_groups[0]['lr']:.6g}" if trainer.optimizers else "",
            "train_loss": format_metric(m.get("train_loss_epoch")),
            "epoch_seconds": f"{time.perf_counter() - self._t0:.2f}",
        }
        for col in METRIC_COLUMNS:
            if col.startswith(("val_", "identity_")):
                row[col] = format_metric(m.get(col)) if ran_val else ""
        self.file.add(row, write=trainer.is_global_zero)  # data parallel: one writer


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
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

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

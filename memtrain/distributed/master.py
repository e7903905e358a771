"""The training loop of the model-parallel strategies (rpc, pipeline), run by rank 0.

Lightning's Trainer owns a whole model in one process; here rank 0 owns the data and the
loss while the shards live elsewhere, so this loop is explicit. It drives an *engine*
(:class:`memtrain.distributed.rpc.RPCEngine`, :class:`memtrain.distributed.pipeline.PipelineEngine`)
and writes the same run directory as single-process ``memtrain fit``: ``config.yaml``,
``metrics.csv`` (same columns), per-rank memory files, ``samples/epoch_N.png`` and
``checkpoints/{last,best}.ckpt``.

Checkpoints hold the whole model's state dict under the same keys as a single-process
checkpoint (``state_dict["model.encoder..."]``), the shards' optimizers merged into one
single-process optimizer state, the schedule, and the position (epoch, batch, step) to
resume from. They are written atomically by rank 0 after the shards' states are fetched.

The order of training batches is drawn per epoch from ``--seed`` and the epoch number, so
a resumed run sees the same batches as one that was never interrupted (a run resumed
from a mid-epoch checkpoint skips the batches already done).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from memtrain.config import FitConfig, to_dict
from memtrain.data.module import loader_workers
from memtrain.distributed.memory import earlier_rows, format_rank_table, memory_file, rank_memory, summarize_ranks, write_rank_files
from memtrain.errors import CheckpointError
from memtrain.loop.callbacks import MetricsFile, format_metric, render_samples
from memtrain.loop.fit import CHECKPOINT_DIR, LAST, _print_outcome, open_run_dir, resume_checkpoint
from memtrain.rundir import atomic_write_bytes

BEST = "best.ckpt"


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of epoch ``epoch``: a permutation drawn from (seed, epoch) alone."""
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train_batches(dataset: Dataset, cfg: FitConfig, epoch: int, skip_batches: int = 0, pin_memory: bool = False) -> DataLoader:
    order = epoch_order(len(dataset), cfg.train.seed, epoch)[skip_batches * cfg.train.batch_size :]
    return DataLoader(
        Subset(dataset, order), batch_size=cfg.train.batch_size, shuffle=False, num_workers=loader_workers(cfg.data, pin_memory), pin_memory=pin_memory
    )


def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"--resume {path.parent.parent}: cannot load {path.name} ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise CheckpointError(f"--resume {path.parent.parent}: {path.name} is not a memtrain checkpoint")
    if "batch" not in ckpt:
        raise CheckpointError(f"--resume {path.parent.parent}: {path.name} was written by single-process training; resume it without a placement strategy")
    return ckpt


def train(cfg: FitConfig, plan, env, *, resume: Path | None, device: torch.device, engine_factory: Callable[[Any], Any]) -> Path:
    """Rank 0's whole run; the other ranks serve ``engine``'s calls meanwhile. Returns the run directory."""
    from memtrain.data.module import build_datasets
    from memtrain.loss import build_loss, image_metrics

    ckpt_path = resume_checkpoint(resume) if resume is not None else None
    ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    train_set, val_set = build_datasets(cfg.data)
    memory = rank_memory(device, cfg.memory.track)
    engine = engine_factory(memory)
    run_dir = open_run_dir(cfg, resume)
    print(f"memtrain: run directory {run_dir} (strategies: {plan.label}, device: {env.device}, size: {cfg.data.size})", flush=True)

    epoch, skip, step, best = 0, 0, 0, math.inf
    loss_sum, seen = 0.0, 0
    if ckpt is not None:
        engine.load(_unprefix(ckpt["state_dict"]), _first(ckpt.get("optimizer_states")), _first(ckpt.get("lr_schedulers")))
        epoch, skip, step, best = int(ckpt["epoch"]), int(ckpt["batch"]), int(ckpt["global_step"]), float(ckpt.get("best_val_loss", math.inf))
        loss_sum, seen = float(ckpt.get("epoch_loss", [0.0, 0])[0]), int(ckpt.get("epoch_loss", [0.0, 0])[1])
        print(f"memtrain: resumed at epoch {epoch}, step {step}", flush=True)
    first_step = step
    kept: dict[int, list[str]] = {}  # per rank: memory rows of the steps before a resume
    metrics = MetricsFile(run_dir / "metrics.csv")
    metrics.resume(epoch)
    loss_fn = build_loss(cfg.loss)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    pin = device.type == "cuda"

    def checkpoint(path: Path, next_epoch: int, next_batch: int) -> None:
        # Memory rows are written with every checkpoint, so a resumed run has the rows of every step before it.
        write_memory()
        state = engine.state()
        save_checkpoint(
            path,
            {
                "epoch": next_epoch,
                "batch": next_batch,
                "global_step": step,
                "best_val_loss": best,
                # Mid-epoch: the training loss so far, so the epoch's train_loss covers it whole after a resume.
                "epoch_loss": [loss_sum, seen] if next_batch else [0.0, 0],
                "state_dict": {f"model.{k}": v for k, v in state["state_dict"].items()},
                "optimizer_states": state["optimizer_states"],
                "lr_schedulers": state["lr_schedulers"],
                "memtrain": {"config": to_dict(cfg), "strategies": plan.specs, "layout": engine.label},
            },
        )

    def write_memory() -> None:
        if cfg.memory.track:
            ranks = engine.memory_records()
            for rr in ranks:
                if rr.rank not in kept:
                    kept[rr.rank] = earlier_rows(memory_file(run_dir, rr.rank), first_step)
            write_rank_files(run_dir, ranks, kept)

    def validate() -> dict[str, float]:
        sums: dict[str, float] = {}
        n = 0
        sample = None
        engine.set_training(False)
        loader = DataLoader(val_set, batch_size=cfg.train.batch_size, shuffle=False, num_workers=loader_workers(cfg.data, pin), pin_memory=pin)
        for i, (x, y) in enumerate(loader):
            if 0 < cfg.train.limit_val_batches <= i:
                break
            x, y = x.to(device), y.to(device)
            out = engine.predict(x)
            with torch.no_grad():
                loss = float(loss_fn(out, y))
                model_m, ident_m = image_metrics(out, y), image_metrics(x, y)
            values = {
                "val_loss": loss,
                "val_msssim": 1.0 - loss,
                "val_ssim": float(model_m["ssim"]),
                "val_psnr": float(model_m["psnr"]),
                "identity_loss": 1.0 - float(ident_m["msssim"]),
                "identity_msssim": float(ident_m["msssim"]),
                "identity_ssim": float(ident_m["ssim"]),
                "identity_psnr": float(ident_m["psnr"]),
            }
            b = x.shape[0]
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * b
            n += b
            have = 0 if sample is None else sample[0].shape[0]
            take = min(cfg.run.samples - have, b)
            if take > 0:
                new = tuple(t[:take].detach().float().cpu() for t in (x, y, out))
                sample = new if sample is None else tuple(torch.cat([a, c]) for a, c in zip(sample, new))
        engine.set_training(True)
        if sample is not None:
            atomic_write_bytes(run_dir / "samples" / f"epoch_{epoch}.png", render_samples(*sample, title=f"epoch {epoch}"))
        return {k: v / max(n, 1) for k, v in sums.items()}

    n_batches = math.ceil(len(train_set) / cfg.train.batch_size)
    done = cfg.train.max_steps > 0 and step >= cfg.train.max_steps
    engine.set_training(True)
    with plan.session():
        while epoch < cfg.train.epochs and not done:
            t0 = time.perf_counter()
            batch_index = skip
            for x, y in train_batches(train_set, cfg, epoch, skip, pin):
                x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
                loss = engine.train_step(x, y, step)
                step += 1
                batch_index += 1
                loss_sum += loss * x.shape[0]
                seen += x.shape[0]
                done = cfg.train.max_steps > 0 and step >= cfg.train.max_steps
                if done:
                    break
                if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0 and batch_index < n_batches:
                    checkpoint(ckpt_dir / LAST, epoch, batch_index)  # (the last batch of an epoch: the epoch-end checkpoint follows)
            finished = batch_index >= n_batches
            row = {"epoch": str(epoch), "step": str(step), "lr": f"{engine.lr():.6g}", "train_loss": format_metric(loss_sum / seen if seen else None)}
            if (epoch + 1) % cfg.train.val_every == 0:
                row.update({k: format_metric(v) for k, v in validate().items()})
            row["epoch_seconds"] = f"{time.perf_counter() - t0:.2f}"
            metrics.add(row)
            print(
                f"epoch {epoch}: step {step}, train_loss {row['train_loss'] or '-'}, val_loss {row.get('val_loss') or '-'} ({row['epoch_seconds']} s)",
                flush=True,
            )
            val_loss = float(row["val_loss"]) if row.get("val_loss") else None
            improved = val_loss is not None and val_loss < best
            if improved:
                best = val_loss
            if finished:
                engine.scheduler_step()
                epoch += 1
                batch_index = 0
            # Stopped by --max-steps inside an epoch: resume there.
            checkpoint(ckpt_dir / LAST, epoch, batch_index)
            if improved:
                checkpoint(ckpt_dir / BEST, epoch, batch_index)
            skip, loss_sum, seen = 0, 0.0, 0
    write_memory()
    if cfg.memory.track:
        print(format_rank_table(summarize_ranks(run_dir, skip_steps=cfg.memory.warmup_steps)), flush=True)
    _print_outcome(run_dir)
    return run_dir


def _first(items):
    return items[0] if items else None


def _unprefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("model."): v for k, v in state_dict.items()}

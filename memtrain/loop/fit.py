"""`memtrain fit`: assemble data, model, strategies and the Lightning Trainer, and train.

Everything the user can get wrong (flags, strategies, data, weights) is checked before
the run directory is created or any training starts.
"""

from __future__ import annotations

import csv
import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from memtrain.config import AUTO, FitConfig, dump_yaml, to_dict
from memtrain.data.module import RadiographDataModule, check_host_memory
from memtrain.errors import CheckpointError, ConfigError, Interrupted, StrategyError
from memtrain.inference import STATE_PREFIX, read_checkpoint
from memtrain.loop.callbacks import LastCheckpoint, MetricsCSV, SampleImages
from memtrain.loop.checkpoint_io import AtomicCheckpointIO
from memtrain.loop.module import EnhancementModule
from memtrain.loop.placement import LOCAL
from memtrain.loop.runners import runner_for
from memtrain.loss import window_for
from memtrain.memory.allocator import fix_mmap_threshold
from memtrain.memory.cuda import allocator_snapshot
from memtrain.memory.lightning import MemoryCallback
from memtrain.memory.planner import Planner
from memtrain.memory.tracker import MemoryTracker
from memtrain.memory.units import fmt_bytes, parse_bytes
from memtrain.model import build_model, state_dict_mismatch
from memtrain.rundir import CONFIG_NAME, atomic_write_text, check_new_run_dir, check_writable, discard_failed_start, new_run_dir, remove_stale_temp_files
from memtrain.strategies import Environment, Plan

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"

# Lightning advice that does not apply to how memtrain sets up its runs.
_QUIET = (
    r".*does not have many workers.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*could not find the monitored key in the returned metrics.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*Precision bf16-mixed is not supported by the model summary.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


class _NoTips(logging.Filter):
    """Drop Lightning's advertising tips ('💡 Tip: ... litlogger')."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def fit(cfg: FitConfig, *, resume: str | Path | None = None) -> Path | None:
    """Train as configured; return the run directory (None on processes of a distributed run that do not write it).

    ``resume`` continues that run from its last.ckpt. The plan's runner executes the run:
    one Lightning process by default, or the processes of a placement strategy (rpc,
    pipeline, ddp) launched with torchrun.
    """
    cfg.validate()
    window_for(cfg.data.size)  # too small for the loss: say so before Lightning prints anything
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use 'auto' or 'cpu')")
    env = Environment.detect(cfg.train.device)
    if env.device == "cpu":
        fix_mmap_threshold(default=None)  # only where MEMTRAIN_MMAP_THRESHOLD asks: fixed, it costs step time (memtrain.memory.allocator)
    check_host_memory(cfg.data, pin_memory=env.device == "cuda")
    if resume is None:
        check_new_run_dir(cfg.run.out)
    else:
        check_writable(resume, "--resume")
    if cfg.strategies == [AUTO]:
        cfg.strategies = choose_strategies(cfg, env)
    plan = Plan.resolve(cfg.strategies, env)
    return runner_for(plan).run(cfg, plan, env, resume=Path(resume) if resume is not None else None)


def resume_checkpoint(run_dir: Path) -> Path:
    """The last.ckpt of ``run_dir``, checked readable; ConfigError or CheckpointError in one line otherwise."""
    return load_resume_checkpoint(run_dir)[0]


def load_resume_checkpoint(run_dir: Path) -> tuple[Path, dict]:
    """(path, content) of ``run_dir``'s last.ckpt, loaded weights-only (no pickled code runs).

    A missing one means the run stopped before its first checkpoint; a corrupt one is
    named, with the newest other checkpoint of the run that does load, if there is one.
    """
    ckpt_path = run_dir / CHECKPOINT_DIR / LAST
    if not ckpt_path.is_file():
        raise ConfigError(
            f"--resume {run_dir}: no {CHECKPOINT_DIR}/{LAST} (the run stopped before its first checkpoint);"
            f" start it again: remove {run_dir}, or run with --config {run_dir / CONFIG_NAME} --out NEW_DIR"
        )
    try:
        return ckpt_path, read_checkpoint(ckpt_path)
    except CheckpointError as e:
        reason = str(e).removeprefix(f"{ckpt_path}: ")
        older = None
        for other in sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
            if other.name == LAST:
                continue
            try:
                ckpt = read_checkpoint(other)
            except CheckpointError:
                continue
            older = f"an older valid checkpoint is {other} (epoch {ckpt.get('epoch')}, step {ckpt.get('global_step')}): to resume from it, copy it over {LAST}"
            break
        hint = older or "no other checkpoint of this run loads; start it again with --config " + str(run_dir / CONFIG_NAME) + " --out NEW_DIR"
        raise CheckpointError(f"--resume {run_dir}: {CHECKPOINT_DIR}/{LAST} is corrupt ({reason}); {hint}") from None


def check_resume_architecture(ckpt: dict, model, ckpt_path: Path) -> None:
    """The resumed checkpoint's weights must fit the model this configuration builds (same keys and shapes)."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"--resume: {ckpt_path} has no state_dict")
    weights = {k[len(STATE_PREFIX) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(STATE_PREFIX)}
    parts = state_dict_mismatch(model.state_dict(), weights)
    if parts:
        raise CheckpointError(f"--resume: {ckpt_path} was written by another architecture than this run's configuration builds: " + "; ".join(parts))


def open_run_dir(cfg: FitConfig, resume: Path | None) -> Path:
    """Create the run directory (or take the resumed one) and write the resolved config.yaml into it."""
    if resume is None:
        run_dir = new_run_dir(cfg.run.out)
        cfg.run.out = str(run_dir)
    else:
        run_dir = resume
        remove_stale_temp_files(run_dir)
    atomic_write_text(run_dir / CONFIG_NAME, dump_yaml(cfg))
    return run_dir


class LightningRunner:
    """The one training loop: Lightning's Trainer over :class:`~memtrain.loop.module.EnhancementModule`.

    The default runs one process. Subclasses override the hooks below: data parallel
    (:class:`memtrain.distributed.ddp.DDPRunner`: launch and reductions) and rank 0 of the
    model-parallel strategies (:class:`memtrain.distributed.sharded.ShardedRunner`: the
    placement and the model), so every placement trains with this same loop.
    """

    def run(self, cfg: FitConfig, plan, env, *, resume: Path | None) -> Path | None:
        ckpt_path, resumed = load_resume_checkpoint(resume) if resume is not None else (None, None)
        L.seed_everything(cfg.train.seed, workers=True, verbose=False)
        datamodule = RadiographDataModule(
            cfg.data, batch_size=cfg.train.batch_size, pin_memory=env.device == "cuda", seed=cfg.train.seed, resumable=self.resumable_data
        )
        # Strategies that restructure or wrap the model check its structure here, before anything is written.
        model = self.build_model(cfg, plan)
        if resumed is not None:
            check_resume_architecture(resumed, model, ckpt_path)
            self.announce(f"memtrain: resuming {ckpt_path} at step {int(resumed.get('global_step', 0))}")
            del resumed

        created = resume is None and not (cfg.run.out and Path(cfg.run.out).expanduser().exists())
        run_dir = self.open_run_dir(cfg, resume)
        try:
            return self._train(cfg, plan, env, run_dir, model, datamodule, ckpt_path)
        except BaseException:
            if resume is None and self.is_main():
                discard_failed_start(run_dir, created)  # no dead-end folder holding only config.yaml
            raise

    def _train(self, cfg: FitConfig, plan, env, run_dir: Path, model, datamodule, ckpt_path: Path | None) -> Path | None:
        self.announce(f"memtrain: run directory {run_dir} (strategies: {plan.label}, device: {env.device}, size: {cfg.data.size})")
        module = EnhancementModule(model, plan, cfg.train, loss=cfg.loss, samples=cfg.run.samples, config=to_dict(cfg), placement=self.placement)

        device = torch.device("cuda", torch.cuda.current_device()) if env.device == "cuda" else torch.device("cpu")
        ckpt_dir = run_dir / CHECKPOINT_DIR
        callbacks = [
            ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1, enable_version_counter=False),
            MetricsCSV(run_dir / "metrics.csv"),
            # "last": one file, overwritten at every epoch end (and every N steps), at the end and on SIGTERM.
            LastCheckpoint(ckpt_dir / LAST, every_n_steps=cfg.train.checkpoint_every_steps),
            *self.placement.callbacks(),
        ]
        if cfg.run.samples > 0:
            callbacks.append(SampleImages(run_dir / "samples"))
        if cfg.memory.track:
            callbacks.append(self.memory_callback(MemoryTracker(device), run_dir, cfg))

        trainer = L.Trainer(
            plugins=[AtomicCheckpointIO(), *self.placement.precision_plugins(plan.precision())],
            max_epochs=cfg.train.epochs,
            max_steps=cfg.train.max_steps,
            check_val_every_n_epoch=cfg.train.val_every,
            limit_val_batches=cfg.train.limit_val_batches if cfg.train.limit_val_batches >= 0 else None,  # 0: no validation
            num_sanity_val_steps=0,
            logger=False,
            callbacks=callbacks,
            default_root_dir=run_dir,
            # CUDA has no deterministic kernel for the U-Net's nearest-upsampling backward:
            # there torch warns instead of failing.
            deterministic=(True if env.device == "cpu" else "warn") if cfg.train.deterministic else None,
            benchmark=False if cfg.train.deterministic else None,
            **self.trainer_options(env),
        )
        snapshot = allocator_snapshot(run_dir / cfg.memory.snapshot if cfg.memory.snapshot else None, device)
        try:
            with plan.session(), snapshot:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            raise Interrupted(
                f"stopped by SIGTERM at step {trainer.global_step}; {ckpt_dir / LAST} holds that state: continue with memtrain fit --resume {run_dir}"
            ) from None
        if getattr(snapshot, "written", None):
            print(f"memtrain: allocator snapshot in {snapshot.written} (open it at https://pytorch.org/memory_viz)")
        if self.is_main():
            _print_outcome(run_dir)
            return run_dir
        return None

    # -- hooks ---------------------------------------------------------------------------
    #: Where the step runs (memtrain.loop.placement): here, the whole model in this process.
    placement = LOCAL

    def build_model(self, cfg: FitConfig, plan):
        """The model the run trains: the configured U-Net with the plan's transforms applied."""
        return plan.apply(build_model(cfg.model))

    #: Single-process runs use memtrain's resumable training loader (same order after a resume, mid-epoch too);
    #: data-parallel runs keep a plain loader, to which Lightning gives a distributed sampler.
    resumable_data = True

    def open_run_dir(self, cfg: FitConfig, resume: Path | None) -> Path:
        return open_run_dir(cfg, resume)

    def trainer_options(self, env) -> dict:
        return {"accelerator": "gpu" if env.device == "cuda" else "cpu", "devices": 1}

    def memory_callback(self, tracker, run_dir: Path, cfg: FitConfig):
        return MemoryCallback(tracker, run_dir / "memory.csv", blocks_csv_path=run_dir / "memory_blocks.csv", warmup_steps=cfg.memory.warmup_steps)

    def is_main(self) -> bool:
        return True

    def announce(self, line: str) -> None:
        if self.is_main():
            print(line, flush=True)


def choose_strategies(cfg: FitConfig, env) -> list[str]:
    """`--strategies auto`: the fastest combination whose estimated step fits --memory-budget (see memtrain.memory.planner)."""
    budget = parse_bytes(cfg.memory.budget, "--memory-budget")

    def progress(line: str) -> None:
        print(f"memtrain: --strategies auto: estimated {line}", file=sys.stderr, flush=True)

    planner = Planner(size=cfg.data.size, batch_size=cfg.train.batch_size, encoder=cfg.model.encoder, loss=cfg.loss, env=env, budget=budget, progress=progress)
    if budget <= planner.headroom:
        raise StrategyError(
            f"--strategies auto: nothing fits --memory-budget {cfg.memory.budget}: it is not more than the {fmt_bytes(planner.headroom)}"
            f" headroom kept for what is not the step's tensors ({planner.model.source})"
        )
    best = planner.choose()
    if best is None:
        measured = [c for c in planner.measured if c.memory is not None]
        least = min(measured, key=lambda c: c.step_peak, default=None)
        hint = f"; the smallest, {least.strategies}, needs {fmt_bytes(least.needed)} by the headroom model" if least else ""
        raise StrategyError(
            f"--strategies auto: nothing fits --memory-budget {cfg.memory.budget} at --size {cfg.data.size},"
            f" --batch-size {cfg.train.batch_size}{hint} (see `memtrain plan --size {cfg.data.size} --memory-budget {cfg.memory.budget} --batch-size {cfg.train.batch_size}`)"
        )
    print(
        f"memtrain: --strategies auto: {best.strategies} (estimated step peak {fmt_bytes(best.step_peak)}, needs {fmt_bytes(best.needed)}"
        f" of {fmt_bytes(budget)}; expected step time x{best.time_cost:.2f} of 'none')",
        flush=True,
    )
    return best.strategies.split(",")


def _print_outcome(run_dir: Path) -> None:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss")]
    if rows:
        r = rows[-1]
        print(
            f"epoch {r['epoch']}: val MS-SSIM {float(r['val_msssim']):.4f} (identity {float(r['identity_msssim']):.4f}), "
            f"PSNR {float(r['val_psnr']):.2f} dB (identity {float(r['identity_psnr']):.2f} dB)"
        )
    names = ("config.yaml", "metrics.csv", "memory.csv", "memory_blocks.csv", "checkpoints", "samples")
    written = [
        n + "/" if (run_dir / n).is_dir() else n for n in names if (run_dir / n).exists() and (not (run_dir / n).is_dir() or any((run_dir / n).iterdir()))
    ]
    print(f"memtrain: outputs in {run_dir}: {', '.join(written)}")

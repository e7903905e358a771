"""Distributed cells of a comparison (``memtrain compare --launcher torchrun --nproc-per-node N``).

A combination with a placement strategy (``rpc``, ``pipeline``, ``ddp``) cannot run in
one process, so its cell is a real ``python -m torch.distributed.run --standalone
--nproc-per-node N -m memtrain fit`` job on phantom radiographs: 1 + ``steps`` epochs
of exactly one training step each (``--train-images`` is one step's worth: ``N ×
--batch-size`` for ``ddp``, ``--batch-size`` otherwise; ``--max-steps 1 + steps``), no
validation, no samples. The row comes from the run's per-rank memory files
(:func:`memtrain.distributed.memory.summarize_ranks`, the warm-up step left out):

* ``forward_peak_mib``, ``backward_peak_mib``, ``optimizer_peak_mib``, ``step_peak_mib``:
  the **largest rank's** peak of each phase — the memory one device must have, the
  number to compare with the single-process ``none`` row (the ratios use it);
* ``ranks`` (``rank:role`` of every rank), ``rank_forward_peaks_mib``,
  ``rank_backward_peaks_mib``, ``rank_step_peaks_mib`` (';'-separated, in rank order) and
  ``rank_mean_*_peak_mib``: each rank's peaks and their mean over ranks — the per-node
  columns of the paper's tables IV and V;
* ``step_time_s``: the median ``epoch_seconds`` of rank 0's ``metrics.csv`` over the
  measured one-step epochs (the warm-up epoch left out); it includes the epoch's data
  loading, which is small next to a step at these sizes.

Failures are results: a job that exits non-zero (wrong ``--nproc-per-node`` for the
strategy, a crash on any rank) gives ``status="error"`` with memtrain's one-line error
when a rank printed one, else the job's last line; a job past ``--cell-timeout`` is
killed (its whole process group) and recorded as ``error``.
"""

from __future__ import annotations

import csv
import statistics
import sys
import tempfile
from pathlib import Path

from memtrain.config import load_yaml
from memtrain.distributed.memory import rank_files, summarize_ranks
from memtrain.memory.tracker import MIB, PHASES
from memtrain.strategies import create
from memtrain.strategies.base import Stage

LAUNCHERS = ("torchrun",)
# Columns a distributed row adds to compare.csv (empty for single-process rows).
COLUMNS = (
    "launcher",
    "nproc_per_node",
    "ranks",
    "rank_forward_peaks_mib",
    "rank_backward_peaks_mib",
    "rank_step_peaks_mib",
    "rank_mean_forward_peak_mib",
    "rank_mean_backward_peak_mib",
    "rank_mean_step_peak_mib",
)


def is_distributed(combo: str) -> bool:
    """Whether ``combo`` contains a placement strategy (one that needs several processes)."""
    return any(create(name).stage == Stage.PLACEMENT for name in combo.split(","))


def needs_launcher(combo: str) -> str:
    """Why a placement combination is rejected without ``--launcher`` (one process would measure the plain model)."""
    return (
        f"--strategies {combo}: runs as several processes started by torchrun; "
        "add --launcher torchrun --nproc-per-node N (rpc: 3, pipeline: 2, ddp: N replicas) to measure it"
    )


def fit_args(spec: dict, nproc: int, out: Path) -> list[str]:
    """``memtrain fit`` flags of one distributed cell: 1 + steps one-step epochs on phantoms, validation off."""
    steps = spec["steps"]
    replicas = nproc if "ddp" in spec["strategies"].split(",") else 1
    return [
        "--strategies", spec["strategies"],
        "--data", "phantom",
        "--size", str(spec["size"]),
        "--train-images", str(replicas * spec["batch_size"]),
        "--val-images", "1",
        "--batch-size", str(spec["batch_size"]),
        "--encoder", spec.get("encoder", "resnet34"),
        "--loss", spec.get("loss", "msssim"),
        "--lr", str(spec.get("lr", 1e-3)),
        "--scheduler", "none",
        "--epochs", str(1 + steps),
        "--max-steps", str(1 + steps),
        "--val-every", str(2 + steps),
        "--samples", "0",
        "--workers", "0",
        "--device", spec.get("device", "auto"),
        "--warmup-steps", "1",
        "--out", str(out),
    ]  # fmt: skip


def run_torchrun_cell(spec: dict, nproc: int, timeout: float) -> dict:
    """Run one distributed cell as a torchrun job and build its result from the run directory."""
    from memtrain.compare.sweep import cell_env, run_killable  # (cycle: sweep <-> torchrun)

    base = {"strategies": spec["strategies"], "size": spec["size"], "batch_size": spec["batch_size"], "phase": "", "launcher": "torchrun"}
    base["nproc_per_node"] = nproc
    env = cell_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="memtrain-torchrun-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "memtrain", "fit"]
        cmd += fit_args(spec, nproc, run_dir)
        done = run_killable(cmd, env=env, timeout=timeout, cwd=tmp, merge_output=True)
        if done is None:
            return base | {"status": "error", "reason": f"torchrun timed out after {timeout:g} s (--cell-timeout); killed"}
        returncode, output = done
        if returncode != 0:
            return base | {"status": "error", "reason": f"torchrun exited with code {returncode}: {failure_line(output)}"}
        try:
            return base | result_from_run(run_dir, spec["steps"])
        except (OSError, ValueError, KeyError) as e:
            return base | {"status": "error", "reason": f"torchrun run directory unreadable: {e.__class__.__name__}: {e}"}


def failure_line(output: str) -> str:
    """memtrain's one-line error from any rank, else the last line of the job's output."""
    lines = [ln.strip() for ln in (output or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "memtrain: error:" in ln]
    line = errors[0] if errors else (lines[-1] if lines else "no output")
    return line[line.find("memtrain: error:") :] if "memtrain: error:" in line else line[:300]


def result_from_run(run_dir: Path, steps: int) -> dict:
    """The cell result of a finished distributed run: per-rank peaks (warm-up left out) and step time."""
    files = rank_files(run_dir)
    if not files:
        raise ValueError(f"no memory files in {run_dir}")
    with next(iter(files.values())).open(newline="") as f:
        header = next(csv.reader(f))
    metric = "alloc_peak" if "alloc_peak_mib" in header else "tensor_peak"
    summary = summarize_ranks(run_dir, metric=metric, skip_steps=1)
    ranks = summary["ranks"]
    phases: dict[str, dict[str, float]] = {}
    for p in PHASES:
        if any(p in r.phases for r in ranks):
            phases[p] = {metric: summary["max"][p] * MIB}
    if metric != "tensor_peak":  # the live-tensor count beside the allocator's, as single-process rows have
        tensor = summarize_ranks(run_dir, metric="tensor_peak", skip_steps=1)
        for p in phases:
            if p in tensor["max"]:
                phases[p]["tensor_peak"] = tensor["max"][p] * MIB
    with (run_dir / "metrics.csv").open(newline="") as f:
        epochs = [r for r in csv.DictReader(f)]
    times = [float(r["epoch_seconds"]) for r in epochs[1:] if r.get("epoch_seconds")]
    losses = [float(r["train_loss"]) for r in epochs if r.get("train_loss")]
    if not times:
        raise ValueError(f"{run_dir / 'metrics.csv'}: no measured epoch (expected {1 + steps} one-step epochs)")

    def peaks(key: str) -> str:
        return ";".join(f"{(r.step if key == 'step' else r.phases.get(key, 0.0)):.2f}" for r in ranks)

    return {
        "status": "ok",
        "reason": "",
        "device": "cuda" if metric == "alloc_peak" else "cpu",
        "plan": ",".join(load_yaml(run_dir / "config.yaml").strategies),
        "phases": phases,
        "step_time_s": statistics.median(times),
        "step_times_s": times,
        "loss": losses[-1] if losses else None,
        "ranks": ";".join(f"{r.rank}:{r.role}" for r in ranks),
        "rank_forward_peaks_mib": peaks("forward"),
        "rank_backward_peaks_mib": peaks("backward"),
        "rank_step_peaks_mib": peaks("step"),
        "rank_mean_forward_peak_mib": round(summary["mean"].get("forward", 0.0), 2),
        "rank_mean_backward_peak_mib": round(summary["mean"].get("backward", 0.0), 2),
        "rank_mean_step_peak_mib": round(summary["mean"]["step"], 2),
        "rank_metric": metric,
    }


def markdown_lines(rows: list[dict]) -> list[str]:
    """Per-rank table of the distributed rows for compare.md (none when there are none)."""
    dist = [r for r in rows if r.get("launcher") and r["status"] == "ok"]
    if not dist:
        return []
    lines = [
        "",
        "Distributed rows (torchrun): the peaks above are the largest rank's; per rank (MiB, warm-up step left out):",
        "",
        "| strategies | size | rank:role | forward peak | backward peak | step peak |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in dist:
        cols = [r["ranks"].split(";"), *(r[f"rank_{k}_peaks_mib"].split(";") for k in ("forward", "backward", "step"))]
        for who, f, b, s in zip(*cols):
            lines.append(f"| {r['strategies']} | {r['size']} | {who} | {f} | {b} | {s} |")
        for label, keys in (
            ("mean", [f"rank_mean_{k}_peak_mib" for k in ("forward", "backward", "step")]),
            ("max", ["forward_peak_mib", "backward_peak_mib", "step_peak_mib"]),
        ):
            lines.append(f"| {r['strategies']} | {r['size']} | {label} | {' | '.join(f'{float(r[k]):.2f}' for k in keys)} |")
    return lines

"""Reproduce the paper's tables I–V with memtrain (real `memtrain fit` runs, one per combination).

The paper (``../shared/reference/memory-strategies-paper.txt``) trained a U-Net ResNet34 with
1 − MS-SSIM on 48/12 radiographs at 512² for each memory strategy and combination and reported:

* Table I   — train/validation loss of each strategy alone (single node);
* Table II  — the same for combinations (AMP+Chkp, AMP+Quant, Chkp+Mom, AMP+Chkp+Mom);
* Table III — forward/backward memory and seconds per epoch (Original, AMP, Chkp+Mom);
* Table IV  — losses of the distributed (encoder/decoder over RPC) runs;
* Table V   — per-GPU forward/backward memory and seconds per epoch of the distributed runs.

This script runs ``memtrain fit --config configs/paper-512.yaml --strategies S --out OUT/S``
for every combination the chosen tables need (distributed ones under ``torchrun
--nproc-per-node 3``), skips runs that already finished, resumes runs that were killed,
and writes ``OUT/table-N.md`` and ``OUT/table-N.csv`` from each run's ``metrics.csv`` and
``memory*.csv``. Losses are memtrain's (1 − MS-SSIM, in [0, 1]); the paper's loss values
were on another scale, so compare the ordering and the ratios, not the raw numbers.

Examples::

    python experiments/paper_tables.py --tables 1,2,3 --out reports/paper        # GPU: hours
    python experiments/paper_tables.py --tables 1,3 --out /tmp/t --size 64 --epochs 1 \\
        -- --train-images 4 --val-images 2 --encoder resnet18                       # smoke run (CPU, minutes)
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memtrain.rundir import atomic_write_text  # noqa: E402

# The paper's rows: (label as in the paper, memtrain --strategies).
TABLES: dict[int, dict] = {
    1: {
        "title": "Table I: loss at 512² for each strategy alone (single node)",
        "kind": "loss",
        "rows": [("Original", "none"), ("AMP", "amp"), ("Quantization", "quant"), ("Checkpointing (Chkp)", "checkpoint"), ("Momentum (Mom)", "momentum")],
    },
    2: {
        "title": "Table II: loss at 512² for combinations (single node)",
        "kind": "loss",
        "rows": [
            ("Original", "none"),
            ("AMP+Chkp", "amp,checkpoint"),
            ("AMP+Quant", "amp,quant"),
            ("Chkp+Mom", "checkpoint,momentum"),
            ("AMP+Chkp+Mom", "amp,checkpoint,momentum"),
        ],
    },
    3: {
        "title": "Table III: memory (MiB) at 512² and seconds per epoch (single node)",
        "kind": "memory",
        "rows": [("Original", "none"), ("AMP", "amp"), ("Chkp + Mom", "checkpoint,momentum")],
    },
    4: {
        "title": "Table IV: loss at 512², encoder/decoder model parallel over RPC (3 processes)",
        "kind": "loss",
        "rows": [
            ("Original", "none"),
            ("Dist", "rpc"),
            ("Dist + AMP", "rpc,amp"),
            ("Dist + AMP + Chkp", "rpc,amp,checkpoint"),
            ("Dist + AMP + Mom", "rpc,amp,momentum"),
            ("Dist + AMP + Chkp + Mom", "rpc,amp,checkpoint,momentum"),
        ],
    },
    5: {
        "title": "Table V: per-process memory (MiB) at 512², RPC model parallel, and seconds per epoch",
        "kind": "memory",
        "rows": [("Dist", "rpc"), ("Dist + AMP", "rpc,amp"), ("Dist + AMP + Chkp", "rpc,amp,checkpoint")],
    },
}
DISTRIBUTED = ("rpc", "pipeline", "ddp")
RPC_PROCESSES = 3  # master + encoder worker + decoder worker


def _is_distributed(strategies: str) -> bool:
    return any(s.split(":")[0] in DISTRIBUTED for s in strategies.split(","))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _epochs_done(run: Path) -> int:
    path = run / "metrics.csv"
    if not path.is_file():
        return 0
    return sum(1 for r in _read_csv(path) if r.get("train_loss"))


def _command(args, strategies: str, run: Path, resume: bool) -> list[str]:
    fit = ["-m", "memtrain", "fit"]
    if _is_distributed(strategies):  # torchrun, one host: master + encoder worker + decoder worker
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RPC_PROCESSES}", *fit]
    else:
        head = [sys.executable, *fit]
    if resume:
        return [*head, "--resume", str(run)]
    cmd = [*head, "--config", args.config, "--strategies", strategies, "--out", str(run), "--epochs", str(args.epochs)]
    if args.size:
        cmd += ["--size", str(args.size)]
    return cmd + args.fit_args


def train(args, strategies: str) -> Path:
    """Run (or finish) the fit of one combination; return its run directory."""
    run = Path(args.out) / strategies.replace(",", "+").replace(":", "-")
    done = _epochs_done(run)
    if done >= args.epochs:
        print(f"[paper] {strategies}: finished earlier ({run})", flush=True)
        return run
    resume = (run / "checkpoints" / "last.ckpt").is_file()
    cmd = _command(args, strategies, run, resume)
    print(f"[paper] {strategies}: {' '.join(cmd[1:])}", flush=True)
    if args.dry_run:
        return run
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"paper_tables: `memtrain fit --strategies {strategies}` failed (exit {proc.returncode}); see the output above")
    return run


def _loss_row(label: str, strategies: str, run: Path) -> dict[str, str]:
    rows = [r for r in _read_csv(run / "metrics.csv") if r.get("train_loss")]
    last = rows[-1]
    return {
        "row": label,
        "strategies": strategies,
        "epochs": str(len(rows)),
        "train_loss": f"{float(last['train_loss']):.4f}",
        "val_loss": f"{float(last['val_loss']):.4f}" if last.get("val_loss") else "",
        "val_msssim": f"{float(last['val_msssim']):.4f}" if last.get("val_msssim") else "",
    }


def _phase_peaks(path: Path) -> dict[str, float]:
    """Per phase, the largest peak and increase over the measured steps: the allocator's on CUDA, else tensor bytes (MiB)."""
    rows = _read_csv(path)
    backend = "alloc" if rows and rows[0].get("alloc_peak_mib") else "tensor"
    peaks: dict[str, float] = {}
    for r in rows:
        for kind in ("peak", "increase"):
            value = r.get(f"{backend}_{kind}_mib")
            if value:
                key = f"{r['phase']}_{kind}"
                peaks[key] = max(peaks.get(key, 0.0), float(value))
    peaks["_backend"] = backend  # type: ignore[assignment]
    return peaks


def _memory_row(label: str, strategies: str, run: Path) -> dict[str, str]:
    files = sorted(run.glob("memory*.csv"))
    files = [f for f in files if "blocks" not in f.name]
    per_process = [_phase_peaks(f) for f in files]
    seconds = [float(r["epoch_seconds"]) for r in _read_csv(run / "metrics.csv") if r.get("epoch_seconds")]
    row = {"row": label, "strategies": strategies, "processes": str(len(per_process)), "backend": per_process[0]["_backend"] if per_process else ""}
    # The paper's "Forward"/"Backward" rows: what each phase adds on top of the step's start (mean over
    # processes; max for the distributed tables), then the phase peak including parameters and optimizer state.
    for key in ("forward_increase", "backward_increase", "forward_peak", "backward_peak"):
        values = [p[key] for p in per_process if key in p]
        row[f"{key}_mib"] = f"{statistics.mean(values):.1f}" if values else ""
        if len(per_process) > 1:
            row[f"{key}_max_mib"] = f"{max(values):.1f}" if values else ""
    row["epoch_seconds"] = f"{statistics.mean(seconds):.2f}" if seconds else ""
    return row


def _markdown(title: str, rows: list[dict[str, str]]) -> str:
    cols = list(rows[0])
    lines = [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default="1,2,3", help="comma list of the paper's tables to reproduce (1-5) [default: 1,2,3]")
    p.add_argument("--out", required=True, help="folder for the runs (one per combination) and table-N.md/.csv")
    p.add_argument("--config", default="configs/paper-512.yaml", help="memtrain preset the runs start from [default: configs/paper-512.yaml]")
    p.add_argument("--epochs", type=int, default=50, help="epochs per run (the paper: 50) [default: 50]")
    p.add_argument("--size", type=int, default=0, help="image side (default: the preset's, 512)")
    p.add_argument("fit_args", nargs="*", help="after --: more `memtrain fit` flags for every run, e.g. -- --train-images 4")
    p.add_argument("--dry-run", action="store_true", help="print the fit commands, run nothing")
    args = p.parse_args(argv)
    try:
        tables = [int(t) for t in args.tables.split(",")]
    except ValueError:
        p.error(f"--tables {args.tables!r}: expected a comma list of numbers 1-5")
    if any(t not in TABLES for t in tables):
        p.error(f"--tables {args.tables!r}: the paper has tables 1-5")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for t in tables:
        spec = TABLES[t]
        runs = [(label, s, train(args, s)) for label, s in spec["rows"]]
        if args.dry_run:
            continue
        make = _loss_row if spec["kind"] == "loss" else _memory_row
        rows = [make(label, s, run) for label, s, run in runs]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / f"table-{t}.csv", buf.getvalue())
        text = _markdown(spec["title"].replace("512²", f"{args.size or 512}²"), rows)
        atomic_write_text(out / f"table-{t}.md", text)
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Step time of every strategy variant the planner considers, relative to `none`, measured side by side on this machine.

The planner (`memtrain plan`, `fit --strategies auto`) orders combinations by the
product of each strategy's declared time cost; the CPU costs are taken from this
table. Every variant trains the fit's step (memtrain.memory.step.TrainStep: forward +
MS-SSIM loss, backward, Adam) on the same phantom batch; the variants run interleaved,
round after round, and the time taken is the process's CPU time (``time.process_time``,
one intra-op thread), which other processes on a shared machine barely change (wall-clock
time there measures the load, not the strategy); the median step time of each is
divided by `none`'s.

    OMP_NUM_THREADS=1 python benchmarks/strategy_time.py --size 256 --rounds 3 --out benchmarks/results/strategy_time_cpu
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

SPECS = (
    "none",
    "amp",
    "checkpoint:selective",
    "checkpoint:blocks",
    "checkpoint:stages",
    "checkpoint:full",
    "momentum",
    "quant:int8",
    "quant:fp8",
    "offload",
)


class Untimed:
    """The tracker interface of TrainStep with nothing recorded (a tracker's dispatch mode would add its own time)."""

    def step(self, *args, **kwargs):
        return contextlib.nullcontext()

    def phase(self, name):
        return contextlib.nullcontext()


def main() -> None:
    from memtrain.config import ModelConfig
    from memtrain.data.datasets import PhantomDataset
    from memtrain.memory.step import TrainStep
    from memtrain.rundir import atomic_write_text
    from memtrain.strategies import Environment, Plan

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each runs --steps timed steps of every variant")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--specs", default=",".join(SPECS), help="comma-separated strategy specs (none first)")
    ap.add_argument("--out", default="benchmarks/results/strategy_time_cpu")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    env = Environment.detect("cpu")
    x, y = (t.unsqueeze(0) for t in PhantomDataset(seed=0, first=0, count=1, size=args.size)[0])
    specs = args.specs.split(",")
    runs = {}
    for spec in specs:
        plan = Plan.resolve(spec, env)
        with plan.session():
            torch.manual_seed(0)
            train = TrainStep(plan, model_cfg=ModelConfig(encoder=args.encoder))
            train(Untimed(), x, y)  # warm-up, left out
        runs[spec] = (plan, train, [])
    for _ in range(args.rounds):
        for spec in specs:
            plan, train, times = runs[spec]
            with plan.session():
                for _ in range(args.steps):
                    t0 = time.process_time()
                    train(Untimed(), x, y)
                    times.append(time.process_time() - t0)
    base = statistics.median(runs["none"][2])
    rows = [
        {"strategy": s, "step_time_s": round(statistics.median(t), 4), "relative": round(statistics.median(t) / base, 3), "steps": len(t)}
        for s, (_p, _t, t) in runs.items()
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.with_suffix(".csv")).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import segmentation_models_pytorch as smp

    lines = [
        f"# Step time per strategy, relative to `none` (CPU, {args.size}x{args.size}, U-Net {args.encoder}, batch 1)",
        "",
        f"torch {torch.__version__}, smp {smp.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s);"
        f" {args.rounds} interleaved rounds x {args.steps} step(s), median process CPU time. Command: `python benchmarks/strategy_time.py"
        f" --size {args.size} --rounds {args.rounds} --out {args.out}`",
        "",
        "| strategy | step CPU time (s) | relative to none |",
        "|---|---:|---:|",
        *(f"| {r['strategy']} | {r['step_time_s']:.3f} | x{r['relative']:.2f} |" for r in rows),
        "",
    ]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""``tile`` against today's best plans: step memory (fake tensors), FLOPs and CPU step time, side by side.

For every size and plan it prints the forward, backward and optimizer ``tensor_peak`` of one
U-Net ResNet34 training step (batch 1 unless given, Adam, MS-SSIM) measured with fake tensors
(:func:`memtrain.memory.estimate.measure_step`), the ratio to the float32 ``none`` step, and at
``--flop-size`` the FLOP ratio (``torch.utils.flop_counter.FlopCounterMode``, forward + backward,
real tensors) and the CPU step-time ratio to ``none`` (real steps, interleaved repeats, median).

    OMP_NUM_THREADS=2 python benchmarks/tile.py --sizes 1024,2048,4096,8192
    OMP_NUM_THREADS=2 python benchmarks/tile.py --sizes 1024 --no-write

Targets (issue 11): 2048² ≤ 0.10× the fp32 step; 4096² a plan ≤ 1.5 GiB; 4192² batch 4 ≤ 8 GiB;
8192² ≤ 8 GiB; the lowest plan's activation peak grows ≤ 4× from 1024² to 4096²; FLOPs ≤ 1.8×.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from memtrain.compare.environment import host_environment  # noqa: E402
from memtrain.memory.estimate import measure_step  # noqa: E402
from memtrain.rundir import atomic_write_text  # noqa: E402

MIB = 2**20
PLANS = ("none", "amp,checkpoint:full,quant", "tile", "amp,tile", "amp,tile,checkpoint:full,quant")
COLUMNS = ("size", "batch", "strategies", "forward_mib", "backward_mib", "optimizer_mib", "step_peak_mib", "peak_vs_fp32", "estimate_s")


def memory_rows(sizes, plans, batch):
    for size in sizes:
        base = None
        for plan in plans:
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = measure_step(plan, size=size, batch_size=batch, fake=True, blocks=False)
            peaks = {p: m.peak(p) for p in ("forward", "backward", "optimizer")}
            step = max(peaks.values())
            base = step if plan == "none" else base
            row = {"size": size, "batch": batch, "strategies": plan, **{f"{p}_mib": round(v / MIB) for p, v in peaks.items()}}
            row.update(step_peak_mib=round(step / MIB), peak_vs_fp32=f"{step / base:.3f}" if base else "", estimate_s=f"{time.perf_counter() - t:.1f}")
            print(row, flush=True)
            yield row


def _model(plan_spec):
    from memtrain.config import ModelConfig
    from memtrain.loss import MSSSIMLoss
    from memtrain.model import build_model
    from memtrain.strategies import Environment, Plan

    plan = Plan.resolve(plan_spec, Environment(device="cpu", native_bf16=False))
    torch.manual_seed(0)
    return plan, plan.apply(build_model(ModelConfig(encoder="resnet34", zero_head=False))), plan.wrap_loss(MSSSIMLoss())


def flops_and_time(size, plans, repeats):
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.rand(1, 1, size, size), torch.rand(1, 1, size, size)
    built = {p: _model(p) for p in plans}

    def step(p):
        plan, model, loss_fn = built[p]
        with plan.forward_context():
            out = model(x)
        loss_fn(out, y).backward()
        model.zero_grad(set_to_none=True)

    flops = {}
    for p in plans:
        counter = FlopCounterMode(display=False)
        with counter:
            step(p)
        flops[p] = counter.get_total_flops()
    times = {p: [] for p in plans}
    for _ in range(repeats):
        for p in plans:
            t = time.process_time()
            step(p)
            times[p].append(time.process_time() - t)
    med = {p: statistics.median(v) for p, v in times.items()}
    return {p: (flops[p] / flops["none"], med[p] / med["none"], med[p]) for p in plans}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2048,4096,8192")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--plans", default=";".join(PLANS), help="';'-separated strategy lists")
    ap.add_argument("--flop-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    plans = args.plans.split(";")
    rows = list(memory_rows([int(s) for s in args.sizes.split(",")], plans, args.batch))
    cost = flops_and_time(args.flop_size, ["none", "tile"], args.repeats) if args.flop_size else {}
    env = host_environment()
    head = f"versions and machine: {env}\n"
    md = io.StringIO()
    md.write(f"# tile: step memory (fake tensors, tensor bytes, resnet34, Adam, batch {args.batch})\n\n{head}\n")
    md.write("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
    for r in rows:
        md.write("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |\n")
    if cost:
        md.write(f"\n## cost at {args.flop_size}² (FLOPs: FlopCounterMode fwd+bwd; CPU process time, {args.repeats} interleaved repeats, median)\n\n")
        md.write("| strategies | FLOP ratio | CPU time ratio | CPU s |\n|---|---|---|---|\n")
        for p, (fr, tr, s) in cost.items():
            md.write(f"| {p} | {fr:.2f} | {tr:.2f} | {s:.2f} |\n")
    print(md.getvalue())
    if not args.no_write:
        out = ROOT / "benchmarks" / "results"
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(out / "tile.csv", buf.getvalue())
        atomic_write_text(out / "tile.md", md.getvalue())


if __name__ == "__main__":
    main()

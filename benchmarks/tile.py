"""``tile`` against today's best plans: step memory (fake tensors), FLOPs and CPU step time, side by side.

For every size and plan it prints the forward, backward and optimizer ``tensor_peak`` of one
U-Net ResNet34 training step (batch 1 unless given, Adam, MS-SSIM) measured with fake tensors
(:func:`memtrain.memory.estimate.measure_step`), the ratio to the float32 ``none`` step, and at
``--flop-size`` the FLOP ratio (``torch.utils.flop_counter.FlopCounterMode``, forward + backward,
real tensors) and the CPU step-time ratio to ``none`` (real steps, interleaved repeats, median).

    OMP_NUM_THREADS=2 python benchmarks/tile.py                       # 1024..8192 and 4192² batch 4; cost at 512²
    OMP_NUM_THREADS=2 python benchmarks/tile.py --sizes 1024 --flop-size 0 --no-write

Memory is estimated for ``memtrain plan``'s default target (``--target cuda``: a GPU with native
bf16, as the planner assumes) or for this CPU (``--target cpu``). A fake estimate of a tiled step
runs the first and the widest tile of every sweep (:func:`memtrain.strategies.tile.sampled_tiles`;
tests/test_tile.py checks it equals a real step), so every size takes seconds.

``tile:lean`` rows: the opt-in variant whose decoder region recomputes the encoder's ¼-resolution skip per tile.

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
PLANS = (
    "none",
    "amp,checkpoint:full,quant",
    "tile",
    "amp,tile",
    "amp,tile,checkpoint:full,quant",
    "amp,tile,offload",
    "amp,tile:lean,checkpoint:full,quant",
    "amp,tile:lean,offload",
)
CASES = "1024,2048,4096,8192,4192x4"  # SIZE or SIZExBATCH; 4192 = a native 4188² radiograph padded to the stride grid
COLUMNS = (
    "size",
    "batch",
    "strategies",
    "forward_mib",
    "backward_mib",
    "optimizer_mib",
    "step_peak_mib",
    "activations_mib",
    "peak_vs_fp32",
    "estimate_s",
)


def memory_rows(cases, plans, env):
    """``activations_mib``: the activation peak — the most activation bytes at the forward's or the backward's peak."""
    for size, batch in cases:
        base = None
        for plan in plans:
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    m = measure_step(plan, size=size, batch_size=batch, fake=True, blocks=False, env=env)
                except Exception as e:  # a plan the target rejects (e.g. offload on a CPU target)
                    print(f"{plan} at {size}: {e}", flush=True)
                    continue
            peaks = {p: m.peak(p) for p in ("forward", "backward", "optimizer")}
            top = max(peaks, key=peaks.get)
            step = peaks[top]
            base = step if plan == "none" else base
            row = {"size": size, "batch": batch, "strategies": plan, **{f"{p}_mib": round(v / MIB) for p, v in peaks.items()}}
            row.update(
                step_peak_mib=round(step / MIB),
                activations_mib=round(max(m.phases[p].get("tensor_peak_activations", 0) for p in ("forward", "backward")) / MIB),
                peak_vs_fp32=f"{step / base:.3f}" if base else "",
                estimate_s=f"{time.perf_counter() - t:.1f}",
            )
            print(row, flush=True)
            yield row


def _model(plan_spec, stands_in_for=None):
    """The plan on this CPU; ``stands_in_for="cuda"``: as a GPU step would run (``tile``'s one statistics sweep)."""
    from dataclasses import replace

    from memtrain.config import ModelConfig
    from memtrain.loss import MSSSIMLoss
    from memtrain.model import build_model
    from memtrain.strategies import Environment, Plan

    plan = Plan.resolve(plan_spec, replace(Environment.detect("cpu"), stands_in_for=stands_in_for))
    torch.manual_seed(0)
    return plan, plan.apply(build_model(ModelConfig(encoder="resnet34", zero_head=False))), plan.wrap_loss(MSSSIMLoss())


def flops_and_time(size, plans, repeats):
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.rand(1, 1, size, size), torch.rand(1, 1, size, size)
    built = {p: _model(p) for p in plans}
    gpu_form = {p: _model(p, "cuda") for p in plans}

    def step(p, models=built):
        plan, model, loss_fn = models[p]
        with plan.session():  # as the training step: the plan's session, autocast around the forward (amp: bf16)
            with plan.precision().autocast(), plan.forward_context():
                loss = loss_fn(model(x), y)
            loss.backward()
        model.zero_grad(set_to_none=True)

    flops, gpu_flops = {}, {}
    for p in plans:
        for models, into in ((built, flops), (gpu_form, gpu_flops)):
            counter = FlopCounterMode(display=False)
            with counter:
                step(p, models)
            into[p] = counter.get_total_flops()
    times = {p: [] for p in plans}
    for _ in range(repeats):
        for p in plans:
            t = time.process_time()
            step(p)
            times[p].append(time.process_time() - t)
    med = {p: statistics.median(v) for p, v in times.items()}
    return {p: (flops[p] / flops["none"], gpu_flops[p] / gpu_flops["none"], med[p] / med["none"], med[p]) for p in plans}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=CASES, help="comma-separated SIZE or SIZExBATCH (batch 1 by default)")
    ap.add_argument("--plans", default=";".join(PLANS), help="';'-separated strategy lists")
    ap.add_argument("--target", choices=("cuda", "cpu"), default="cuda", help="estimate for memtrain plan's default CUDA target or for this CPU")
    ap.add_argument(
        "--cost-plans",
        default="tile;amp,tile,checkpoint:full,quant;tile:lean;amp,tile:lean,checkpoint:full,quant",
        help="';'-separated plans timed and FLOP-counted against none",
    )
    ap.add_argument("--flop-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    plans = args.plans.split(";")
    from memtrain.memory.planner import default_target
    from memtrain.strategies import Environment

    target = default_target() if args.target == "cuda" else Environment.detect("cpu")
    cases = [(int(c.split("x")[0]), int(c.split("x")[1]) if "x" in c else 1) for c in args.sizes.split(",")]
    rows = list(memory_rows(cases, plans, target))
    cost = flops_and_time(args.flop_size, ["none", *args.cost_plans.split(";")], args.repeats) if args.flop_size else {}
    env = host_environment()
    head = f"versions and machine: {env}\n\ntarget: {target} ({args.target}); command: `python benchmarks/tile.py {' '.join(sys.argv[1:])}`\n"
    md = io.StringIO()
    md.write(f"# tile: step memory (fake tensors, tensor bytes, resnet34, Adam, MS-SSIM)\n\n{head}\n")
    md.write("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
    for r in rows:
        md.write("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |\n")
    if cost:
        md.write(f"\n## cost at {args.flop_size}² (FLOPs: FlopCounterMode fwd+bwd; CPU process time, {args.repeats} interleaved repeats, median)\n\n")
        md.write(
            "Real steps on this CPU: float32 plans with tile's CPU rounding (a second statistics sweep per BatchNorm),"
            " amp plans under bf16 autocast. GPU-form FLOPs: the same plans as a GPU step runs them (one sweep).\n\n"
        )
        md.write("| strategies | FLOP ratio | FLOP ratio, GPU form | CPU time ratio | CPU s |\n|---|---|---|---|---|\n")
        for p, (fr, gr, tr, s) in cost.items():
            md.write(f"| {p} | {fr:.2f} | {gr:.2f} | {tr:.2f} | {s:.2f} |\n")
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

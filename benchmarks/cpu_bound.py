"""Does the plan's CPU estimate bound the real memory of a CPU step, within 10 %? And what does fixing glibc's mmap threshold cost?

For each plan, in a fresh process per repeat (plans interleaved, repeat after repeat): one real
step after a warm-up at ``--base`` px and at ``--size`` px (``measure_step(fake=False)`` with the
``process`` backend, glibc's mmap threshold fixed as for every measurement); the *measured increase* is the
largest phase's peak resident memory at ``--size`` minus the same at ``--base``. Beside it,
from fake tensors: the *tensor estimate* (largest phase's live tensor bytes, the same
difference) and the *CPU bound* (what the default CPU headroom model,
``memtrain.memory.headroom.default_model("cpu")``, says the step needs, the same difference:
tensors + oneDNN's working copy, × 1.03). The ratio is CPU bound ÷ measured increase
(target: 1.00–1.10).

Time cost of the fixed threshold: ``--time-rounds`` rounds, each a fresh process with the
threshold fixed and one with glibc's dynamic threshold (``MEMTRAIN_MMAP_THRESHOLD=default``),
interleaved; each runs a warm-up and ``--time-steps`` steps of ``none`` at ``--size``
(median wall and process CPU time per step).

    python benchmarks/cpu_bound.py --repeats 3 --time-rounds 3 --out benchmarks/results/cpu_bound
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLANS = "none;amp;checkpoint:full;amp,checkpoint:full;amp,checkpoint:full,quant;tile"
MIB = 2**20


def child_memory(plan: str, base: int, size: int) -> None:
    import torch

    from memtrain.memory.estimate import measure_step
    from memtrain.strategies import Environment

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    env = Environment.detect("cpu")
    out = {}
    for s in (base, size):
        m = measure_step(plan, size=s, env=env, fake=False, blocks=False, backends=("tensor", "process"))
        out[s] = {"process": m.metric_peak("process_peak"), "tensor": m.metric_peak("tensor_peak")}
    print(json.dumps(out))


def child_time(size: int, steps: int) -> None:
    import contextlib

    import torch

    from memtrain.config import ModelConfig
    from memtrain.memory.allocator import fix_mmap_threshold
    from memtrain.memory.step import TrainStep
    from memtrain.strategies import Environment, Plan

    class Untimed:
        def step(self, *args, **kwargs):
            return contextlib.nullcontext()

        def phase(self, name):
            return contextlib.nullcontext()

    threshold = fix_mmap_threshold()  # what measurements do (a no-op under MEMTRAIN_MMAP_THRESHOLD=default)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    plan = Plan.resolve("none", Environment.detect("cpu"))
    torch.manual_seed(0)
    x, y = torch.rand(1, 1, size, size), torch.rand(1, 1, size, size)
    walls, cpus = [], []
    with plan.session():
        train = TrainStep(plan, model_cfg=ModelConfig(encoder="resnet34"))
        train(Untimed(), x, y)  # warm-up, left out
        for _ in range(steps):
            w, c = time.perf_counter(), time.process_time()
            train(Untimed(), x, y)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    print(json.dumps({"applied": threshold, "wall": statistics.median(walls), "cpu": statistics.median(cpus)}))


def run_child(args: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimates(plan: str, base: int, size: int) -> tuple[int, int]:
    """(tensor estimate increase, CPU bound increase) in bytes, from fake tensors."""
    from memtrain.memory.estimate import measure_step
    from memtrain.memory.headroom import default_model
    from memtrain.strategies import Environment

    env, model = Environment.detect("cpu"), default_model("cpu")
    mem = {s: measure_step(plan, size=s, env=env, blocks=False) for s in (base, size)}
    return mem[size].step_peak - mem[base].step_peak, model.needed(mem[size]) - model.needed(mem[base])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", default=PLANS, help="';'-separated strategy combinations")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--base", type=int, default=64, help="the size whose peak is subtracted")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per plan (interleaved)")
    ap.add_argument("--time-rounds", type=int, default=3, help="interleaved pairs of timing processes (0: no timing)")
    ap.add_argument("--time-steps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/cpu_bound")
    ap.add_argument("--child-memory", help=argparse.SUPPRESS)
    ap.add_argument("--child-time", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.child_memory:
        return child_memory(args.child_memory, args.base, args.size)
    if args.child_time:
        return child_time(args.size, args.time_steps)

    import torch

    from memtrain.compare.environment import host_environment
    from memtrain.rundir import atomic_write_text

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    plans = args.plans.split(";")
    measured: dict[str, list[int]] = {p: [] for p in plans}
    common = ["--base", str(args.base), "--size", str(args.size)]
    for r in range(args.repeats):
        for plan in plans:
            out = run_child(["--child-memory", plan, *common])
            measured[plan].append(out[str(args.size)]["process"] - out[str(args.base)]["process"])
            print(f"repeat {r + 1}: {plan}: measured increase {measured[plan][-1] / MIB:.1f} MiB", file=sys.stderr, flush=True)
    rows = []
    for plan in plans:
        tensor, bound = estimates(plan, args.base, args.size)
        m = sorted(measured[plan])
        med = statistics.median(m)
        rows.append(
            {
                "strategies": plan,
                "size": args.size,
                "base": args.base,
                "tensor_estimate_mib": round(tensor / MIB, 1),
                "cpu_bound_mib": round(bound / MIB, 1),
                "measured_min_mib": round(m[0] / MIB, 1),
                "measured_median_mib": round(med / MIB, 1),
                "measured_max_mib": round(m[-1] / MIB, 1),
                "ratio_to_median": round(bound / med, 3),
                "ratio_to_max": round(bound / m[-1], 3),
                "ratio_to_min": round(bound / m[0], 3),
            }
        )
    timing = []
    for _ in range(args.time_rounds):
        for label, value in (("fixed (128 KiB)", None), ("glibc dynamic", "default")):
            env = dict(os.environ)
            env.pop("MEMTRAIN_MMAP_THRESHOLD", None)
            if value is not None:
                env["MEMTRAIN_MMAP_THRESHOLD"] = value
            t = run_child(["--child-time", "--size", str(args.size), "--time-steps", str(args.time_steps)], env=env)
            timing.append({"threshold": label, **t})
    out = Path(args.out)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    host = host_environment()
    command = f"python benchmarks/cpu_bound.py --size {args.size} --base {args.base} --repeats {args.repeats} --time-rounds {args.time_rounds} --out {args.out}"
    lines = [
        f"# CPU estimate vs measured peak resident memory ({args.size}² minus {args.base}², U-Net resnet34, MS-SSIM, batch 1)",
        "",
        f"Command: `{command}` (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}). "
        f"{host['cpu']}; torch {host['torch']}, smp {host['segmentation_models_pytorch']}, lightning {host['lightning']}, "
        f"pytorch-msssim {host['pytorch_msssim']}, memtrain {host['memtrain']}, {host['os']}.",
        "",
        f"Measured: one real step after a warm-up, fresh process per repeat ({args.repeats} repeats, plans interleaved), glibc's mmap threshold "
        "fixed (memtrain.memory.allocator); largest phase's peak RSS minus the same at the base size. CPU bound: "
        "`default_model('cpu').needed()` at both sizes, the difference. Ratio: CPU bound ÷ measured (target 1.00–1.10).",
        "",
        "| strategies | tensor estimate (MiB) | CPU bound (MiB) | measured min / median / max (MiB) | ratio to median (to max – to min) |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['strategies']} | {r['tensor_estimate_mib']:.1f} | {r['cpu_bound_mib']:.1f} | "
            f"{r['measured_min_mib']:.1f} / {r['measured_median_mib']:.1f} / {r['measured_max_mib']:.1f} | "
            f"{r['ratio_to_median']:.3f} ({r['ratio_to_max']:.3f} – {r['ratio_to_min']:.3f}) |"
            for r in rows
        ),
        "",
    ]
    if timing:
        by = {label: [t for t in timing if t["threshold"] == label] for label in ("fixed (128 KiB)", "glibc dynamic")}
        med = {label: (statistics.median([t["wall"] for t in ts]), statistics.median([t["cpu"] for t in ts])) for label, ts in by.items()}
        base_wall, base_cpu = med["glibc dynamic"]
        lines += [
            f"## Time cost of the fixed mmap threshold (`none`, {args.size}², {args.time_rounds} interleaved pairs of fresh processes, "
            f"median of {args.time_steps} steps each after a warm-up; the machine was shared and loaded, so wall times are noisy)",
            "",
            "| mmap threshold | step wall (s) | step process CPU (s) | wall ÷ dynamic | CPU ÷ dynamic |",
            "|---|---:|---:|---:|---:|",
            *(f"| {label} | {w:.3f} | {c:.3f} | x{w / base_wall:.3f} | x{c / base_cpu:.3f} |" for label, (w, c) in med.items()),
            "",
            "Per process (wall s, CPU s): " + "; ".join(f"{t['threshold']}: {t['wall']:.3f}, {t['cpu']:.3f}" for t in timing),
            "",
        ]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

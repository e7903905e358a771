"""Memory and time of the memory strategies, side by side: one training step of the U-Net ResNet34, batch 1.

For every combination and size it prints the forward, backward and optimizer ``tensor_peak``
(live tensor bytes of the step, :func:`memtrain.memory.estimate.measure_step`) measured with
fake tensors (shapes and autograd graph real, nothing allocated — exact on CPU), and at the
smallest size also for real, so the two can be compared. The step time ÷ baseline is
measured for real at the smallest size: every combination's step is built once, warmed up,
then the combinations run round-robin (interleaved, so background load hits them alike) and
the median of each is divided by the baseline's median.

Targets (issue 3): at 2048² the best faithful plan ≤ 0.15 × the float32 baseline peak; a
4096² plan ≤ 8 GiB; the lowest-memory plan's step time ≤ 1.4 × baseline. Results go to
``benchmarks/results/strategies.{csv,md}`` with versions and machine.

    OMP_NUM_THREADS=2 python benchmarks/strategies.py                       # sizes 256..4096
    OMP_NUM_THREADS=2 python benchmarks/strategies.py --sizes 256,512 --repeats 3 --no-write

Every combination here is accepted by ``Plan.resolve`` and checked for faithfulness by
tests/test_matrix.py. ``offload`` is left out on a CPU: it moves saved tensors from the
device to host memory, and on a CPU they are already there (it measures the same as without).
"""

from __future__ import annotations

import argparse
import contextlib
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

GIB = 2**30
MIB = 2**20
COMBINATIONS = (
    "none",
    "amp",
    "checkpoint",
    "checkpoint:full",
    "quant",
    "amp,checkpoint",
    "amp,quant",
    "amp,checkpoint:full",
    "amp,checkpoint,momentum",
    "amp,checkpoint:full,quant",
)
PHASES = ("forward", "backward", "optimizer")
COLUMNS = ("size", "strategies", "how", "forward_mib", "backward_mib", "optimizer_mib", "step_peak_mib", "peak_vs_baseline", "time_vs_baseline", "time_s")


class _NoTracker:
    """TrainStep's tracker interface, recording nothing (for timing)."""

    def step(self, *objs, step=None):
        return contextlib.nullcontext()

    def phase(self, name):
        return contextlib.nullcontext()


def _quiet_resolve(spec: str):
    from memtrain.strategies import Environment, Plan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Plan.resolve(spec, Environment(device="cpu", native_bf16=False))


def time_steps(combos: list[str], size: int, repeats: int, encoder: str) -> dict[str, list[float]]:
    """Seconds per real training step of each combination, interleaved round-robin after one warm-up step each."""
    from memtrain.config import ModelConfig
    from memtrain.memory.step import TrainStep

    torch.manual_seed(0)
    x, y = torch.rand(1, 1, size, size), torch.rand(1, 1, size, size)
    steps, plans = {}, {}
    for spec in combos:
        plans[spec] = _quiet_resolve(spec)
        with plans[spec].session():
            steps[spec] = TrainStep(plans[spec], model_cfg=ModelConfig(encoder=encoder))
            steps[spec](_NoTracker(), x, y)  # warm-up
    times: dict[str, list[float]] = {s: [] for s in combos}
    for _ in range(repeats):
        for spec in combos:
            with plans[spec].session():
                t0 = time.perf_counter()
                steps[spec](_NoTracker(), x, y)
                times[spec].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256,512,1024,2048,4096")
    ap.add_argument("--combinations", default=",".join(c.replace(",", "+") for c in COMBINATIONS), help="'+' joins the strategies of one combination")
    ap.add_argument("--encoder", default="resnet34")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per combination at the smallest size (0: memory only, fake tensors)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    combos = [c.replace("+", ",") for c in args.combinations.split(",")]
    if combos[0] != "none":
        combos.insert(0, "none")
    started = time.time()
    rows: list[dict] = []

    def add(size, spec, how, mem, base_peak, t=None, base_t=None):
        peaks = {p: mem.peak(p) for p in PHASES}
        row = {"size": size, "strategies": mem.strategies if spec != "none" else "none", "how": how}
        row.update({f"{p}_mib": f"{peaks[p] / MIB:.1f}" for p in PHASES})
        row["step_peak_mib"] = f"{mem.step_peak / MIB:.1f}"
        row["peak_vs_baseline"] = f"{mem.step_peak / base_peak:.3f}"
        row["time_vs_baseline"] = f"{t / base_t:.2f}" if t is not None else ""
        row["time_s"] = f"{t:.3f}" if t is not None else ""
        rows.append(row)
        print(" | ".join(str(row[c]) for c in COLUMNS), flush=True)

    print(" | ".join(COLUMNS))
    small = sizes[0]
    # --repeats 0: memory only (no real steps: neither timed nor measured for real).
    times = time_steps(combos, small, args.repeats, args.encoder) if args.repeats > 0 else {}
    median = {s: statistics.median(v) for s, v in times.items()}
    for size in sizes:
        fake = {spec: measure_step(spec, size=size, encoder=args.encoder, blocks=False) for spec in combos}
        base_peak = fake["none"].step_peak
        for spec in combos:
            add(size, spec, "fake", fake[spec], base_peak, median.get(spec) if size == small else None, median.get("none") if size == small else None)
            if size == small and args.repeats > 0:
                add(size, spec, "real", measure_step(spec, size=size, encoder=args.encoder, fake=False, blocks=False), base_peak)
    elapsed = time.time() - started

    # Targets.
    def best(size):
        cand = [r for r in rows if r["size"] == size and r["how"] == "fake"]
        return min(cand, key=lambda r: float(r["step_peak_mib"])) if cand else None

    targets = []
    if (b := best(2048)) is not None:
        ratio = float(b["peak_vs_baseline"])
        targets.append(f"2048²: best plan `{b['strategies']}` peaks at {ratio:.3f} × the fp32 baseline (target ≤ 0.15: {'met' if ratio <= 0.15 else 'MISSED'})")
    if (b := best(4096)) is not None:
        gib = float(b["step_peak_mib"]) / 1024
        targets.append(f"4096²: best plan `{b['strategies']}` peaks at {gib:.2f} GiB (target ≤ 8 GiB: {'met' if gib <= 8 else 'MISSED'})")
    if median and (b := best(small)) is not None:
        lowest = best(max(sizes))["strategies"]
        row = next(r for r in rows if r["size"] == small and r["how"] == "fake" and r["strategies"] == lowest)
        ratio = float(row["time_vs_baseline"])
        targets.append(
            f"{small}²: the lowest-memory plan `{lowest}` steps in {ratio:.2f} × the baseline's time (target ≤ 1.4: {'met' if ratio <= 1.4 else 'MISSED'})"
        )
    for t in targets:
        print(t)

    if args.no_write:
        return 0
    host = host_environment()
    out = ROOT / "benchmarks" / "results"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "strategies.csv", buf.getvalue())
    md = [
        f"# Memory strategies: step peak and time — {host['cpu'].split(' (')[0]}",
        "",
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/strategies.py --sizes {args.sizes} --combinations {args.combinations} "
        f"--repeats {args.repeats}` ({elapsed:.0f} s)",
        "",
        f"U-Net {args.encoder}, batch 1, 1 − MS-SSIM, Adam; `tensor_peak` (live tensor bytes) per phase of the second step, "
        "fake tensors (`fake`) and, at the smallest size, a real CPU step (`real`). "
        + (
            f"Time: median of {args.repeats} real steps at {small}², combinations interleaved, ÷ the baseline's median."
            if median
            else "Memory only (`--repeats 0`): no real steps, no time."
        ),
        f"torch {host['torch']}, segmentation-models-pytorch {host['segmentation_models_pytorch']}, pytorch-msssim {host['pytorch_msssim']}, "
        f"Python {host['python']}; CPU {host['cpu']}; {host['os']}.",
        "",
        *[f"- {t}" for t in targets],
        "",
        "| size | strategies | how | forward MiB | backward MiB | optimizer MiB | step peak MiB | peak ÷ baseline | time ÷ baseline |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['size']} | {r['strategies']} | {r['how']} | {r['forward_mib']} | {r['backward_mib']} | {r['optimizer_mib']} | {r['step_peak_mib']} | "
            f"{r['peak_vs_baseline']} | {r['time_vs_baseline']} |"
            for r in rows
        ],
        "",
    ]
    atomic_write_text(out / "strategies.md", "\n".join(md))
    print(f"wrote {out / 'strategies.csv'} and {out / 'strategies.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How far is the planner's estimate from what a real step holds? Estimate vs tensor count vs allocator vs NVML.

For each size, the baseline (``none``), the planner's best plan for ``--memory-budget`` and the
``--also`` combinations are

* estimated with fake tensors (:func:`memtrain.memory.estimate.measure_step`, what
  ``memtrain plan`` and ``--strategies auto`` use), and
* measured for real, each in a fresh process (the ``memtrain compare`` cell: one warm-up
  step left out, then ``--steps`` steps), with every backend of the device: ``tensor``
  (live tensor bytes), and on a GPU ``cuda`` (allocator ``alloc_peak``, ``reserved_peak``)
  and ``nvml`` (``nvml_used_peak``, sampled); on a CPU ``process`` (``process_peak``, the
  process's peak resident memory in the phase).

It prints one row per (size, strategies, phase) and the relative error of the estimate
against the tensor count and against the allocator, and writes
``benchmarks/results/tracker_accuracy_<device>.{md,csv}``. On a CPU the GPU columns say
``needs CUDA``. Target on a GPU: estimate within 10 % of ``alloc_peak``.

    python benchmarks/tracker_accuracy.py                       # GPU: 512,1024,2048; CPU: 256,512,1024
    python benchmarks/tracker_accuracy.py --sizes 512 --memory-budget 8GiB
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memtrain.compare.environment import host_environment  # noqa: E402
from memtrain.compare.sweep import Sweep, run_cell_process  # noqa: E402
from memtrain.memory.estimate import measure_step  # noqa: E402
from memtrain.memory.planner import Planner  # noqa: E402
from memtrain.memory.tracker import MIB, PHASES  # noqa: E402
from memtrain.memory.units import fmt_bytes, parse_bytes  # noqa: E402
from memtrain.rundir import atomic_write_text  # noqa: E402
from memtrain.strategies import Environment  # noqa: E402

NEEDS_CUDA = "needs CUDA"
COLUMNS = (
    "size",
    "strategies",
    "role",
    "phase",
    "estimate_mib",
    "tensor_mib",
    "alloc_mib",
    "reserved_mib",
    "nvml_used_mib",
    "process_mib",
    "est_vs_tensor_pct",
    "est_vs_alloc_pct",
)


def _pct(est: float, ref: float | None) -> str:
    return "" if not ref else f"{100 * (est - ref) / ref:+.2f}"


def main(argv: list[str] | None = None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="512,1024,2048" if cuda else "256,512,1024")
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=1, help="measured steps per real run (after one warm-up step)")
    p.add_argument("--memory-budget", default=None, help="budget for the best plan [default: the GPU's memory; on a CPU 2GiB]")
    p.add_argument("--also", default="amp", help="';'-separated combinations measured besides none and the best plan")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    env = Environment.detect("cuda" if cuda else "cpu")
    default_budget = torch.cuda.get_device_properties(0).total_memory if cuda else 2 * 2**30
    budget = default_budget if args.memory_budget is None else parse_bytes(args.memory_budget, "--memory-budget")
    sizes = [int(s) for s in args.sizes.split(",")]
    also = [c for c in args.also.split(";") if c]
    rows, device_env, chosen = [], {}, []
    t_start = time.perf_counter()
    for size in sizes:
        planner = Planner(size=size, batch_size=args.batch_size, encoder=args.encoder, env=env, budget=budget)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            best = planner.choose()
        combos = {"none": "baseline"}
        chosen.append(f"{size}: {best.strategies if best else 'nothing fits'}")
        if best is not None:
            combos.setdefault(best.strategies, "best plan")
        for c in also:
            combos.setdefault(c, "also")
        for combo, role in combos.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est = measure_step(combo, size=size, batch_size=args.batch_size, encoder=args.encoder, env=env, fake=True, blocks=False)
            sweep = Sweep([combo], [size], out=None, steps=args.steps, batch_size=args.batch_size, encoder=args.encoder)
            real = run_cell_process(sweep.spec(combo, size), timeout=3600)
            device_env = device_env or real.get("environment", {})
            if real["status"] != "ok":
                print(f"{size} {combo}: {real['status']} {real.get('phase', '')} {real.get('reason', '')}", flush=True)
                rows.append(dict.fromkeys(COLUMNS, "") | {"size": size, "strategies": combo, "role": role, "phase": real["status"]})
                continue
            for phase in PHASES:
                m = real["phases"][phase]
                e = est.peak(phase)
                row = {
                    "size": size,
                    "strategies": combo,
                    "role": role,
                    "phase": phase,
                    "estimate_mib": f"{e / MIB:.1f}",
                    "tensor_mib": f"{m['tensor_peak'] / MIB:.1f}",
                    "alloc_mib": f"{m['alloc_peak'] / MIB:.1f}" if "alloc_peak" in m else NEEDS_CUDA,
                    "reserved_mib": f"{m['reserved_peak'] / MIB:.1f}" if "reserved_peak" in m else NEEDS_CUDA,
                    "nvml_used_mib": f"{m['nvml_used_peak'] / MIB:.1f}" if "nvml_used_peak" in m else NEEDS_CUDA,
                    "process_mib": f"{m['process_peak'] / MIB:.1f}" if "process_peak" in m else "",
                    "est_vs_tensor_pct": _pct(e, m["tensor_peak"]),
                    "est_vs_alloc_pct": _pct(e, m.get("alloc_peak")) if "alloc_peak" in m else NEEDS_CUDA,
                }
                rows.append(row)
                print("  ".join(f"{row[k]}" for k in COLUMNS), flush=True)
    elapsed = time.perf_counter() - t_start
    host = host_environment()
    device = device_env.get("device", "?")
    kind = "cuda" if cuda else "cpu"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    out = Path(args.out)
    atomic_write_text(out / f"tracker_accuracy_{kind}.csv", buf.getvalue())
    errors = [abs(float(r["est_vs_tensor_pct"])) for r in rows if r["est_vs_tensor_pct"] not in ("", NEEDS_CUDA)]
    alloc_errors = [abs(float(r["est_vs_alloc_pct"])) for r in rows if r["est_vs_alloc_pct"] not in ("", NEEDS_CUDA)]
    lines = [
        f"# Tracker accuracy: estimate (fake tensors) vs real step — {device}",
        "",
        "Command: `" + " ".join(["python benchmarks/tracker_accuracy.py", *(argv if argv is not None else sys.argv[1:])]) + "`",
        "",
        f"U-Net {args.encoder}, batch {args.batch_size}, best plan for a budget of {fmt_bytes(budget)}; real runs: one warm-up step, then"
        f" {args.steps} measured, each (size, strategies) in a fresh process; {elapsed:.0f} s in all.",
        f"torch {host['torch']} (CUDA build {host['cuda_build']}), segmentation-models-pytorch {host['segmentation_models_pytorch']},"
        f" driver {device_env.get('driver', '?')}, CUDA {device_env.get('cuda', '?')}; CPU {host['cpu']}.",
        "",
        f"Best plan (the planner's choice for {fmt_bytes(budget)}) per size: {'; '.join(chosen)}.",
        "",
        "Peaks in MiB per phase; errors are (estimate − measured) / measured.",
        "",
        "| size | strategies | role | phase | estimate | tensor | alloc | reserved | nvml used | process (CPU RSS) | est vs tensor | est vs alloc |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            "| " + " | ".join(str(r[k]) + (" %" if k.endswith("_pct") and r[k] not in ("", NEEDS_CUDA) else "") for k in COLUMNS).replace("| |", "| – |") + " |"
        )
    lines += [
        "",
        f"Largest |estimate − tensor| / tensor: {max(errors):.2f} %." if errors else "No real run succeeded.",
        f"Largest |estimate − alloc| / alloc: {max(alloc_errors):.2f} % (target ≤ 10 %)." if alloc_errors else "GPU columns need CUDA (run this on a GPU).",
    ]
    atomic_write_text(out / f"tracker_accuracy_{kind}.md", "\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))
    print(f"wrote {out}/tracker_accuracy_{kind}.md and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())

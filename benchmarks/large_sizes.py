"""Large-size models (memtrain.memory.large_sizes) against direct fake-tensor estimates (measure_step) at 1024² .. 8192².

For each combination `memtrain plan` estimates through a large-size model by default (a strategy
whose step changes with the size: quant, momentum, tile; shipped.large_combinations, in the
planner's order), the model found (disk cache, then the shipped file) is evaluated at each size
it covers and compared with ``measure_step`` at that size, batch 1, for the planner's default
target. Per row: the relative error of each phase's tensor peak (what the planner's verdict uses),
the largest of them, and the largest over every metric (peak, increase, the peak's breakdown by
category) relative to the phase's peak. Exact models must show 0; approximate ones claim ≤ 1 %.
Results go to benchmarks/results/large_sizes.{md,csv}, rewritten after every row.

    python benchmarks/large_sizes.py                                   # every combination, 1024,2048,4096,8192
    python benchmarks/large_sizes.py --limit 20 --sizes 2048,8192      # the first 20 in the planner's order
    python benchmarks/large_sizes.py --combos "quant,amp;tile,amp"
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memtrain.rundir import atomic_write_text  # noqa: E402

COLUMNS = ("combination", "kind", "fit_sizes", "size", "forward_err", "backward_err", "optimizer_err", "peak_err", "any_metric_err", "direct_s")


def _err(model_memory, direct, phase: str, metric: str = "tensor_peak") -> float:
    return abs(model_memory.phases[phase][metric] - direct.phases[phase][metric]) / direct.phases[phase]["tensor_peak"]


def _pct(x: float) -> str:
    """A relative error in percent, three significant digits; 0 exactly when exact."""
    return f"{x * 100:.3g} %"


def write(rows: list[dict], out: Path, header: str, command: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "large_sizes.csv", buf.getvalue())
    measured = [r for r in rows if "peak" in r]
    worst: dict[str, dict[str, float]] = {}
    for r in measured:
        w = worst.setdefault(r["kind"], {})
        w[r["size"]] = max(w.get(r["size"], 0.0), r["peak"])
    sizes = sorted({r["size"] for r in measured})
    lines = [
        "# Large-size models vs direct fake-tensor estimates",
        "",
        f"Command: `{command}`",
        "",
        header,
        "",
        "kind — exact: per-event quadratics verified to the byte (memtrain.memory.large_sizes, a SizeModel fitted at the fit sizes);"
        " approximate: each phase's peak as a quadratic, checked within 0.2 % at the verify size, claiming ≤ 1 %;"
        " refused: the planner measures at the size. err: |model − measure_step| / measure_step's phase peak;"
        " peak_err: the largest over the phases' tensor peaks (what `plan` decides with); any_metric_err: over every metric"
        " (peak, increase, the peak's breakdown by category). An empty row: the size is below the model's first fit size or off its grid.",
        "",
        "Largest peak_err per kind and size:",
        "",
        "| kind | " + " | ".join(str(s) for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
        *(f"| {k} | " + " | ".join(_pct(w[s]) if s in w else "" for s in sizes) + " |" for k, w in sorted(worst.items())),
        "",
        "| combination | kind | fit sizes | size | forward | backward | optimizer | peak err | any metric | direct s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['combination']} | {r['kind']} | {r['fit_sizes']} | {r['size']} | {r['forward_err']} | {r['backward_err']} | {r['optimizer_err']}"
            f" | {r['peak_err']} | {r['any_metric_err']} | {r['direct_s']} |"
            for r in rows
        ),
    ]
    atomic_write_text(out / "large_sizes.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,2048,4096,8192")
    p.add_argument("--combos", default="", help="';'-separated combinations [default: shipped.large_combinations, the planner's order]")
    p.add_argument("--limit", type=int, default=0, help="only the first N combinations (0: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--append", action="store_true", help="keep the rows of the CSV already in --out and add these")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    warnings.simplefilter("ignore")

    from benchmarks.planner_speed import versions
    from memtrain.memory import large_sizes, scaling, shipped
    from memtrain.memory.estimate import measure_step
    from memtrain.memory.planner import default_target
    from memtrain.memory.tracker import PHASES
    from memtrain.strategies import Plan

    env = default_target()
    sizes = [int(s) for s in args.sizes.split(",")]
    combos = [c for c in args.combos.split(";") if c] or shipped.large_combinations(env)
    combos = combos[: args.limit] if args.limit else combos
    out = Path(args.out)
    command = "python benchmarks/large_sizes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = versions() + f"; target {env.device} (native bf16 {env.native_bf16}), batch 1, U-Net ResNet34, MS-SSIM; load average at start {load:.1f}."
    rows: list[dict] = []
    if args.append and (out / "large_sizes.csv").exists():
        rows = list(csv.DictReader(io.StringIO((out / "large_sizes.csv").read_text())))
        for r in rows:
            r["size"] = int(r["size"]) if r["size"] else ""
            if r["peak_err"]:
                r["peak"] = float(r["peak_err"].split()[0]) / 100
        command = f"{command} (appended to an earlier run)"
    for combo in combos:
        plan = Plan.resolve(combo, env)
        found = large_sizes.find(scaling.cache_key(combo, batch_size=1, encoder="resnet34", env=env))
        model = None if found is None else found[0]
        if model is None or isinstance(model, str):
            rows.append(dict.fromkeys(COLUMNS, "") | {"combination": combo, "kind": "refused" if model else "missing", "fit_sizes": model or ""})
            write(rows, out, header, command)
            continue
        kind = "exact" if isinstance(model, scaling.SizeModel) else "approximate"
        for size in sizes:
            row = dict.fromkeys(COLUMNS, "") | {"combination": combo, "kind": kind, "fit_sizes": "/".join(map(str, model.sizes)), "size": size}
            if large_sizes.covers(size, plan, model):
                start = time.perf_counter()
                direct = measure_step(combo, size=size, env=env, blocks=False)
                row["direct_s"] = f"{time.perf_counter() - start:.1f}"
                got = model.at(size, strategies=direct.strategies, batch_size=1, device=env.device)
                errs = {ph: _err(got, direct, ph) for ph in PHASES}
                row.update({f"{ph}_err": _pct(e) for ph, e in errs.items()})
                row["peak"] = max(errs.values())
                row["peak_err"] = _pct(row["peak"])
                row["any_metric_err"] = _pct(max(_err(got, direct, ph, m) for ph in PHASES for m in large_sizes.METRICS))
            rows.append(row)
            print(row, flush=True)
            write(rows, out, header, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Wall time of `memtrain plan --size S --memory-budget 8GiB`, cold (empty estimate cache) and warm, for S = 512 .. 8192.

Each run is a fresh `python -m memtrain plan` process, as a user types it. "cold" starts from
an empty cache folder (MEMTRAIN_CACHE_DIR) with the size models shipped with memtrain
(memtrain.memory.shipped), as on a fresh machine; "bare" is cold without them
(MEMTRAIN_SHIPPED=0: every size model traced); "warm" reruns the same command on the cache
the previous run of that size left. Results go to benchmarks/results/planner_speed.{md,csv},
rewritten after every row.

    python benchmarks/planner_speed.py                      # 512,1024,2048,4096,8192; cold, warm
    python benchmarks/planner_speed.py --sizes 512,4096 --bare 4096 --jobs 2   # 4096 also bare, before cold
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memtrain.rundir import atomic_write_text  # noqa: E402

COLUMNS = ("size", "cache", "wall_s", "estimates", "shipped", "traced", "traced_s", "chosen", "exit")


def plan(size: int, cache: Path, budget: str, jobs: int, shipped: bool = True) -> dict:
    env = dict(os.environ, MEMTRAIN_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "2")
    env["MEMTRAIN_SHIPPED"] = "1" if shipped else "0"
    cmd = [sys.executable, "-m", "memtrain", "plan", "--size", str(size), "--memory-budget", budget, "--jobs", str(jobs)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    chosen = next((ln.split(": ", 1)[1].split(" (")[0] for ln in proc.stdout.splitlines() if ln.startswith("fastest that fits:")), "nothing fits")
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("memtrain plan: [")]
    traced = [ln for ln in progress if "cached" not in ln and "shipped" not in ln]
    return {
        "size": size,
        "wall_s": f"{wall:.1f}",
        "estimates": len(progress),
        "shipped": sum("(shipped)" in ln for ln in progress),
        "traced": len(traced),
        "traced_s": f"{sum(float(m.group(1)) for ln in traced if (m := re.search(r', ([0-9.]+) s$', ln))):.1f}",
        "chosen": chosen,
        "exit": proc.returncode,
    }


def versions() -> str:
    import segmentation_models_pytorch as smp
    import torch

    import memtrain

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"memtrain {memtrain.__version__}, torch {torch.__version__}, segmentation-models-pytorch {smp.__version__}, Python {platform.python_version()};"
        f" {cpu}, {os.cpu_count()} cores visible, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}"
    )


def write(rows: list[dict], out: Path, header: str, command: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "planner_speed.csv", buf.getvalue())
    lines = [
        "# `memtrain plan` wall time",
        "",
        f"Command: `{command}`",
        "",
        header,
        "",
        "cache — cold: empty estimate cache, with the size models shipped with memtrain (a fresh install);"
        " bare: empty cache and the shipped models switched off (MEMTRAIN_SHIPPED=0), every size model traced;"
        " warm: the same command again on the cache the previous run left.",
        "estimates: progress lines (one per combination estimated); shipped: of them, size models read from the shipped file"
        " (rows with shipped > 0 rely on it); traced: estimates traced or measured in this run (neither cached nor shipped),"
        " and the seconds they took (their progress lines). In cold rows these are combinations with a strategy whose step"
        " depends on the size (quant, momentum, tile: size_polynomial = False) measured at the size itself: below 1024 px, or where"
        " no large-size model (memtrain.memory.large_sizes) is shipped or it was refused; wall − traced s is the rest"
        " (start-up, cached and shipped lookups, output).",
        "",
        "| size | cache | wall s | estimates | shipped | traced | traced s | chosen | exit |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|",
        *(
            f"| {r['size']} | {r['cache']} | {r['wall_s']} | {r['estimates']} | {r['shipped']} | {r['traced']} | {r['traced_s']} | {r['chosen']} | {r['exit']} |"
            for r in rows
        ),
    ]
    atomic_write_text(out / "planner_speed.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="512,1024,2048,4096,8192")
    p.add_argument("--memory-budget", default="8GiB")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--bare", default="", help="comma-separated sizes also measured bare (shipped models off), before their cold run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    bare = {int(s) for s in args.bare.split(",") if s}
    out = Path(args.out)
    command = "python benchmarks/planner_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = versions() + f"; load average at start {load:.1f} (other work on the machine slows every row alike)."
    rows: list[dict] = []
    for size in sizes:
        cold = Path(tempfile.mkdtemp(prefix="memtrain-plan-cold-"))
        try:
            for label in ("bare", "cold", "warm") if size in bare else ("cold", "warm"):
                if label != "warm" and any(cold.iterdir()):  # each cold or bare run starts from an empty cache
                    shutil.rmtree(cold)
                    cold.mkdir()
                rows.append(plan(size, cold, args.memory_budget, args.jobs, shipped=label != "bare") | {"cache": label})
                print(rows[-1], flush=True)
                write(rows, out, header, command)
        finally:
            shutil.rmtree(cold, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

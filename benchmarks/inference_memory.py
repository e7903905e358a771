"""Inference memory: the automatic-tiling estimate of `memtrain enhance` against the real peak, side by side.

For each (precision, size) a fresh process builds the U-Net, measures what
:class:`memtrain.inference.Enhancer` estimates for one forward (fake-tensor bytes per
pixel x pixels, and that times ``SAFETY``) and then runs the real forward, recording the
process's peak resident memory increase (VmHWM after resetting it through
/proc/self/clear_refs). The estimate is safe when ``SAFETY x tensor bytes`` >= the real
increase.

    python benchmarks/inference_memory.py                    # resnet34, 512/1024/2048, fp32 and amp
    python benchmarks/inference_memory.py --sizes 512 1024 --out benchmarks/inference_memory.md

CPU (Linux) only: the CUDA budget uses the allocator's free memory instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's memtrain, not an installed one


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def cell(encoder: str, size: int, amp: bool) -> dict:
    """One measurement, run in this (fresh) process."""
    import torch

    from memtrain.config import ModelConfig
    from memtrain.inference import SAFETY, Enhancer
    from memtrain.model import build_model

    torch.manual_seed(0)
    enhancer = Enhancer(build_model(ModelConfig(encoder=encoder, zero_head=False)), amp=amp)
    bpp = enhancer.bytes_per_pixel()
    x = torch.rand(1, 1, size, size)
    with enhancer.session():
        enhancer.forward(x[:, :, :64, :64])  # warm-up: kernels, thread pools
        before = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        t0 = time.perf_counter()
        out = enhancer.forward(x)
        seconds = time.perf_counter() - t0
        peak = _vm("VmHWM")
    del out
    tensor = bpp * size * size
    return {
        "encoder": encoder,
        "size": size,
        "precision": enhancer.precision,
        "bytes_per_pixel": bpp,
        "tensor_estimate_mib": tensor / 2**20,
        "budgeted_mib": SAFETY * tensor / 2**20,
        "rss_increase_mib": (peak - before) / 2**20,
        "seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="also write the table as Markdown to this file")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        encoder, size, amp = json.loads(args.cell)
        print(json.dumps(cell(encoder, size, amp)))
        return

    import torch

    from memtrain.inference import SAFETY

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    rows = []
    for amp in (False, True):
        for size in args.sizes:
            proc = subprocess.run(
                [sys.executable, __file__, "--cell", json.dumps([args.encoder, size, amp])], env=env, capture_output=True, text=True, check=True
            )
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['precision']:>14} {size:>5}²: estimate {r['budgeted_mib']:8.1f} MiB, real {r['rss_increase_mib']:8.1f} MiB", file=sys.stderr)

    lines = [
        f"# Inference memory: estimate vs real ({args.encoder} U-Net, CPU)",
        "",
        f"`python benchmarks/inference_memory.py --encoder {args.encoder} --sizes {' '.join(map(str, args.sizes))}` — "
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={args.threads}. SAFETY = {SAFETY}.",
        "",
        "| precision | size | fake-tensor B/px | tensor estimate MiB | budgeted (x SAFETY) MiB | real peak RSS increase MiB | real / tensor | covered | forward s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["rss_increase_mib"] / r["tensor_estimate_mib"]
        covered = "yes" if r["budgeted_mib"] >= r["rss_increase_mib"] else "**no**"
        lines.append(
            f"| {r['precision']} | {r['size']}² | {r['bytes_per_pixel']:.0f} | {r['tensor_estimate_mib']:.1f} | {r['budgeted_mib']:.1f} | "
            f"{r['rss_increase_mib']:.1f} | {ratio:.2f} | {covered} | {r['seconds']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

"""Inference memory: the automatic-tiling estimate of `memtrain enhance` against the real peak, and tiled vs whole-image, side by side.

For each (precision, size) a fresh process builds the U-Net, measures what
:class:`memtrain.inference.Enhancer` estimates for one forward (fake-tensor bytes per
pixel x pixels, and that times ``SAFETY``) and then runs the real forward, recording the
process's peak resident memory increase (VmHWM after resetting it through
/proc/self/clear_refs). The estimate is safe when ``SAFETY x tensor bytes`` >= the real
increase.

    python benchmarks/inference_memory.py                    # resnet34, 512/1024/2048, fp32 and amp
    python benchmarks/inference_memory.py --sizes 1024 2048 --tiles --out benchmarks/results/inference_memory_cpu.md
    python benchmarks/inference_memory.py --sizes 1024 --tiles --exact-sizes 1024 2048 4188 --out benchmarks/results/inference_memory_cpu.md

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


def cell(encoder: str, size: int, amp: bool, tile: int | None = None, tiling: str = "blend") -> dict:
    """One measurement, run in this (fresh) process: one forward of the whole image, or `memtrain enhance`'s tiled path (blend or exact)."""
    import numpy as np
    import torch

    from memtrain.config import ModelConfig
    from memtrain.inference import SAFETY, Enhancer
    from memtrain.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder=encoder, zero_head=False)).eval().requires_grad_(False)  # as `load_trained` returns it
    enhancer = Enhancer(model, amp=amp, tiling=tiling)
    bpp = enhancer.bytes_per_pixel()
    x = torch.rand(1, 1, size, size)
    with enhancer.session():
        enhancer.forward(x[:, :, :64, :64])  # warm-up: kernels, thread pools
        before = _vm("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        t0 = time.perf_counter()
        if tile is None:
            out = enhancer.forward(x)
        else:
            out, used = enhancer(np.asarray(x[0, 0]), tile=tile, overlap=min(64, tile // 4))
            assert used.tile == tile and used.exact == (tiling == "exact")
        seconds = time.perf_counter() - t0
        peak = _vm("VmHWM")
    del out
    side = size if tile is None else tile
    tensor = bpp * side * side if tile is None or tiling == "blend" else enhancer.tiled_bytes(size, size, tile)
    return {
        "encoder": encoder,
        "size": size,
        "tile": tile,
        "tiling": tiling,
        "precision": enhancer.precision,
        "bytes_per_pixel": bpp,
        "tensor_estimate_mib": tensor / 2**20,
        "budgeted_mib": SAFETY * tensor / 2**20,
        "rss_increase_mib": (peak - before) / 2**20,
        "seconds": seconds,
    }


def exact_table(encoder: str, sizes: list[int]) -> list[str]:
    """Exact tiles' tensor bytes (fake tensors, float32, batch 1) against the whole image's, per size and tile side."""
    import torch

    from memtrain.config import ModelConfig
    from memtrain.inference import Enhancer
    from memtrain.model import build_model
    from memtrain.strategies.tile import make_tiles

    torch.manual_seed(0)
    enhancer = Enhancer(build_model(ModelConfig(encoder=encoder, zero_head=False)).eval().requires_grad_(False), tiling="exact")
    lines = [
        "",
        "## Exact tiles: tensor bytes (fake tensors, float32, batch 1)",
        "",
        "What one exact tiled forward holds at its peak: the whole tensors crossing the regions (image, `f2` at ¼ with 64",
        "channels, the middle's features, the decoder's ⅛ input, the output) plus one tile window's working set. Pixels",
        "computed by the tiled stages: windows (tile + 2 × 32 px halo, clipped at the border) over the image's pixels.",
        "",
        "| image | tiles | tensor MiB | vs whole | tiled-stage pixels vs whole | probe s |",
        "|---|---|---|---|---|---|",
    ]
    for size in sizes:
        size += -size % 32
        whole = enhancer.bytes_per_pixel() * size * size
        lines.append(f"| {size}² | whole | {whole / 2**20:.1f} | 1.00 | 1.00 | |")
        for side in (1024, 512, 256, 128):
            if side >= size:
                continue
            t0 = time.perf_counter()
            need = enhancer.tiled_bytes(size, size, side)
            seconds = time.perf_counter() - t0
            tiles = make_tiles(size, size, side, enhancer.halo())
            area = sum((t.wy1 - t.wy0) * (t.wx1 - t.wx0) for t in tiles) / size**2
            lines.append(f"| {size}² | {len(tiles)} x {side}² exact | {need / 2**20:.1f} | {need / whole:.2f} | {area:.2f} | {seconds:.0f} |")
            print(f"exact {size}² {side}: {need / 2**20:.1f} MiB ({seconds:.0f} s)", file=sys.stderr)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiles", action="store_true", help="also run every size in tiles of size/2 (overlap 64) and compare with the whole image")
    p.add_argument("--big", type=int, default=4188, help="side of the estimated-only table (fake tensors) [default: 4188]")
    p.add_argument(
        "--exact-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also tabulate exact tiles' tensor bytes (fake tensors, float32) at these sizes against the whole image",
    )
    p.add_argument("--out", type=Path, help="also write the table as Markdown to this file")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        print(json.dumps(cell(*json.loads(args.cell))))
        return

    import torch

    from memtrain.inference import SAFETY, tile_starts

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    rows = []
    tiled = []
    for amp in (False, True):
        for size in args.sizes:
            for tile, tiling in ((None, "blend"), (size // 2, "blend"), (size // 2, "exact")) if args.tiles else ((None, "blend"),):
                proc = subprocess.run(
                    [sys.executable, __file__, "--cell", json.dumps([args.encoder, size, amp, tile, tiling])],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                (rows if tile is None else tiled).append(r)
                print(
                    f"{r['precision']:>14} {size:>5}² tile {tile} {tiling}: estimate {r['budgeted_mib']:8.1f} MiB, real {r['rss_increase_mib']:8.1f} MiB, {r['seconds']:.1f} s",
                    file=sys.stderr,
                )

    lines = [
        f"# Inference memory: estimate vs real ({args.encoder} U-Net, CPU)",
        "",
        f"`python benchmarks/inference_memory.py --encoder {args.encoder} --sizes {' '.join(map(str, args.sizes))}{' --tiles' if args.tiles else ''}"
        f"{' --exact-sizes ' + ' '.join(map(str, args.exact_sizes)) if args.exact_sizes else ''}` — "
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
    if tiled:
        lines += [
            "",
            "## Tiled vs whole image (real runs)",
            "",
            "Tiles of size/2 through `Enhancer.__call__`: blended (overlap 64; pad, tiles, blend, crop) and exact (the `tile`",
            "strategy's regions, 32 px halo, the ¼-resolution and coarser tensors whole; output equal to the whole image's);",
            "the whole image through one forward. Tensor MiB: fake-tensor bytes of what runs at once (blend: one tile's forward;",
            "exact: the tiled forward at the image's size).",
            "",
            "| precision | image | tiles | tensor MiB | real peak RSS increase MiB | vs whole | time s | vs whole |",
            "|---|---|---|---|---|---|---|---|",
        ]
        whole = {(r["precision"], r["size"]): r for r in rows}
        for key, w in whole.items():
            lines.append(
                f"| {w['precision']} | {w['size']}² | whole | {w['tensor_estimate_mib']:.1f} | {w['rss_increase_mib']:.1f} | 1.00 | {w['seconds']:.1f} | 1.00 |"
            )
            for r in (r for r in tiled if (r["precision"], r["size"]) == key):
                if r["tiling"] == "exact":
                    from memtrain.strategies.tile import make_tiles

                    label = f"{len(make_tiles(r['size'], r['size'], r['tile'], 32))} x {r['tile']}² exact"
                else:
                    label = f"{len(tile_starts(r['size'], r['tile'], min(64, r['tile'] // 4))) ** 2} x {r['tile']}² blended"
                lines.append(
                    f"| {r['precision']} | {r['size']}² | {label} | {r['tensor_estimate_mib']:.1f} | {r['rss_increase_mib']:.1f} | "
                    f"{r['rss_increase_mib'] / w['rss_increase_mib']:.2f} | {r['seconds']:.1f} | {r['seconds'] / w['seconds']:.2f} |"
                )
    padded = args.big + (-args.big % 32)
    lines += [
        "",
        f"## {args.big}² radiograph (estimated from fake-tensor bytes per pixel; padded to {padded}²)",
        "",
        "| precision | processing | tiles | estimated peak (x SAFETY) GiB |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if r["size"] != args.sizes[-1]:
            continue
        for tile in (None, 2048, 1024, 512):
            side = padded if tile is None else tile
            n = 1 if tile is None else len(tile_starts(padded, tile, 64)) ** 2
            gib = SAFETY * r["bytes_per_pixel"] * side * side / 2**30
            lines.append(f"| {r['precision']} | {'whole image' if tile is None else f'tiles of {tile}², overlap 64'} | {n} | {gib:.2f} |")
    if args.exact_sizes:
        lines += exact_table(args.encoder, args.exact_sizes)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

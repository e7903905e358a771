"""The loss alone, side by side: memtrain's MS-SSIM (``msssim``) and pytorch-msssim's (``msssim:reference``).

Memory: for each size, the peak tensor bytes above the two inputs (pred, target; batch 1, one
channel) in the loss's forward, what it holds from forward to backward, and the peak in its
backward, counted by the project's ``tensor`` backend under fake tensors (shapes and autograd
real, nothing allocated), as a ratio to the input image's bytes — for float32 inputs and for
bf16 inputs (what an ``amp`` model outputs).

Time: forward + backward of each loss on real float32 tensors at ``--time-size`` (batch 1 and 2),
and the no-grad forward (validation), repeated round-robin (interleaved, so background load hits
both alike); the median of memtrain's ÷ the median of the reference's, in wall-clock and in CPU
(process) time.

Random head: one real forward (no grad) of a randomly initialised U-Net ResNet34 (``--no-zero-head``)
at ``--head-size`` on phantom data, then each loss and its gradient with respect to the output:
the gradient the whole network gets at step one.

Targets (issue 10): peak in forward and in backward ≤ 4 × the image's bytes at 2048² and 4096²;
fwd + bwd time at 1024² not slower than pytorch-msssim. Results go to
``benchmarks/results/loss.{csv,md}`` with versions and machine.

    OMP_NUM_THREADS=2 python benchmarks/loss.py
    OMP_NUM_THREADS=2 python benchmarks/loss.py --sizes 512,1024 --repeats 3 --head-size 256 --no-write
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from memtrain.compare.environment import host_environment  # noqa: E402
from memtrain.loss import LOSSES, build_loss  # noqa: E402
from memtrain.rundir import atomic_write_text  # noqa: E402

MIB = 2**20
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
COLUMNS = ("size", "loss", "input", "image_mib", "forward_mib", "held_mib", "backward_mib", "forward_x_image", "backward_x_image")


def peaks(name: str, size: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(forward peak, held after forward, backward peak) in bytes above the inputs, under fake tensors."""
    from memtrain.memory.estimate import loss_memory

    return loss_memory(build_loss(name), size, dtype)


def time_losses(size: int, batch: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of fwd+bwd and of a no-grad forward per loss, interleaved round-robin after a warm-up."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(batch, 1, size, size, generator=g)
    pred = (target + 0.2 * torch.randn(batch, 1, size, size, generator=g)).requires_grad_(True)
    fns = {name: build_loss(name) for name in LOSSES}

    def train(fn):
        fn(pred, target).backward()
        pred.grad = None

    def validate(fn):
        with torch.no_grad():
            fn(pred, target)

    out: dict[str, dict[str, list[float]]] = {}
    for kind, run in (("fwd+bwd", train), ("forward (no grad)", validate)):
        for fn in fns.values():
            run(fn)  # warm-up
        for name in fns:
            out[f"{name}|{kind}|wall"], out[f"{name}|{kind}|cpu"] = [], []
        for _ in range(repeats):
            for name, fn in fns.items():
                w0, c0 = time.perf_counter(), time.process_time()
                run(fn)
                out[f"{name}|{kind}|wall"].append(time.perf_counter() - w0)
                out[f"{name}|{kind}|cpu"].append(time.process_time() - c0)
    return out


def random_head(size: int) -> list[str]:
    """Loss and output-gradient of each loss for a random-head U-Net ResNet34's first output at ``size``."""
    from memtrain.config import ModelConfig
    from memtrain.data.datasets import PhantomDataset
    from memtrain.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="resnet34", zero_head=False))
    x, y = PhantomDataset(seed=0, first=0, count=1, size=size)[0]
    with torch.no_grad():
        out = model(x[None])
    lines = []
    for name in LOSSES:
        pred = out.clone().requires_grad_(True)
        loss = build_loss(name)(pred, y[None])
        (grad,) = torch.autograd.grad(loss, pred)
        lines.append(
            f"{size}², random head, `{name}`: loss {loss.item():.6f}, output gradient finite: {bool(torch.isfinite(grad).all())}, "
            f"max |grad| {grad.abs().max().item():.3e}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="512,1024,2048,4096")
    ap.add_argument("--time-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per loss (0: memory only)")
    ap.add_argument("--head-size", type=int, default=2048, help="random-head check size (0: skip)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    started = time.time()

    rows = []
    print(" | ".join(COLUMNS), flush=True)
    for size in sizes:
        for dname, dtype in DTYPES.items():
            image = size * size * dtype.itemsize
            for name in LOSSES:
                fwd, held, bwd = peaks(name, size, dtype)
                row = {"size": size, "loss": name, "input": dname, "image_mib": f"{image / MIB:.1f}"}
                row |= {"forward_mib": f"{fwd / MIB:.1f}", "held_mib": f"{held / MIB:.1f}", "backward_mib": f"{bwd / MIB:.1f}"}
                row |= {"forward_x_image": f"{fwd / image:.2f}", "backward_x_image": f"{bwd / image:.2f}"}
                rows.append(row)
                print(" | ".join(str(row[c]) for c in COLUMNS), flush=True)

    targets = []
    for size in (2048, 4096):
        r = next((r for r in rows if r["size"] == size and r["loss"] == "msssim" and r["input"] == "float32"), None)
        if r is not None:
            worst = max(float(r["forward_x_image"]), float(r["backward_x_image"]))
            targets.append(f"{size}², float32: memtrain's peak is {worst:.2f} × the image's bytes (target ≤ 4: {'met' if worst <= 4 else 'MISSED'})")

    timing = []
    if args.repeats > 0:
        for batch in (1, 2):
            t = time_losses(args.time_size, batch, args.repeats)
            for kind in ("fwd+bwd", "forward (no grad)"):
                for clock in ("wall", "cpu"):
                    ours, ref = (statistics.median(t[f"{n}|{kind}|{clock}"]) for n in LOSSES)
                    timing.append((batch, kind, clock, ours, ref, ours / ref))
                    print(
                        f"time {args.time_size}² batch {batch} {kind} ({clock}): msssim {ours:.3f} s, reference {ref:.3f} s, ratio {ours / ref:.2f}", flush=True
                    )
        wall = next(x for x in timing if x[0] == 1 and x[1] == "fwd+bwd" and x[2] == "wall")
        targets.append(
            f"{args.time_size}², fwd+bwd, batch 1: memtrain ÷ pytorch-msssim = {wall[5]:.2f} (wall, median; target ≤ 1: {'met' if wall[5] <= 1 else 'MISSED'})"
        )
    head = random_head(args.head_size) if args.head_size else []
    for line in targets + head:
        print(line, flush=True)
    elapsed = time.time() - started
    if args.no_write:
        return 0

    host = host_environment()
    out = ROOT / "benchmarks" / "results"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "loss.csv", buf.getvalue())
    md = [
        f"# The loss alone: memtrain's MS-SSIM vs pytorch-msssim — {host['cpu'].split(' (')[0]}",
        "",
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/loss.py --sizes {args.sizes} --time-size {args.time_size} "
        f"--repeats {args.repeats} --head-size {args.head_size}` ({elapsed:.0f} s)",
        "",
        "Memory: `tensor_peak` (live tensor bytes) above the two inputs (batch 1, one channel), fake tensors; `held` is what the loss keeps "
        "from its forward to its backward; `× image` divides by the input image's bytes (float32: 4 B/px, bf16: 2 B/px). "
        "`msssim` = memtrain's (the default), `msssim:reference` = pytorch-msssim 1.0.0 in float32.",
        f"torch {host['torch']}, pytorch-msssim {host['pytorch_msssim']}, segmentation-models-pytorch {host['segmentation_models_pytorch']}, "
        f"Python {host['python']}; CPU {host['cpu']}; {host['os']}.",
        "",
        *[f"- {t}" for t in targets],
        *[f"- {h}" for h in head],
        "",
        "| size | loss | input | image MiB | forward MiB | held MiB | backward MiB | forward × image | backward × image |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['size']} | {r['loss']} | {r['input']} | {r['image_mib']} | {r['forward_mib']} | {r['held_mib']} | {r['backward_mib']} | "
            f"{r['forward_x_image']} | {r['backward_x_image']} |"
            for r in rows
        ],
        "",
    ]
    if timing:
        md += [
            f"Time at {args.time_size}², real float32 tensors, median of {args.repeats} runs per loss, interleaved round-robin after one warm-up; "
            "`cpu` is process CPU time (all threads).",
            "",
            "| batch | what | clock | msssim s | msssim:reference s | ratio |",
            "|---:|---|---|---:|---:|---:|",
            *[f"| {b} | {k} | {c} | {o:.3f} | {r:.3f} | {q:.2f} |" for b, k, c, o, r, q in timing],
            "",
        ]
    atomic_write_text(out / "loss.md", "\n".join(md))
    print(f"wrote {out / 'loss.csv'} and {out / 'loss.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

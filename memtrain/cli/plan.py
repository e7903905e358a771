"""`memtrain plan`: estimate every strategy combination's peak memory for a size, and pick the fastest that fits a budget.

Nothing is allocated: each combination's training step runs on fake tensors and the
tensor backend counts the bytes it would hold (see memtrain.memory.planner).
"""

from __future__ import annotations

import argparse
import json

from memtrain.config import LOSS_NAMES, check_size
from memtrain.errors import ConfigError

EPILOG = """examples:
  memtrain plan --size 4096 --budget 8GiB
  memtrain plan --size 2048 --budget 24GB --batch-size 2 --json
  memtrain plan --size 1024 --strategies "none;amp;amp,tf32"
fits: step peak x (1 + 10 %) + headroom (default 1 GiB: CUDA context and workspaces) <= budget.
units: KiB/MiB/GiB (and K/M/G) are powers of 1024, kB/MB/GB powers of 1000."""


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="estimate every strategy combination's memory and pick the fastest that fits", description=__doc__, epilog=EPILOG)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--size", type=int, required=True, help="training image side in pixels (a multiple of 32)")
    p.add_argument("--budget", help="device memory available, e.g. 8GiB, 24GB, 512MiB or bytes (without it nothing is marked as fitting)")
    p.add_argument("--batch-size", type=int, default=1, help="images per step [default: 1]")
    p.add_argument("--encoder", default="resnet34", help="smp encoder of the U-Net [default: resnet34]")
    p.add_argument("--loss", default="msssim", choices=LOSS_NAMES, help="training loss, as in `memtrain fit --loss` [default: msssim]")
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="target device the plan is for [default: cuda; without a GPU here, assumed Ampere or newer (native bf16)]",
    )
    p.add_argument(
        "--strategies",
        help="';'-separated combinations to consider instead of all of them (every checkpoint granularity, quant:int8, offload on CUDA; no torchrun placements), e.g. 'none;amp;amp,tf32'",
    )
    p.add_argument("--headroom", default="1GiB", help="memory kept free for the CUDA context and workspaces [default: 1GiB]")
    p.add_argument("--max-size", type=int, default=None, help="largest number of strategies in one combination [default: all]")
    p.add_argument("--jobs", type=int, default=1, help="processes estimating in parallel [default: 1]")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects instead of the table")
    p.set_defaults(run=run)


def target_environment(device: str):
    """The Environment to plan for: detected when that device is here, else a CUDA GPU with native bf16 (Ampere+)."""
    import torch

    from memtrain.strategies import Environment

    if device == "cuda" and torch.cuda.is_available():
        return Environment.detect("cuda"), "detected"
    if device == "cuda":
        return Environment(device="cuda", native_bf16=True), "assumed Ampere or newer (no GPU here)"
    return Environment.detect("cpu"), "detected"


def parse_combos(text: str | None) -> list[str] | None:
    if text is None:
        return None
    combos = [",".join(n.strip() for n in c.split(",") if n.strip()) for c in text.split(";")]
    combos = [c for c in combos if c]
    if not combos:
        raise ConfigError(f"--strategies {text!r}: expected ';'-separated combinations, e.g. 'none;amp;amp,tf32'")
    return combos


def run(args: argparse.Namespace) -> int:
    from memtrain.memory.planner import Planner, chosen
    from memtrain.memory.units import parse_bytes

    check_size(args.size)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: expected a positive number")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: expected a positive number")
    if args.max_size is not None and args.max_size < 1:
        raise ConfigError(f"--max-size {args.max_size}: expected a positive number")
    budget = parse_bytes(args.budget, "--budget") if args.budget is not None else None
    headroom = parse_bytes(args.headroom, "--headroom")
    combos = parse_combos(args.strategies)
    _check_encoder(args.encoder)
    env, how = target_environment(args.device)
    planner = Planner(
        size=args.size, batch_size=args.batch_size, encoder=args.encoder, loss=args.loss, env=env, budget=budget, headroom=headroom, jobs=args.jobs
    )
    if combos is None and args.max_size is not None:
        from memtrain.memory.planner import combinations

        combos = combinations(max_size=args.max_size, env=env)
    cands = planner.plan(combos)
    best = chosen(cands)
    if args.json:
        rows = [c.as_dict(args.size, args.batch_size) | {"chosen": c is best} for c in cands]
        print(json.dumps(rows, indent=2))
        return 0
    print(format_plan(cands, best, planner, args, how))
    return 0


def _check_encoder(name: str) -> None:
    import segmentation_models_pytorch as smp

    if name not in smp.encoders.get_encoder_names():
        resnets = ", ".join(n for n in smp.encoders.get_encoder_names() if n.startswith("resnet"))
        raise ConfigError(f"--encoder {name}: unknown smp encoder (ResNet encoders: {resnets})")


def format_plan(cands, best, planner, args, how: str) -> str:
    from memtrain.memory.tracker import MIB
    from memtrain.memory.units import fmt_bytes

    env = planner.env
    target = env.device + (f", {how}" if how != "detected" else "")
    lines = [f"memtrain plan: U-Net {args.encoder}, loss {args.loss}, {args.size}x{args.size}, batch {args.batch_size}, target {target}"]
    if planner.budget is not None:
        usable = (planner.budget - planner.headroom) / (1 + planner.fraction)
        lines.append(
            f"budget {fmt_bytes(planner.budget)}: fits if step peak x {1 + planner.fraction:.2f} + {fmt_bytes(planner.headroom)} headroom"
            f" <= budget, i.e. step peak <= {fmt_bytes(max(0, usable))}"
        )
    lines.append("estimated with fake tensors (tensor backend: live tensor bytes); sorted by expected step time relative to 'none'")
    header = ["strategies", "time cost", "forward MiB", "backward MiB", "optimizer MiB", "step peak MiB", "fits"]
    rows = []
    for c in cands:
        if c.memory is None:
            continue
        fits = "-" if c.fits is None else ("yes" if c.fits else "no")
        if c is best:
            fits += "  <- chosen"
        name = c.strategies + (f" (= {c.measured_as})" if c.measured_as else "")
        rows.append(
            [name, f"x{c.time_cost:.2f}", *(f"{c.peak(p) / MIB:,.0f}" for p in ("forward", "backward", "optimizer")), f"{c.step_peak / MIB:,.0f}", fits]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) if i in (0, 6) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    if any(c.measured_as for c in cands):
        lines.append("(= X): same memory as X — the other strategies change no memory, measured alone")
    for c in cands:
        if c.memory is None:
            lines.append(f"not estimated: {c.strategies}: {c.status}: {c.reason}")
    if args.strategies is None:
        from memtrain.memory.planner import left_out

        for name, why in left_out(env):
            lines.append(f"not considered: {name}: {why}")
    if planner.budget is not None:
        if best is None:
            lines.append(f"nothing fits in {fmt_bytes(planner.budget)}: lower --size or --batch-size, or find more memory")
        else:
            lines.append(
                f"fastest that fits: {best.strategies} (step peak {fmt_bytes(best.step_peak)}, needs {fmt_bytes(planner.required(best.step_peak))};"
                f" expected step time x{best.time_cost:.2f})"
            )
    return "\n".join(lines)

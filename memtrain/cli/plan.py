"""`memtrain plan`: estimate every strategy combination's peak memory for a size, and pick the fastest that fits a budget.

Nothing is allocated: each combination's training step runs on fake tensors and the
tensor backend counts the bytes it would hold (see memtrain.memory.planner).
"""

# Lazy imports (startup): run() imports the command's code and torch, so that `memtrain plan --help` needs no torch.
from __future__ import annotations

import argparse
import json
import re
import sys

from memtrain.config import LOSS_NAMES, check_size
from memtrain.errors import ConfigError
from memtrain.vocabulary import BATCH_SIZE, DEVICES, add_deprecated, add_plans_argument, parse_plans

EPILOG = """examples:
  memtrain plan --size 4096 --memory-budget 8GiB
  memtrain plan --size 2048 --memory-budget 24GB --batch-size 2 --json
  memtrain plan --size 1024 --strategies none --strategies amp --strategies amp,tf32   # = --strategies "none;amp;amp,tf32"
fits: what the step needs by the headroom model <= budget (CUDA: step peak x 1.10 + 1 GiB until `memtrain calibrate`
measures it on the GPU; CPU: step peak + oneDNN workspace per pixel; see memtrain.memory.headroom).
units: KiB/MiB/GiB (and K/M/G) are powers of 1024, kB/MB/GB powers of 1000."""


SHOWN = 10  # rows of the table without --all: the fastest that fit


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="estimate every strategy combination's memory and pick the fastest that fits", description=__doc__, epilog=EPILOG)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--size", type=int, required=True, help="training image side in pixels (a multiple of 32)")
    budget = p.add_argument(
        "--memory-budget", metavar="SIZE", help="device memory available, e.g. 8GiB, 24GB, 512MiB or bytes (without it nothing is marked as fitting)"
    )
    add_deprecated(p, "--budget", budget)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"images per step, as in `memtrain fit --batch-size` [default: {BATCH_SIZE}]")
    p.add_argument("--encoder", default="resnet34", help="smp encoder of the U-Net [default: resnet34]")
    p.add_argument("--loss", default="msssim", choices=LOSS_NAMES, help="training loss, as in `memtrain fit --loss` [default: msssim]")
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="cuda",
        help="the device the plan is for, not necessarily this one: 'auto' is this machine's (CUDA when present, else CPU)"
        " [default: cuda; without a GPU here, assumed Ampere or newer (native bf16)]",
    )
    add_plans_argument(
        p,
        "plans to consider instead of all of them (every checkpoint granularity, quant:int8, offload on CUDA; no torchrun placements):"
        " a comma list is one plan; repeat the flag or separate plans with ';', e.g. 'none;amp;amp,tf32'",
    )
    p.add_argument("--headroom", metavar="SIZE", help="memory kept free for the CUDA context and workspaces [default: the headroom model's fixed part]")
    p.add_argument(
        "--headroom-model", metavar="FILE", help="headroom model file (JSON, see memtrain calibrate) [default: the calibrated one if any, else the default]"
    )
    most = p.add_argument("--max-strategies", type=int, default=None, metavar="N", help="largest number of strategies in one combination [default: all]")
    add_deprecated(p, "--max-size", most)
    p.add_argument("--jobs", type=int, default=1, help="processes estimating in parallel [default: 1]")
    p.add_argument("--all", action="store_true", help="estimate and list every combination, not only the 10 fastest that fit")
    p.add_argument("--json", action="store_true", help="print a JSON list of every combination (as --all) instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=run)


def target_environment(device: str):
    """The Environment to plan for: detected when that device is here, else a CUDA GPU with native bf16 (Ampere+)."""
    import torch

    from memtrain.strategies import Environment

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        return Environment.detect("cuda"), "detected"
    if device == "cuda":
        return Environment(device="cuda", native_bf16=True), "assumed Ampere or newer (no GPU here)"
    return Environment.detect("cpu"), "detected"


def run(args: argparse.Namespace) -> int:
    from memtrain.memory.planner import Planner, chosen
    from memtrain.memory.units import parse_bytes

    check_size(args.size)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: expected a positive number")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: expected a positive number")
    if args.max_strategies is not None and args.max_strategies < 1:
        raise ConfigError(f"--max-strategies {args.max_strategies}: expected a positive number")
    budget = parse_bytes(args.memory_budget, "--memory-budget") if args.memory_budget is not None else None
    headroom = parse_bytes(args.headroom, "--headroom") if args.headroom is not None else None
    combos = parse_plans(args.strategies)
    _check_encoder(args.encoder)
    env, how = target_environment(args.device)
    from memtrain.memory.headroom import model_for

    model = model_for(env.device, args.headroom_model)
    progress = None if args.quiet else (lambda line: print(f"memtrain plan: {line}", file=sys.stderr, flush=True))
    planner = Planner(
        size=args.size,
        batch_size=args.batch_size,
        encoder=args.encoder,
        loss=args.loss,
        env=env,
        budget=budget,
        headroom=headroom,
        headroom_model=model,
        jobs=args.jobs,
        progress=progress,
    )
    if combos is None and args.max_strategies is not None:
        from memtrain.memory.planner import combinations

        combos = combinations(max_size=args.max_strategies, env=env)
    cands = planner.plan(combos, enough=None if args.all or args.json else SHOWN)
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
        lines.append(f"budget {fmt_bytes(planner.budget)}: fits if needed <= budget; needed = {planner.model.describe()}")
    lines.append("estimated with fake tensors (tensor backend: live tensor bytes); sorted by expected step time relative to 'none'")
    header = ["strategies", "time cost", "forward MiB", "backward MiB", "optimizer MiB", "step peak MiB", "needed MiB", "fits"]
    measured = [c for c in cands if c.memory is not None]
    shown = measured if args.all or planner.budget is None else [c for c in measured if c.fits][:SHOWN]
    rows = []
    for c in shown:
        fits = "-" if c.fits is None else ("yes" if c.fits else "no")
        if c is best:
            fits += "  <- chosen"
        name = c.strategies + (f" (= {c.measured_as})" if c.measured_as else "")
        rows.append(
            [
                name,
                f"x{c.time_cost:.2f}",
                *(f"{c.peak(p) / MIB:,.0f}" for p in ("forward", "backward", "optimizer")),
                ("~" if c.approximate else "") + f"{c.step_peak / MIB:,.0f}",
                f"{c.needed / MIB:,.0f}",
                fits,
            ]
        )
    if shown is not measured:
        lines.append(f"the {len(shown)} fastest that fit of {len(measured)} estimated (--all: every combination)")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(w) if i in (0, 7) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    if any(c.measured_as for c in shown):
        lines.append("(= X): same memory as X — the other strategies change no memory, measured alone")
    if any(c.approximate for c in shown):
        lines.append("~: from an approximate large-size model (each phase's peak within 1 % of a direct estimate; memtrain.memory.large_sizes)")
    lines.extend(grouped_rejections(cands))
    if args.strategies is None:
        from memtrain.memory.planner import left_out

        for name, why in left_out(env):
            lines.append(f"not considered: {name}: {why}")
    if planner.budget is not None:
        if best is None:
            lines.append(f"nothing fits in {fmt_bytes(planner.budget)}: lower --size or --batch-size, or find more memory")
        else:
            lines.append(
                f"fastest that fits: {best.strategies} (step peak {fmt_bytes(best.step_peak)}, needs {fmt_bytes(best.needed)};"
                f" expected step time x{best.time_cost:.2f})"
            )
    return "\n".join(lines)


def grouped_rejections(cands) -> list[str]:
    """One line per reason for the combinations not estimated: the reason, how many, and the first few of them."""
    groups: dict[tuple[str, str], list[str]] = {}
    for c in cands:
        if c.memory is None:  # the reason without the combination it names, so that one reason is one line
            groups.setdefault((c.status, re.sub(r"^--strategies \S+: ", "", c.reason)), []).append(c.strategies)
    lines = []
    for (status, reason), combos in groups.items():
        listed = "; ".join(combos[:3]) + (f"; ... ({len(combos) - 3} more)" if len(combos) > 3 else "")
        lines.append(f"{status} ({len(combos)}): {reason}: {listed}")
    return lines

"""`memtrain compare`: measure strategy combinations at several sizes, each cell in a fresh process.

A comma list is one combination (one plan); several are given by repeating --strategies
or by separating them with ';', e.g. --strategies "none;amp;checkpoint,momentum". Every (combination, size) cell trains
one warm-up step and --steps measured steps of the fit's training step on phantom
radiographs; an out-of-memory error is a result (status oom, with the phase), and the
sweep goes on. With --launcher torchrun --nproc-per-node N, combinations with a placement
strategy (rpc, pipeline, ddp) run as real torchrun jobs of N processes and their rows
report the largest rank's peaks plus every rank's peaks and their mean (without
--launcher they are rejected: they need several processes). Writes compare.csv, compare.json, compare.md and compare.png to --out.
"""

# Lazy imports (startup): run() imports the command's code and torch, so that `memtrain compare --help` needs no torch.
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from memtrain.config import LOSS_NAMES
from memtrain.errors import ConfigError
from memtrain.rundir import atomic_write_text
from memtrain.vocabulary import BATCH_SIZE, DEVICES, add_plans_argument, parse_plans

EPILOG = """examples:
  memtrain compare --strategies "none;amp;checkpoint;amp,checkpoint" --sizes 512,1024,2048 --steps 3 --out reports/cmp
  memtrain compare --strategies none --strategies amp --sizes 256,512 --steps 2 --out reports/cpu --cpu-memory-limit 6GiB
  memtrain compare --strategies "none;rpc;rpc,checkpoint" --sizes 512 --launcher torchrun --nproc-per-node 3 --out reports/rpc"""


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="measure strategy combinations at several sizes (CSV, JSON, Markdown, PNG)", description=__doc__, epilog=EPILOG)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_plans_argument(p, "combinations to measure: a comma list is one; repeat the flag or separate them with ';'. Include 'none' for the ratios")
    p.add_argument("--sizes", help="comma-separated image sides in pixels (multiples of 32), e.g. 512,1024,2048")
    p.add_argument("--out", help="output folder for compare.csv/.json/.md/.png (refused if it already holds a comparison)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per cell, after one warm-up step that is left out [default: 3]")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"images per step, as in `memtrain fit --batch-size` [default: {BATCH_SIZE}]")
    p.add_argument("--encoder", default="resnet34", help="smp encoder of the U-Net [default: resnet34]")
    p.add_argument("--loss", default="msssim", choices=LOSS_NAMES, help="training loss, as in `memtrain fit --loss` [default: msssim]")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where cells run [default: auto: CUDA when present]")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate [default: 0.001]")
    p.add_argument("--cell-timeout", type=float, default=1800, help="seconds before a cell is killed and recorded as an error [default: 1800]")
    p.add_argument(
        "--cpu-memory-limit",
        help="CPU cells: memory a cell may map beyond what it holds after start-up (e.g. 6GiB); above it the cell fails with status oom, like a GPU budget",
    )
    p.add_argument(
        "--launcher",
        choices=("torchrun",),
        help="run combinations with a placement strategy (rpc, pipeline, ddp) as 'python -m torch.distributed.run --standalone' jobs on this host",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        help="--launcher torchrun: processes per job (rpc needs 3, pipeline 2, ddp any number of replicas)",
    )
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell (JSON spec) in this process
    p.add_argument("--cell-out", help=argparse.SUPPRESS)  # internal: where the cell writes its JSON result
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.cell is not None:
        return _run_cell(args)
    from memtrain.compare.sweep import Sweep, parse_sizes, run_sweep
    from memtrain.memory.units import parse_bytes

    for flag, value in (("--strategies", args.strategies), ("--sizes", args.sizes), ("--out", args.out)):
        if not value:
            raise ConfigError(f"{flag}: required (see 'memtrain compare --help')")
    combos = parse_plans(args.strategies)
    sizes = parse_sizes(args.sizes)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: expected a positive number")
    if args.launcher is None and args.nproc_per_node is not None:
        raise ConfigError("--nproc-per-node: only with --launcher torchrun")
    if args.launcher is not None and (args.nproc_per_node is None or args.nproc_per_node < 1):
        value = "missing" if args.nproc_per_node is None else str(args.nproc_per_node)
        raise ConfigError(f"--nproc-per-node {value}: --launcher torchrun needs a positive number of processes per job (rpc: 3, pipeline: 2, ddp: N)")
    if not args.cell_timeout > 0:
        raise ConfigError(f"--cell-timeout {args.cell_timeout}: expected a positive number of seconds")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available (use 'auto' or 'cpu')")
    limit = parse_bytes(args.cpu_memory_limit, "--cpu-memory-limit") if args.cpu_memory_limit else None
    _check_encoder(args.encoder)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    held = [name for name in ("compare.json", "compare.csv", "compare.md", "compare.png") if (out / name).exists()]
    if held:
        raise ConfigError(f"--out {out}: already holds a comparison ({', '.join(held)}); choose another --out or remove it")
    sweep = Sweep(combos, sizes, out, steps=args.steps, batch_size=args.batch_size, encoder=args.encoder, loss=args.loss, device=args.device, lr=args.lr)
    sweep.cell_timeout, sweep.cpu_memory_limit = args.cell_timeout, limit
    sweep.launcher, sweep.nproc_per_node = args.launcher, args.nproc_per_node or 1
    if "none" not in combos:
        print("memtrain: note: no 'none' combination, so no ratios (include it for the reductions)", flush=True)
    print(f"memtrain compare: {len(combos)} combination(s) x {len(sizes)} size(s), each cell in a fresh process -> {out}", flush=True)
    run_sweep(sweep, log=lambda line: print(line, flush=True))
    print(f"memtrain: wrote {out}/compare.csv, compare.json, compare.md, compare.png")
    return 0


def _check_encoder(name: str) -> None:
    import segmentation_models_pytorch as smp

    if name not in smp.encoders.get_encoder_names():
        resnets = ", ".join(n for n in smp.encoders.get_encoder_names() if n.startswith("resnet"))
        raise ConfigError(f"--encoder {name}: unknown smp encoder (ResNet encoders: {resnets})")


def _run_cell(args: argparse.Namespace) -> int:
    from memtrain.compare.cell import run_cell

    warnings.simplefilter("ignore")
    result = run_cell(json.loads(args.cell))
    atomic_write_text(Path(args.cell_out), json.dumps(result, default=str))
    return 0

"""`memtrain calibrate`: measure on this GPU what a step needs beyond its tensors, for `memtrain plan` and `fit --strategies auto`.

Runs a few real training steps at small sizes for each family of plans, compares the
allocator's active and reserved peaks and NVML with the fake-tensor estimate, and writes
the headroom model (workspace per pixel, allocator fraction, fixed part) that `plan` and
`--strategies auto` then use instead of the default x1.10 + 1 GiB (see
memtrain.memory.calibrate and memtrain.memory.headroom). Needs a CUDA GPU.
"""

# Lazy imports (startup): run() imports the command's code and torch, so that `memtrain calibrate --help` needs no torch.
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from memtrain import __version__
from memtrain.config import check_size
from memtrain.errors import ConfigError
from memtrain.rundir import atomic_write_text
from memtrain.vocabulary import BATCH_SIZE, add_plans_argument, parse_plans

EPILOG = """examples:
  memtrain calibrate                       # writes the model where plan finds it (the memtrain cache folder)
  memtrain calibrate --sizes 256,512 --out headroom.json --report calibrate.md
  memtrain plan --size 4096 --memory-budget 24GiB --headroom-model headroom.json"""


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure the GPU headroom model plan and --strategies auto use (needs CUDA)", description=__doc__, epilog=EPILOG)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_plans_argument(
        p,
        "plan families to run: a comma list is one plan; repeat the flag or separate plans with ';'"
        " [default: none;amp;checkpoint:full;amp,checkpoint:blocks;amp,checkpoint:full]",
    )
    p.add_argument("--sizes", default="256,384,512", help="comma-separated image sides, multiples of 32 [default: 256,384,512]")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"images per step, as in `memtrain fit --batch-size` [default: {BATCH_SIZE}]")
    p.add_argument("--encoder", default="resnet34", help="smp encoder of the U-Net [default: resnet34]")
    p.add_argument(
        "--steps",
        type=int,
        default=1,
        help="measured steps per run, after one warm-up step that is left out (as in `memtrain compare`); the last one's peaks are kept [default: 1]",
    )
    p.add_argument(
        "--out", metavar="FILE", help="where to write the model [default: the file plan reads: MEMTRAIN_CACHE_DIR or ~/.cache/memtrain/headroom-cuda.json]"
    )
    p.add_argument("--report", metavar="FILE", help="also write the measurements as a Markdown table")
    p.set_defaults(run=run)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--sizes {text}: expected comma-separated integers, e.g. 256,384,512") from None
    if not sizes:
        raise ConfigError(f"--sizes {text}: expected at least one size")
    for s in sizes:
        check_size(s, "--sizes")
    return sizes


def run(args: argparse.Namespace) -> int:
    from memtrain.memory.calibrate import DEFAULT_STRATEGIES

    sizes = _sizes(args.sizes)
    combos = parse_plans(args.strategies) or list(DEFAULT_STRATEGIES)
    for flag, value in (("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: expected a positive number")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("calibrate: needs a CUDA GPU and this machine has none; plan and --strategies auto keep the default headroom model (x1.10 + 1 GiB)")

    from memtrain.memory import calibrate
    from memtrain.memory.headroom import default_path

    out = Path(args.out) if args.out else default_path("cuda")
    device = torch.cuda.get_device_name()
    rows = calibrate.measure(
        combos,
        sizes,
        batch_size=args.batch_size,
        encoder=args.encoder,
        steps=1 + args.steps,  # the warm-up step, then --steps measured ones
        progress=lambda line: print(f"memtrain calibrate: {line}", file=sys.stderr, flush=True),
    )
    source = f"memtrain calibrate on {device} (torch {torch.__version__}, memtrain {__version__}; {len(rows)} runs at {','.join(map(str, sizes))} px)"
    model, notes = calibrate.fit(rows, source=source)
    atomic_write_text(out, model.to_json())
    if args.report:
        header = f"# memtrain calibrate\n\ndevice: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}; memtrain {__version__}"
        atomic_write_text(Path(args.report), calibrate.markdown(rows, model, notes, header))
    print(f"headroom model: {model.describe()}")
    for n in notes:
        print(f"  {n}")
    print(f"written to {out}")
    return 0

"""`memtrain fit`: train a model (see memtrain.loop.fit)."""

# Lazy imports (startup): run() imports the command's code and torch, so that `memtrain fit --help` needs no torch.
from __future__ import annotations

import argparse
from pathlib import Path

from memtrain import config as C
from memtrain.errors import ConfigError
from memtrain.rundir import CONFIG_NAME

EPILOG = """examples:
  memtrain fit --strategies amp --size 256 --epochs 2
  memtrain fit --data DIR --targets clahe --size 1024 --out runs/exp1
  memtrain fit --config configs/paper-512.yaml --lr 3e-4
  memtrain fit --resume runs/exp1 --epochs 80
precedence: defaults < --config (or the resumed run's config.yaml) < flags."""


def add_parser(sub) -> None:
    p = sub.add_parser("fit", help="train a model", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="FILE", help="YAML preset (see configs/); flags override it")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue a run from RUN_DIR/checkpoints/last.ckpt with its config.yaml; flags override it")
    C.add_arguments(p)
    p.set_defaults(run=run)


def resolve_config(args: argparse.Namespace) -> C.FitConfig:
    """Defaults, then --config or the resumed run's config, then the typed flags."""
    if args.config and args.resume:
        raise ConfigError("--config and --resume: give one (a resumed run uses its own config.yaml)")
    cfg = C.FitConfig()
    if args.config:
        cfg = C.load_yaml(args.config)
    elif args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / CONFIG_NAME).is_file():
            raise ConfigError(f"--resume {run_dir}: no {CONFIG_NAME} there (expected a memtrain run directory)")
        cfg = C.load_yaml(run_dir / CONFIG_NAME)
        given_out = getattr(args, "run.out", None)
        if given_out is not None and Path(given_out).resolve() != run_dir.resolve():
            raise ConfigError(f"--out {given_out}: a resumed run writes to its own directory ({run_dir})")
        cfg.run.out = str(run_dir)
    return C.apply_overrides(cfg, args).validate()


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    from memtrain.loop.fit import fit

    fit(cfg, resume=args.resume)
    return 0

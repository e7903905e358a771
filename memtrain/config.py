"""Run configuration: keyword-only dataclasses, YAML presets and command-line overrides.

Precedence, lowest first: the dataclass defaults, then ``--config FILE`` (or the
``config.yaml`` of a run given to ``--resume``), then the flags typed on the command
line. Every field carries a one-line ``help`` that is both its documentation and its
``--flag`` help text, so the CLI is generated from this file and cannot drift from it.

A run saves its resolved configuration as ``config.yaml`` beside its outputs; that file
is itself a valid ``--config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memtrain.errors import ConfigError
from memtrain.vocabulary import BATCH_SIZE, DEVICES, add_deprecated, one_plan_only, rename_keys

# The U-Net downsamples five times, so every side must be divisible by 2**5.
SIZE_MULTIPLE = 32
# The names of memtrain.loss.LOSSES (kept here so the config needs no torch import; a test checks they agree).
LOSS_NAMES = ("msssim", "msssim:reference")
# `--strategies auto`: the planner picks the fastest combination that fits --memory-budget.
AUTO = "auto"
# `memtrain export` defaults, here so that building the command line never imports torch.
EXPORT_FORMATS = ("onnx", "torchscript")
EXPORT_ATOL = 1e-4
EXPORT_SIZE = 128


def opt(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    choices=None,
    factory=None,
    min: float | None = None,
    above: float | None = None,
    max: float | None = None,
    below: float | None = None,
    special: tuple = (),
    renamed_from: tuple[str, ...] = (),
):
    """A config field: its default, its one-line doc and (optionally) its flag name, choices and range.

    ``renamed_from`` lists old spellings of the flag, still accepted for one release with a
    deprecation line (see :mod:`memtrain.vocabulary`).

    Numbers are checked when the config is resolved (:meth:`FitConfig.validate`), before
    anything is written: ``min``/``max`` are inclusive bounds, ``above``/``below`` exclusive
    ones, a float must be finite, and the values in ``special`` (e.g. -1 for "no limit")
    are accepted as well.
    """
    bounds = {"min": min, "above": above, "max": max, "below": below, "special": tuple(special)}
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "renamed_from": tuple(renamed_from), **bounds}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class DataConfig:
    """Where images come from and how they are brought to the training size."""

    source: str = opt("phantom", flag="--data", help="'phantom' (built-in synthetic radiographs) or a folder of PNG/TIFF/JPEG/DICOM images")
    targets: str = opt("clahe", help="folder data: a folder of target images paired by file stem, or 'clahe' to compute CLAHE + unsharp-mask targets")
    size: int = opt(512, help=f"training image side in pixels; a multiple of {SIZE_MULTIPLE} (the U-Net's constraint)")
    fit: str = opt(
        "resize",
        choices=("resize", "crop"),
        help="how images reach --size: 'resize' keeps the aspect ratio and pads, 'crop' takes a random (validation: centred) crop",
    )
    train_images: int = opt(48, min=1, help="phantom: number of training images (the paper used 48)")
    val_images: int = opt(12, min=1, help="phantom: number of validation images (the paper used 12)")
    val_fraction: float = opt(
        0.2, above=0.0, below=1.0, help="folder data: fraction of images held out for validation, chosen deterministically from file names and --data-seed"
    )
    data_seed: int = opt(0, min=0, max=2**63 - 1, help="seed of the phantom generator and of the train/validation split (independent of --seed)")
    workers: int = opt(
        -1,
        min=-1,
        help="data-loading worker processes; 0 loads in the training process, -1 picks: up to 4 on CUDA, 0 on CPU (where workers compete with training for cores)",
    )


@dataclass(kw_only=True)
class ModelConfig:
    """The network: a segmentation-models-pytorch U-Net, one channel in and one out."""

    encoder: str = opt("resnet34", help="smp encoder name (resnet18, resnet34, resnet50, ...)")
    encoder_weights: str | None = opt(None, help="local state-dict file for the encoder (random init when absent; nothing is downloaded)")
    zero_head: bool = opt(
        True,
        help="start the output convolution at zero (a flat first output); with --loss msssim:reference a random head gets no gradient (see memtrain.model)",
    )


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation and the Lightning loop."""

    epochs: int = opt(50, min=1, help="number of epochs (the paper trained 50)")
    max_steps: int = opt(-1, min=1, special=(-1,), help="stop after this many optimizer steps (-1: no limit)")
    batch_size: int = opt(BATCH_SIZE, min=1, help="images per optimizer step (the default of every subcommand's --batch-size)")
    lr: float = opt(1e-3, above=0.0, help="Adam learning rate")
    weight_decay: float = opt(0.0, min=0.0, help="Adam weight decay")
    scheduler: str = opt("cosine", choices=("none", "cosine", "step"), help="learning-rate schedule, stepped once per epoch")
    step_size: int = opt(10, min=1, help="'step' scheduler: epochs between decays")
    gamma: float = opt(0.5, above=0.0, help="'step' scheduler: decay factor")
    seed: int = opt(0, min=0, max=2**32 - 1, help="seed of model initialisation and data order")
    deterministic: bool = opt(False, help="use deterministic algorithms only (slower; errors on ops that have none)")
    device: str = opt("auto", choices=DEVICES, renamed_from=("--accelerator",), help="where to train: 'auto' picks CUDA when present, else CPU")
    val_every: int = opt(1, min=1, help="validate every N epochs")
    limit_val_batches: int = opt(-1, min=0, special=(-1,), help="validate on at most this many batches (-1: all, 0: no validation)")
    checkpoint_every_steps: int = opt(0, min=0, help="write last.ckpt every N training steps instead of at epoch ends (0: at epoch ends)")


@dataclass(kw_only=True)
class MemoryConfig:
    """Per-phase memory tracking of every training step."""

    track: bool = opt(True, flag="--memory", help="record forward/backward/optimizer peak memory of every step into memory.csv")
    warmup_steps: int = opt(1, min=0, help="steps left out of the end-of-run memory summary (allocator and optimizer-state warm-up)")
    budget: str | None = opt(
        None,
        flag="--memory-budget",
        help="device memory for '--strategies auto', e.g. 8GiB, 8GB, 512MiB or bytes: the fastest strategy combination whose estimated step fits is used",
    )
    snapshot: str | None = opt(
        None,
        flag="--memory-snapshot",
        help="CUDA: write torch's allocator snapshot (every allocation with its stack) to FILE, for https://pytorch.org/memory_viz; relative to the run directory",
    )


@dataclass(kw_only=True)
class DistConfig:
    """Multi-process strategies (rpc, pipeline, ddp), launched with torchrun; ignored by single-process runs."""

    microbatches: int = opt(1, min=1, help="pipeline: microbatches each batch is split into (GPipe/1F1B); must divide --batch-size")
    pipeline_schedule: str = opt(
        "gpipe",
        choices=("gpipe", "1f1b"),
        help="pipeline: microbatch schedule, 'gpipe' (all forwards, then all backwards) or '1f1b' (interleaved, fewer live activations)",
    )
    rpc_transport: str = opt("auto", choices=("auto", "tcp", "shm"), help="rpc: TensorPipe transport; 'auto' is tcp (shm busy-polls a core per idle process)")
    rpc_timeout: float = opt(
        600.0, above=0.0, help="rpc: seconds one remote call (a shard's forward, backward or optimizer step) may take before the run fails"
    )
    master_timeout: float = opt(30.0, above=0.0, help="seconds without a heartbeat from rank 0 after which the other ranks exit instead of hanging")


@dataclass(kw_only=True)
class RunConfig:
    """Outputs of the run."""

    out: str | None = opt(None, help="run directory (default: runs/<timestamp>)")
    samples: int = opt(3, min=0, help="validation images drawn into samples/epoch_N.png (0: none)")


@dataclass(kw_only=True)
class FitConfig:
    """Everything `memtrain fit` needs; sections mirror the YAML layout."""

    strategies: list[str] = opt(
        help="the plan to train: a comma list of memory strategies, e.g. 'amp,checkpoint' (see `memtrain strategies`), or 'auto' with --memory-budget",
        factory=lambda: ["none"],
    )
    loss: str = opt(
        "msssim",
        choices=LOSS_NAMES,
        help="training loss: 'msssim' (memtrain's 1 − MS-SSIM, no dead zone, a few image sizes of memory) or 'msssim:reference' (pytorch-msssim's, the paper's)",
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> FitConfig:
        """Check values that no type can express; raise ConfigError naming the flag."""
        check_size(self.data.size)
        for section, f in _sections():
            check_range(f, flag_of(section, f), getattr(self if section is None else getattr(self, section), f.name))
        if self.train.batch_size % self.dist.microbatches:
            raise ConfigError(f"--microbatches {self.dist.microbatches}: expected a divisor of --batch-size {self.train.batch_size}")
        if not self.strategies:
            raise ConfigError("--strategies: expected at least one strategy name (use 'none' for the plain model)")
        one_plan_only(self.strategies)
        if self.memory.budget is not None:
            from memtrain.memory.units import parse_bytes  # lazy (startup): memtrain.memory loads torch; --help must not

            parse_bytes(self.memory.budget, "--memory-budget")
        if AUTO in self.strategies:
            if len(self.strategies) > 1:
                raise ConfigError(
                    f"--strategies {','.join(self.strategies)}: 'auto' chooses the whole combination and cannot be combined with other strategies"
                )
            if self.memory.budget is None:
                raise ConfigError("--strategies auto: needs --memory-budget (e.g. --memory-budget 8GiB) to choose strategies that fit")
        return self


def check_size(size: int, flag: str = "--size") -> int:
    """Raise ConfigError unless ``size`` is a positive multiple of 32, naming the nearest valid sizes."""
    if size >= SIZE_MULTIPLE and size % SIZE_MULTIPLE == 0:
        return size
    lower = max(SIZE_MULTIPLE, size // SIZE_MULTIPLE * SIZE_MULTIPLE)
    upper = max(SIZE_MULTIPLE, -(-size // SIZE_MULTIPLE) * SIZE_MULTIPLE)
    nearest = f"{lower}" if lower == upper else f"{lower} or {upper}"
    raise ConfigError(f"{flag} {size}: expected a multiple of {SIZE_MULTIPLE} (the U-Net downsamples 5 times); nearest valid: {nearest}")


def check_range(f: dataclasses.Field, flag: str, value: Any) -> None:
    """Raise ConfigError naming ``flag`` unless the number ``value`` is finite and within the field's declared range."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value in f.metadata.get("special", ()):
        return
    lo, above, hi, below = (f.metadata.get(k) for k in ("min", "above", "max", "below"))
    ok = math.isfinite(value) and (lo is None or value >= lo) and (above is None or value > above)
    ok = ok and (hi is None or value <= hi) and (below is None or value < below)
    if ok:
        return
    kind = "an integer" if isinstance(value, int) else "a finite number"
    parts = []
    if lo is not None:
        parts.append(f">= {lo:g}")
    if above is not None:
        parts.append(f"> {above:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}" if hi < 1e6 else f"<= {hi}")
    if below is not None:
        parts.append(f"< {below:g}")
    extra = "".join(f", or {v}" for v in f.metadata.get("special", ()))
    positive = f"a positive {'integer' if isinstance(value, int) else 'number'}"
    desc = positive if above == 0 and len(parts) == 1 else f"{kind} {' and '.join(parts)}"
    raise ConfigError(f"{flag} {value}: expected {desc}{extra}")


# --------------------------------------------------------------------------- fields


def _sections(cls=FitConfig) -> list[tuple[str | None, dataclasses.Field]]:
    """(section name or None for top level, field) for every leaf field of FitConfig."""
    out: list[tuple[str | None, dataclasses.Field]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend((f.name, sub) for sub in dataclasses.fields(hints[f.name]))
        else:
            out.append((None, f))
    return out


def _leaf_type(section: str | None, f: dataclasses.Field):
    owner = FitConfig if section is None else typing.get_type_hints(FitConfig)[section]
    tp = typing.get_type_hints(owner)[f.name]
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    return tp, optional


def flag_of(section: str | None, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _key(section: str | None, name: str) -> str:
    return name if section is None else f"{section}.{name}"


def _coerce(value: Any, section: str | None, f: dataclasses.Field, where: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise ConfigError naming ``where``."""
    tp, optional = _leaf_type(section, f)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{where}: expected a value, got nothing")
    try:
        if typing.get_origin(tp) is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            result: Any = [str(v).strip() for v in items if str(v).strip()]
        elif tp is bool:
            if isinstance(value, bool):
                result = value
            elif str(value).lower() in ("true", "yes", "on", "1"):
                result = True
            elif str(value).lower() in ("false", "no", "off", "0"):
                result = False
            else:
                raise ValueError
        elif tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            result = int(value)
        elif tp is float:
            if isinstance(value, bool):
                raise ValueError
            result = float(value)
        else:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            result = str(value)
    except (TypeError, ValueError):
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, "a list")
        raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and result not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(choices)}, got {result!r}")
    return result


# --------------------------------------------------------------------------- YAML


def to_dict(cfg: FitConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(raw: Any, where: str, base: FitConfig | None = None, *, warn_renamed: bool = True) -> FitConfig:
    """Overlay a nested mapping (as in YAML) onto ``base`` (default: the defaults).

    Old key spellings (:data:`memtrain.vocabulary.RENAMED_KEYS`) are read as their new names, with a
    deprecation line unless ``warn_renamed`` is false (a checkpoint's own record, which the reader cannot edit).
    """
    cfg = _deepcopy(base if base is not None else FitConfig())
    if raw is None:
        return cfg
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (data, model, train, ...), got {type(raw).__name__}")
    raw = rename_keys(raw, where, warn=warn_renamed)
    leaves = {(s, f.name): (s, f) for s, f in _sections()}
    sections = {s for s, _ in _sections() if s}
    for key, value in raw.items():
        if key in sections:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: section '{key}' must be a mapping, got {value!r}")
            for sub, subval in value.items():
                if (key, sub) not in leaves:
                    known = ", ".join(sorted(n for s, n in leaves if s == key))
                    raise ConfigError(f"{where}: unknown key '{key}.{sub}' (known in '{key}': {known})")
                s, f = leaves[(key, sub)]
                setattr(getattr(cfg, key), sub, _coerce(subval, s, f, f"{where}: {key}.{sub}"))
        elif (None, key) in leaves:
            s, f = leaves[(None, key)]
            setattr(cfg, key, _coerce(value, s, f, f"{where}: {key}"))
        else:
            known = ", ".join(sorted({s or n for s, n in leaves}))
            raise ConfigError(f"{where}: unknown key '{key}' (known: {known})")
    return cfg


def _deepcopy(cfg: FitConfig) -> FitConfig:
    return from_plain(dataclasses.asdict(cfg))


def from_plain(d: dict[str, Any]) -> FitConfig:
    hints = typing.get_type_hints(FitConfig)
    kwargs = {}
    for f in dataclasses.fields(FitConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = hints[f.name](**d[f.name])
        else:
            kwargs[f.name] = list(d[f.name]) if isinstance(d[f.name], list) else d[f.name]
    return FitConfig(**kwargs)


def load_yaml(path: str | Path, base: FitConfig | None = None) -> FitConfig:
    """Read a YAML preset; every problem is a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"--config {path}: not valid YAML{at}: {problem}") from None
    return from_dict(raw, str(path), base)


def dump_yaml(cfg: FitConfig) -> str:
    header = "# memtrain fit configuration (resolved). Reuse it with: memtrain fit --config <this file>\n"
    return header + yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field. Defaults are suppressed so only typed flags override."""
    for section, f in _sections():
        tp, _ = _leaf_type(section, f)
        title = section or "general"
        group = _group(parser, title)
        kwargs: dict[str, Any] = {"dest": _key(section, f.name), "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if tp is bool:
            group.add_argument(flag_of(section, f), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if f.metadata.get("choices"):
            kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        default = f.default if f.default is not MISSING else f.default_factory()
        if default is not None and not isinstance(default, list):
            kwargs["help"] += f" [default: {default}]"
        action = group.add_argument(flag_of(section, f), type=str, **kwargs)
        for old in f.metadata.get("renamed_from", ()):
            add_deprecated(group, old, action)


def _group(parser: argparse.ArgumentParser, title: str):
    for g in parser._action_groups:
        if g.title == title:
            return g
    return parser.add_argument_group(title)


def apply_overrides(cfg: FitConfig, args: argparse.Namespace) -> FitConfig:
    """Apply the flags that were given on the command line (and only those)."""
    cfg = _deepcopy(cfg)
    given = vars(args)
    for section, f in _sections():
        key = _key(section, f.name)
        if key not in given:
            continue
        value = _coerce(given[key], section, f, f"{flag_of(section, f)} {given[key]}")
        setattr(cfg if section is None else getattr(cfg, section), f.name, value)
    return cfg


def field_docs() -> list[tuple[str, str, str]]:
    """(yaml key, flag, help) for every field — used by the generated docs reference (docs/hooks/cli_reference.py) and its test."""
    return [(_key(s, f.name), flag_of(s, f), f.metadata["help"]) for s, f in _sections()]

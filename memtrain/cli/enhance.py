"""`memtrain enhance`: run a trained model on full-resolution images, writing each in its own format.

Inputs are PNG/TIFF/JPEG (8/16-bit) and DICOM files, or folders of them (searched
recursively; the output keeps the relative layout). Images of any size are padded to a
multiple of 32 and cropped back; images too large for the available memory are
processed in tiles (automatically, or always with --tile): exact tiles equal to
whole-image inference (the `tile` strategy's machinery: the full-resolution stages tile
by tile with the halo their receptive field needs, the low-resolution middle whole), or,
with --tiling blend or for models exact tiling cannot run (quant:qat), overlapping tiles
blended without seams. Outputs keep the input's format and bit depth; DICOM outputs are derived images
with new SOP/Series Instance UIDs and the patient/study linkage kept. Logs and output
names use input file names only, never DICOM attributes.
"""

# Lazy imports (startup): run() imports the command's code and torch, so that `memtrain enhance --help` needs no torch.
from __future__ import annotations

import argparse
import time
from pathlib import Path

from memtrain import __version__
from memtrain.errors import ConfigError, DataError
from memtrain.rundir import atomic_write_bytes, check_writable
from memtrain.vocabulary import DEVICES, add_deprecated

EPILOG = """examples:
  memtrain enhance runs/exp1/checkpoints/best.ckpt scans/ --out enhanced/
  memtrain enhance best.ckpt chest.dcm knee.png --out enhanced/ --compare
  memtrain enhance best.ckpt big.tif --out enhanced/ --tile 1024 --amp
  memtrain enhance best.ckpt big.tif --out enhanced/ --tiling blend --tile 1024 --overlap 64"""

COMPARE_SUFFIX = "_compare.png"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "enhance",
        help="enhance images with a trained model (any size; DICOM in, DICOM out)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .ckpt written by `memtrain fit` (e.g. runs/exp1/checkpoints/best.ckpt)")
    p.add_argument("inputs", metavar="IMAGES_OR_DIRS", nargs="+", help="image files (PNG, TIFF, JPEG, DICOM) or folders of them")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created); outputs keep the input names and formats")
    p.add_argument("--tile", type=str, metavar="PX", help="always process in tiles of PX² pixels (a multiple of 32); default: only when the image does not fit")
    p.add_argument(
        "--tiling",
        choices=("auto", "exact", "blend"),
        default="auto",
        help="'exact': tiles whose output equals whole-image inference (U-Nets with a ResNet encoder and BatchNorm); "
        "'blend': overlapping tiles blended with raised-cosine weights; 'auto': exact when the model supports it and its floor fits the memory, else blend [default: auto]",
    )
    p.add_argument(
        "--overlap",
        type=str,
        metavar="PX",
        help="blended tiles: overlap of neighbouring tiles [default: 64]; exact tiles carry the halo their receptive field needs instead",
    )
    p.add_argument("--amp", action="store_true", help="16-bit autocast (bf16 on CPU and recent GPUs, else fp16): about half the memory")
    p.add_argument("--compare", action="store_true", help="also write NAME_compare.png: input | output side by side (8-bit)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run: 'auto' uses CUDA when present [default: auto]")
    budget = p.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="device memory for one forward, e.g. 4GiB, 4GB, 512MiB or bytes; above it the image is tiled (default: 90%% of free CUDA memory, or half the free RAM)",
    )
    add_deprecated(p, "--max-memory", budget, convert=_gib_as_bytes)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    p.set_defaults(run=run)


def _int(flag: str, value: str | None, minimum: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{flag} {value}: expected an integer") from None
    if n < minimum:
        raise ConfigError(f"{flag} {value}: expected {minimum} or more")
    return n


def _gib_as_bytes(value: str) -> str:
    """The deprecated ``--max-memory GIB`` (a bare number of GiB) as the bytes ``--memory-budget`` reads."""
    try:
        v = float(value)
    except ValueError:
        raise ConfigError(f"--max-memory {value}: expected a number of GiB (its replacement, --memory-budget, takes a size such as 4GiB)") from None
    if not v > 0:
        raise ConfigError(f"--max-memory {value}: expected a positive number of GiB")
    return str(int(v * 2**30))


def collect_inputs(items: list[str]) -> list[tuple[Path, Path]]:
    """(input file, output path relative to --out) for every argument; folders are searched recursively."""
    from memtrain.data.readers import IMAGE_SUFFIXES, has_dicom_preamble

    found: list[tuple[Path, Path]] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_file():
            found.append((path, Path(path.name)))
        elif path.is_dir():
            files = []
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path)
                if not f.is_file() or any(part.startswith(".") for part in rel.parts) or f.name.endswith(COMPARE_SUFFIX):
                    continue
                suffix = f.suffix.lower()
                if suffix in IMAGE_SUFFIXES or (not suffix and f.name.upper() != "DICOMDIR" and has_dicom_preamble(f)):
                    files.append((f, rel))
            if not files:
                raise DataError(f"{path}: no images in this folder (expected {', '.join(IMAGE_SUFFIXES)} or DICOM files)")
            found.extend(files)
        else:
            raise DataError(f"{path}: no such file or folder")
    return found


def plan_outputs(inputs: list[tuple[Path, Path]], out: Path, *, compare: bool, overwrite: bool) -> list[tuple[Path, Path, Path | None]]:
    """(input, output, compare output or None); refuses collisions, outputs that are inputs, and (without --overwrite) existing files."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    planned = []
    taken: dict[Path, Path] = {}
    sources = {p.resolve() for p, _ in inputs}
    existing = []
    for src, rel in inputs:
        dst = out / rel
        cmp = dst.with_name(dst.stem + COMPARE_SUFFIX) if compare else None
        for target in (dst, cmp):
            if target is None:
                continue
            key = target.resolve()
            if key in taken:
                raise DataError(f"{src} and {taken[key]}: both would be written to {target}; enhance them into different --out folders")
            if key in sources:
                raise ConfigError(f"--out {out}: would overwrite the input {target}; choose another output folder")
            taken[key] = src
            if target.exists():
                existing.append(target)
        planned.append((src, dst, cmp))
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise ConfigError(f"--out {out}: {existing[0]}{more} already exist; pass --overwrite to replace them")
    return planned


def run(args: argparse.Namespace) -> int:
    import torch

    from memtrain.data.readers import load_source
    from memtrain.data.writers import compare_png, encode, quiet_pydicom
    from memtrain.inference import DEFAULT_OVERLAP, Enhancer, load_trained

    tile = _int("--tile", args.tile, 32)
    overlap = _int("--overlap", args.overlap, 0)
    if args.overlap is not None and args.tiling == "exact":
        raise ConfigError(f"--overlap {args.overlap}: applies to --tiling blend; exact tiles carry the halo their receptive field needs")
    from memtrain.memory.units import parse_bytes

    max_memory = parse_bytes(args.memory_budget, "--memory-budget") if args.memory_budget is not None else None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use 'auto' or 'cpu')")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    out = Path(args.out).expanduser()
    jobs = plan_outputs(collect_inputs(args.inputs), out, compare=args.compare, overwrite=args.overwrite)
    check_writable(out, "--out")

    trained = load_trained(args.checkpoint, device=device)
    enhancer = Enhancer(trained.model, device=device, amp=args.amp, max_memory=max_memory, tiling=args.tiling)
    if overlap is not None and enhancer.exact:
        print(
            f"memtrain: note: --overlap {overlap} is for blended tiles; exact tiles carry a {enhancer.halo()} px halo instead (--tiling blend uses it)",
            flush=True,
        )
    overlap = DEFAULT_OVERLAP if overlap is None else overlap
    if tile is not None:
        enhancer.plan(tile, tile, tile=tile, overlap=overlap)  # flag errors before any work
    cfg = trained.config
    print(
        f"memtrain: model U-Net {cfg.model.encoder} from {trained.path} (trained at {cfg.data.size}², strategies: {','.join(trained.specs)}); "
        f"device {device}, {enhancer.precision}; {len(jobs)} image(s) -> {out}",
        flush=True,
    )
    series_uids: dict[str, str] = {}
    total = time.perf_counter()
    for n, (src, dst, cmp) in enumerate(jobs, 1):
        t0 = time.perf_counter()
        with quiet_pydicom():
            source = load_source(src)
            y, tiling = enhancer(source.image, tile=tile, overlap=overlap)
            description = (
                f"memtrain {__version__} enhance: U-Net {cfg.model.encoder} contrast enhancement (checkpoint {trained.path.name}, "
                f"strategies {','.join(trained.specs)}, {enhancer.precision}, {tiling.describe()})"
            )
            data = encode(source, y, description=description, series_uids=series_uids)
        atomic_write_bytes(dst, data)
        if cmp is not None:
            atomic_write_bytes(cmp, compare_png(source.image, y))
        h, w = source.shape
        print(f"memtrain: [{n}/{len(jobs)}] {src} ({w}x{h}, {source.kind}, {tiling.describe()}) -> {dst} in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"memtrain: enhanced {len(jobs)} image(s) into {out} in {time.perf_counter() - total:.1f} s")
    return 0

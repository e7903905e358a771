"""`memtrain export`: write a trained model as ONNX or TorchScript for serving, verified against PyTorch.

Height and width are dynamic (multiples of 32), and so is the batch. The exported file is
run by its runtime (onnxruntime, or the reloaded TorchScript module) on a test batch at
another size and must match the PyTorch model within --atol, or nothing is written and
the command fails. --triton-repo also writes a Triton Inference Server model repository
(REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx or model.pt). See memtrain.export.
"""

# Lazy imports (startup): run() imports the command's code and torch, so that `memtrain export --help` needs no torch.
from __future__ import annotations

import argparse

from memtrain.config import EXPORT_ATOL as DEFAULT_ATOL
from memtrain.config import EXPORT_FORMATS as FORMATS
from memtrain.config import EXPORT_SIZE as DEFAULT_SIZE
from memtrain.config import check_size
from memtrain.errors import ConfigError

EPILOG = """examples:
  memtrain export runs/exp1/checkpoints/best.ckpt --format onnx --out model_dir
  memtrain export best.ckpt --format onnx --out model_dir --triton-repo models --name enhancer
  memtrain export best.ckpt --format torchscript --out model_dir --triton-repo models
  memtrain export best.ckpt --format torchscript --out model_dir --int8   # models trained with quant:qat (int8: TorchScript only)"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model (ONNX / TorchScript, Triton repository), verified",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .ckpt written by `memtrain fit`")
    p.add_argument(
        "--format",
        required=True,
        metavar="{" + ",".join(FORMATS) + "}",
        help="onnx (onnxruntime, Triton onnxruntime_onnx) or torchscript (Triton pytorch_libtorch)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for model.onnx / model.pt and export.json")
    p.add_argument(
        "--size", default=str(DEFAULT_SIZE), metavar="PX", help=f"side of the example input used to export (a multiple of 32) [default: {DEFAULT_SIZE}]"
    )
    p.add_argument("--verify-size", metavar="HxW", help="test-batch size for verification, multiples of 32 [default: (size+32)x(size+96)]")
    p.add_argument(
        "--atol",
        default=str(DEFAULT_ATOL),
        metavar="X",
        help=f"largest absolute difference allowed between runtime and PyTorch outputs [default: {DEFAULT_ATOL:g}]",
    )
    p.add_argument("--triton-repo", metavar="REPO", help="also write a Triton model repository: REPO/NAME/config.pbtxt and REPO/NAME/1/<model file>")
    p.add_argument("--name", default="enhancer", help="Triton model name [default: enhancer]")
    p.add_argument("--max-batch-size", default="8", metavar="N", help="Triton max_batch_size [default: 8]")
    p.add_argument(
        "--int8", action="store_true", help="also export an int8 model (models trained with --strategies quant:qat); its size and accuracy change are reported"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing files (default: refuse)")
    p.set_defaults(run=run)


def _number(flag: str, value: str, kind=int):
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{flag} {value}: expected {'an integer' if kind is int else 'a number'}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from memtrain.export import export_model, parse_hw

    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format}: expected one of {', '.join(FORMATS)}")
    size = check_size(_number("--size", args.size), "--size")
    verify = parse_hw(args.verify_size, "--verify-size") if args.verify_size else None
    atol = _number("--atol", args.atol, float)
    max_batch = _number("--max-batch-size", args.max_batch_size)
    if args.format == "torchscript":
        print(
            "memtrain: note: TorchScript is deprecated in PyTorch (torch.jit warns); it is still what Triton's pytorch_libtorch backend loads. Prefer --format onnx."
        )
    print(f"memtrain: exporting {args.checkpoint} as {args.format} (torch {torch.__version__})", flush=True)
    result = export_model(
        args.checkpoint,
        args.format,
        args.out,
        size=size,
        verify_size=verify,
        atol=atol,
        triton_repo=args.triton_repo,
        name=args.name,
        max_batch_size=max_batch,
        int8=args.int8,
        overwrite=args.overwrite,
    )
    print(f"memtrain: {result.describe()}")
    if result.int8 is not None:
        print(f"memtrain: {result.int8.describe()}")
    if result.triton_dir:
        print(f"memtrain: Triton model repository entry {result.triton_dir} (config.pbtxt, 1/{result.path.rsplit('/', 1)[-1]})")
    return 0

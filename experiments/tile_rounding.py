"""How far float32 rounding carries a short Adam run: tiled vs untiled, with and without ATen's CPU rounding of BatchNorm's statistics, and untiled vs itself with its input one ulp away.

The issue-11 done-when compares ``memtrain fit --strategies tile:128 --size 256 --seed 3 --max-steps 3``
with the same run without ``tile`` (configs/ci-tiny.yaml: ResNet18 U-Net, zero head, Adam lr 1e-3; one
image per step, as tests/test_tile.py runs it): the same training losses within 1e-5 relative. This
script runs that training in-process — the same data, seed and model, so its float32 losses are the
CLI's ``metrics.csv`` values — and separates three questions:

* is the tiled step the untiled one? (float64 tiled vs float64 untiled: rounding is 1e-16 there);
* how far apart are the float32 tiled and untiled runs? (the done-when) — as ``tile`` trains on a CPU
  (``cpu_rounding``: BatchNorm's statistics and output rounded as ATen's CPU kernel rounds them, so the
  tiled forward is the untiled one bit for bit and only the backward sums in another order), and
  without that rounding (one statistics sweep, the GPU's form);
* how far does float32 carry the *untiled* run when nothing but rounding changes? The untiled run
  again with every input pixel moved by one float32 ulp (``torch.nextafter``: 1.2e-7 relative, far
  below a 16-bit radiograph's resolution of 1.5e-5) — the floor any other float32 ordering of the
  same sums (tiling, another thread count, another convolution algorithm) can be held to.

For each step it prints the losses, their relative differences to the float32 untiled run, and how
many parameters' Adam updates differ by more than lr/2 (Adam's first update of a parameter is
±lr whatever its gradient's size: gradients at float32's noise floor flip it, and the flips of
step s show in the loss of step s+1).

Example (2 CPU cores, ~2 minutes)::

    OMP_NUM_THREADS=2 python experiments/tile_rounding.py --size 256 --tile 128 --steps 3
"""

from __future__ import annotations

import argparse
import copy

import torch

from memtrain.config import DataConfig, ModelConfig
from memtrain.data.module import build_datasets
from memtrain.loss import MSSSIMLoss
from memtrain.model import build_model
from memtrain.strategies.tile import apply_tiling


def run(base: torch.nn.Module, data, dtype: torch.dtype, lr: float, tile: int | None, ulp: bool, cpu_rounding: bool = True) -> tuple[list[float], list[dict]]:
    """Losses and each step's parameter updates of Adam on ``data`` (each update a dict name -> float64 tensor)."""
    model = copy.deepcopy(base).to(dtype)
    if tile:
        apply_tiling(model, tile, cpu_rounding=cpu_rounding)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = MSSSIMLoss()
    losses, updates = [], []
    for x, y in data:
        x = x.to(dtype)
        if ulp:
            x = torch.nextafter(x, x + 1)
        loss = loss_fn(model(x), y.to(dtype))
        loss.backward()
        before = {n: p.detach().to(torch.float64, copy=True) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        updates.append({n: p.detach().double() - before[n] for n, p in model.named_parameters()})
        losses.append(loss.item())
    return losses, updates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    torch.manual_seed(args.seed)  # as `memtrain fit --seed`: the model is built right after seeding
    base = build_model(ModelConfig(encoder="resnet18", zero_head=True))
    train, _ = build_datasets(DataConfig(source="phantom", size=args.size, train_images=1, val_images=2))
    x, y = train[0]
    data = [(x[None], y[None])] * args.steps  # --train-images 1 --batch-size 1: the same image every step
    runs = {
        "untiled float32": (torch.float32, None, False, True),
        f"tile:{args.tile} float32": (torch.float32, args.tile, False, True),
        f"tile:{args.tile} float32, one sweep": (torch.float32, args.tile, False, False),
        "untiled float32, input +1 ulp": (torch.float32, None, True, True),
        "untiled float64": (torch.float64, None, False, True),
        f"tile:{args.tile} float64": (torch.float64, args.tile, False, True),
    }
    results = {name: run(base, data, dtype, args.lr, tile, ulp, cpu) for name, (dtype, tile, ulp, cpu) in runs.items()}
    ref_losses, ref_updates = results["untiled float32"]
    print(f"{'run':32s} " + " ".join(f"{'step ' + str(s + 1):>12s}" for s in range(args.steps)))
    for name, (losses, updates) in results.items():
        print(f"{name:32s} " + " ".join(f"{v:12.8f}" for v in losses))
        if name == "untiled float32":
            continue
        rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
        flips = [sum(int(((u[k] - r[k]).abs() > args.lr / 2).sum()) for k in u) for u, r in zip(updates, ref_updates)]
        print(f"{'  loss rel. diff to untiled f32':32s} " + " ".join(f"{v:12.1e}" for v in rel))
        print(f"{'  updates > lr/2 apart':32s} " + " ".join(f"{v:12d}" for v in flips))
    t64, u64 = results[f"tile:{args.tile} float64"][0], results["untiled float64"][0]
    print(f"float64, tiled vs untiled: largest loss rel. diff {max(abs(a - b) / abs(b) for a, b in zip(t64, u64)):.1e}")


if __name__ == "__main__":
    main()

"""How far float32 rounding carries a short Adam run: plain vs ``tile``, each against a float64 run.

The issue-11 done-when compares ``memtrain fit --strategies tile:128 --size 256 --seed 3 --max-steps 3``
with the same run without ``tile``: the same training losses within 1e-5 relative. This script takes the
same kind of run in-process (ResNet18 U-Net as configs/ci-tiny.yaml, zero head, Adam lr 1e-3, batch 2,
phantom radiographs) in float32 and in float64, plain and tiled, and prints every step's loss and
the largest parameter difference after the last step. It separates two questions:

* is the tiled step the untiled one? (float64: tiled vs plain, where rounding is 1e-16);
* how reproducible is a float32 run at all? (float32 plain vs float64 plain, and float32 tiled vs
  float64 plain: both are rounding away from the same exact trajectory).

Example (2 CPU cores: ~6 minutes at 256², ~1 minute at 128²)::

    OMP_NUM_THREADS=2 python experiments/tile_rounding.py --size 256 --tile 128 --steps 3
"""

from __future__ import annotations

import argparse
import copy

import torch

from memtrain.config import ModelConfig
from memtrain.data.datasets import PhantomDataset
from memtrain.loss import MSSSIMLoss
from memtrain.model import build_model
from memtrain.strategies.tile import apply_tiling


def batches(size: int, batch: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds = PhantomDataset(seed=0, first=0, count=batch * steps, size=size)
    out = []
    for s in range(steps):
        xs, ys = zip(*(ds[s * batch + i] for i in range(batch)))
        out.append((torch.stack(xs), torch.stack(ys)))
    return out


def run(model: torch.nn.Module, data, dtype: torch.dtype, lr: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = model.to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = MSSSIMLoss()
    losses = []
    for x, y in data:
        loss = loss_fn(model(x.to(dtype)), y.to(dtype))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().double().clone() for k, v in model.state_dict().items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    base = build_model(ModelConfig(encoder="resnet18", zero_head=True))
    data = batches(args.size, args.batch, args.steps)
    results = {}
    for dtype in (torch.float64, torch.float32):
        for tiled in (False, True):
            model = copy.deepcopy(base)
            if tiled:
                apply_tiling(model, args.tile)
            name = f"{'tile' if tiled else 'plain'} {str(dtype).removeprefix('torch.')}"
            results[name] = run(model, data, dtype, args.lr)
            print(f"{name:15s} losses " + " ".join(f"{v:.8f}" for v in results[name][0]), flush=True)

    def compare(a: str, b: str) -> None:
        la, sa = results[a]
        lb, sb = results[b]
        rel = max(abs(x - y) / abs(y) for x, y in zip(la, lb))
        dparam = max((sa[k] - sb[k]).abs().max().item() for k in sa if sa[k].is_floating_point())
        worst = max((k for k in sa if sa[k].is_floating_point()), key=lambda k: (sa[k] - sb[k]).abs().max().item())
        per_step = " ".join(f"{abs(x - y) / abs(y):.1e}" for x, y in zip(la, lb))
        keys = [k for k in sa if sa[k].is_floating_point() and "running" not in k]
        flipped = sum(int(((sa[k] - sb[k]).abs() > args.lr / 2).sum()) for k in keys) / sum(sa[k].numel() for k in keys)
        buffers = max(((sa[k] - sb[k]).abs().max() / sb[k].abs().max()).item() for k in sa if "running" in k)
        print(
            f"{a:13s} vs {b:13s}: loss rel. diff per step {per_step} (max {rel:.1e}); max |Δparam| {dparam:.1e} ({worst}); "
            f"parameters with |Δ| > lr/2: {100 * flipped:.2f} %; BN running buffers max rel. diff {buffers:.1e}"
        )

    compare("tile float64", "plain float64")
    compare("tile float32", "plain float32")
    compare("plain float32", "plain float64")
    compare("tile float32", "plain float64")


if __name__ == "__main__":
    main()

"""`memtrain strategies`: list the registered strategies, their variants and trade-offs."""

# Lazy imports (startup): run() imports the command's code and torch, so that `memtrain strategies --help` needs no torch.
from __future__ import annotations

import inspect


def add_parser(sub) -> None:
    p = sub.add_parser("strategies", help="list memory strategies and their trade-offs", description=__doc__)
    p.add_argument("--verbose", "-v", action="store_true", help="print each strategy's full trade-off text")
    p.set_defaults(run=run)


def run(args) -> int:
    from memtrain.strategies import registered
    from memtrain.strategies.base import Stage

    items = sorted(registered().values(), key=lambda c: (c.stage, c.name))
    print("strategies (apply order: " + " -> ".join(s.name.lower() for s in Stage) + "; combine with commas, e.g. --strategies amp,checkpoint)")
    print(
        "time: expected step time relative to 'none' on a CUDA GPU and on a CPU (the declared_time that `memtrain plan` orders by; per variant where they differ)"
    )
    for cls in items:
        variants = ", ".join(f"{cls.name}:{v}" for v in cls.variants[1:] if v) if cls.variants else ""
        print(f"  {cls.name:<12} [{cls.stage.name.lower()}; time {time_text(cls)}] {cls.summary}" + (f" (variants: {variants})" if variants else ""))
        if args.verbose:
            doc = inspect.cleandoc(cls.__doc__ or "")
            print("".join(f"      {line}\n" for line in doc.splitlines()))
    return 0


def _cost(cls, variant: str | None) -> str:
    return f"x{cls.declared_time(variant, 'cuda'):.2f} GPU, x{cls.declared_time(variant, 'cpu'):.2f} CPU"


def time_text(cls) -> str:
    """The declared time cost on each device, once when every variant has the same, else per ``name:variant``."""
    variants = cls.variants or (None,)
    costs = {v: _cost(cls, v) for v in variants}
    if len(set(costs.values())) == 1:
        return costs[variants[0]]
    return "; ".join(f"{cls.name}:{v} {c}" for v, c in costs.items())

"""`memtrain strategies`: list the registered strategies, their variants and trade-offs."""

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
    print("time: expected step time relative to 'none' (the declared time_cost that `memtrain plan` orders by)")
    for cls in items:
        variants = ", ".join(f"{cls.name}:{v}" for v in cls.variants[1:] if v) if cls.variants else ""
        cpu = cls.time_cost if cls.time_cost_cpu is None else cls.time_cost_cpu
        cost = f"time x{cls.time_cost:.2f} GPU" + (f", x{cpu:.2f} CPU" if cpu != cls.time_cost else "")
        print(f"  {cls.name:<12} [{cls.stage.name.lower()}; {cost}] {cls.summary}" + (f" (variants: {variants})" if variants else ""))
        if args.verbose:
            doc = inspect.cleandoc(cls.__doc__ or "")
            print("".join(f"      {line}\n" for line in doc.splitlines()))
    return 0

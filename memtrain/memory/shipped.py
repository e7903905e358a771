"""Estimates shipped with memtrain, so that `memtrain plan` answers in seconds on a fresh machine.

``shipped_models.json.gz`` (package data, next to this module) maps cache names — exactly
the names the disk cache of :mod:`memtrain.memory.scaling` uses, versions of torch, smp and
memtrain included in the key — to the JSON the disk cache would hold. :func:`memtrain.memory.scaling.read_entry`
falls back to it after the disk cache, so another torch, smp or memtrain version simply misses
and traces; ``MEMTRAIN_SHIPPED=0`` ignores the file (benchmarks of a cold start without it). The store is generic: anything cached through ``scaling.write_entry`` under its
own key can be shipped the same way.

Regenerate it (traces every default combination of ``memtrain plan`` for its default target
at batch sizes 1 and 2, U-Net ResNet34, MS-SSIM; about ten minutes on 2 cores; then the
large-size models, :mod:`memtrain.memory.large_sizes`, of the default combinations whose step
changes with the size, at batch size 1: about 20 s each, an hour on one core)::

    python -m memtrain.memory.shipped --jobs 2

Models are written to the disk cache as they are made, so ``MEMTRAIN_CACHE_DIR=DIR ... --reuse-cache``
resumes an interrupted run.

The file is written atomically and deterministically (sorted keys, gzip without a
timestamp). ``tests/test_plan_shipped.py`` re-traces one shipped combination and compares.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from memtrain.rundir import atomic_write_bytes
from memtrain.strategies import Plan

PATH = Path(__file__).with_name("shipped_models.json.gz")
BATCH_SIZES = (1, 2)
LARGE_BATCH_SIZES = (1,)
ENCODER = "resnet34"
LOSS = "msssim"
SIZE_FOR_CANDIDATES = 512  # which combinations are candidates does not depend on the size; any valid one


@functools.cache
def _entries(path: Path = PATH) -> dict[str, dict]:
    try:
        data = json.loads(gzip.decompress(path.read_bytes()))
        return data["entries"] if isinstance(data.get("entries"), dict) else {}
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return {}


def lookup(name: str) -> dict | None:
    """The shipped JSON stored under cache name ``name``, or None (always None with ``MEMTRAIN_SHIPPED=0``)."""
    if os.environ.get("MEMTRAIN_SHIPPED") == "0":
        return None
    return _entries().get(name)


def write(entries: dict[str, dict], about: dict, path: Path = PATH) -> int:
    """Write ``entries`` (cache name → JSON) with a description ``about`` to ``path`` atomically; its size in bytes."""
    text = json.dumps({"about": about, "entries": entries}, sort_keys=True, separators=(",", ":"))
    data = gzip.compress(text.encode(), compresslevel=9, mtime=0)
    atomic_write_bytes(path, data)
    return len(data)


def default_combinations(env) -> list[str]:
    """The combinations `memtrain plan` estimates through size models by default on ``env``: planned, not rejected, every strategy ``size_polynomial``."""
    from memtrain.memory.planner import Planner  # (cycle: planner -> scaling -> shipped -> planner)

    out = []
    for c in Planner(size=SIZE_FOR_CANDIDATES, env=env).candidates():
        if c.status == "ok" and all(type(s).size_polynomial for s in Plan.resolve(c.strategies, env).strategies):
            out.append(c.strategies)
    return out


def large_combinations(env) -> list[str]:
    """The combinations `memtrain plan` estimates at the size by default on ``env`` (a strategy not ``size_polynomial``), in its order.

    Those with a memory-neutral strategy (measured as the planner does, at ``FIT_SIZES[0]``) are
    left out: the planner estimates them as the same combination without it.
    """
    # (cycle: planner -> scaling -> shipped -> planner; large_sizes -> scaling)
    from memtrain.memory.large_sizes import FIT_SIZES
    from memtrain.memory.planner import Planner

    planner = Planner(size=FIT_SIZES[0], env=env)
    cands = [c for c in planner.candidates() if c.status == "ok"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        neutral = planner._neutral(sorted({n for c in cands for n in c.strategies.split(",") if n != "none"}))
    out = []
    for c in sorted(cands, key=lambda c: c.time_cost):
        names = c.strategies.split(",")
        if not neutral.intersection(names) and not all(type(s).size_polynomial for s in Plan.resolve(c.strategies, env).strategies):
            out.append(c.strategies)
    return out


def _large_entry(args: tuple) -> tuple[str, str, int, dict, float]:
    """Worker: (cache name, combination, batch size, the JSON stored for its large-size model, seconds); cached as it is made."""
    # (cycle: planner -> scaling -> shipped -> planner; large_sizes -> scaling)
    from memtrain.memory import large_sizes, scaling
    from memtrain.memory.planner import default_target

    combo, batch_size = args
    warnings.simplefilter("ignore")
    env = default_target()
    start = time.perf_counter()
    name = large_sizes.name(scaling.cache_key(combo, batch_size=batch_size, encoder=ENCODER, loss=LOSS, env=env))
    found = scaling.read_entry(name, shipped=False)
    if found is not None and large_sizes.from_entry(found[0]) is not None:
        return name, combo, batch_size, found[0], time.perf_counter() - start
    try:
        data = large_sizes.entry(large_sizes.trace(combo, batch_size=batch_size, encoder=ENCODER, loss=LOSS, env=env))
    except Exception as e:  # the planner measures such a combination at the size
        data = large_sizes.entry(f"tracing at {large_sizes.FIT_SIZES[0]} px and up failed ({e.__class__.__name__})")
    scaling.write_entry(name, data)
    return name, combo, batch_size, data, time.perf_counter() - start


def _size_model_entry(args: tuple) -> tuple[str, str, int, dict, float]:
    """Worker: (cache key, combination, batch size, the JSON the cache holds, seconds)."""
    # (cycle: planner -> scaling -> shipped -> planner)
    from memtrain.memory import scaling
    from memtrain.memory.planner import default_target

    combo, batch_size = args
    warnings.simplefilter("ignore")
    env = default_target()
    start = time.perf_counter()
    model = scaling.size_model(combo, batch_size=batch_size, encoder=ENCODER, loss=LOSS, env=env, shipped=False)
    key = scaling.cache_key(combo, batch_size=batch_size, encoder=ENCODER, loss=LOSS, env=env)
    return key, combo, batch_size, scaling.entry(model), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m memtrain.memory.shipped", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="comma-separated batch sizes [default: 1,2]")
    p.add_argument(
        "--large-batch-sizes",
        default=",".join(map(str, LARGE_BATCH_SIZES)),
        help="comma-separated batch sizes of the large-size models (memtrain.memory.large_sizes); empty: none [default: 1]",
    )
    p.add_argument("--jobs", type=int, default=1, help="processes tracing in parallel [default: 1]")
    p.add_argument("--out", default=str(PATH), help="file to write [default: the package's shipped_models.json.gz]")
    p.add_argument("--reuse-cache", action="store_true", help="take models already in the disk cache (MEMTRAIN_CACHE_DIR) instead of tracing all afresh")
    args = p.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"memtrain: error: --batch-sizes {args.batch_sizes!r}: expected comma-separated positive integers, e.g. 1,2", file=sys.stderr)
        return 2
    try:
        large_batch_sizes = [int(b) for b in args.large_batch_sizes.split(",") if b.strip()]
        if large_batch_sizes and min(large_batch_sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"memtrain: error: --large-batch-sizes {args.large_batch_sizes!r}: expected comma-separated positive integers, e.g. 1", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"memtrain: error: --jobs {args.jobs}: expected a positive number", file=sys.stderr)
        return 2
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"memtrain: error: --out {out}: folder {out.parent} does not exist", file=sys.stderr)
        return 2
    if not args.reuse_cache:
        os.environ["MEMTRAIN_CACHE_DIR"] = tempfile.mkdtemp(prefix="memtrain-ship-")  # workers inherit it
    os.environ.setdefault("OMP_NUM_THREADS", "1" if args.jobs > 1 else "2")

    # (cycle: planner -> scaling -> shipped -> planner; large_sizes -> scaling)
    from memtrain.memory import large_sizes, scaling
    from memtrain.memory.planner import default_target

    env = default_target()
    work = [(c, b) for b in batch_sizes for c in default_combinations(env)]
    large = [(c, b) for b in large_batch_sizes for c in large_combinations(env)] if large_batch_sizes else []
    total = len(work) + len(large)
    print(
        f"{len(work)} size models to trace ({len(work) // len(batch_sizes)} combinations x batch sizes {batch_sizes}),"
        f" {len(large)} large-size models (batch sizes {large_batch_sizes})",
        file=sys.stderr,
        flush=True,
    )
    entries: dict[str, dict] = {}

    def done(result) -> None:
        key, combo, batch_size, data, seconds = result
        entries[key] = data
        what = "model" if "events" in data else "approximate model" if "approximate" in data else f"none: {data.get('direct')}"
        print(f"[{len(entries)}/{total}] {combo} batch {batch_size}: {what}, {seconds:.1f} s", file=sys.stderr, flush=True)

    for fn, items in ((_size_model_entry, work), (_large_entry, large)):
        if args.jobs > 1 and len(items) > 1:
            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                for result in pool.map(fn, items):
                    done(result)
        else:
            for w in items:
                done(fn(w))
    about = {
        "what": "pruned size models (memtrain.memory.scaling) of memtrain plan's default combinations; keys are scaling.cache_key;"
        " large-size models (memtrain.memory.large_sizes) of those whose step changes with the size; keys are large_sizes.name",
        "regenerate": "python -m memtrain.memory.shipped --jobs 2",
        "format": scaling.FORMAT,
        **scaling.installed_versions(),
        "encoder": ENCODER,
        "loss": LOSS,
        "batch_sizes": batch_sizes,
        "large_batch_sizes": large_batch_sizes,
        "large_range": large_sizes.RANGE,
        "target": {"device": env.device, "native_bf16": env.native_bf16},
    }
    size = write(entries, about, out)
    print(f"wrote {out}: {len(entries)} entries, {size:,} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

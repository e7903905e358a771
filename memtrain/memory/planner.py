"""Choose memory strategies for a budget: estimate every combination's step with fake tensors.

Candidates are ``none`` and every combination of the registered strategies — alone, in
pairs, triples, up to all of them (``max_size`` bounds it) — each strategy in each of
the variants it offers to plans (:meth:`Strategy.plan_options`: every checkpoint
granularity; ``quant:int8``; ``offload`` on a CUDA target only; no placement strategy,
since those run several processes). What is left out is listed with the reason
(:func:`left_out`). Each combination is resolved for the target environment first;
combinations that :meth:`Plan.resolve` rejects are listed with the reason and never
measured. The rest
are estimated with fake tensors — nothing is allocated — by :func:`estimate_memory`: from
the combination's *size model* (:mod:`memtrain.memory.scaling`: exact per-event quadratics
in the image side, traced once at three small sizes and verified at a fourth, cached on
disk, so any size up to 8192² and beyond costs nothing more; the default combinations'
models for the default target ship with memtrain, :mod:`memtrain.memory.shipped`); for strategies whose
step changes with the size (``size_polynomial = False``), from 1024 px on, from the
combination's large-size model when one is cached or shipped (:mod:`memtrain.memory.large_sizes`:
exact, or each phase's peak within 1 %); otherwise by :func:`memtrain.memory.estimate.measure_step`
at the size (3–50 s on a CPU; also cached). A line per estimate goes to ``progress``.

Strategies that change no memory at all (e.g. ``tf32``) are detected by measurement:
a strategy whose own estimate equals ``none``'s in every phase is *memory-neutral*,
and a combination containing it reuses the estimate of the same combination without
it. ``--jobs`` spreads estimates over processes.

Order and choice: combinations are sorted by expected step-time cost — the product of
each strategy's ``relative_time()`` (its declared ``time_cost``; 1.0 = the plain
model's speed) — then by step peak, and estimated in that order. A combination *fits*
when what it needs by the headroom model (:mod:`memtrain.memory.headroom`: tensor peak
plus kernel workspace, × (1 + fraction) + fixed; on CUDA ×1.10 + 1 GiB until
``memtrain calibrate`` measures it) is at most the budget. The chosen plan is the first
combination in that order that fits: the fastest expected one. With ``enough`` (the CLI's
table), estimating stops once that many fit: the slower rest are not estimated
(``skipped``) — they cannot be among the fastest that fit.

Fallbacks: a strategy may declare a slower, leaner variant that plans try only where nothing
else fits (:meth:`Strategy.fallback_variant`: ``tile`` → ``tile:lean``). When a budget is given
and no estimated combination fits it, the planner takes the :data:`FALLBACKS_TRIED` combinations
with such a strategy that have the smallest step peaks (distinct estimates: combinations that
differ only by memory-neutral strategies count once, and all of them get their fallback form),
and estimates their fallback forms in expected-cost order, stopping at the first that fits
(``--all``/``--json``: every one). Plans where something fits never estimate a fallback, so
they take no longer. A fallback named in ``--strategies`` is an ordinary combination.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

from memtrain.errors import MemtrainError
from memtrain.memory import large_sizes, scaling
from memtrain.memory.estimate import StepMemory, measure_step
from memtrain.memory.headroom import model_for
from memtrain.memory.tracker import MIB, PHASES
from memtrain.strategies import Environment, Plan, create, registered

HEADROOM_BYTES = 2**30
HEADROOM_FRACTION = 0.10
# Combinations (distinct estimates, smallest step peaks first) whose fallback form a plan tries when nothing fits. tile:lean
# takes ~0.8x tile's step peak (benchmarks/results/tile.md) and is estimated at the size (3-8 s each at 4096² on a CPU),
# so the few smallest are the ones that can fit.
FALLBACKS_TRIED = 4


@dataclass
class Candidate:
    """One combination: its plan label, expected cost, estimate and verdict."""

    strategies: str  # what to pass to --strategies (as enumerated, e.g. "amp,tf32")
    label: str  # the resolved plan (e.g. "amp:bf16,tf32")
    time_cost: float
    status: str = "ok"  # ok | rejected | error
    reason: str = ""
    memory: StepMemory | None = None
    measured_as: str | None = None  # the combination whose estimate is reused (memory-neutral strategies left out)
    fits: bool | None = None
    needed: int | None = None  # memory the step needs by the headroom model (memtrain.memory.headroom)
    estimated_by: str | None = None  # how the estimate was obtained: size model, approximate size model (≤ 1%), measured at the size

    @property
    def approximate(self) -> bool:
        """The estimate comes from an approximate large-size model (within its stated bound of ``measure_step``, not equal)."""
        return (self.estimated_by or "").startswith("approximate")

    def peak(self, phase: str) -> int | None:
        return None if self.memory is None else self.memory.peak(phase)

    @property
    def step_peak(self) -> int | None:
        return None if self.memory is None else self.memory.step_peak

    def as_dict(self, size: int, batch_size: int) -> dict[str, object]:
        def mib(v):
            return None if v is None else round(v / MIB, 1)

        return {
            "strategies": self.strategies,
            "plan": self.label,
            "size": size,
            "batch_size": batch_size,
            "status": self.status,
            "time_cost": round(self.time_cost, 4),
            "forward_peak_mib": mib(self.peak("forward")),
            "backward_peak_mib": mib(self.peak("backward")),
            "optimizer_peak_mib": mib(self.peak("optimizer")),
            "step_peak_mib": mib(self.step_peak),
            "needed_mib": mib(self.needed),
            "fits": self.fits,
            "reason": self.reason,
            "estimated_by": self.estimated_by,
        }


def default_target():
    """The environment plans are for unless told otherwise: a CUDA GPU with native bf16 (Ampere or newer)."""
    return Environment(device="cuda", native_bf16=True)


def strategy_names() -> list[str]:
    """Registered strategies other than ``none``, in transform order."""
    return [cls.name for cls in sorted(registered().values(), key=lambda c: (c.stage, c.name)) if cls.name != "none"]


def strategy_options(env=None) -> dict[str, tuple[tuple[str, ...], str]]:
    """Each registered strategy's specs for plans on ``env`` and the reason for what it leaves out (:meth:`Strategy.plan_options`)."""
    env = env or default_target()
    classes = registered()
    return {name: classes[name].plan_options(env) for name in strategy_names()}


def left_out(env=None) -> list[tuple[str, str]]:
    """(strategy, reason) for the strategies and variants plans do not consider on ``env``."""
    return [(name, reason) for name, (_specs, reason) in strategy_options(env).items() if reason]


def combinations(names: list[str] | None = None, max_size: int | None = None, env=None) -> list[str]:
    """``none``, then every combination of 1 .. ``max_size`` of the strategies ``names`` (default: all), in each planned variant."""
    options = strategy_options(env)
    groups = [options[n][0] for n in (strategy_names() if names is None else names) if options[n][0]]
    top = len(groups) if max_size is None else min(max_size, len(groups))
    return ["none"] + [",".join(specs) for k in range(1, top + 1) for chosen in itertools.combinations(groups, k) for specs in itertools.product(*chosen)]


def required_bytes(step_peak: int, headroom: int = HEADROOM_BYTES, fraction: float = HEADROOM_FRACTION) -> int:
    """Device memory a step of ``step_peak`` tensor bytes needs, headroom included."""
    return math.ceil(step_peak * (1.0 + fraction)) + headroom


def _measure(args: tuple) -> tuple[StepMemory | str, str, float]:
    """Worker: (an estimate or the error text, how it was obtained, seconds); a failing strategy must not stop the plan."""
    combo, size, batch_size, encoder, loss, env, extrapolate = args
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            memory, how = estimate_memory(combo, size=size, batch_size=batch_size, encoder=encoder, loss=loss, env=env, extrapolate=extrapolate)
            return memory, how, time.perf_counter() - start
    except MemtrainError as e:
        return f"rejected: {e}", "failed", time.perf_counter() - start
    except Exception as e:
        return f"error: {e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}", "failed", time.perf_counter() - start


def estimate_memory(combo: str, *, size: int, batch_size: int, encoder: str, loss: str = "msssim", env, extrapolate: bool = True) -> tuple[StepMemory, str]:
    """``combo``'s step at ``size`` with fake tensors, and how: from its size model (memtrain.memory.scaling) or measured at the size.

    Both are cached on disk; the size model is used when every strategy declares
    ``size_polynomial``, the size is on the model's range (≥ its smallest traced size) and the
    model was verified. A combination with a strategy whose step changes with the size uses its
    large-size model (:mod:`memtrain.memory.large_sizes`: exact, or within 1 %; from 1024 px on)
    when one is cached or shipped. Otherwise :func:`measure_step` runs at ``size``.
    """
    plan = Plan.resolve(combo, env)
    key = scaling.cache_key(combo, batch_size=batch_size, encoder=encoder, loss=loss, env=env)
    why = "extrapolation off"
    if extrapolate:
        if not all(type(s).size_polynomial for s in plan.strategies):
            why = "its events depend on the size"
            found = large_sizes.find(key) if large_sizes.covers(size, plan) else None
            if found is not None and isinstance(found[0], str):
                why += f"; {found[0]}"
            elif found is not None and large_sizes.covers(size, plan, found[0]):
                model, source = found
                how = "size model" if isinstance(model, scaling.SizeModel) else f"approximate size model (≤ {model.bound:.0%})"
                return model.at(size, strategies=plan.label, batch_size=batch_size, device=env.device), f"{how} from {model.sizes[0]} px ({source})"
            elif found is not None:
                why += f"; its size model starts at {found[0].sizes[0]} px"
        elif size < scaling.SIZES[0]:
            why = f"below {scaling.SIZES[0]} px"
        else:
            found = scaling.find(key)
            try:
                model = found[0] if found is not None else scaling.size_model(combo, batch_size=batch_size, encoder=encoder, loss=loss, env=env)
            except MemtrainError:
                raise
            except Exception as e:  # a trace at the small sizes failed: the size itself decides
                model = f"tracing at {scaling.SIZES[0]}-{scaling.VERIFY_SIZE} px failed ({e.__class__.__name__})"
            if isinstance(model, scaling.SizeModel):
                return model.at(size, strategies=plan.label, batch_size=batch_size, device=env.device), "size model" + (f" ({found[1]})" if found else "")
            why = model
    memory = scaling.load_direct(key, size)
    if memory is not None:
        return memory, f"measured at the size (cached; {why})"
    memory = measure_step(combo, size=size, batch_size=batch_size, encoder=encoder, loss=loss, fake=True, env=env, blocks=False)
    scaling.store_direct(key, memory)
    return memory, f"measured at the size ({why})"


class Planner:
    """Estimates candidates for one (size, batch size, encoder, loss, target) and picks the fastest that fits ``budget``."""

    def __init__(
        self,
        *,
        size: int,
        batch_size: int = 1,
        encoder: str = "resnet34",
        loss: str = "msssim",
        env=None,
        budget: int | None = None,
        headroom: int | None = None,
        fraction: float | None = None,
        headroom_model=None,
        jobs: int = 1,
        extrapolate: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.size, self.batch_size, self.encoder, self.loss = size, batch_size, encoder, loss
        self.env = env or default_target()

        model = headroom_model or model_for(self.env.device)
        if headroom is not None:
            model = replace(model, fixed=headroom, source=f"{model.source}; fixed part from --headroom")
        if fraction is not None:
            model = replace(model, fraction=fraction)
        self.budget, self.model = budget, model
        self.headroom, self.fraction = model.fixed, model.fraction
        self.jobs = max(1, jobs)
        self.extrapolate = extrapolate
        self.progress = progress  # called with one line per combination estimated (None: silent)
        self._cache: dict[str, StepMemory | str] = {}
        self._how: dict[str, str] = {}  # combination -> how its estimate was obtained (estimate_memory's second value)
        self.measured: list[Candidate] = []  # what choose() estimated
        self.neutral: set[str] = set()  # memory-neutral strategies found by estimate()
        self.estimated = 0  # estimates made (progress lines)

    # -- candidates
    def candidates(self, combos: list[str] | None = None) -> list[Candidate]:
        """Resolve ``combos`` (default: :func:`combinations`) for the target; rejected ones carry the reason."""
        out = []
        for combo in combinations(env=self.env) if combos is None else combos:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    plan = Plan.resolve(combo, self.env)
            except MemtrainError as e:
                out.append(Candidate(combo, combo, math.inf, status="rejected", reason=str(e)))
                continue
            unplanned = [(s.name, type(s).plan_options(self.env)[1]) for s in plan.strategies if not type(s).plan_options(self.env)[0]]
            if unplanned:
                name, why = unplanned[0]
                out.append(Candidate(combo, plan.label, math.inf, status="rejected", reason=f"{name}: {why}"))
                continue
            out.append(Candidate(combo, plan.label, plan.time_cost))
        return out

    # -- estimates
    def _run(self, combos: list[str]) -> None:
        todo = [c for c in dict.fromkeys(combos) if c not in self._cache]
        if not todo:
            return
        args = [(c, self.size, self.batch_size, self.encoder, self.loss, self.env, self.extrapolate) for c in todo]
        if self.jobs > 1 and len(todo) > 2:
            workers = min(self.jobs, len(todo))
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_worker) as pool:
                for combo, result in zip(todo, pool.map(_measure, args)):
                    self._done(combo, result)
        else:
            for combo, a in zip(todo, args):
                self._done(combo, _measure(a))

    def _done(self, combo: str, result: tuple) -> None:
        memory, how, seconds = result
        self._cache[combo] = memory
        self._how[combo] = how
        self.estimated += 1
        if self.progress is not None:
            peak = f"step peak {memory.step_peak / MIB:,.0f} MiB" if isinstance(memory, StepMemory) else memory
            self.progress(f"[{self.estimated}] {combo}: {peak}; {how}, {seconds:.1f} s")

    def _neutral(self, names: list[str]) -> set[str]:
        """Strategies whose own estimate equals ``none``'s in every phase (they change no memory)."""
        if not names:
            return set()
        self._run(["none", *names])
        base = self._cache["none"]
        if not isinstance(base, StepMemory):
            return set()
        neutral = set()
        for name in names:
            m = self._cache[name]
            if isinstance(m, StepMemory) and all(m.peak(p) == base.peak(p) for p in PHASES):
                neutral.add(name)
        return neutral

    def estimate(self, candidates: list[Candidate], *, enough: int | None = None) -> list[Candidate]:
        """Fill in every candidate's estimate and verdict (memory-neutral strategies reuse estimates).

        With ``enough`` and a budget, candidates are estimated in expected-cost order and the
        estimating stops once ``enough`` of them fit: the slower rest cannot be among the
        ``enough`` fastest that fit, and are marked ``skipped``.
        """
        ok = [c for c in candidates if c.status == "ok"]
        singles = sorted({n for c in ok for n in c.strategies.split(",") if n != "none"})
        self.neutral = self._neutral(singles)
        for c in ok:
            c.measured_as = self._memory_key(c)
        fitting = 0
        for _cost, group in itertools.groupby(sorted(ok, key=lambda c: c.time_cost), key=lambda c: c.time_cost):
            group = list(group)
            if enough is not None and self.budget is not None and fitting >= enough:
                for c in group:
                    c.status, c.reason, c.measured_as = "skipped", f"expected slower than the {enough} fastest that fit", None
                continue
            self._estimate_group(group)
            fitting += sum(bool(c.fits) for c in group)
        return candidates

    def _estimate_group(self, group: list[Candidate]) -> None:
        """Estimate each candidate's ``measured_as`` (jobs in parallel) and settle it; ``measured_as`` stays only where it is another combination."""
        self._run([c.measured_as for c in group])
        for c in group:
            key = c.measured_as
            if key == c.strategies:
                c.measured_as = None
            self._settle(c, key)

    def _memory_key(self, c: Candidate) -> str:
        """The combination whose estimate ``c`` shares: ``c`` without the known memory-neutral strategies."""
        return ",".join(n for n in c.strategies.split(",") if n not in self.neutral) or "none"

    def _settle(self, c: Candidate, key: str) -> None:
        """``c``'s verdict from the estimate of ``key`` (``c`` itself, or the combination it shares an estimate with)."""
        result = self._cache[key]
        c.estimated_by = self._how.get(key)
        if isinstance(result, StepMemory):
            c.memory = result
            c.needed = self.model.needed(result)
            if self.budget is not None:
                c.fits = c.needed <= self.budget
        else:
            c.status, _, c.reason = result.partition(": ")
            c.status = "rejected" if c.status == "rejected" else "error"

    def required(self, step_peak: int) -> int:
        """What a step of ``step_peak`` tensor bytes needs by the headroom model, without its workspace term."""
        return self.model.needed_for(step_peak)

    def plan(self, combos: list[str] | None = None, *, enough: int | None = None) -> list[Candidate]:
        """Every candidate estimated (see :meth:`estimate` for ``enough``), sorted: measured ones by (cost, step peak), then the rest.

        Where a budget is given and nothing fits, the fallback forms (:meth:`fallbacks`) join the
        candidates: with ``enough``, estimated until the first that fits; without, all of them.
        """
        cands = self.estimate(self.candidates(combos), enough=enough)
        extra = self.fallbacks(cands)
        if extra:
            self._estimate_fallbacks(extra, stop=enough is not None)
        return sort_candidates(cands + extra)

    def choose(self, combos: list[str] | None = None) -> Candidate | None:
        """The fastest expected candidate that fits the budget, measuring in cost order and stopping at the first that fits.

        Where none fits, the fastest fallback form that fits (:meth:`fallbacks`), or None.
        """
        if self.budget is None:
            raise ValueError("choose() needs a budget")
        cands = [c for c in self.candidates(combos) if c.status == "ok"]
        for _cost, group in itertools.groupby(sorted(cands, key=lambda c: c.time_cost), key=lambda c: c.time_cost):
            group = list(group)
            self._run([self._memory_key(c) for c in group])
            for c in group:
                self._settle(c, self._memory_key(c))
            self.measured.extend(group)
            fitting = sorted((c for c in group if c.fits), key=lambda c: c.step_peak)
            if fitting:
                return fitting[0]
        extra = self.fallbacks(cands)
        self.measured.extend(extra)
        return self._estimate_fallbacks(extra, stop=True)

    # -- fallbacks
    def fallbacks(self, cands: list[Candidate]) -> list[Candidate]:
        """Where a budget is given and no estimated candidate fits it: the fallback forms of the smallest (see the module docstring).

        Of the estimated candidates with a strategy that declares a fallback variant, those whose
        estimate (without memory-neutral strategies) is one of the :data:`FALLBACKS_TRIED` with the
        smallest step peaks get that strategy replaced by its fallback; forms already among
        ``cands`` are left out. Returned resolved and not estimated; empty when something fits.
        """
        if self.budget is None or any(c.fits for c in cands):
            return []
        estimated = [c for c in cands if c.memory is not None]
        if not self.neutral:  # choose() does not look for memory-neutral strategies; here their estimates are cached already
            self.neutral = self._neutral(sorted({n for c in estimated for n in c.strategies.split(",") if n != "none"}))
        forms = {c.strategies: form for c in estimated if (form := fallback_form(c.strategies)) is not None}
        keys: list[str] = []
        for c in sorted((c for c in estimated if c.strategies in forms), key=lambda c: c.step_peak):
            if self._memory_key(c) not in keys:
                if len(keys) == FALLBACKS_TRIED:
                    break
                keys.append(self._memory_key(c))
        known = {c.strategies for c in cands}
        todo = [forms[c.strategies] for c in estimated if c.strategies in forms and self._memory_key(c) in keys]
        return self.candidates([f for f in dict.fromkeys(todo) if f not in known])

    def _estimate_fallbacks(self, extra: list[Candidate], *, stop: bool) -> Candidate | None:
        """Estimate ``extra`` in expected-cost order; with ``stop``, the slower ones after the first group that fits are ``skipped``. The fastest that fits."""
        best = None
        for _cost, group in itertools.groupby(sorted((c for c in extra if c.status == "ok"), key=lambda c: c.time_cost), key=lambda c: c.time_cost):
            group = list(group)
            if stop and best is not None:
                for c in group:
                    c.status, c.reason = "skipped", f"fallback expected slower than {best.strategies}, which fits"
                continue
            for c in group:
                c.measured_as = self._memory_key(c)
            self._estimate_group(group)
            fitting = sorted((c for c in group if c.fits), key=lambda c: c.step_peak)
            if fitting and best is None:
                best = fitting[0]
        return best


def fallback_form(combo: str) -> str | None:
    """``combo`` with each strategy that declares a fallback variant in that variant (``tile`` → ``tile:lean``), or None when none does."""
    parts, changed = [], False
    for spec in combo.split(","):
        s = create(spec)
        fallback = type(s).fallback_variant(s.variant)
        changed |= fallback is not None
        parts.append(spec if fallback is None else f"{s.name}:{fallback}")
    return ",".join(parts) if changed else None


def sort_candidates(cands: list[Candidate]) -> list[Candidate]:
    measured = sorted((c for c in cands if c.memory is not None), key=lambda c: (c.time_cost, c.step_peak))
    return measured + [c for c in cands if c.memory is None]


def chosen(cands: list[Candidate]) -> Candidate | None:
    """The first fitting candidate of a sorted list."""
    return next((c for c in cands if c.fits), None)


def _quiet_worker() -> None:
    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

"""Choose memory strategies for a budget: estimate every combination's step with fake tensors.

Candidates are ``none`` and every combination of the registered strategies — alone, in
pairs, triples, up to all of them (``max_size`` bounds it) — each strategy in each of
the variants it offers to plans (:meth:`Strategy.plan_options`: every checkpoint
granularity; ``quant:int8``; ``offload`` on a CUDA target only; no placement strategy,
since those run several processes). What is left out is listed with the reason
(:func:`left_out`). Each combination is resolved for the target environment first;
combinations that :meth:`Plan.resolve` rejects are listed with the reason and never
measured. The rest
are measured with :func:`memtrain.memory.estimate.measure_step` under fake tensors: the
exact tensor bytes of the fit's training step, nothing allocated, ~1-3 s each on a
CPU whatever the image size.

Strategies that change no memory at all (e.g. ``tf32``) are detected by measurement:
a strategy whose own estimate equals ``none``'s in every phase is *memory-neutral*,
and a combination containing it reuses the estimate of the same combination without
it. With k memory-changing strategies the planner measures at most 2^k combinations
(the registry of the paper's strategies gives a few dozen); ``--jobs`` spreads them over
processes.

Order and choice: combinations are sorted by expected step-time cost — the product of
each strategy's ``relative_time()`` (its declared ``time_cost``; 1.0 = the plain
model's speed) — then by step peak. A combination *fits* when

    step peak × (1 + ``fraction``) + ``headroom`` ≤ budget

with, by default, ``fraction`` = 10 % (allocator block rounding and fragmentation: the
caching allocator's reserve above its allocated peak) and ``headroom`` = 1 GiB (the
CUDA context, cuDNN/cuBLAS workspaces and the pinned-memory and library buffers that
never become tensors). The chosen plan is the first combination in that order that
fits: the fastest expected one.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from dataclasses import dataclass

from memtrain.errors import MemtrainError
from memtrain.memory.estimate import StepMemory, measure_step
from memtrain.memory.tracker import MIB, PHASES

HEADROOM_BYTES = 2**30
HEADROOM_FRACTION = 0.10


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
            "fits": self.fits,
            "reason": self.reason,
        }


def default_target():
    """The environment plans are for unless told otherwise: a CUDA GPU with native bf16 (Ampere or newer)."""
    from memtrain.strategies import Environment

    return Environment(device="cuda", native_bf16=True)


def strategy_names() -> list[str]:
    """Registered strategies other than ``none``, in transform order."""
    from memtrain.strategies import registered

    return [cls.name for cls in sorted(registered().values(), key=lambda c: (c.stage, c.name)) if cls.name != "none"]


def strategy_options(env=None) -> dict[str, tuple[tuple[str, ...], str]]:
    """Each registered strategy's specs for plans on ``env`` and the reason for what it leaves out (:meth:`Strategy.plan_options`)."""
    from memtrain.strategies import registered

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


def _measure(args: tuple) -> StepMemory | str:
    """Worker: an estimate, or the error text (a failing strategy must not stop the plan)."""
    combo, size, batch_size, encoder, loss, env = args
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return measure_step(combo, size=size, batch_size=batch_size, encoder=encoder, loss=loss, fake=True, env=env, blocks=False)
    except MemtrainError as e:
        return f"rejected: {e}"
    except Exception as e:
        return f"error: {e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


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
        headroom: int = HEADROOM_BYTES,
        fraction: float = HEADROOM_FRACTION,
        jobs: int = 1,
    ) -> None:
        self.size, self.batch_size, self.encoder, self.loss = size, batch_size, encoder, loss
        self.env = env or default_target()
        self.budget, self.headroom, self.fraction = budget, headroom, fraction
        self.jobs = max(1, jobs)
        self._cache: dict[str, StepMemory | str] = {}
        self.measured: list[Candidate] = []  # what choose() estimated
        self.neutral: set[str] = set()  # memory-neutral strategies found by estimate()

    # -- candidates
    def candidates(self, combos: list[str] | None = None) -> list[Candidate]:
        """Resolve ``combos`` (default: :func:`combinations`) for the target; rejected ones carry the reason."""
        from memtrain.strategies import Plan

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
        args = [(c, self.size, self.batch_size, self.encoder, self.loss, self.env) for c in todo]
        if self.jobs > 1 and len(todo) > 2:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            workers = min(self.jobs, len(todo))
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_quiet_worker) as pool:
                results = list(pool.map(_measure, args))
        else:
            results = [_measure(a) for a in args]
        self._cache.update(zip(todo, results))

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

    def estimate(self, candidates: list[Candidate]) -> list[Candidate]:
        """Fill in every candidate's estimate and verdict (memory-neutral strategies reuse estimates)."""
        ok = [c for c in candidates if c.status == "ok"]
        singles = sorted({n for c in ok for n in c.strategies.split(",") if n != "none"})
        self.neutral = self._neutral(singles)
        for c in ok:
            c.measured_as = self._memory_key(c)
        self._run([c.measured_as for c in ok])
        for c in ok:
            result = self._cache[c.measured_as]
            if c.measured_as == c.strategies:
                c.measured_as = None
            self._settle(c, result)
        return candidates

    def _memory_key(self, c: Candidate) -> str:
        """The combination whose estimate ``c`` shares: ``c`` without the known memory-neutral strategies."""
        return ",".join(n for n in c.strategies.split(",") if n not in self.neutral) or "none"

    def _settle(self, c: Candidate, result: StepMemory | str) -> None:
        if isinstance(result, StepMemory):
            c.memory = result
            if self.budget is not None:
                c.fits = self.required(result.step_peak) <= self.budget
        else:
            c.status, _, c.reason = result.partition(": ")
            c.status = "rejected" if c.status == "rejected" else "error"

    def required(self, step_peak: int) -> int:
        return required_bytes(step_peak, self.headroom, self.fraction)

    def plan(self, combos: list[str] | None = None) -> list[Candidate]:
        """Every candidate estimated, sorted: measured ones by (cost, step peak), then rejected and failed ones."""
        cands = self.estimate(self.candidates(combos))
        return sort_candidates(cands)

    def choose(self, combos: list[str] | None = None) -> Candidate | None:
        """The fastest expected candidate that fits the budget, measuring in cost order and stopping at the first that fits."""
        if self.budget is None:
            raise ValueError("choose() needs a budget")
        cands = [c for c in self.candidates(combos) if c.status == "ok"]
        for _cost, group in itertools.groupby(sorted(cands, key=lambda c: c.time_cost), key=lambda c: c.time_cost):
            group = list(group)
            self._run([self._memory_key(c) for c in group])
            for c in group:
                self._settle(c, self._cache[self._memory_key(c)])
            self.measured.extend(group)
            fitting = sorted((c for c in group if c.fits), key=lambda c: c.step_peak)
            if fitting:
                return fitting[0]
        return None


def sort_candidates(cands: list[Candidate]) -> list[Candidate]:
    measured = sorted((c for c in cands if c.memory is not None), key=lambda c: (c.time_cost, c.step_peak))
    return measured + [c for c in cands if c.memory is None]


def chosen(cands: list[Candidate]) -> Candidate | None:
    """The first fitting candidate of a sorted list."""
    return next((c for c in cands if c.fits), None)


def _quiet_worker() -> None:
    warnings.simplefilter("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

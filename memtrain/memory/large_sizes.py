"""Size models from 1024 px on, for combinations whose step changes with the size (``size_polynomial = False``).

The exact size models of :mod:`memtrain.memory.scaling` are fitted at 192–256 px, where
``quant``'s slices, ``tile``'s tiles and ``momentum``'s stores still change the event
sequence with the size, so those combinations were estimated directly at every size (3–50 s each).
At larger sizes they settle: ``tile`` runs 256-px tiles (:func:`memtrain.strategies.tile.auto_side`
≥ 512 px) of which fake estimates run the same representative ones, ``momentum``'s stores
become quadratic, so the events are again quadratics in the side; ``quant``'s slices (about
:data:`memtrain.strategies.quant.CHUNK_NUMEL` elements, so their number grows with the size)
are a few MiB against a peak of GiB.

:func:`trace` tries each of :data:`TIERS` in turn — three fit sizes and a larger verify size
— measuring the step there (:func:`memtrain.memory.estimate.measure_sizes`, one model), and
returns, in order of preference, for the first tier that gives one:

1. an **exact** model — a :class:`memtrain.memory.scaling.SizeModel` fitted at the fit sizes
   when the three event sequences have the same length and every event at the verify size
   is what it predicts, pruned to its upper envelope: the same answer as ``measure_step`` at every
   size of its grid from the first fit size on, like the small-size models;
2. an **approximate** model (:class:`PeakModel`) — each phase's peak, increase and peak breakdown
   as the quadratic through their values at the fit sizes — only when it predicts the verify
   size within :data:`CHECK` of the phase's peak (a fifth of what it claims, to leave room for
   extrapolation); it claims :data:`ERROR_BOUND` (issue 14 allows 1 % from ``measure_step``),
   which ``benchmarks/large_sizes.py`` measures up to 8192²;
3. otherwise the reason (str): the planner estimates directly at the size.

Later tiers exist because a phase's peak can move from one event to another inside an
earlier tier's range (``quant`` with ``checkpoint`` or ``tile``: the backward peak moves from
the end of backward, where the gradients are, to its middle, where the activations are); the
last tier is verified at 8192 px itself. A model is used only from its first fit size on, at
sizes on its grid (:func:`grid`: multiples of the 32-px stride, of the 256-px tile for
``tile``); below, or off the grid, the planner measures at the size. The planner never traces
these models itself (that takes longer than one direct estimate): ``python -m
memtrain.memory.shipped`` makes them for the default combinations, and the planner looks them
up in the disk cache, then in the shipped file, under :func:`name` (the small-size key with a
suffix). An entry records its tier and check, a refusal every tier tried: a model of a tier
no longer in :data:`TIERS`, or a refusal by other tiers, is ignored (traced again).
"""

from __future__ import annotations

from dataclasses import dataclass

from memtrain.memory.estimate import StepMemory, measure_sizes
from memtrain.memory.scaling import CATEGORY_KEYS, FORMAT, SizeModel, _quadratic, read_entry
from memtrain.memory.tracker import PHASES

TIERS = (((1024, 1536, 2048), 3072), ((2048, 3072, 4096), 6144), ((3072, 4096, 6144), 8192))  # (fit sizes, verify size), tried in turn
FIT_SIZES = TIERS[0][0]  # the smallest size a model may start at
CHECK = 0.002  # an approximate model's largest miss at its tier's verify size, relative to the phase's peak
ERROR_BOUND = 0.01  # what an approximate model claims from its first fit size up to 8192 px (measured: benchmarks/results/large_sizes.md)


def _range(tiers) -> dict:
    return {"tiers": [[list(fit), verify] for fit, verify in tiers], "check": CHECK}


RANGE = _range(TIERS)  # what a refusal was made for; a model records its own tier
METRICS = ("tensor_peak", "tensor_increase", *CATEGORY_KEYS)
TILE_GRID = 256  # tile's auto side from 512 px on


def name(key: str) -> str:
    """The cache name of the large-size model of the combination whose small-size key (scaling.cache_key) is ``key``."""
    return f"{key}-large"


def grid(plan) -> int:
    """The sizes a model of ``plan`` holds at are multiples of this: the 256-px tile with ``tile``, else the 32-px stride."""
    return TILE_GRID if any(s.name == "tile" for s in plan.strategies) else 32


def covers(size: int, plan, model=None) -> bool:
    """Whether a large-size model of ``plan`` (``model``: this one) applies at ``size``: from its first fit size on, on its grid."""
    start = FIT_SIZES[0] if model is None else model.sizes[0]
    return size >= start and size % grid(plan) == 0


@dataclass
class PeakModel:
    """An approximate model: per phase, each metric of :data:`METRICS` at the fit ``sizes``; its answer is their quadratic.

    Within :attr:`bound` of ``measure_step`` (relative to the phase's peak) from ``sizes[0]`` on,
    checked at its tier's verify size within :data:`CHECK` (``checked``: the miss found there).
    """

    phases: dict[str, dict[str, list[int]]]
    step_start: tuple[int, int, int]
    checked: dict[str, float]  # size -> largest relative miss found there
    sizes: tuple[int, int, int] = FIT_SIZES
    bound: float = ERROR_BOUND

    @classmethod
    def fit(cls, traces) -> PeakModel:
        """From three StepMemory at three sizes (a tier's fit sizes)."""
        phases = {p: {m: [t.phases[p][m] for t in traces] for m in METRICS} for p in PHASES}
        return cls(phases, tuple(t.step_start for t in traces), {}, tuple(t.size for t in traces))

    def phase_at(self, phase: str, size: int) -> dict[str, int]:
        return {m: _quadratic(tuple(v), size, self.sizes) for m, v in self.phases[phase].items()}

    def miss(self, memory) -> float:
        """The largest |predicted − measured| over phases and metrics, relative to the measured phase peak, at ``memory.size``."""
        worst = 0.0
        for p in PHASES:
            got, predicted = memory.phases[p], self.phase_at(p, memory.size)
            worst = max(worst, *(abs(predicted[m] - got[m]) / got["tensor_peak"] for m in METRICS))
        return worst

    def at(self, size: int, *, strategies: str, batch_size: int, device: str):
        phases = {p: self.phase_at(p, size) for p in PHASES}
        return StepMemory(strategies, size, batch_size, True, phases, device=device, step_start=_quadratic(self.step_start, size, self.sizes))

    def to_json(self) -> dict:
        a = {"phases": self.phases, "step_start": list(self.step_start), "checked": self.checked, "sizes": list(self.sizes), "bound": self.bound}
        return {"format": FORMAT, "approximate": a}

    @classmethod
    def from_json(cls, data: dict) -> PeakModel:
        a = data["approximate"]
        phases = {p: {m: list(a["phases"][p][m]) for m in METRICS} for p in PHASES}
        return cls(phases, tuple(a["step_start"]), dict(a["checked"]), tuple(int(s) for s in a["sizes"]), float(a["bound"]))


Model = SizeModel | PeakModel


def entry(model: Model | str) -> dict:
    """The JSON stored for ``model`` with its tier and check, or for the reason there is none with every tier tried (:data:`TIERS`)."""
    if isinstance(model, str):
        return {"format": FORMAT, "direct": model, "range": _range(TIERS)}
    tier = next((fit, verify) for fit, verify in TIERS if fit == model.sizes)
    return model.to_json() | {"range": _range([tier])}


def from_entry(data: dict) -> Model | str | None:
    """The model (or the reason there is none) an entry holds; None when unreadable or made for other tiers or checks.

    A model stays valid while its tier is one of :data:`TIERS` (with the same check); a refusal
    only while it was refused by exactly :data:`TIERS` (a tier added since may give a model).
    """
    r = data.get("range")
    if not isinstance(r, dict) or r.get("check") != CHECK:
        return None
    try:
        if "direct" in data:
            return str(data["direct"]) if r == _range(TIERS) else None
        if len(r["tiers"]) != 1 or r["tiers"][0] not in _range(TIERS)["tiers"]:
            return None
        model = PeakModel.from_json(data) if "approximate" in data else SizeModel.from_json(data)
        return model if list(model.sizes) == r["tiers"][0][0] else None
    except (KeyError, TypeError, ValueError):
        return None


def find(key: str) -> tuple[Model | str, str] | None:
    """The stored large-size model of small-size key ``key`` (or why there is none) and where from ("cached" or "shipped"); None if neither."""
    found = read_entry(name(key))
    if found is None:
        return None
    model = from_entry(found[0])
    return None if model is None else (model, found[1])


def trace(combo: str, *, batch_size: int, encoder: str, loss: str = "msssim", env) -> Model | str:
    """``combo``'s large-size model from the first of :data:`TIERS` that gives one (exact, else approximate within :data:`CHECK`), or why there is none.

    Nothing is cached. A trace at a size is the same whichever sizes the model ran before
    (:func:`memtrain.memory.estimate.measure_sizes`), so a later tier reuses the earlier ones' traces.
    """
    traced: dict[int, object] = {}
    reasons = []
    for fit, verify in TIERS:
        todo = [s for s in (*fit, verify) if s not in traced]
        traced.update((t.size, t) for t in measure_sizes(combo, sizes=todo, batch_size=batch_size, encoder=encoder, loss=loss, env=env))
        traces, check = [traced[s] for s in fit], traced[verify]
        exact = SizeModel.fit(traces, sizes=fit)
        if exact is not None and exact.matches(check):
            return exact.prune()
        approx = PeakModel.fit(traces)
        miss = approx.miss(check)
        approx.checked[str(verify)] = round(miss, 6)
        if miss <= CHECK:
            return approx
        reasons.append(f"through {', '.join(map(str, fit))} px misses {verify} px by {miss:.2%}")
    return f"the quadratic {'; '.join(reasons)} (> {CHECK:.1%})"

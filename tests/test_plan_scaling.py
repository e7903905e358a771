"""`memtrain plan`'s size models: estimates extrapolated from three small sizes are the direct fake-tensor estimates, exactly."""

from __future__ import annotations

import json
import random

import pytest

from memtrain.memory import scaling
from memtrain.memory.estimate import measure_sizes, measure_step
from memtrain.memory.planner import Planner, estimate_memory
from memtrain.memory.tracker import PHASES
from memtrain.strategies import Environment

GPU = Environment(device="cuda", native_bf16=True)  # planned for; estimated on CPU fake tensors


def test_quadratic_is_exact_integer_interpolation():
    f = lambda s: 3 * s * s // 4 + 5 * s + 7  # noqa: E731 - integral on the stride grid
    values = tuple(f(s) for s in scaling.SIZES)
    assert [scaling._quadratic(values, s) for s in (32, 512, 8192, 65536)] == [f(s) for s in (32, 512, 8192, 65536)]


@pytest.fixture(scope="module")
def full_model():
    """The unpruned model of one combination, fitted at SIZES and verified at VERIFY_SIZE (what size_model does before pruning)."""
    traces = measure_sizes("amp,checkpoint:blocks", sizes=[*scaling.SIZES, scaling.VERIFY_SIZE], encoder="resnet18", env=GPU)
    m = scaling.SizeModel.fit(traces[:3])
    assert m is not None and m.matches(traces[3])
    return m


@pytest.fixture(scope="module")
def model(full_model):
    """The pruned model, cached on disk as size_model would leave it."""
    m = full_model.prune()
    scaling.store(scaling.cache_key("amp,checkpoint:blocks", batch_size=1, encoder="resnet18", env=GPU), m)
    return m


def _first_maxima_sizes() -> list[int]:
    # Every stride-grid size 192..8192, every integer 192..640, a seeded sample of other integers up to 8192, and far beyond.
    rnd = random.Random(14)
    return sorted({*range(192, 8193, 32), *range(192, 641), *rnd.sample(range(641, 8193), 300), 16384, 65536, 10**6})


def test_pruned_model_gives_the_same_phase_answer_at_every_size(full_model, model):
    # Mechanism: a few events of several hundred per phase are kept; computation: the same peak, increase and breakdown.
    assert model.pruned and not full_model.pruned
    for phase in PHASES:
        assert 1 <= len(model.events[phase]) <= 4 < len(full_model.events[phase]) or phase == "optimizer"
    for size in _first_maxima_sizes():
        for phase in PHASES:
            assert model.phase_at(phase, size) == full_model.phase_at(phase, size), (phase, size)
    assert json.dumps(model.to_json()).__len__() * 20 < json.dumps(full_model.to_json()).__len__()
    with pytest.raises(ValueError, match="pruned"):
        model.matches(None)


@pytest.mark.parametrize("seed", range(12))
def test_pruning_keeps_the_first_maximum_of_crossing_quadratics(seed):
    # Property over synthetic events built to cross, tie and repeat (values integral at SIZES, as traced bytes are):
    # at every integer size the pruned model's peak is the same event's, with the same breakdown.
    rnd = random.Random(seed)
    events = []
    for _ in range(rnd.randint(2, 40)):
        base, slope, bend = rnd.randint(0, 2000), rnd.randint(-60, 60), rnd.choice([0, 0, 1, -1, 3])
        current = [base + slope * k + bend * k * k + rnd.choice([0, 0, 1]) for k in range(3)]
        events.append([current, *([rnd.randint(0, 9) for _ in range(3)] for _ in range(4))])
    events += [events[0], [events[-1][0], [1, 2, 3], [0, 0, 0], [0, 0, 0], [0, 0, 0]]]  # a repeated event and an equal peak with another breakdown
    full = scaling.SizeModel({p: events for p in PHASES}, (0, 0, 0))
    pruned = full.prune()
    for size in [*range(192, 1200), 4096, 8192, 10**6]:
        assert pruned.phase_at("forward", size) == full.phase_at("forward", size), size


@pytest.mark.parametrize("size", [512, 8192])
def test_size_model_equals_the_direct_estimate(model, size):
    # Every phase metric (peak, increase and the peak's breakdown by category), to the byte: at a size a CPU
    # could run, and at 8192² (fake tensors allocate nothing, so the direct estimate is cheap there too).
    direct = measure_step("amp,checkpoint:blocks", size=size, encoder="resnet18", env=GPU, blocks=False)
    extrapolated = model.at(size, strategies=direct.strategies, batch_size=1, device="cuda")
    assert extrapolated.phases == direct.phases
    assert extrapolated.step_peak == direct.step_peak > 0


def test_planner_uses_cached_models_and_measures_size_dependent_strategies_directly(model):
    lines: list[str] = []
    # The model of the fixture above is cached on disk: a new planner (any size) reuses it without tracing.
    memory, how = estimate_memory("amp,checkpoint:blocks", size=1024, batch_size=1, encoder="resnet18", env=GPU)
    assert how == "size model (cached)" and memory.size == 1024 and memory.step_peak > 0
    # quant slices its saved tensors by size (size_polynomial = False): measured at the size, then cached.
    planner = Planner(size=1024, encoder="resnet18", env=GPU, progress=lines.append)
    planner._run(["quant"])
    assert "measured at the size (its events depend on the size)" in lines[-1]
    _, how = estimate_memory("quant", size=1024, batch_size=1, encoder="resnet18", env=GPU)
    assert how.startswith("measured at the size (cached")


def test_rejections_are_grouped_one_line_per_reason():
    from memtrain.cli.plan import grouped_rejections
    from memtrain.memory.planner import Candidate

    why = "quant:int8 and offload both replace what autograd saves"
    cands = [
        Candidate(c, c, 1.0, status="rejected", reason=f"--strategies {c}: {why}")
        for c in ("quant,offload", "amp,quant,offload", "quant,offload,tf32", "quant,offload,momentum")
    ]
    cands.append(Candidate("amp,ddp", "amp,ddp", 1.0, status="rejected", reason="ddp: runs several processes"))
    lines = grouped_rejections(cands)
    assert lines == [
        f"rejected (4): {why}: quant,offload; amp,quant,offload; quant,offload,tf32; ... (1 more)",
        "rejected (1): ddp: runs several processes: amp,ddp",
    ]

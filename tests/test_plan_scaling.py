"""`memtrain plan`'s size models: estimates extrapolated from three small sizes are the direct fake-tensor estimates, exactly."""

from __future__ import annotations

import pytest

from memtrain.memory import scaling
from memtrain.memory.estimate import measure_step
from memtrain.memory.planner import Planner, estimate_memory
from memtrain.strategies import Environment

GPU = Environment(device="cuda", native_bf16=True)  # planned for; estimated on CPU fake tensors


def test_quadratic_is_exact_integer_interpolation():
    f = lambda s: 3 * s * s // 4 + 5 * s + 7  # noqa: E731 - integral on the stride grid
    values = tuple(f(s) for s in scaling.SIZES)
    assert [scaling._quadratic(values, s) for s in (32, 512, 8192, 65536)] == [f(s) for s in (32, 512, 8192, 65536)]


@pytest.fixture(scope="module")
def model():
    m = scaling.size_model("amp,checkpoint:blocks", batch_size=1, encoder="resnet18", env=GPU)
    assert isinstance(m, scaling.SizeModel), m
    return m


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

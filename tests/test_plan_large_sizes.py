"""Large-size models (memtrain.memory.large_sizes): for quant, momentum and tile, exact or within the stated bound of measure_step, else refused."""

from __future__ import annotations

import gzip
import json

import pytest

from memtrain.memory import large_sizes, scaling, shipped
from memtrain.memory.estimate import StepMemory, measure_step
from memtrain.memory.planner import default_target, estimate_memory
from memtrain.memory.tracker import PHASES
from memtrain.strategies import Environment, Plan

GPU = Environment(device="cuda", native_bf16=True)  # planned for; estimated on CPU fake tensors


def _memory(size: int) -> StepMemory:
    # Every metric a quadratic in the side with integer coefficients (the peak the largest), as the byte counts of a real step.
    phases = {p: {m: (6 - i) * size * size + (j + 3) * size + 100_000_000 for i, m in enumerate(large_sizes.METRICS)} for j, p in enumerate(PHASES)}
    return StepMemory("quant", size, 1, True, phases, step_start=2 * size * size + 99)


def test_approximate_model_is_the_quadratic_through_its_fit_sizes_and_measures_its_miss():
    # Contract of PeakModel: at its fit sizes it is what was measured; elsewhere the quadratic; miss() is relative to the phase peak.
    fit, verify = large_sizes.TIERS[0]
    model = large_sizes.PeakModel.fit([_memory(s) for s in fit])
    assert model.sizes == fit and model.bound == large_sizes.ERROR_BOUND == 0.01
    for s in (*fit, 4096, 8192):
        assert model.at(s, strategies="quant", batch_size=1, device="cuda").phases == _memory(s).phases
        assert model.miss(_memory(s)) == 0.0
    off = _memory(verify)
    off.phases["backward"]["tensor_peak"] = round(off.phases["backward"]["tensor_peak"] * 1.01)  # the direct estimate 1 % above
    assert model.miss(off) == pytest.approx(0.01 / 1.01, rel=1e-3) and model.miss(off) > large_sizes.CHECK
    data = large_sizes.entry(model)
    assert large_sizes.from_entry(data) == model and data["range"] == {"tiers": [[list(fit), verify]], "check": large_sizes.CHECK}
    assert large_sizes.from_entry(data | {"range": {"tiers": [[[192, 224, 256], 320]], "check": large_sizes.CHECK}}) is None  # another tier: ignored
    assert large_sizes.from_entry(data | {"range": {"tiers": [[list(fit), verify]], "check": 0.01}}) is None  # another check: ignored
    refused = large_sizes.entry("why")
    assert large_sizes.from_entry(refused) == "why"
    assert large_sizes.from_entry(refused | {"range": large_sizes._range(large_sizes.TIERS[:1])}) is None  # refused by fewer tiers: retrace


def test_trace_refuses_a_model_that_misses_its_verify_size(monkeypatch):
    # trace() on real fake-tensor traces, at small sizes and resnet18 to keep it fast: there momentum's events are not
    # exactly quadratic (its fixed-point stores miss 320 px by some KB) and a phase's peak moves between events, so
    # neither the exact nor the approximate fit predicts 320 px: refused, and the planner measures at the size.
    monkeypatch.setattr(large_sizes, "TIERS", ((scaling.SIZES, scaling.VERIFY_SIZE),))
    refused = large_sizes.trace("momentum", batch_size=1, encoder="resnet18", env=GPU)
    assert isinstance(refused, str) and refused.startswith("the quadratic through 192, 224, 256 px misses 320 px by"), refused
    miss = float(refused.split(" by ")[1].split("%")[0]) / 100
    assert miss > large_sizes.CHECK


def test_models_hold_from_the_first_fit_size_on_their_grid():
    quant, tile = Plan.resolve("quant", GPU), Plan.resolve("tile,amp", GPU)
    assert large_sizes.covers(1024, quant) and large_sizes.covers(1056, quant) and not large_sizes.covers(992, quant)
    assert large_sizes.covers(1280, tile) and not large_sizes.covers(1056, tile)  # tiles of 256 px
    second = large_sizes.PeakModel({}, (0, 0, 0), {}, large_sizes.TIERS[1][0])  # a model of the second tier starts at 2048 px
    assert not large_sizes.covers(1536, quant, second) and large_sizes.covers(2080, quant, second)


def _shipped_large(combo: str):
    about = json.loads(gzip.decompress(shipped.PATH.read_bytes()))["about"]
    here = scaling.installed_versions() | {"format": scaling.FORMAT, "large_range": large_sizes.RANGE}
    there = {k: about.get(k) for k in here}
    if here != there:
        pytest.skip(f"the shipped models were made with {there}, this is {here}: they miss here (regenerate: python -m memtrain.memory.shipped)")
    found = large_sizes.find(scaling.cache_key(combo, batch_size=1, encoder="resnet34", env=default_target()))
    assert found is not None, f"no large-size model of {combo} in the shipped file"
    return found


@pytest.mark.parametrize(("combo", "size"), [("momentum", 1280), ("quant,amp", 1280), ("tile,amp", 1280)])
def test_shipped_large_size_model_agrees_with_measure_step(tmp_path, monkeypatch, combo, size):
    # A cold plan (empty disk cache) takes quant, momentum and tile estimates from 1024 px on from the shipped file:
    # exact models give measure_step's phases to the byte, approximate ones within their bound.
    monkeypatch.setenv("MEMTRAIN_CACHE_DIR", str(tmp_path))
    model, source = _shipped_large(combo)
    assert source == "shipped" and not isinstance(model, str), model
    memory, how = estimate_memory(combo, size=size, batch_size=1, encoder="resnet34", env=default_target())
    assert how.endswith(f"from {model.sizes[0]} px (shipped)") and not any(tmp_path.iterdir())  # nothing measured, nothing written
    direct = measure_step(combo, size=size, env=default_target(), blocks=False)
    if isinstance(model, scaling.SizeModel):
        assert how.startswith("size model") and memory.phases == direct.phases
    else:
        assert how.startswith("approximate size model (≤ 1%)")
        for p in PHASES:
            assert abs(memory.phases[p]["tensor_peak"] - direct.phases[p]["tensor_peak"]) <= model.bound * direct.phases[p]["tensor_peak"], p


def test_a_model_of_a_later_tier_holds_from_its_first_fit_size_only(tmp_path, monkeypatch):
    # quant with checkpoint: the backward peak moves between events below 2048 px, so its shipped model is of the second
    # tier (fit at 2048/3072/4096). From 2048 px on it is used and agrees with measure_step; below, the size is measured.
    monkeypatch.setenv("MEMTRAIN_CACHE_DIR", str(tmp_path))
    combo, env = "quant,checkpoint:full,amp", default_target()
    model, _ = _shipped_large(combo)
    assert model.sizes == large_sizes.TIERS[1][0], model.sizes
    memory, how = estimate_memory(combo, size=2304, batch_size=1, encoder="resnet34", env=env)
    assert how.endswith("from 2048 px (shipped)")
    direct = measure_step(combo, size=2304, env=env, blocks=False)
    for p in PHASES:
        assert abs(memory.phases[p]["tensor_peak"] - direct.phases[p]["tensor_peak"]) <= model.bound * direct.phases[p]["tensor_peak"], p
    _, how = estimate_memory(combo, size=1024, batch_size=1, encoder="resnet34", env=env)
    assert how == "measured at the size (its events depend on the size; its size model starts at 2048 px)"


def test_plan_table_marks_estimates_from_approximate_models(tmp_path):
    # quant,checkpoint:full,amp at 4096² comes from its shipped approximate model, checkpoint:full,amp from its exact size model:
    # the table marks the first's step peak with "~" and says what it means; --json says how each estimate was obtained.
    from conftest import run_cli

    args = ("plan", "--size", "4096", "--strategies", "quant,checkpoint:full,amp;checkpoint:full,amp", "--all")
    proc = run_cli(*args, MEMTRAIN_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith(("quant,", "checkpoint:"))}
    assert " ~" in rows["quant,checkpoint:full,amp"] and "~" not in rows["checkpoint:full,amp"], proc.stdout
    assert any(line.startswith("~: from an approximate large-size model") for line in proc.stdout.splitlines())
    proc = run_cli(*args, "--json", MEMTRAIN_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    by = {row["strategies"]: row["estimated_by"] for row in json.loads(proc.stdout)}
    assert by["quant,checkpoint:full,amp"].startswith("approximate size model (≤ 1%) from 2048 px (shipped)"), by
    assert by["checkpoint:full,amp"].startswith("size model"), by

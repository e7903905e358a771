"""The size models shipped with memtrain (memtrain/memory/shipped_models.json.gz): found by a cold `plan`, and what a fresh trace gives."""

from __future__ import annotations

import gzip
import json

import pytest

from memtrain.memory import scaling, shipped
from memtrain.memory.planner import default_target, estimate_memory
from memtrain.memory.tracker import PHASES


def _about() -> dict:
    return json.loads(gzip.decompress(shipped.PATH.read_bytes()))["about"]


def _same_versions() -> None:
    about = _about()
    here = scaling.installed_versions() | {"format": scaling.FORMAT}
    there = {k: about[k] for k in here}
    if here != there:
        pytest.skip(f"the shipped models were made with {there}, this is {here}: they miss here (regenerate: python -m memtrain.memory.shipped)")


def test_shipped_file_is_small_and_covers_the_default_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTRAIN_CACHE_DIR", str(tmp_path))  # an empty disk cache: a fresh machine
    assert shipped.PATH.stat().st_size <= 1_000_000
    _same_versions()
    env = default_target()
    about = _about()
    assert about["batch_sizes"] == [1, 2] and about["target"] == {"device": env.device, "native_bf16": env.native_bf16}
    for batch_size in (1, 2):
        for combo in ("none", "amp", "checkpoint:full,offload,amp"):
            key = scaling.cache_key(combo, batch_size=batch_size, encoder="resnet34", env=env)
            found = scaling.find(key)
            assert found is not None and found[1] == "shipped", (combo, batch_size)
            assert isinstance(found[0], scaling.SizeModel) and found[0].pruned


def test_cold_plan_estimate_comes_from_the_shipped_model_and_other_versions_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTRAIN_CACHE_DIR", str(tmp_path))  # an empty disk cache: nothing is traced
    _same_versions()
    env = default_target()
    memory, how = estimate_memory("checkpoint:stages,amp", size=4096, batch_size=2, encoder="resnet34", env=env)
    assert how == "size model (shipped)" and memory.size == 4096 and memory.step_peak > 0
    assert not any(tmp_path.iterdir())  # nothing traced, nothing written
    monkeypatch.setenv("MEMTRAIN_SHIPPED", "0")  # switched off (benchmarks): the same key misses
    assert scaling.load(scaling.cache_key("checkpoint:stages,amp", batch_size=2, encoder="resnet34", env=env)) is None
    monkeypatch.delenv("MEMTRAIN_SHIPPED")
    other = scaling.installed_versions() | {"torch": "0.0.0"}  # another torch: another key, which the shipped file does not hold
    assert scaling.load(scaling.cache_key("checkpoint:stages,amp", batch_size=2, encoder="resnet34", env=env, versions=other)) is None


def test_a_fresh_trace_equals_the_shipped_model():
    # Drift: the cheapest shipped combination traced again now must give what was shipped, at every phase and size.
    _same_versions()
    env = default_target()
    key = scaling.cache_key("none", batch_size=1, encoder="resnet34", env=env)
    shipped_model = scaling.SizeModel.from_json(shipped.lookup(key))
    fresh = scaling.trace("none", batch_size=1, encoder="resnet34", env=env, verify=False)
    assert isinstance(fresh, scaling.SizeModel)
    for size in (192, 512, 1024, 4096, 8192):
        for phase in PHASES:
            assert fresh.phase_at(phase, size) == shipped_model.phase_at(phase, size), (phase, size)
    assert fresh.to_json() == shipped.lookup(key)


def test_shipped_store_roundtrip_and_generator_bad_input(tmp_path, capsys):
    path = tmp_path / "models.json.gz"
    entries = {"k": {"format": scaling.FORMAT, "direct": "why"}}
    size = shipped.write(entries, {"what": "test"}, path)
    first = path.read_bytes()
    assert size == len(first) and shipped._entries(path) == entries
    shipped.write(entries, {"what": "test"}, path)
    assert path.read_bytes() == first  # deterministic: no timestamp, sorted keys
    assert shipped.main(["--batch-sizes", "one", "--out", str(tmp_path / "x.json.gz")]) == 2
    assert shipped.main(["--out", str(tmp_path / "missing" / "x.json.gz")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("memtrain: error: --batch-sizes 'one': expected") and err[1].startswith("memtrain: error: --out ")
    assert len(err) == 2 and list(tmp_path.iterdir()) == [path]

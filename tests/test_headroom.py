"""The headroom model: `memtrain calibrate` needs CUDA; a model file (by hand or calibrated) decides what fits."""

from __future__ import annotations

import json

import pytest

from memtrain.cli import main
from memtrain.memory.headroom import HeadroomModel, default_path, load_model, model_for
from memtrain.memory.planner import Planner
from memtrain.strategies import Environment

GPU = Environment(device="cuda", native_bf16=True)


def _write(path, **fields):
    path.write_text(json.dumps({"format": 1, "device": "cuda", "fraction": 0.0, "fixed": 0, "workspace": {}, "source": "by hand"} | fields))
    return path


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU path of calibrate")
def test_calibrate_without_cuda_is_one_line_exit_2(tmp_path, capsys):
    code = main(["calibrate", "--out", str(tmp_path / "h.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("memtrain: error: calibrate: needs a CUDA GPU"), err
    assert not (tmp_path / "h.json").exists()
    code = main(["calibrate", "--sizes", "100"])  # arguments are checked first, wherever it runs
    assert code == 2 and "--sizes 100: expected a multiple of 32" in capsys.readouterr().err


def test_a_headroom_file_decides_what_fits(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEMTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    args = ["plan", "--size", "64", "--encoder", "resnet18", "--strategies", "none", "--memory-budget", "2GiB", "--quiet", "--json"]
    # By hand: a fixed part above the budget -> nothing fits; none -> it fits.
    big = _write(tmp_path / "big.json", fixed=3 * 2**30, workspace={"forward": 100.0})
    assert main([*args, "--headroom-model", str(big)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["fits"] is False and rows[0]["needed_mib"] > 3 * 1024
    small = _write(tmp_path / "small.json")
    assert main([*args, "--headroom-model", str(small)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["fits"] is True and rows[0]["needed_mib"] == rows[0]["step_peak_mib"]
    # Where `memtrain calibrate` writes it, plan and --strategies auto (the Planner) find it without a flag.
    _write(default_path("cuda"), fraction=0.5, fixed=123, source="calibrated")
    planner = Planner(size=64, encoder="resnet18", env=GPU)
    assert planner.model.source == "calibrated" and planner.required(1000) == 1500 + 123
    assert model_for("cpu").source.startswith("default")  # the CPU model is separate
    # A malformed file is a one-line error naming the flag.
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    code = main([*args, "--headroom-model", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("memtrain: error: --headroom-model") and len(err.splitlines()) == 1


def test_model_arithmetic(tmp_path):
    from memtrain.memory.estimate import StepMemory

    m = HeadroomModel(device="cuda", fraction=0.1, fixed=1000, workspace={"forward": 2.0})
    mem = StepMemory("none", 32, 2, True, {"forward": {"tensor_peak": 10_000}, "backward": {"tensor_peak": 11_000}})
    # forward: 10000 + 2 B/px x 2 x 32 x 32 = 14096 > backward 11000; x 1.1 + 1000
    assert m.bound(mem) == 14096 and m.needed(mem) == 16506
    (tmp_path / "m.json").write_text(m.to_json())
    assert load_model(tmp_path / "m.json") == m

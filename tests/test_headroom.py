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


def _convolution_inputs(size: int, tile: tuple[int, bool] | None = None) -> list[int]:
    """Bytes of every convolution input of a float32 U-Net ResNet34 training forward at ``size``², on fake tensors;
    ``tile``: ``(side, lean)`` of the tiled program."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from memtrain.config import ModelConfig
    from memtrain.model import build_model
    from memtrain.strategies.tile import apply_tiling

    inputs = []

    class Convolutions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                inputs.append(args[0].numel() * args[0].element_size())
            return func(*args, **(kwargs or {}))

    with FakeTensorMode():
        model = build_model(ModelConfig(encoder="resnet34"))
        if tile is not None:
            apply_tiling(model, tile[0], lean=tile[1])
        with Convolutions():
            model(torch.rand(1, 1, size, size))
    return inputs


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


def test_cpu_workspace_follows_the_convolutions_operands():
    from memtrain.memory.estimate import StepMemory
    from memtrain.memory.headroom import default_model

    cpu = default_model("cpu")
    phases = {"forward": {"tensor_peak": 0}, "backward": {"tensor_peak": 0}}

    def workspace(strategies, size):
        return cpu.bound(StepMemory(strategies, size, 1, True, phases))

    # float32: a 32-channel full-resolution copy, 128 B/px; 16-bit kernels half that.
    assert workspace("none", 512) == 128 * 512**2 and workspace("amp:bf16,checkpoint:full", 512) == 64 * 512**2
    # tile: the full-resolution convolutions run on windows (tile side + 2 x 32 px halo), not on the image...
    assert workspace("tile", 512) == 128 * 320**2 and workspace("tile:128", 384) == 128 * 192**2
    assert workspace("tile", 64) == 128 * 64**2  # a window clipped to the image
    # ... but the untiled middle's largest input (24 B per image pixel in float32, 12 in 16 bits) outgrows a window.
    assert workspace("tile:128", 2048) == 24 * 2048**2 and workspace("amp:bf16,tile:lean-128", 2048) == 12 * 2048**2


def test_cpu_workspace_under_tile_is_the_largest_convolution_input_of_the_tiled_step():
    # Traced: every convolution of a tiled training forward on fake tensors (the backward's recomputes repeat them). At
    # 512² with tile:128 the largest input is the middle's (decoder block 2, 384 channels at 1/8: 6 MiB), not a window's
    # (192² x 32 channels: 4.5 MiB); with tile:lean-128 a window's (its decoder halo is 64 px: 256² x 32, 8 MiB).
    from memtrain.memory.estimate import StepMemory
    from memtrain.memory.headroom import default_model

    phases = {"forward": {"tensor_peak": 0}, "backward": {"tensor_peak": 0}}
    size = 512
    for lean, largest in ((False, 24 * size**2), (True, 128 * 256**2)):
        spec = "tile:lean-128" if lean else "tile:128"
        bound = default_model("cpu").bound(StepMemory(spec, size, 1, True, phases))
        assert max(_convolution_inputs(size, (128, lean))) == bound == largest


def test_cpu_workspace_is_the_largest_convolution_input_of_the_unet():
    # CPU_WORKSPACE's 128 B/px is derived from the traced convolutions (each holds a blocked copy of its input while it
    # runs, memtrain.memory.headroom): the largest input per image pixel, in float32, must be that.
    from memtrain.memory.headroom import CPU_WORKSPACE

    size = 64
    inputs = _convolution_inputs(size)
    assert len(inputs) >= 36 and max(inputs) / size**2 == CPU_WORKSPACE["forward"] == 2 * CPU_WORKSPACE["forward@16-bit"]

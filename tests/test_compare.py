"""`memtrain compare`: real sweeps in subprocesses, failures recorded as results, and the tables."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import run_cli
from PIL import Image

from memtrain.cli import main
from memtrain.compare.report import finalize, to_markdown
from memtrain.compare.sweep import Sweep, run_cell_process

SMALL = ["--encoder", "resnet18", "--steps", "1"]


def _csv(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_compare_writes_tables_and_a_rejected_combination_does_not_stop_it(tmp_path):
    out = tmp_path / "cmp"
    proc = run_cli("compare", "--strategies", "none;none,amp;ddp;amp", "--sizes", "64", *SMALL, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["strategies"]: r for r in _csv(out / "compare.csv")}
    assert list(rows) == ["none", "none,amp", "ddp", "amp"]
    none, bad, amp = rows["none"], rows["none,amp"], rows["amp"]
    assert none["status"] == amp["status"] == "ok" and none["backend"] == "tensor"
    assert bad["status"] == "rejected" and "cannot be combined" in bad["reason"]
    # Placement strategies need several processes (torchrun): a single-process cell says so and the sweep goes on.
    assert rows["ddp"]["status"] == "rejected" and "torchrun" in rows["ddp"]["reason"]
    for col in ("forward_peak_mib", "backward_peak_mib", "step_peak_mib", "step_time_s", "loss", "batch_size"):
        assert float(none[col]) > 0 and float(amp[col]) > 0, col
    assert float(none["forward_ratio"]) == 1.0 and float(none["backward_ratio"]) == 1.0
    # 16-bit activations: amp's forward peak, divided by none's, is what the ratio column says.
    assert float(amp["forward_ratio"]) == pytest.approx(float(amp["forward_peak_mib"]) / float(none["forward_peak_mib"]), abs=1e-3)
    doc = json.loads((out / "compare.json").read_text())
    assert [r["strategies"] for r in doc["rows"]] == ["none", "none,amp", "ddp", "amp"]
    assert doc["cells"][3]["plan"] == "amp:bf16" and doc["cells"][3]["blocks"]["decoder.blocks.4"] > 0
    md = (out / "compare.md").read_text()
    for text in ("| device | CPU", "| torch | ", "segmentation-models-pytorch", "| CPU | ", "memory backend of the peaks | tensor", "| amp | 64 | ok |"):
        assert text in md, text
    with Image.open(out / "compare.png") as im:
        assert im.size[0] > 500 and im.size[1] > 300
    # An existing comparison is never overwritten.
    before = (out / "compare.csv").read_text()
    assert main(["compare", "--strategies", "none", "--sizes", "64", "--out", str(out)]) == 2
    assert (out / "compare.csv").read_text() == before


@pytest.mark.slow
def test_compare_records_a_real_out_of_memory_with_its_phase_and_goes_on(tmp_path):
    """On a CPU a cell's address space is limited (--cpu-memory-limit): a 1024² forward cannot fit in 1 GiB more."""
    out = tmp_path / "cmp"
    proc = run_cli("compare", "--strategies", "none", "--sizes", "1024,64", *SMALL, "--cpu-memory-limit", "1GiB", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    big, small = _csv(out / "compare.csv")
    assert (big["size"], big["status"], big["phase"]) == ("1024", "oom", "forward")
    assert "can't allocate memory" in big["reason"]
    assert (small["size"], small["status"]) == ("64", "ok")
    assert "| none | 1024 | out of memory in forward |" in (out / "compare.md").read_text()


def test_a_cell_past_its_time_limit_is_killed_and_recorded():
    sweep = Sweep(["none"], [64], out=None, steps=1, encoder="resnet18")
    result = run_cell_process(sweep.spec("none", 64), timeout=1.0)
    assert result["status"] == "error" and "timed out after 1 s" in result["reason"]


def test_ratios_and_markdown_from_cell_results():
    mib = 2**20

    def ok(combo, fwd, bwd, t):
        phases = {"forward": {"tensor_peak": fwd * mib}, "backward": {"tensor_peak": bwd * mib}, "optimizer": {"tensor_peak": 10 * mib}}
        return {"strategies": combo, "plan": combo, "size": 512, "batch_size": 1, "status": "ok", "phases": phases, "step_time_s": t, "loss": 0.5}

    results = [
        ok("none", 400, 300, 2.0),
        ok("amp", 200, 240, 1.0),
        {"strategies": "checkpoint", "size": 512, "batch_size": 1, "status": "oom", "phase": "backward", "reason": "CUDA out of memory"},
    ]
    rows = finalize(results)
    assert rows[1]["forward_ratio"] == 0.5 and rows[1]["backward_ratio"] == 0.8 and rows[1]["time_ratio"] == 0.5
    assert rows[1]["step_peak_mib"] == 240 and rows[1]["backend"] == "tensor"
    assert rows[2]["status"] == "oom" and rows[2]["forward_ratio"] is None
    sweep = Sweep(["none", "amp", "checkpoint"], [512], out=None)
    host = {k: "x" for k in ("cuda_build", "torch", "segmentation_models_pytorch", "pytorch_msssim", "lightning", "memtrain", "cpu", "python", "os")}
    md = to_markdown(sweep, host, {"device": "GPU"}, rows)
    assert "| amp | 512 | ok | 200 | 240 | 240 | 50.0 % | 20.0 % | 1.00 | 0.50 |" in md
    assert "| checkpoint | 512 | out of memory in backward |" in md


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--strategies", "none;turbo", "--sizes", "64"], "unknown strategy 'turbo'"),
        (["--strategies", "none", "--sizes", "100"], "--sizes 100: expected a multiple of 32"),
        (["--strategies", "none", "--sizes", "64", "--cpu-memory-limit", "lots"], "--cpu-memory-limit lots"),
        (["--sizes", "64"], "--strategies: required"),
    ],
)
def test_bad_compare_input_is_one_line(capsys, tmp_path, args, fragment):
    code = main(["compare", *args, "--out", str(tmp_path / "cmp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: a real CUDA out-of-memory error")
def test_a_cuda_out_of_memory_is_classified_with_its_phase(tmp_path):
    from memtrain.memory.estimate import measure_step

    free, _ = torch.cuda.mem_get_info()
    # A batch whose forward needs three times the free memory: the first allocations succeed, then the allocator gives up.
    per_image = measure_step("none", size=2048, encoder="resnet18", fake=True).peak("forward", "tensor_peak_activations")
    batch = max(1, int(3 * free / per_image))
    sweep = Sweep(["none"], [2048], out=None, steps=1, encoder="resnet18", batch_size=batch, device="cuda")
    result = run_cell_process(sweep.spec("none", 2048), timeout=600)
    assert result["status"] == "oom" and result["phase"] in ("forward", "backward"), result
    assert "OutOfMemoryError" in result["reason"]


@pytest.mark.slow
def test_compare_runs_placement_combinations_under_torchrun_with_per_rank_peaks(tmp_path):
    """--launcher torchrun: rpc runs as a real 3-process torchrun job; its row has every rank's peaks, their mean and
    max, and ratios against the single-process 'none' row; pipeline with 3 processes fails as a row, the sweep goes on."""
    out = tmp_path / "cmp"
    proc = run_cli(
        "compare", "--strategies", "none;rpc;pipeline", "--sizes", "64", *SMALL, "--launcher", "torchrun", "--nproc-per-node", "3", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["strategies"]: r for r in _csv(out / "compare.csv")}
    none, rpc, pipe = rows["none"], rows["rpc"], rows["pipeline"]
    assert none["status"] == "ok" and none["launcher"] == "" and none["ranks"] == ""
    assert rpc["status"] == "ok" and rpc["launcher"] == "torchrun" and rpc["nproc_per_node"] == "3"
    assert rpc["ranks"] == "0:master;1:encoder;2:decoder"
    per_rank = {k: [float(v) for v in rpc[f"rank_{k}_peaks_mib"].split(";")] for k in ("forward", "backward", "step")}
    assert all(len(v) == 3 and all(x > 0 for x in v) for v in per_rank.values())
    for k, col in (("forward", "forward_peak_mib"), ("backward", "backward_peak_mib"), ("step", "step_peak_mib")):
        assert float(rpc[col]) == max(per_rank[k])  # the row's peak is the largest rank's
        assert float(rpc[f"rank_mean_{k}_peak_mib"]) == pytest.approx(sum(per_rank[k]) / 3, abs=0.01)
        assert float(rpc[f"rank_mean_{k}_peak_mib"]) <= float(rpc[col])
    # The master holds a batch and the output; each shard less than the whole single-process model.
    assert per_rank["step"][0] < 0.05 * per_rank["step"][1]
    assert max(per_rank["step"]) < float(none["step_peak_mib"])
    assert float(rpc["step_ratio"]) == pytest.approx(float(rpc["step_peak_mib"]) / float(none["step_peak_mib"]), abs=1e-3)
    assert float(rpc["time_ratio"]) > 0 and float(rpc["step_time_s"]) > 0
    assert pipe["status"] == "error" and "needs 2 processes" in pipe["reason"] and "WORLD_SIZE=3" in pipe["reason"], pipe["reason"]
    md = (out / "compare.md").read_text()
    assert "| rpc | 64 | 1:encoder |" in md and "| rpc | 64 | mean |" in md
    doc = json.loads((out / "compare.json").read_text())
    assert doc["settings"]["launcher"] == "torchrun" and doc["settings"]["nproc_per_node"] == 3


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--launcher", "torchrun"], "--nproc-per-node missing"),
        (["--launcher", "torchrun", "--nproc-per-node", "0"], "--nproc-per-node 0"),
        (["--nproc-per-node", "3"], "only with --launcher torchrun"),
        (["--launcher", "mpirun", "--nproc-per-node", "3"], "--launcher"),
    ],
)
def test_bad_launcher_flags_are_one_line(capsys, tmp_path, args, fragment):
    code = main(["compare", "--strategies", "none;rpc", "--sizes", "64", *args, "--out", str(tmp_path / "cmp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "cmp").exists()


def test_without_a_launcher_placement_combinations_are_rejected_with_the_launch_command(tmp_path):
    """One process would train the plain model and call it rpc: the row is rejected with the flags to add."""
    out = tmp_path / "cmp"
    assert main(["compare", "--strategies", "rpc", "--sizes", "64", "--out", str(out)]) == 0
    (row,) = _csv(out / "compare.csv")
    assert row["status"] == "rejected" and "--launcher torchrun --nproc-per-node N" in row["reason"] and row["launcher"] == ""

"""The CLI end to end, in real subprocesses: a run's outputs, kill-and-resume, and every bad input."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, assert_user_error, cli_env, run_cli
from PIL import Image

TINY = ["--config", str(ROOT / "configs" / "ci-tiny.yaml")]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_fit_writes_the_whole_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("fit", *TINY, "--epochs", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # Resolved config: flags applied, reusable as a preset.
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["data"]["size"] == 64 and saved["run"]["out"] == str(out)
    # One metrics row per epoch with model and identity columns.
    rows = _rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    for r in rows:
        for col in ("train_loss", "val_loss", "val_psnr", "val_ssim", "identity_psnr", "identity_ssim", "epoch_seconds"):
            assert r[col] != "" and np.isfinite(float(r[col])), col
    # Memory per phase for every step, with the end-of-run table on stdout.
    mem = _rows(out / "memory.csv")
    assert {r["phase"] for r in mem} == {"forward", "backward", "optimizer"}
    assert len(mem) == 3 * int(rows[-1]["step"])
    assert all(float(r["tensor_peak_mib"]) > 0 for r in mem)
    assert "peak memory per phase" in proc.stdout and "forward" in proc.stdout
    # Checkpoints load without unpickling code and carry the config.
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = torch.load(out / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert ckpt["memtrain"]["config"]["data"]["size"] == 64
        assert any(k.startswith("model.encoder.") for k in ckpt["state_dict"])
    # Sample images: input | target | output.
    for epoch in (0, 1):
        with Image.open(out / "samples" / f"epoch_{epoch}.png") as im:
            assert im.size[0] > 300 and im.size[1] > 300


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "run"
    # Epochs long enough (6 steps) to kill the run between two of them.
    args = [sys.executable, "-m", "memtrain", "fit", *TINY, "--epochs", "3", "--train-images", "12", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    metrics = out / "metrics.csv"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(_rows(metrics)) >= 1 and (out / "checkpoints" / "last.ckpt").exists():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done_before = len(_rows(metrics))
    assert 1 <= done_before < 3
    resumed = run_cli("fit", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(metrics)
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    steps = [int(r["step"]) for r in rows]
    assert steps == [6, 12, 18]  # the optimizer step count continues, nothing is repeated
    mem_steps = sorted(int(r["step"]) for r in _rows(out / "memory.csv") if r["phase"] == "forward")
    assert mem_steps == list(range(18))


@pytest.mark.slow
def test_amp_one_step(tmp_path):
    out = tmp_path / "amp"
    proc = run_cli("fit", *TINY, "--strategies", "amp", "--max-steps", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strategies: amp:bf16" in proc.stdout
    assert [r["step"] for r in _rows(out / "memory.csv")] == ["0", "0", "0"]
    assert (out / "checkpoints" / "last.ckpt").exists()


def _corrupt_folder(root: Path) -> Path:
    folder = root / "corrupt"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    return folder


def _fake_dicom_folder(root: Path) -> Path:
    folder = root / "dicoms"
    folder.mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "a.png")
    (folder / "b.dcm").write_text("I am a text file")
    return folder


def _missing_targets(root: Path) -> tuple[Path, Path]:
    images, targets = root / "imgs", root / "tgts"
    images.mkdir()
    targets.mkdir()
    for name in ("p1", "p2", "p3"):
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(images / f"{name}.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(targets / "p1.png")
    return images, targets


BAD_INPUTS = {
    "unknown strategy": (lambda r: ["--strategies", "amp,turbo"], ["unknown strategy 'turbo'", "available:", "amp", "none"]),
    "size not /32": (lambda r: ["--size", "250"], ["--size 250", "multiple of 32", "224 or 256"]),
    "missing data folder": (lambda r: ["--data", str(r / "nowhere")], ["--data", "nowhere", "no such folder"]),
    "empty data folder": (lambda r: ["--data", str((r / "empty").mkdir() or r / "empty")], ["no images found"]),
    "corrupt image": (lambda r: ["--data", str(_corrupt_folder(r))], ["bad.png", "cannot decode PNG"]),
    "non-DICOM .dcm": (lambda r: ["--data", str(_fake_dicom_folder(r))], ["b.dcm", "not a DICOM file"]),
    "targets missing": (lambda r: ["--data", str(_missing_targets(r)[0]), "--targets", str(r / "tgts")], ["--targets", "no target for 2 of 3", "p2, p3"]),
    "unreadable config": (lambda r: ["--config", str((r / "c.yaml").write_text("train: {lr: [") and r / "c.yaml")], ["c.yaml", "not valid YAML"]),
    "unknown flag": (lambda r: ["--learning-rate", "3"], ["unrecognized arguments: --learning-rate"]),
    "bad encoder weights": (
        lambda r: ["--encoder-weights", str((r / "w.pt").write_text("nope") and r / "w.pt")],
        ["--encoder-weights", "w.pt", "not a loadable"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    make_args, fragments = BAD_INPUTS[case]
    out = tmp_path / "out"
    proc = run_cli("fit", "--size", "64", "--encoder", "resnet18", "--out", str(out), *make_args(tmp_path))
    assert_user_error(proc, *fragments)
    assert not out.exists()  # nothing is created before the inputs are known good


def test_out_refuses_to_overwrite_an_existing_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("kept: true\n")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").write_bytes(b"kept")
    proc = run_cli("fit", *TINY, "--out", str(out))
    assert_user_error(proc, "already holds a run", "--resume")
    assert (out / "config.yaml").read_text() == "kept: true\n"
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == b"kept"

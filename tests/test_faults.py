"""Fault injection: bad input, unreadable or hostile files, unwritable outputs, signals and kill -9.

Every case of issue 13 is one test here. Bad input must give one line
``memtrain: error: ...`` naming the flag or file, exit code 2, no traceback, and nothing
written. Most cases run in-process through the CLI entry point (``memtrain.cli.main``, the
same code path as the ``memtrain`` command); the kill, signal and checkpoint-write cases
run real subprocesses.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_env

from memtrain.cli import main

TINY = ["--config", str(ROOT / "configs" / "ci-tiny.yaml")]


def cli(*argv: str) -> tuple[int, str, str]:
    """Run ``memtrain ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_line(result: tuple[int, str, str], *fragments: str) -> str:
    """Exit 2, exactly one stderr line (the error) holding every fragment, nothing else printed, no traceback."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memtrain: error: "), err
    for frag in fragments:
        assert frag in lines[0], f"{frag!r} not in {lines[0]!r}"
    assert out == "", out  # no banner, no progress before the error
    return lines[0]


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- flags

FLAG_CASES = {
    "step-size 0": (["--scheduler", "step", "--step-size", "0"], ["--step-size 0", "expected an integer >= 1"]),
    "weight-decay -1": (["--weight-decay", "-1"], ["--weight-decay -1", ">= 0"]),
    "weight-decay nan": (["--weight-decay", "nan"], ["--weight-decay nan", "finite"]),
    "data-seed -1": (["--data-seed", "-1"], ["--data-seed -1", ">= 0"]),
    "seed -1": (["--seed", "-1"], ["--seed -1", ">= 0"]),
    "seed too large": (["--seed", str(2**32)], ["--seed 4294967296", "<= 4294967295"]),
    "gamma nan": (["--scheduler", "step", "--step-size", "1", "--gamma", "nan"], ["--gamma nan", "positive number"]),
    "lr inf": (["--lr", "inf"], ["--lr inf", "positive number"]),
    "lr -1e-3": (["--lr", "-1e-3"], ["--lr -0.001", "positive number"]),
    "limit-val-batches -2": (["--limit-val-batches", "-2"], ["--limit-val-batches -2", "or -1"]),
    "rpc-timeout nan": (["--rpc-timeout", "nan"], ["--rpc-timeout nan", "positive"]),
    "memory-budget -1GiB": (["--strategies", "auto", "--memory-budget", "-1GiB"], ["--memory-budget -1GiB", "not a negative"]),
    "memory-budget=-1GiB": (["--strategies", "auto", "--memory-budget=-1GiB"], ["--memory-budget -1GiB", "not a negative"]),
    "size 32": (["--size", "32"], ["--size 32", "too small"]),
    "size 100000": (["--size", "100000"], ["--size 100000", "memtrain plan"]),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_fit_flag_is_one_line_before_anything_is_written(tmp_path, case):
    argv, fragments = FLAG_CASES[case]
    out = tmp_path / "run"
    assert_one_line(cli("fit", *TINY, "--out", out, *argv), *fragments)
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--memory-budget", "-1GiB"], ["--memory-budget -1GiB", "not a negative"]),
        (["--memory-budget=-1GiB"], ["--memory-budget -1GiB", "not a negative"]),
        (["--strategies", "nonsense"], ["--strategies", "unknown strategy 'nonsense'", "available:"]),
        (["--strategies", "none;amp,turbo"], ["unknown strategy 'turbo'"]),
    ],
)
def test_bad_plan_flag_is_one_line(argv, fragments):
    assert_one_line(cli("plan", "--size", "64", "--encoder", "resnet18", *argv), *fragments)


def test_compare_refuses_a_folder_holding_a_csv_without_json(tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.csv").write_text("kept\n")
    assert_one_line(cli("compare", "--strategies", "none", "--sizes", "64", "--out", out), "--out", "compare.csv", "already holds a comparison")
    assert (out / "compare.csv").read_text() == "kept\n"


# --------------------------------------------------------------------------- hostile checkpoints


class _Payload:
    """Unpickling this would create the marker file: the test fails if any loader runs it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_checkpoint(kind: str, good: Path, folder: Path) -> Path:
    import torch

    path = folder / f"{kind}.ckpt"
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("epoch: 3\nthis is not a checkpoint\n")
    elif kind == "malicious":
        torch.save({"state_dict": {}, "memtrain": {"config": {}}, "payload": _Payload(folder / "PWNED")}, path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        # A real memtrain checkpoint whose weights belong to another architecture than its configuration builds.
        ckpt = torch.load(good, map_location="cpu", weights_only=True)
        ckpt["memtrain"]["config"]["model"]["encoder"] = "resnet34"
        torch.save(ckpt, path)
    return path


BAD_CHECKPOINTS = {
    "truncated": ["not a readable PyTorch checkpoint", "truncated or corrupt"],
    "text": ["not a readable PyTorch checkpoint", "a text file"],
    "malicious": ["refused", "would run pickled code"],
    "empty": ["not a readable PyTorch checkpoint"],
    "foreign": ["weights do not match"],
}


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_enhance_and_export_refuse_a_bad_checkpoint_in_one_line(tmp_path, trained_checkpoint, image_folder, kind):
    ckpt = _bad_checkpoint(kind, trained_checkpoint, tmp_path / "ckpts")
    images = image_folder(n=1, size=64)
    for argv in (
        ["enhance", ckpt, images, "--out", tmp_path / "enhanced"],
        ["export", ckpt, "--format", "torchscript", "--size", "64", "--out", tmp_path / "exported"],
    ):
        assert_one_line_allowing_progress(cli(*argv), str(ckpt), *BAD_CHECKPOINTS[kind])
    assert not (tmp_path / "enhanced").exists() and not (tmp_path / "exported").exists()
    assert not (tmp_path / "ckpts" / "PWNED").exists()


def assert_one_line_allowing_progress(result: tuple[int, str, str], *fragments: str) -> str:
    """As assert_one_line, for commands that may print what they are about to do before reading the checkpoint."""
    code, _progress, err = result
    return assert_one_line((code, "", err), *fragments)


def _run_copy(trained_checkpoint: Path, root: Path, last: Path | None) -> Path:
    """A run folder like a stopped one: the trained run's config.yaml and best.ckpt, ``last`` as its last.ckpt."""
    import shutil

    src = trained_checkpoint.parent.parent
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(src / "config.yaml", run / "config.yaml")
    shutil.copy(trained_checkpoint, run / "checkpoints" / "best.ckpt")
    if last is not None:
        shutil.copy(last, run / "checkpoints" / "last.ckpt")
    return run


@pytest.mark.parametrize("kind", ["truncated", "text", "malicious"])
def test_resume_from_a_corrupt_last_ckpt_names_an_older_valid_one_and_changes_nothing(tmp_path, trained_checkpoint, kind):
    run = _run_copy(trained_checkpoint, tmp_path, _bad_checkpoint(kind, trained_checkpoint, tmp_path / "bad"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    line = assert_one_line(cli("fit", "--resume", run, "--epochs", "3"), f"--resume {run}", "last.ckpt is corrupt", "older valid checkpoint", "best.ckpt")
    assert "PWNED" not in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # config.yaml not rewritten
    assert not (tmp_path / "bad" / "PWNED").exists()


def test_resume_from_another_architecture_is_refused_before_config_is_rewritten(tmp_path, trained_checkpoint):
    run = _run_copy(trained_checkpoint, tmp_path, trained_checkpoint)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("encoder: resnet18", "encoder: resnet34"))
    before = config.read_bytes()
    assert_one_line(cli("fit", "--resume", run), "last.ckpt", "another architecture", "missing")
    assert config.read_bytes() == before


def test_resume_without_any_checkpoint_says_how_to_start_again(tmp_path, trained_checkpoint):
    run = _run_copy(trained_checkpoint, tmp_path, None)
    (run / "checkpoints" / "best.ckpt").unlink()
    assert_one_line(cli("fit", "--resume", run), "no checkpoints/last.ckpt", "--config")
    assert_one_line(cli("fit", *TINY, "--out", run), "stopped before its first checkpoint", f"remove {run}")


# --------------------------------------------------------------------------- unwritable outputs


def _unwritable(tmp_path: Path, how: str) -> Path:
    if how == "file in the way":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "out"
    return Path("/sys/memtrain-test-out")  # read-only for root too (chmod 555 is not, when tests run as root)


@pytest.mark.parametrize("how", ["file in the way", "read-only place"])
def test_unwritable_out_is_one_line_for_fit_enhance_export(tmp_path, trained_checkpoint, image_folder, how):
    out = _unwritable(tmp_path, how)
    images = image_folder(n=1, size=64)
    assert_one_line(cli("fit", *TINY, "--out", out), f"--out {out}")
    assert_one_line(cli("enhance", trained_checkpoint, images, "--out", out), f"--out {out}")
    assert_one_line_allowing_progress(cli("export", trained_checkpoint, "--format", "torchscript", "--size", "64", "--out", out), f"--out {out}")
    assert not out.exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    from memtrain.rundir import atomic_write_text

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary file left


# --------------------------------------------------------------------------- run contracts

QUIET = ["--samples", "0", "--no-memory"]


def _final_line(stdout: str) -> str:
    return [ln for ln in stdout.splitlines() if ln.startswith("memtrain: outputs in")][-1]


def test_max_steps_before_the_first_validation_writes_last_ckpt_and_lists_only_what_exists(tmp_path):
    import torch

    out = tmp_path / "run"
    code, stdout, err = cli("fit", *TINY, "--max-steps", "1", "--samples", "2", "--out", out)
    assert code == 0, err
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1
    assert not (out / "checkpoints" / "best.ckpt").exists() and not (out / "samples").exists()
    assert _final_line(stdout).endswith("config.yaml, metrics.csv, memory.csv, memory_blocks.csv, checkpoints/")


def test_extending_a_finished_cosine_run_continues_the_new_schedule_and_lr_column_is_the_trained_lr(tmp_path):
    """--limit-val-batches 0 runs no validation; --resume --epochs 2 trains epoch 1 at the cosine lr of a 2-epoch schedule."""
    import torch

    out = tmp_path / "run"
    code, stdout, err = cli("fit", *TINY, *QUIET, "--scheduler", "cosine", "--epochs", "1", "--limit-val-batches", "0", "--out", out)
    assert code == 0, err
    assert not (out / "checkpoints" / "best.ckpt").exists()  # no validation, so no best
    first = rows(out / "metrics.csv")
    assert [r["val_loss"] for r in first] == [""] and first[0]["lr"] == "0.001"
    before = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]

    code, stdout, err = cli("fit", "--resume", out, "--epochs", "2")
    assert code == 0, err
    assert "cosine schedule continues over 2 epochs" in stdout
    metrics = rows(out / "metrics.csv")
    assert [(r["epoch"], r["step"], r["lr"]) for r in metrics] == [("0", "2", "0.001"), ("1", "4", "0.0005")]
    after = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    conv = "model.decoder.blocks.0.conv1.0.weight"
    assert not torch.equal(before[conv], after[conv])  # the extra epoch trained (the old schedule had lr 0 there)


# --------------------------------------------------------------------------- kill -9, SIGTERM, exact resume


def _wait(proc, until, timeout: float = 240.0) -> bool:
    """Poll ``until()`` every 5 ms; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the run")


def test_kill_9_during_checkpoint_writes_and_at_random_moments_then_sigterm_resumes_exactly(tmp_path):
    """Interrupted three times (kill -9 mid-write of last.ckpt, kill -9 at a seeded random moment, SIGTERM), with
    TMPDIR on another filesystem, and resumed each time: the same metrics rows and global step as an uninterrupted run.

    Checkpoints every step, so every resume but the last is mid-epoch: the resumed epoch must continue the same data order.
    """
    import torch

    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp_path")
    args = [*TINY, *QUIET, "--epochs", "3", "--scheduler", "cosine", "--checkpoint-every-steps", "1"]
    ref = tmp_path / "ref"
    code, _, err = cli("fit", *args, "--out", ref)
    assert code == 0, err
    expected = rows(ref / "metrics.csv")

    run = tmp_path / "run"
    ckpt_dir = run / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    rng = random.Random(13)
    started = time.monotonic()
    kills = 0
    for how in ("kill during write", "kill at random", "sigterm"):
        argv = ["fit", *args, "--out", str(run)] if not last.exists() else ["fit", "--resume", str(run)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "memtrain", *argv],
            cwd=ROOT,
            env=cli_env(TMPDIR="/dev/shm"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            step0 = os.stat(last).st_mtime_ns if last.exists() else None
            # Every interruption comes after a new checkpoint exists, so each one loses work.
            alive = _wait(proc, lambda step0=step0: last.exists() and os.stat(last).st_mtime_ns != step0)
            if alive and how == "kill during write":
                alive = _wait(proc, lambda: any(ckpt_dir.glob(".last.ckpt.*.tmp")))
            elif alive and how == "kill at random":
                time.sleep(rng.uniform(0.0, 1.5))
                alive = proc.poll() is None
            if alive:
                proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
                kills += 1
            _, err = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if alive and how == "sigterm":
            assert proc.returncode == 143, err[-3000:]
            assert err.strip().splitlines()[-1].startswith("memtrain: error: stopped by SIGTERM at step"), err[-2000:]
        # Never a corrupt checkpoint, whatever the moment of the kill.
        torch.load(last, map_location="cpu", weights_only=True)
    assert kills >= 2, "the run finished before it could be interrupted"

    code, _, err = cli("fit", "--resume", run)
    assert code == 0, err
    assert not list(run.rglob(".*.tmp"))  # temporary files of killed writes are cleared on resume
    got = rows(run / "metrics.csv")
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected] == ["0", "1", "2"]
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == int(expected[-1]["step"])
    for g, e in zip(got, expected):
        assert g["lr"] == e["lr"]
        for col in ("train_loss", "val_loss", "val_msssim", "val_psnr"):
            assert float(g[col]) == pytest.approx(float(e[col]), rel=1e-4, abs=1e-5), (g["epoch"], col)
        assert 0.0 < float(g["epoch_seconds"]) < time.monotonic() - started


@pytest.mark.parametrize("existed", [False, True])
def test_a_start_that_fails_before_its_first_checkpoint_leaves_no_dead_end_folder(tmp_path, monkeypatch, existed):
    """A fault in the first training step (injected) must not leave a folder holding only config.yaml."""
    from memtrain.loop.module import EnhancementModule

    def broken_step(self, batch, batch_idx):
        raise RuntimeError("injected fault in the first step")

    monkeypatch.setattr(EnhancementModule, "training_step", broken_step)
    out = tmp_path / "run"
    if existed:
        out.mkdir()
        (out / "notes.txt").write_text("the user's own file\n")
    with pytest.raises(RuntimeError, match="injected fault"):
        cli("fit", *TINY, *QUIET, "--out", out)
    if existed:
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()

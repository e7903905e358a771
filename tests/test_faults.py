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
from pathlib import Path

import pytest
from conftest import ROOT

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
        (["--budget", "-1GiB"], ["--budget -1GiB", "not a negative"]),
        (["--budget=-1GiB"], ["--budget -1GiB", "not a negative"]),
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

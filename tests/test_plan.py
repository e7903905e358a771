"""The planner: byte sizes, estimates of every combination, the choice, `memtrain plan` and `fit --strategies auto`."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import ROOT, assert_user_error, run_cli

from memtrain.cli import main
from memtrain.errors import ConfigError
from memtrain.memory.planner import Planner, chosen, combinations, left_out, required_bytes, strategy_options
from memtrain.memory.units import parse_bytes
from memtrain.strategies import Environment, available

GPU = Environment(device="cuda", native_bf16=True)  # planned for, never used: estimates run on CPU fake tensors
TINY = ["--config", str(ROOT / "configs" / "ci-tiny.yaml")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * 2**30),
        ("8GB", 8 * 10**9),
        ("512MiB", 512 * 2**20),
        ("512 mib", 512 * 2**20),
        ("1.5G", int(1.5 * 2**30)),
        ("1073741824", 2**30),
        ("1e9", 10**9),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "8 gigs", "GiB", "-1GiB", "0", "8GiBB"])
def test_parse_bytes_rejects_with_the_flag_named(text):
    with pytest.raises(ConfigError, match="--memory-budget"):
        parse_bytes(text)


def test_combinations_cover_every_planned_variant_and_leave_out_placement():
    combos = combinations(env=GPU)
    options = strategy_options(GPU)
    assert set(options) == {n for n in available() if n != "none"}  # every registered strategy is asked
    singles = [spec for specs, _ in options.values() for spec in specs]
    assert {"amp", "tf32", "offload", "quant", "momentum", "tile", *(f"checkpoint:{v}" for v in ("selective", "blocks", "stages", "full"))} == set(singles)
    assert combos[0] == "none" and set(singles) <= set(combos)
    # none + every subset of strategies, each in each of its planned variants (one variant per combination).
    assert len(combos) == len(set(combos)) == math.prod(1 + len(specs) for specs, _ in options.values())
    assert all(len({s.split(":")[0] for s in c.split(",")}) == len(c.split(",")) for c in combos)
    assert len(combinations(max_size=1, env=GPU)) == 1 + len(singles)
    # Placement strategies run several processes; offload does nothing on a CPU target: left out, with the reason.
    reasons = dict(left_out(GPU))
    assert all("torchrun" in reasons[n] for n in ("ddp", "pipeline", "rpc")) and "fp8" in reasons["quant"]
    assert not any(n in c for c in combos for n in ("ddp", "pipeline", "rpc"))
    cpu = Environment(device="cpu", native_bf16=False)
    assert not any("offload" in c for c in combinations(env=cpu)) and "CPU" in dict(left_out(cpu))["offload"]


@pytest.fixture(scope="module")
def planned():
    """Every combination at 512 px (resnet18) for a CUDA target, estimated once for the tests below."""
    planner = Planner(size=512, encoder="resnet18", env=GPU)
    return planner, planner.plan(["none", "amp", "tf32", "amp,tf32"])


def test_plan_estimates_every_combination_and_reuses_memory_neutral_ones(planned):
    _, cands = planned
    by = {c.strategies: c for c in cands}
    assert set(by) == {"none", "amp", "tf32", "amp,tf32"}
    assert all(c.status == "ok" and c.memory is not None for c in cands)
    # tf32 changes no memory: detected by measurement, its combinations reuse the estimates without it.
    assert by["tf32"].measured_as == "none" and by["amp,tf32"].measured_as == "amp"
    assert by["tf32"].step_peak == by["none"].step_peak
    # amp stores 16-bit activations (the parameters, gradients and Adam state stay float32).
    act = "tensor_peak_activations"
    assert by["amp"].memory.peak("forward", act) < 0.7 * by["none"].memory.peak("forward", act)
    # Sorted by expected step time (the product of the strategies' time_cost).
    costs = [c.time_cost for c in cands]
    assert costs == sorted(costs)
    assert by["amp,tf32"].time_cost == pytest.approx(by["amp"].time_cost * by["tf32"].time_cost)


def test_choice_is_the_fastest_that_fits(planned):
    planner, cands = planned
    by = {c.strategies: c for c in cands}
    amp_needs = required_bytes(by["amp"].step_peak)
    none_needs = required_bytes(by["none"].step_peak)
    assert amp_needs < none_needs
    for budget, expected in ((none_needs, "amp,tf32"), (amp_needs, "amp,tf32"), (amp_needs - 1, None)):
        p = Planner(size=512, encoder="resnet18", env=GPU, budget=budget)
        p._cache = planner._cache  # the same estimates; the choice is what is under test
        listed = p.plan(["none", "amp", "tf32", "amp,tf32"])
        best = chosen(listed)
        assert (best.strategies if best else None) == expected, budget
        assert all(c.fits == (required_bytes(c.step_peak) <= budget) for c in listed)
        lazy = p.choose(["none", "amp", "tf32", "amp,tf32"])  # what `fit --strategies auto` runs
        assert (lazy.strategies if lazy else None) == expected


def test_plan_rejected_combinations_are_listed_not_estimated():
    planner = Planner(size=128, encoder="resnet18", env=GPU)
    rejected, placed = planner.plan(["none,amp", "amp,ddp"])
    assert rejected.status == "rejected" and "cannot be combined" in rejected.reason and rejected.memory is None
    assert placed.status == "rejected" and "ddp: runs several processes launched with torchrun" in placed.reason
    assert not planner._cache  # nothing was estimated


@pytest.mark.slow
def test_plan_cli_json(tmp_path):
    # --jobs 2: estimated in 2 processes; a placement strategy is listed as rejected (it needs torchrun), not estimated.
    combos = ["none", "amp", "tf32", "checkpoint:full", "amp,ddp"]
    proc = run_cli("plan", "--size", "128", "--encoder", "resnet18", "--memory-budget", "2GiB", "--json", "--strategies", ";".join(combos), "--jobs", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert [r["strategies"] for r in rows][-1] == "amp,ddp" and {r["strategies"] for r in rows} == set(combos)
    assert rows[-1]["status"] == "rejected" and "torchrun" in rows[-1]["reason"] and rows[-1]["step_peak_mib"] is None
    for r in rows:
        assert {"strategies", "size", "forward_peak_mib", "backward_peak_mib", "step_peak_mib", "fits"} <= set(r)
        if r["status"] == "ok":
            assert r["size"] == 128 and r["fits"] is True and r["step_peak_mib"] >= max(r["forward_peak_mib"], r["backward_peak_mib"])
    assert sum(r["chosen"] for r in rows) == 1
    assert rows[0]["chosen"]


def _main(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["plan", "--size", "4096", "--memory-budget", "8 gigs"], "--memory-budget 8 gigs: expected a size like 8GiB"),
        (["plan", "--size", "100"], "--size 100: expected a multiple of 32"),
        (["fit", *TINY, "--memory-budget", "lots"], "--memory-budget lots: expected a size"),
        (["fit", *TINY, "--strategies", "auto"], "--strategies auto: needs --memory-budget"),
        (["fit", *TINY, "--strategies", "auto,amp", "--memory-budget", "8GiB"], "'auto' chooses the whole combination"),
    ],
)
def test_bad_budget_and_auto_input_is_one_line(capsys, tmp_path, args, fragment):
    code, _, err = _main(capsys, *args, *(["--out", str(tmp_path / "run")] if args[0] == "fit" else []))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memtrain: error:") and fragment in lines[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fit_auto_with_a_budget_nothing_fits_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("fit", *TINY, "--strategies", "auto", "--memory-budget", "1MiB", "--out", str(out))
    assert_user_error(proc, "--strategies auto: nothing fits --memory-budget 1MiB", "headroom")
    assert not out.exists()


def test_fit_auto_trains_with_the_chosen_plan(tmp_path, capsys):
    from memtrain.config import load_yaml
    from memtrain.loop.fit import fit

    cfg = load_yaml(ROOT / "configs" / "ci-tiny.yaml")
    cfg.strategies = ["auto"]
    cfg.memory.budget = "4GiB"
    cfg.run.out = str(tmp_path / "run")
    cfg.run.samples = 0
    cfg.train.max_steps = 1
    cfg.validate()
    run_dir = fit(cfg)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("memtrain: --strategies auto:"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    # The run and its config (so --resume reproduces it) use the chosen combination ...
    assert line.startswith(f"memtrain: --strategies auto: {','.join(saved['strategies'])} (estimated step peak")
    assert saved["memory"]["budget"] == "4GiB"
    # ... which, with a budget every combination fits at 64 px, is one of the cheapest expected.
    candidates = Planner(size=64, batch_size=2, encoder="resnet18", env=Environment.detect("cpu")).candidates()
    cost = {c.strategies: c.time_cost for c in candidates if c.status == "ok"}
    assert cost[",".join(saved["strategies"])] == min(cost.values())
    assert (run_dir / "checkpoints" / "last.ckpt").exists()

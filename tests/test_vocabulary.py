"""One vocabulary across subcommands: the same flag names, `--strategies` grammar and defaults; old spellings warn and still work."""

from __future__ import annotations

import argparse
import warnings

import pytest
from conftest import run_cli

from memtrain import config as C
from memtrain import vocabulary
from memtrain.cli import SUBCOMMANDS, build_parser
from memtrain.cli.fit import resolve_config
from memtrain.errors import ConfigError
from memtrain.vocabulary import BATCH_SIZE, DEVICES, RENAMED, RENAMED_KEYS, DeprecatedSpelling, parse_plans

# The canonical flag for each thing, and spellings that name the same thing. A subcommand may accept a
# synonym only as a hidden deprecated alias (memtrain.vocabulary.RENAMED) that stores into the canonical flag.
CANONICAL = {
    "--memory-budget": {"--budget", "--max-memory", "--memory-limit", "--mem-budget", "--gpu-memory", "--max-mem"},
    "--device": {"--accelerator", "--gpu", "--cuda", "--devices"},
    "--batch-size": {"--batch", "--bs", "--batchsize", "--batch_size"},
    "--strategies": {"--strategy", "--plan", "--plans", "--combos", "--combinations"},
    "--max-strategies": {"--max-size", "--max-combination"},
}
SYNONYMS = {s: canon for canon, syns in CANONICAL.items() for s in syns}
# Where a subcommand's default differs from the others on purpose: (subcommand, flag) -> why.
DEFAULT_EXCEPTIONS = {("plan", "--device"): "the plan is for the training machine, a CUDA GPU unless told otherwise, not for this one"}
# Flags whose choices and defaults must agree wherever they appear (fit's defaults come from memtrain.config).
SHARED = ("--batch-size", "--device", "--encoder", "--loss", "--lr")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: action.choices[name] for name in SUBCOMMANDS}


def _options(p: argparse.ArgumentParser) -> tuple[dict[str, argparse.Action], dict[str, argparse.Action]]:
    """(visible flag -> action, hidden flag -> action) of one subcommand."""
    visible, hidden = {}, {}
    for a in p._actions:
        for o in a.option_strings:
            (hidden if a.help == argparse.SUPPRESS else visible)[o] = a
    return visible, hidden


def _default_and_choices(name: str, action: argparse.Action) -> tuple[object, tuple | None]:
    """What a flag defaults to and accepts; fit's flags default to SUPPRESS and take both from their config field."""
    if name == "fit":
        section, _, key = action.dest.rpartition(".")
        cfg, field = C.FitConfig(), next(f for s, f in C._sections() if C._key(s, f.name) == action.dest)
        return getattr(getattr(cfg, section) if section else cfg, key), field.metadata.get("choices")
    return action.default, tuple(action.choices) if action.choices else None


def test_the_same_thing_has_the_same_flag_name_in_every_subcommand():
    subs = _subparsers()
    accepted_old = set()
    for name, p in subs.items():
        visible, hidden = _options(p)
        assert not (set(visible) & set(SYNONYMS)), f"memtrain {name}: {sorted(set(visible) & set(SYNONYMS))} name what " + ", ".join(
            SYNONYMS[s] for s in sorted(set(visible) & set(SYNONYMS))
        )
        for old, action in hidden.items():
            if old in ("--cell", "--cell-out"):  # compare's internal per-cell protocol, not a user flag
                continue
            assert old in RENAMED, f"memtrain {name}: hidden flag {old} is not a declared deprecated spelling"
            new = RENAMED[old]
            assert new in visible and visible[new].dest == action.dest, f"memtrain {name}: {old} does not store into {new}"
            accepted_old.add(old)
    assert accepted_old == set(RENAMED), f"old spellings no subcommand accepts: {sorted(set(RENAMED) - accepted_old)}"


def test_shared_flags_have_the_same_choices_and_defaults_everywhere():
    subs = _subparsers()
    for flag in SHARED:
        seen = {}
        for name, p in subs.items():
            visible, _ = _options(p)
            if flag in visible and (name, flag) not in DEFAULT_EXCEPTIONS:
                seen[name] = _default_and_choices(name, visible[flag])
        assert len(seen) >= 2, (flag, seen)
        assert len(set(seen.values())) == 1, f"{flag} differs between subcommands: {seen}"
    batch = {name: _default_and_choices(name, _options(p)[0]["--batch-size"])[0] for name, p in subs.items() if "--batch-size" in _options(p)[0]}
    assert set(batch) == {"fit", "plan", "compare", "calibrate"} and set(batch.values()) == {BATCH_SIZE}, batch
    assert f"default {BATCH_SIZE} in" in vocabulary.__doc__  # the docs' "Shared flags" section is that docstring
    devices = {name: _default_and_choices(name, _options(p)[0]["--device"])[1] for name, p in subs.items() if "--device" in _options(p)[0]}
    assert set(devices) == {"fit", "plan", "compare", "enhance"} and set(devices.values()) == {DEVICES}, devices


def test_a_comma_list_is_one_plan_everywhere_and_several_plans_repeat_the_flag_or_use_semicolons(tmp_path):
    parser = build_parser()
    required = {"plan": ["--size", "64"], "compare": [], "calibrate": []}
    for name, extra in required.items():
        one = parser.parse_args([name, *extra, "--strategies", "amp,checkpoint"])
        assert parse_plans(one.strategies) == ["amp,checkpoint"], name
        several = parser.parse_args([name, *extra, "--strategies", "none;amp", "--strategies", " amp , checkpoint ", "--strategies", "none"])
        assert parse_plans(several.strategies) == ["none", "amp", "amp,checkpoint"], name
    fit = resolve_config(parser.parse_args(["fit", "--strategies", "amp,checkpoint"]))
    assert fit.strategies == ["amp", "checkpoint"]
    with pytest.raises(ConfigError, match=r"fit trains one plan.*';' separates plans only in plan, compare and calibrate"):
        resolve_config(parser.parse_args(["fit", "--strategies", "none;amp"]))
    with pytest.raises(ConfigError, match=r"--strategies 'none; amp,turbo': unknown strategy 'turbo'"):
        parse_plans(["none", "amp,turbo"])


@pytest.mark.parametrize(
    ("argv", "old", "dest", "value"),
    [
        (["plan", "--size", "64", "--budget", "8GiB"], "--budget", "memory_budget", "8GiB"),
        (["plan", "--size", "64", "--max-size", "2"], "--max-size", "max_strategies", 2),
        (["enhance", "m.ckpt", "x.png", "--out", "o", "--max-memory", "1.5"], "--max-memory", "memory_budget", str(int(1.5 * 2**30))),
        (["fit", "--accelerator", "cpu"], "--accelerator", "train.device", "cpu"),
    ],
)
def test_an_old_spelling_warns_and_stores_into_the_new_flag(argv, old, dest, value):
    with pytest.warns(DeprecatedSpelling, match=f"^{old} is deprecated; use {RENAMED[old]}$"):
        args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value


def test_an_old_yaml_key_warns_and_is_read_as_the_new_one():
    ((old, new),) = RENAMED_KEYS.items()
    with pytest.warns(DeprecatedSpelling, match=f"^old.yaml: {old} is deprecated; use {new}$"):
        cfg = C.from_dict({"train": {"accelerator": "cpu", "epochs": 3}}, "old.yaml")
    assert cfg.train.device == "cpu" and cfg.train.epochs == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a checkpoint's saved configuration is read without a warning the reader cannot act on
        assert C.from_dict({"train": {"accelerator": "cpu"}}, "best.ckpt", warn_renamed=False).train.device == "cpu"


@pytest.mark.slow
def test_a_deprecated_flag_still_works_and_prints_one_warning_line():
    proc = run_cli("plan", "--size", "64", "--encoder", "resnet18", "--strategies", "none", "--budget", "2GiB", "--quiet", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["memtrain: warning: --budget is deprecated; use --memory-budget"], proc.stderr
    assert '"fits": true' in proc.stdout and '"chosen": true' in proc.stdout

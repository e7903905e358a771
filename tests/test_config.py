"""Config: defaults < YAML < flags, one-line errors, round trip through config.yaml."""

from __future__ import annotations

import argparse

import pytest

from memtrain import config as C
from memtrain.cli import Parser
from memtrain.cli.fit import add_parser, resolve_config
from memtrain.errors import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = Parser(prog="memtrain")
    add_parser(parser.add_subparsers(dest="command", parser_class=Parser))
    return parser.parse_args(["fit", *argv])


def test_every_field_documented_and_keyword_only():
    for key, flag, help_text in C.field_docs():
        assert help_text and flag.startswith("--"), key
    with pytest.raises(TypeError):
        C.DataConfig("phantom")  # keyword-only


def test_precedence_defaults_yaml_flags(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 3e-4\n  epochs: 7\ndata:\n  size: 256\nstrategies: amp\n")
    cfg = resolve_config(parse("--config", str(preset), "--lr", "0.01", "--batch-size", "3"))
    assert cfg.train.lr == 0.01  # flag beats YAML
    assert cfg.train.epochs == 7  # YAML beats default
    assert cfg.data.size == 256
    assert cfg.train.batch_size == 3
    assert cfg.strategies == ["amp"]
    assert cfg.model.encoder == "resnet34"  # default untouched


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # PyYAML reads '3e-4' as a string; the config must still take it as a number.
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  lr: 3e-4\n")
    assert C.load_yaml(preset).train.lr == pytest.approx(3e-4)


def test_flags_parse_types_and_lists():
    cfg = resolve_config(parse("--strategies", "amp, tf32", "--size", "128", "--deterministic", "--no-memory", "--encoder-weights", "none"))
    assert cfg.strategies == ["amp", "tf32"]
    assert cfg.data.size == 128
    assert cfg.train.deterministic is True
    assert cfg.memory.track is False
    assert cfg.model.encoder_weights is None


def test_saved_config_round_trips(tmp_path):
    cfg = resolve_config(parse("--size", "640", "--lr", "0.002", "--strategies", "amp"))
    path = tmp_path / "config.yaml"
    path.write_text(C.dump_yaml(cfg))
    assert C.load_yaml(path) == cfg


def test_shipped_presets_load():
    presets = {p.name: p for p in (C.Path(__file__).parents[1] / "configs").glob("*.yaml")}
    assert {"ci-tiny.yaml", "quickstart.yaml", "paper-512.yaml", "paper-1024.yaml", "paper-2048.yaml"} <= set(presets)
    for preset in presets.values():
        C.load_yaml(preset).validate()
    assert C.load_yaml(presets["paper-2048.yaml"]).data.size == 2048


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("train:\n  lrr: 1\n", "unknown key 'train.lrr'"),
        ("bogus: 1\n", "unknown key 'bogus'"),
        ("train:\n  lr: fast\n", "train.lr: expected a number"),
        ("train:\n  epochs: 2.5\n", "train.epochs: expected an integer"),
        ("train: [1, 2]\n", "section 'train' must be a mapping"),
        ("train:\n  scheduler: linear\n", "expected one of none, cosine, step"),
        ("train: {lr: 1\n", "not valid YAML at line"),
        ("- just\n- a list\n", "expected a mapping of sections"),
    ],
)
def test_bad_yaml_is_one_line_naming_the_file(tmp_path, text, fragment):
    preset = tmp_path / "bad.yaml"
    preset.write_text(text)
    with pytest.raises(ConfigError) as info:
        C.load_yaml(preset)
    msg = str(info.value)
    assert fragment in msg and "bad.yaml" in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--size", "250"], "--size 250: expected a multiple of 32"),
        (["--size", "250"], "nearest valid: 224 or 256"),
        (["--size", "16"], "nearest valid: 32"),
        (["--lr", "-1"], "--lr -1.0: expected a positive number"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--max-steps", "0"], "--max-steps 0"),
        (["--val-fraction", "1.5"], "--val-fraction 1.5"),
        (["--fit", "stretch"], "expected one of resize, crop"),
        (["--epochs", "two"], "--epochs two: expected an integer"),
    ],
)
def test_bad_flags(argv, fragment):
    with pytest.raises(ConfigError, match=None) as info:
        resolve_config(parse(*argv))
    assert fragment in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        resolve_config(parse("--config", str(tmp_path / "nope.yaml")))


def test_config_and_resume_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="give one"):
        resolve_config(parse("--config", "a.yaml", "--resume", str(tmp_path)))


def test_generated_reference_documents_every_flag():
    """The docs' CLI and config reference pages are generated from these fields (docs/hooks/cli_reference.py)."""
    import importlib.util

    path = C.Path(__file__).parents[1] / "docs" / "hooks" / "cli_reference.py"
    spec = importlib.util.spec_from_file_location("cli_reference", path)
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    cli, config = hook.cli_markdown(), hook.config_markdown()
    for key, flag, _ in C.field_docs():
        assert f"`{flag}" in cli and f"`{key}`" in cli, flag
        assert f"| `{key}` | `{flag}` |" in config, key

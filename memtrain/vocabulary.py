"""One vocabulary across the subcommands: the canonical flag names, the old spellings they replace, the ``--strategies`` grammar.

A flag means the same in every subcommand that takes it:

- ``--memory-budget SIZE``: the device memory the command may plan for (``8GiB``, ``24GB``, ``512MiB`` or bytes).
- ``--device {auto,cpu,cuda}``: where the command runs; ``auto`` is CUDA when present. ``plan``: the device the
  plan is for, ``cuda`` by default (the training machine, not necessarily this one).
- ``--batch-size N``: images per step, default 1 in ``fit``, ``plan``, ``compare`` and ``calibrate``, so that a
  plan made with the defaults is for the batch ``fit`` trains.
- ``--strategies``: a comma list is ONE plan (``amp,checkpoint``). ``fit`` trains one plan; ``plan``,
  ``compare`` and ``calibrate`` take several, by repeating the flag or separating plans with ``;``
  (``--strategies none --strategies amp,checkpoint`` is ``--strategies 'none;amp,checkpoint'``).
- ``--steps N``: measured steps, after one warm-up step that is left out.

The old spellings in ``RENAMED`` (flags) and ``RENAMED_KEYS`` (YAML keys) keep working for one more release;
each use prints one line ``memtrain: warning: OLD is deprecated; use NEW``.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Iterable

from memtrain.errors import ConfigError, MemtrainError

# Images per step in every subcommand that takes --batch-size (fit, plan, compare, calibrate). One image is
# what high-resolution training runs (the paper's 1024² and 2048² presets) and what every measured figure uses.
# The import of this module stays cheap (no torch): the command line is built from it.
BATCH_SIZE = 1

DEVICES = ("auto", "cpu", "cuda")

# Old flag spelling -> the canonical one. Accepted for one more release, with a deprecation line.
RENAMED = {
    "--budget": "--memory-budget",  # plan
    "--max-memory": "--memory-budget",  # enhance (a number of GiB; now a size with its unit)
    "--accelerator": "--device",  # fit
    "--max-size": "--max-strategies",  # plan: not an image size, the number of strategies in a combination
}

# Old YAML key -> the canonical one (run directories' config.yaml files written before the rename).
RENAMED_KEYS = {"train.accelerator": "train.device"}


class DeprecatedSpelling(FutureWarning):
    """An old flag or key spelling that still works for one release; the CLI prints it as one ``memtrain: warning:`` line."""


def warn_renamed(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", DeprecatedSpelling, stacklevel=3)


class _DeprecatedAlias(argparse.Action):
    """An old spelling: warns once per use, converts the value if its unit changed, and stores it where the new flag does."""

    def __init__(self, option_strings, dest, *, new: str, convert: Callable[[str], str] | None = None, **kwargs) -> None:
        kwargs.update(help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.convert = new, convert

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warn_renamed(option_string or self.option_strings[0], self.new)
        setattr(namespace, self.dest, self.convert(values) if self.convert else values)


def add_deprecated(parser, old: str, new: argparse.Action, *, convert: Callable[[str], str] | None = None) -> argparse.Action:
    """Accept ``old`` as a hidden spelling of the flag ``new`` (the action ``add_argument`` returned); see :data:`RENAMED`."""
    if RENAMED.get(old) != new.option_strings[0]:
        raise ValueError(f"{old} -> {new.option_strings[0]} is not in memtrain.vocabulary.RENAMED")
    return parser.add_argument(
        old, dest=new.dest, action=_DeprecatedAlias, new=new.option_strings[0], convert=convert, type=new.type, choices=new.choices, metavar=new.metavar
    )


def rename_keys(raw: dict, where: str, *, warn: bool = True) -> dict:
    """A YAML mapping with the keys of :data:`RENAMED_KEYS` moved to their new names (with a deprecation line each, if ``warn``)."""
    out = dict(raw)
    for old, new in RENAMED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        section = out.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        if warn:
            warn_renamed(f"{where}: {old}", new)
        section = dict(section)
        value = section.pop(old_key)
        out[old_section] = section
        target = dict(out.get(new_section) or {})
        target.setdefault(new_key, value)
        out[new_section] = target
    return out


# --------------------------------------------------------------------------- --strategies


def add_plans_argument(parser, help: str):
    """``--strategies``, repeatable, for the subcommands that take several plans (plan, compare, calibrate)."""
    return parser.add_argument("--strategies", action="append", metavar="PLAN", help=help)


def parse_plans(values: str | Iterable[str] | None, flag: str = "--strategies") -> list[str] | None:
    """Plans from ``--strategies`` values: a comma list is one plan, ``;`` or a repeated flag separates plans.

    ``["none;amp", "amp,checkpoint"]`` → ``["none", "amp", "amp,checkpoint"]``. Blanks are dropped, repeats
    kept once; every strategy name is checked (an unknown one is a one-line error naming the flag). ``None``
    (the flag not given) stays ``None``.
    """
    if values is None:
        return None
    texts = [values] if isinstance(values, str) else list(values)
    given = "; ".join(texts)
    from memtrain.strategies.registry import create  # lazy (startup): the registry loads torch; --help must not

    plans = []
    for text in texts:
        for part in text.split(";"):
            names = [n.strip() for n in part.split(",") if n.strip()]
            for name in names:
                try:
                    create(name)
                except MemtrainError as e:
                    raise ConfigError(f"{flag} {given!r}: {str(e).removeprefix('--strategies: ')}") from None
            if names:
                plans.append(",".join(names))
    if not plans:
        raise ConfigError(
            f"{flag} {given!r}: expected plans such as 'none;amp;amp,checkpoint' (a comma list is one plan; ';' or a repeated {flag} separates plans)"
        )
    return list(dict.fromkeys(plans))


def one_plan_only(names: Iterable[str], flag: str = "--strategies") -> None:
    """``fit`` trains one plan: a ``;`` in its comma list is an error that says where several plans belong."""
    text = ",".join(names)
    if ";" in text:
        raise ConfigError(f"{flag} {text}: fit trains one plan, a comma list such as 'amp,checkpoint'; ';' separates plans only in plan, compare and calibrate")

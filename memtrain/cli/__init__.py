"""The `memtrain` command line.

Each subcommand is a module here exposing ``add_parser(subparsers)`` and ``run(args)``.
User errors (:class:`memtrain.errors.MemtrainError`, bad flags) print one line on stderr
and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from importlib import import_module

from memtrain import __version__
from memtrain.errors import MemtrainError

SUBCOMMANDS = ("fit", "plan", "calibrate", "compare", "enhance", "export", "strategies")


class UsageError(MemtrainError):
    """A malformed command line."""


class Parser(argparse.ArgumentParser):
    """argparse that raises a one-line UsageError instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


# A value that starts with '-' and a digit or a dot (-1, -1e-3, -1GiB, -.5): argparse would take it for an option.
_NEGATIVE = re.compile(r"^-\.?[0-9]")


def join_negative_values(argv: list[str]) -> list[str]:
    """``--flag -1GiB`` → ``--flag=-1GiB``, so that a negative value reaches the flag's own check and its message."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and "=" not in tok and tok != "--" and i + 1 < len(argv) and _NEGATIVE.match(argv[i + 1]):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def build_parser() -> Parser:
    parser = Parser(prog="memtrain", description="Memory-efficient training of high-resolution image-to-image models.")
    parser.add_argument("--version", action="version", version=f"memtrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in SUBCOMMANDS:
        import_module(f"memtrain.cli.{name}").add_parser(sub)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    print(f"memtrain: warning: {text}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _one_line_warnings
    try:
        parser = build_parser()
        args = parser.parse_args(join_negative_values(list(sys.argv[1:] if argv is None else argv)))
        if args.command is None:
            parser.print_help()
            return 2
        from memtrain.memory.allocator import threshold_from_env  # startup: memtrain.memory loads torch, which --help need not

        threshold_from_env()  # checked before any command writes anything (fit, compare and measurements read it)
        return int(args.run(args) or 0)
    except MemtrainError as e:
        print(f"memtrain: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("memtrain: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    # c10's own log lines go to stderr with a C++ stack (a TCPStore client's "recvValue failed" when rank 0 of a
    # distributed run died and took the store with it); memtrain's contract is one line per error. Set before torch
    # loads, which reads it once; TORCH_CPP_LOG_LEVEL=WARNING (or INFO) in the environment brings them back.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.exit(main())

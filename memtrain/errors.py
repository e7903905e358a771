"""User-facing errors.

Anything the user can fix (a flag, a file, a combination of strategies) raises a
:class:`MemtrainError`. The CLI prints its message as one line on stderr and exits
with code 2, without a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class MemtrainError(Exception):
    """An error in the user's input: one line on stderr, exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # One line, always: the CLI contract is a single readable sentence.
        super().__init__(" ".join(str(message).split()))


class ConfigError(MemtrainError):
    """A flag, preset or config file value is missing, malformed or out of range."""


class DataError(MemtrainError):
    """An input image, folder or target pairing cannot be used."""


class StrategyError(MemtrainError):
    """An unknown strategy, or a combination of strategies that cannot be faithful."""


class CheckpointError(MemtrainError):
    """A checkpoint or weights file that cannot be loaded."""


class OutputError(MemtrainError):
    """An output file or folder that cannot be created or written (a file in the way, no permission, a read-only place)."""


class Interrupted(MemtrainError):
    """The run was stopped by a signal after saving its state: one line, exit code 143 (128 + SIGTERM)."""

    exit_code = 143

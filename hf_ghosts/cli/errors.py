"""The command line's one error type."""

from __future__ import annotations

__all__ = ["CliError"]


class CliError(Exception):
    """Bad input: ``hf-ghosts`` prints the message (the problem and its fix) and exits with status 2."""

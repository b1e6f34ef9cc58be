"""The root of every error feddat-secure raises for a user or an operator to act on.

The command line prints any :class:`FeddatError` as one line and exits 2; anything else is a bug
and keeps its traceback. Each module defines its own subclass (``ConfigError``, ``DataError``,
``ModelLoadError``, ``CheckpointError``, ``FederationError``, ...), so callers can catch one
kind or all of them.
"""

from __future__ import annotations


class FeddatError(Exception):
    """Something the user or an operator can fix: a configuration, a folder, a file, a refused run."""


class FederationError(FeddatError):
    """A party refused to go on: a message it cannot accept, a state it cannot restore, a budget it would pass."""

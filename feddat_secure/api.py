"""The stable Python API: load a configuration, run a federation, and (:class:`~feddat_secure.predictor.Predictor`)
use its result. docs/api.md documents it; everything else in the package may change between releases.

Importing this module loads no deep-learning library: :func:`run` imports the runner when it is called.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from . import config as _config
from .config import ConfigError, RunConfig

if TYPE_CHECKING:
    from .federation.runner import RunResult

LOGGER = logging.getLogger("feddat_secure")
_WARNING_PREFIX = "feddat-secure: warning: "  # how the runner marks a warning among the lines it prints


def load_config(source: RunConfig | str | os.PathLike[str] | Mapping[str, Any]) -> RunConfig:
    """A validated configuration from a TOML file's path or from a dict of its tables (every key optional, as
    in a file). Any mistake raises :class:`~feddat_secure.config.ConfigError`: one line naming the key."""
    if isinstance(source, RunConfig):
        return source
    if isinstance(source, str | os.PathLike):
        return _config.load_config(Path(source))
    if isinstance(source, Mapping):
        return _config.config_from_dict(_plain(source))
    raise ConfigError(f"a configuration is a TOML file's path or a dict of its tables, not a {type(source).__name__}")


def run(config: RunConfig | str | os.PathLike[str] | Mapping[str, Any], *, overwrite: bool = False,
        resume: bool = False, progress: bool = True) -> RunResult:
    """Run the federation ``config`` describes (anything :func:`load_config` takes) into
    ``<output_dir>/<name>/`` and return its :class:`~feddat_secure.federation.runner.RunResult`.

    ``overwrite`` replaces an existing run folder; ``resume`` continues an interrupted run of the same
    configuration. ``progress`` prints a progress bar and each round's table as the command line does; without
    it those lines go to the ``feddat_secure`` logger, warnings (about the data) at WARNING and the rest at INFO.
    A refused configuration, data or run folder raises a :class:`~feddat_secure.errors.FeddatError` and leaves
    no run folder behind.
    """
    resolved = load_config(config)
    from .federation.runner import run as run_federation  # torch and the rest: only once the config is valid

    return run_federation(resolved, overwrite=overwrite, resume=resume, progress=progress,
                          echo=tqdm.write if progress else _log_line)


def _log_line(line: str) -> None:
    if line.startswith(_WARNING_PREFIX):
        LOGGER.warning(line.removeprefix(_WARNING_PREFIX))
    else:
        LOGGER.info(line)


def _plain(table: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mappings as plain dicts, which is what the configuration's validation reads."""
    return {key: _plain(value) if isinstance(value, Mapping) else value for key, value in table.items()}

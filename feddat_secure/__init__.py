"""feddat-secure: federated finetuning of a vision-language model with FedDAT.

The stable Python API (docs/api.md)::

    import feddat_secure

    config = feddat_secure.load_config("examples/feddat_domain.toml")   # or a dict of the TOML's tables
    result = feddat_secure.run(config)                                  # -> RunResult (run_dir, history, ...)
    predictor = feddat_secure.Predictor.from_run(result.run_dir, site="client0")
    predictor.predict(images, questions)                                # -> answers; predict_proba: probabilities

The package never downloads anything: every model and tokenizer is loaded from a local folder with
``local_files_only=True`` (feddat_secure.model.backbone). Importing it changes nothing in the caller's
process (no environment variable is set) and loads no deep-learning library: the names above are loaded on
first use, and torch, transformers and PEFT only by what trains or predicts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import load_config, run
    from .config import ConfigError, RunConfig
    from .errors import FeddatError
    from .federation.runner import RunResult
    from .predictor import Predictor, ResultError

__version__ = "0.1.0"

# Each public name and the module that defines it, imported when the name is first used.
_EXPORTS = {
    "load_config": "api",
    "run": "api",
    "Predictor": "predictor",
    "ResultError": "predictor",
    "RunConfig": "config",
    "ConfigError": "config",
    "FeddatError": "errors",
    "RunResult": "federation.runner",
}
__all__ = ["ConfigError", "FeddatError", "Predictor", "ResultError", "RunConfig", "RunResult", "__version__",
           "load_config", "run"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

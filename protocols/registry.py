"""The protocols by name: each registers its options dataclass and a factory, in one place.

The options dataclass is the single definition of what a protocol accepts: ``make_protocol`` builds it,
and the run configuration validates a ``[secure_aggregation.<name>]`` table from the same class. Field
metadata tells the configuration how to check a key (``{"choices": (...)}`` or ``{"minimum": x, "strict":
bool}``); a field with ``{"runtime": True}`` is supplied by the runner (seeds, weight and noise bounds) and
never read from a configuration file. A factory may import heavy dependencies lazily: registering the HE
protocol does not import TenSEAL, building one does.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import Protocol
from .errors import ConfigurationError
from .he.config import HEOptions
from .masked import MaskedOptions, MaskedProtocol
from .plain import PlainOptions, PlainProtocol

# a protocol's name is a message header value and a configuration table name: keep it short and plain
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class _Registration:
    options_class: type
    factory: Callable[[Any], Protocol]


_PROTOCOLS: dict[str, _Registration] = {}


def register_protocol(name: str, options_cls: type, factory: Callable[[Any], Protocol]) -> None:
    """Make protocol ``name`` available to ``make_protocol`` and to configuration files.

    ``options_cls`` is a dataclass whose every field has a default (``make_protocol(name)`` builds the
    defaults); ``factory(options)`` returns the protocol. A name is registered once.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(f"invalid protocol name {name!r}: use 1-32 characters a-z 0-9 _, starting with a "
                                 "letter")
    if name in _PROTOCOLS:
        raise ConfigurationError(f"protocol {name!r} is already registered")
    if not isinstance(options_cls, type) or not dataclasses.is_dataclass(options_cls):
        raise ConfigurationError(f"protocol {name!r}: the options class must be a dataclass, not {options_cls!r}")
    without_default = [item.name for item in dataclasses.fields(options_cls)
                       if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING]
    if without_default:
        raise ConfigurationError(f"protocol {name!r}: options {', '.join(without_default)} have no default")
    if not callable(factory):
        raise ConfigurationError(f"protocol {name!r}: the factory must be callable")
    _PROTOCOLS[name] = _Registration(options_cls, factory)


def registered_protocols() -> tuple[str, ...]:
    """The registered names, in registration order (the built-in ones first)."""
    return tuple(_PROTOCOLS)


def options_class(name: str) -> type:
    """The options dataclass of protocol ``name``."""
    return _registration(name).options_class


def make_protocol(name: str, options: Any = None, **overrides: Any) -> Protocol:
    """Build protocol ``name`` from ``options`` (an instance of its options class; None: the defaults) with
    ``overrides`` (field values, e.g. the runner's ``seed`` and ``max_weight``) replacing its fields.

    Unknown protocols, unknown options and invalid values raise ConfigurationError.
    """
    registration = _registration(name)
    cls = registration.options_class
    known = [item.name for item in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigurationError(f"protocol {name!r}: unknown option {', '.join(unknown)}; the options are "
                                 f"{', '.join(known)}", unknown[0])
    if options is None:
        options = cls(**overrides)
    elif type(options) is not cls:
        raise ConfigurationError(f"protocol {name!r} takes {cls.__name__} options, not {type(options).__name__}")
    elif overrides:
        options = dataclasses.replace(options, **overrides)
    return registration.factory(options)


def _registration(name: str) -> _Registration:
    try:
        return _PROTOCOLS[name]
    except (KeyError, TypeError):
        raise ConfigurationError(f"unknown protocol {name!r}; choose one of {', '.join(_PROTOCOLS)}") from None


def _he(options: HEOptions) -> Protocol:
    from .he.protocol import HEProtocol  # here, not above: TenSEAL loads only when an HE protocol is built

    return HEProtocol(options)


register_protocol("plain", PlainOptions, PlainProtocol)
register_protocol("masked", MaskedOptions, MaskedProtocol)
register_protocol("he", HEOptions, _he)

"""Homomorphic aggregation with CKKS (TenSEAL): the server adds ciphertexts it cannot read.

Parties: clients encrypt, the server adds, a key holder (its own role; in a small deployment one site
may take it) makes a fresh key pair per round and decrypts only the exact sum of enough committed, signed
contributions, as recomputed and co-signed by a committee it draws from the sites whose inputs were counted.
Every ciphertext carries a uniform mask mod q that only the key holder removes, from the sum (masks.py).
The message flow is in messages.py, the threat model and parameters in docs/protocols.md.

Importing this package does not import TenSEAL (a configuration is validated with ``HEOptions``
alone); the parties and ``HEProtocol`` load it on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import HEOptions

_LAZY = {"HEProtocol": "protocol", "HEClient": "client", "HEServer": "server", "HEKeyHolder": "keyholder"}

__all__ = ["HEClient", "HEKeyHolder", "HEOptions", "HEProtocol", "HEServer"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)

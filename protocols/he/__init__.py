"""Homomorphic aggregation with CKKS (TenSEAL): the server adds ciphertexts it cannot read.

Parties: clients encrypt, the server adds, a key holder (its own role; in a small deployment one site
may take it) makes a fresh key pair per round and decrypts only a sum of enough signed contributions.
The message flow is in messages.py, the threat model and parameters in docs/protocols.md.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..base import Protocol
from ..errors import ConfigurationError
from ..identity import Identity, Roster
from .chunks import Layout
from .client import HEClient
from .config import HEConfig
from .keyholder import HEKeyHolder
from .messages import NAME, STAGES
from .server import HEServer

__all__ = ["HEClient", "HEConfig", "HEKeyHolder", "HEProtocol", "HEServer"]


@dataclass(frozen=True)
class HEProtocol(Protocol):
    """CKKS aggregation; the options are ``HEConfig``'s (``seed`` is accepted and unused: nothing here is
    random except key material and canary seeds, which always come from the OS)."""

    poly_modulus_degree: int = HEConfig.poly_modulus_degree
    coeff_mod_bit_sizes: tuple[int, ...] = HEConfig.coeff_mod_bit_sizes
    global_scale_bits: int = HEConfig.global_scale_bits
    min_clients: int = HEConfig.min_clients
    seed: int = 0
    name = NAME
    stages = STAGES
    needs_keyholder = True

    @property
    def config(self) -> HEConfig:
        return HEConfig(self.poly_modulus_degree, tuple(self.coeff_mod_bit_sizes), self.global_scale_bits,
                        self.min_clients)

    def __post_init__(self):
        self.config  # noqa: B018  (validates the options now, not at the first round)

    def client(self, identity: Identity, roster: Roster, server_id: str = "server") -> HEClient:
        return HEClient(self.config, identity, roster, server_id)

    def server(self, identity: Identity, roster: Roster) -> HEServer:
        return HEServer(self.config, identity, roster)

    def keyholder(self, identity: Identity, roster: Roster) -> HEKeyHolder:
        return HEKeyHolder(self.config, identity, roster)

    def check(self, num_clients: int, vector_length: int) -> None:
        super().check(num_clients, vector_length)
        config = self.config
        if num_clients < config.min_clients:
            raise ConfigurationError(f"{num_clients} clients can never reach min_clients = {config.min_clients}")
        if config.per_client_bound(num_clients) < 1.0:
            raise ConfigurationError(f"{num_clients} clients overflow the CKKS capacity {config.capacity:.6g}")

    def bytes_per_parameter(self) -> float:
        """Upload bytes per vector entry of a long vector, measured once by encrypting one full ciphertext."""
        return _measured_bytes_per_parameter(self.config)


@functools.cache
def _measured_bytes_per_parameter(config: HEConfig) -> float:
    from . import ckks

    layout = Layout(config.slots, config.slots)
    context = ckks.secret_context(config)
    ciphertext = ckks.encrypt(context, [np.zeros(config.slots)])[0]
    return len(ciphertext) / layout.per_chunk

"""The HE protocol object: builds clients, the server and the key holder around one validated HEOptions.

Importing this module imports TenSEAL; the registry imports it only when an HE protocol is built.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from ..base import Protocol
from ..errors import ConfigurationError
from ..identity import Identity, Roster
from .chunks import Layout
from .client import HEClient
from .config import HEOptions
from .keyholder import HEKeyHolder
from .messages import NAME, STAGES
from .server import HEServer


class HEProtocol(Protocol):
    """CKKS aggregation with a separate key holder."""

    name = NAME
    stages = STAGES
    needs_keyholder = True

    def __init__(self, options: HEOptions):
        self.options = options

    @property
    def min_clients(self) -> int:  # type: ignore[override]
        """The fewest clients a round can aggregate (a larger cohort needs ``options.required(cohort)``)."""
        return self.options.min_clients

    def client(self, identity: Identity, roster: Roster, server_id: str = "server", *, session: str,
               state: Mapping[str, Any] | None = None) -> HEClient:
        return HEClient(self.options, identity, roster, server_id, session=session, state=state)

    def server(self, identity: Identity, roster: Roster, *, session: str,
               state: Mapping[str, Any] | None = None) -> HEServer:
        return HEServer(self.options, identity, roster, session=session, state=state)

    def keyholder(self, identity: Identity, roster: Roster, *, session: str,
                  state: Mapping[str, Any] | None = None) -> HEKeyHolder:
        return HEKeyHolder(self.options, identity, roster, session=session, state=state)

    def check(self, num_clients: int, vector_length: int) -> None:
        super().check(num_clients, vector_length)
        options = self.options
        if num_clients < options.min_clients:
            raise ConfigurationError(f"{num_clients} clients can never reach min_clients = {options.min_clients}")
        if options.per_client_bound(num_clients) < 1.0:
            raise ConfigurationError(f"{num_clients} clients overflow the CKKS capacity {options.capacity:.6g}")

    def bytes_per_parameter(self) -> float:
        """Upload bytes per vector entry of a long vector, measured once by encrypting one full ciphertext."""
        return _measured_bytes_per_parameter(self.options)


@functools.cache
def _measured_bytes_per_parameter(options: HEOptions) -> float:
    from . import ckks

    return ckks.fresh_ciphertext_bytes(options) / Layout(options.slots, options.slots).per_chunk

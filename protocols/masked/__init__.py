"""SecAgg+ masked aggregation (Bonawitz et al., CCS 2017; Bell et al., CCS 2020).

Stages: commit → advertise_keys → share_keys → masked_input → consistency_check → unmask.
See docs/protocols.md for the message flow, the parameters and how to choose them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..base import Protocol
from ..identity import Identity, Roster
from .client import MaskedClient
from .config import MaskedOptions
from .graph import GraphParameters, default_parameters
from .packing import wire_width
from .quantize import Quantizer, largest_safe_weight
from .server import MaskedAggregate, MaskedServer
from .stages import NAME, STAGES


class MaskedProtocol(Protocol):
    """Builds masked clients and servers sharing one validated MaskedOptions."""

    name = NAME
    stages = STAGES
    def __init__(self, options: MaskedOptions):
        self.options = options

    @property
    def min_clients(self) -> int:  # type: ignore[override]
        """The fewest clients a round may list: ``MaskedOptions.min_clients``, which every client enforces."""
        return self.options.min_clients

    def client(self, identity: Identity, roster: Roster, server_id: str = "server", *, session: str,
               state: Mapping[str, Any] | None = None) -> MaskedClient:
        return MaskedClient(self.options, identity, roster, server_id, session=session, state=state)

    def server(self, identity: Identity, roster: Roster, *, session: str,
               state: Mapping[str, Any] | None = None) -> MaskedServer:
        return MaskedServer(self.options, identity, roster, session=session, state=state)

    def check(self, num_clients: int, vector_length: int) -> None:
        super().check(num_clients, vector_length)
        self.options.round_terms(num_clients, vector_length)

    def bytes_per_parameter(self) -> float:
        return float(wire_width(self.options.modulus_bits))

    @property
    def quantizer(self) -> Quantizer:
        return self.options.quantizer


__all__ = ["GraphParameters", "MaskedAggregate", "MaskedClient", "MaskedOptions", "MaskedProtocol", "MaskedServer",
           "Quantizer", "default_parameters", "largest_safe_weight"]

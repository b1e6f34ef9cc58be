"""SecAgg+ masked aggregation (Bonawitz et al., CCS 2017; Bell et al., CCS 2020).

Stages: advertise_keys → share_keys → masked_input → consistency_check → unmask.
See docs/protocols.md for the message flow, the parameters and how to choose them.
"""

from __future__ import annotations

from ..base import Protocol
from ..identity import Identity, Roster
from .client import MaskedClient
from .config import MaskedConfig
from .graph import GraphParameters, default_parameters
from .quantize import Quantizer, largest_safe_weight
from .server import MaskedAggregate, MaskedServer
from .stages import NAME, STAGES


class MaskedProtocol(Protocol):
    """Builds masked clients and servers sharing one validated MaskedConfig."""

    name = NAME
    stages = STAGES
    min_clients = 2  # the sum of one client's input is that input

    def __init__(self, **options):
        self.config = MaskedConfig(**options)

    def client(self, identity: Identity, roster: Roster, server_id: str = "server") -> MaskedClient:
        return MaskedClient(self.config, identity, roster, server_id)

    def server(self, identity: Identity, roster: Roster) -> MaskedServer:
        return MaskedServer(self.config, identity, roster)

    def check(self, num_clients: int, vector_length: int) -> None:
        super().check(num_clients, vector_length)
        self.config.round_terms(num_clients, vector_length)

    def bytes_per_parameter(self) -> float:
        return float(self.config.word_dtype.itemsize)

    @property
    def quantizer(self) -> Quantizer:
        return self.config.quantizer


__all__ = ["GraphParameters", "MaskedAggregate", "MaskedClient", "MaskedConfig", "MaskedProtocol", "MaskedServer",
           "Quantizer", "default_parameters", "largest_safe_weight"]

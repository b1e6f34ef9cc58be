"""Secure aggregation protocols: masked (SecAgg+), homomorphic (CKKS) and the insecure plain reference.

A package of its own: it works on flat numeric vectors with numpy and ``cryptography`` (TenSEAL
for the HE protocol, imported only when used) and never imports torch or ``feddat_secure``, so
it can be reviewed and deployed on its own. Parties are state machines exchanging signed,
canonical messages (``wire``); ``simulate_round`` runs a whole round in one process.
"""

from .base import (
    PROTOCOLS,
    AggregateResult,
    ClientSession,
    KeyHolderSession,
    Outgoing,
    Protocol,
    ServerSession,
    make_protocol,
)
from .errors import ConfigurationError, MessageRejected, ProtocolError, RoundAborted
from .identity import (
    KEYHOLDER_ID,
    SERVER_ID,
    Identity,
    Roster,
    RosterEntry,
    create_identities,
    load_identity,
    load_roster,
)
from .simulation import drive_round, setup_keyholder, simulate_round
from .wire import MAX_MESSAGE_BYTES, Envelope, decode, encode, expect

__all__ = [
    "KEYHOLDER_ID", "MAX_MESSAGE_BYTES", "PROTOCOLS", "SERVER_ID", "AggregateResult", "ClientSession",
    "ConfigurationError", "Envelope", "Identity", "KeyHolderSession", "MessageRejected", "Outgoing", "Protocol",
    "ProtocolError", "Roster", "RosterEntry", "RoundAborted", "ServerSession", "create_identities", "decode",
    "drive_round", "encode", "expect", "load_identity", "load_roster", "make_protocol", "setup_keyholder",
    "simulate_round",
]

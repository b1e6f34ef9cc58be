"""Secure aggregation protocols: masked (SecAgg+), homomorphic (CKKS) and the insecure plain reference.

A package of its own: it works on flat numeric vectors with numpy and ``cryptography`` (TenSEAL
for the HE protocol, imported only when used) and never imports torch or ``feddat_secure``, so
it can be reviewed and deployed on its own. Parties are state machines exchanging signed,
canonical messages (``wire``) within one session; ``registry`` builds protocols by name;
``simulate_round`` runs a whole round in one process.
"""

from .base import AggregateResult, ClientSession, KeyHolderSession, Outgoing, Protocol, ServerSession
from .enrolment import build_roster, enrol_parties, load_party_identity, read_enrolment, save_party_identity
from .errors import ConfigurationError, MessageRejected, ProtocolError, RoundAborted
from .identity import (
    KEYHOLDER_ID,
    SERVER_ID,
    Identity,
    Roster,
    RosterEntry,
    load_roster,
)
from .registry import make_protocol, options_class, register_protocol, registered_protocols
from .simulation import drive_round, setup_keyholder, simulate_round
from .wire import MAX_MESSAGE_BYTES, Envelope, check_session_id, decode, encode, expect, new_session_id, peek

__all__ = [
    "KEYHOLDER_ID", "MAX_MESSAGE_BYTES", "SERVER_ID", "AggregateResult", "ClientSession", "ConfigurationError",
    "Envelope", "Identity", "KeyHolderSession", "MessageRejected", "Outgoing", "Protocol", "ProtocolError", "Roster",
    "RosterEntry", "RoundAborted", "ServerSession", "build_roster", "check_session_id", "decode", "drive_round",
    "encode", "enrol_parties", "expect", "load_party_identity", "load_roster", "make_protocol", "new_session_id",
    "options_class", "peek", "read_enrolment", "register_protocol", "registered_protocols", "save_party_identity",
    "setup_keyholder", "simulate_round",
]

"""The party interface every protocol implements, and the registry that builds protocols by name.

Parties are transport-agnostic state machines: they consume serialized messages and return the
messages to send (``Outgoing``). Who carries the bytes (the in-process driver in
``simulation.py``, or a real network) is not their concern, and neither is time: a stage closes
when the caller calls ``ServerSession.advance``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigurationError, ProtocolError
from .identity import Identity, Roster

PROTOCOLS = ("plain", "masked", "he")


@dataclass(frozen=True)
class Outgoing:
    """A serialized message and the party id it is for."""

    recipient: str
    data: bytes


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """The round output: ``vector`` = Σ w_i·x_i over the ``counted`` clients, weights summing to ``total_weight``."""

    vector: np.ndarray
    counted: tuple[str, ...]
    total_weight: float


class ClientSession(ABC):
    """One client's side of a protocol; lives across rounds."""

    party_id: str

    @abstractmethod
    def set_input(self, round_id: int, vector: np.ndarray, weight: float) -> None:
        """This round's input. Checked here (1-D, numeric, finite): a bad input raises ProtocolError on
        the client, before anything derived from it is masked, encrypted or sent."""

    @abstractmethod
    def handle(self, data: bytes) -> list[Outgoing]:
        """Consume one message and return the answers. Bad, replayed or unexpected input raises
        MessageRejected and leaves the session as it was."""


class ServerSession(ABC):
    """The server's side of a protocol; one per run, one round at a time."""

    stages: tuple[str, ...]
    stage: str
    round_done: bool

    @abstractmethod
    def begin_round(self, round_id: int, clients: Sequence[str], vector_length: int) -> list[Outgoing]:
        """Start a round with these clients (roster ids); returns the first stage's messages."""

    @abstractmethod
    def receive(self, data: bytes) -> None:
        """One client message for the current stage. A bad one raises MessageRejected and changes
        nothing; its sender then counts as dropped for this stage."""

    @abstractmethod
    def advance(self) -> list[Outgoing]:
        """Close the current stage (everyone live answered, or its deadline passed) and return the
        next stage's messages. Raises RoundAborted when the round can no longer succeed."""

    @abstractmethod
    def result(self) -> AggregateResult:
        """The aggregate, once ``round_done``."""


class KeyHolderSession(ABC):
    """The party that holds a decryption key the server must not have (the HE protocol only)."""

    @abstractmethod
    def setup(self, recipients: Sequence[str]) -> list[Outgoing]:
        """Messages that give ``recipients`` what they need before any round (a signed public context)."""

    @abstractmethod
    def handle(self, data: bytes) -> list[Outgoing]:
        """Consume one message and return the answers (MessageRejected as for clients)."""


class Protocol(ABC):
    """A configured protocol: builds the parties and knows its stage names and limits."""

    name: str
    stages: tuple[str, ...]
    needs_keyholder: bool = False
    insecure: bool = False
    min_clients: int = 1  # the fewest clients a round can aggregate

    @abstractmethod
    def client(self, identity: Identity, roster: Roster, server_id: str = "server") -> ClientSession: ...

    @abstractmethod
    def server(self, identity: Identity, roster: Roster) -> ServerSession: ...

    def keyholder(self, identity: Identity, roster: Roster) -> KeyHolderSession | None:
        return None

    def check(self, num_clients: int, vector_length: int) -> None:
        """Raise ConfigurationError if a round with these sizes cannot work (overflow, too few clients)."""
        if num_clients < 1:
            raise ConfigurationError(f"a round needs at least one client, not {num_clients}")
        if vector_length < 1:
            raise ConfigurationError(f"vectors must have at least one entry, not {vector_length}")

    def bytes_per_parameter(self) -> float:
        """Bytes each client uploads per vector entry (the dominant message), for reports."""
        raise NotImplementedError


def checked_input(vector: object, weight: object) -> tuple[np.ndarray, float]:
    """A client's input as a float64 copy and its weight; refuses what no protocol can aggregate.

    Runs on the client before anything is derived from the input, so a NaN or inf never
    reaches a mask or a ciphertext.
    """
    array = np.asarray(vector)
    if array.ndim != 1 or array.size == 0:
        raise ProtocolError(f"an input must be a non-empty 1-D vector, not shape {array.shape}")
    if array.dtype.kind not in "iuf":
        raise ProtocolError(f"an input must be numeric, not {array.dtype}")
    array = array.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ProtocolError(f"the input holds {bad.size} NaN or infinite entries (first at index {bad[0]}); "
                            "refusing it before anything is sent")
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.integer | np.floating):
        raise ProtocolError(f"a weight must be a number, not {type(weight).__name__}")
    weight = float(weight)
    if not np.isfinite(weight) or weight <= 0:
        raise ProtocolError(f"a weight must be finite and positive, not {weight}")
    return array, weight


def checked_round(roster: Roster, round_id: object, clients: Sequence[str], vector_length: object) -> tuple[str, ...]:
    """Validate a server's ``begin_round`` arguments; returns the clients as a tuple."""
    if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < 0:
        raise ConfigurationError(f"round ids are integers >= 0, not {round_id!r}")
    if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
        raise ConfigurationError(f"vector_length must be a positive integer, not {vector_length!r}")
    clients = tuple(clients)
    if not clients:
        raise ConfigurationError("a round needs at least one client")
    if len(set(clients)) != len(clients):
        raise ConfigurationError("a round lists some client twice")
    strangers = [client for client in clients if client not in roster or roster.role(client) != "client"]
    if strangers:
        raise ConfigurationError(f"not enrolled as clients on the roster: {', '.join(map(repr, strangers))}")
    return clients


def _plain(**options) -> Protocol:
    from .plain import PlainProtocol

    return PlainProtocol(**options)


def _masked(**options) -> Protocol:
    from .masked import MaskedProtocol

    return MaskedProtocol(**options)


def _he(**options) -> Protocol:
    module = importlib.import_module("protocols.he")  # lazily: TenSEAL is heavy and only the HE runs need it
    return module.HEProtocol(**options)


_FACTORIES: dict[str, Callable[..., Protocol]] = {"plain": _plain, "masked": _masked, "he": _he}


def make_protocol(name: str, **options) -> Protocol:
    """Build the protocol ``name`` ("plain" | "masked" | "he") from its options.

    Every protocol accepts ``seed`` (the non-cryptographic randomness: graph, stochastic rounding)
    besides its own options; unknown options raise ConfigurationError.
    """
    if name not in _FACTORIES:
        raise ConfigurationError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    try:
        return _FACTORIES[name](**options)
    except TypeError as error:
        if "keyword argument" not in str(error):
            raise
        raise ConfigurationError(f"protocol {name!r}: {error}") from None

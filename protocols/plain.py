"""The INSECURE reference protocol: clients send their weighted vectors in the clear.

It exists to measure the cost of the secure protocols against, and to test the shared
machinery (identities, wire format, driver) on its own. The server sees every input.
Messages are still signed and validated like everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import (
    AggregateResult,
    ClientSession,
    Outgoing,
    Protocol,
    ServerSession,
    checked_input,
    checked_round,
)
from .errors import MessageRejected, RoundAborted
from .identity import Identity, Roster
from .wire import Envelope, decode, encode, expect

NAME = "plain"
INPUT = "input"


@dataclass(frozen=True)
class PlainProtocol(Protocol):
    """Insecure: the server learns every client's weighted input."""

    seed: int = 0  # accepted like every protocol's; nothing here is random
    name = NAME
    stages = (INPUT,)
    insecure = True

    def client(self, identity: Identity, roster: Roster, server_id: str = "server") -> PlainClient:
        return PlainClient(identity, roster, server_id)

    def server(self, identity: Identity, roster: Roster) -> PlainServer:
        return PlainServer(identity, roster)

    def bytes_per_parameter(self) -> float:
        return 8.0


class PlainClient(ClientSession):
    def __init__(self, identity: Identity, roster: Roster, server_id: str):
        self.party_id = identity.party_id
        self._identity, self._roster, self._server_id = identity, roster, server_id
        self._inputs: dict[int, tuple[np.ndarray, float]] = {}

    def set_input(self, round_id: int, vector: np.ndarray, weight: float) -> None:
        self._inputs = {round_id: checked_input(vector, weight)}

    def handle(self, data: bytes) -> list[Outgoing]:
        envelope = expect(decode(data, self._roster), protocol=NAME, stage=INPUT, sender=self._server_id,
                          recipient=self.party_id)
        if envelope.round not in self._inputs:
            raise MessageRejected(f"no input is waiting for round {envelope.round} (replayed or stale request)",
                                  envelope.sender)
        vector, weight = self._inputs[envelope.round]
        if envelope.fields != {"vector_length": len(vector)}:
            raise MessageRejected(f"request does not match this client's input of length {len(vector)}: "
                                  f"{dict(envelope.fields)}", envelope.sender)
        del self._inputs[envelope.round]  # answer once: a replayed request finds nothing
        answer = Envelope(NAME, envelope.round, INPUT, self.party_id, self._server_id, {"weight": weight},
                          {"vector": vector * weight})
        return [Outgoing(self._server_id, encode(answer, self._identity))]


class PlainServer(ServerSession):
    stages = (INPUT,)

    def __init__(self, identity: Identity, roster: Roster):
        self._identity, self._roster = identity, roster
        self.stage = INPUT
        self.round_done = False
        self._round = -1
        self._clients: tuple[str, ...] = ()
        self._length = 0
        self._received: dict[str, tuple[np.ndarray, float]] = {}

    def begin_round(self, round_id: int, clients: Sequence[str], vector_length: int) -> list[Outgoing]:
        clients = checked_round(self._roster, round_id, clients, vector_length)
        self._round, self._clients, self._length = round_id, clients, vector_length
        self._received, self.stage, self.round_done = {}, INPUT, False
        me = self._identity.party_id
        return [Outgoing(c, encode(Envelope(NAME, round_id, INPUT, me, c, {"vector_length": vector_length}),
                                   self._identity)) for c in clients]

    def receive(self, data: bytes) -> None:
        if self.round_done:
            raise MessageRejected("the round is over")
        envelope = expect(decode(data, self._roster), protocol=NAME, round=self._round, stage=INPUT,
                          recipient=self._identity.party_id)
        sender = envelope.sender
        if sender not in self._clients:
            raise MessageRejected("not a client of this round", sender)
        if sender in self._received:
            raise MessageRejected("duplicate input", sender)
        vector = envelope.arrays.get("vector")
        if set(envelope.arrays) != {"vector"} or envelope.blobs or vector.dtype != np.float64 \
                or vector.shape != (self._length,):
            raise MessageRejected(f"expected one float64 array 'vector' of length {self._length}", sender)
        weight = envelope.fields.get("weight")
        if set(envelope.fields) != {"weight"} or isinstance(weight, bool) or not isinstance(weight, int | float) \
                or not np.isfinite(weight) or weight <= 0:
            raise MessageRejected("expected the field 'weight', a positive number", sender)
        if not np.isfinite(vector).all():
            raise MessageRejected("the vector holds NaN or infinite entries", sender)
        self._received[sender] = (vector, float(weight))

    def advance(self) -> list[Outgoing]:
        if self.round_done:
            raise RoundAborted(self.stage, "the round is already over", self._round)
        if not self._received:
            raise RoundAborted(INPUT, "no client sent its input", self._round)
        self.round_done = True
        return []

    def result(self) -> AggregateResult:
        if not self.round_done:
            raise RoundAborted(self.stage, "the round has not finished", self._round)
        counted = tuple(sorted(self._received))
        total = np.zeros(self._length)
        for client in counted:
            total += self._received[client][0]
        return AggregateResult(total, counted, sum(self._received[c][1] for c in counted))

"""The INSECURE reference protocol: clients send their weighted vectors in the clear.

It exists to measure the cost of the secure protocols against, and to test the shared
machinery (identities, wire format, driver) on its own. The server sees every input.
Messages are still signed and validated like everywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import (
    AggregateResult,
    ClientSession,
    Outgoing,
    Protocol,
    ServerSession,
    checked_context,
    checked_input,
    checked_round,
    export_inputs,
    import_inputs,
)
from .errors import MessageRejected, RoundAborted
from .identity import Identity, Roster
from .wire import expect

NAME = "plain"
INPUT = "input"


REQUEST_BYTES = 1 << 16  # a request (and an input's header and signature) is far smaller; an input adds 8 B a value


@dataclass(frozen=True)
class PlainOptions:
    """Nothing to configure. ``seed`` is accepted because the runner passes one to every protocol; nothing
    here is random."""

    seed: int | None = field(default=0, metadata={"runtime": True})


class PlainProtocol(Protocol):
    """Insecure: the server learns every client's weighted input."""

    name = NAME
    stages = (INPUT,)
    insecure = True

    def __init__(self, options: PlainOptions):
        self.options = options

    def client(self, identity: Identity, roster: Roster, server_id: str = "server", *, session: str,
               state: Mapping[str, Any] | None = None) -> PlainClient:
        return PlainClient(self.options, identity, roster, server_id, session=session, state=state)

    def server(self, identity: Identity, roster: Roster, *, session: str,
               state: Mapping[str, Any] | None = None) -> PlainServer:
        return PlainServer(self.options, identity, roster, session=session, state=state)

    def bytes_per_parameter(self) -> float:
        return 8.0


class PlainClient(ClientSession):
    protocol_name = NAME

    def __init__(self, options: PlainOptions, identity: Identity, roster: Roster, server_id: str, *, session: str,
                 state: Mapping[str, Any] | None = None):
        super().__init__(identity, roster, session, options)
        self._server_id = server_id
        self._inputs: dict[int, tuple[np.ndarray, float]] = {}
        self._context = ""
        self._load(state)

    def set_input(self, round_id: int, vector: np.ndarray, weight: float, *, round_context: str = "") -> int:
        self._inputs, self._context = {round_id: checked_input(vector, weight)}, checked_context(round_context)
        return 0

    def handle(self, data: bytes) -> list[Outgoing]:
        envelope = expect(self._decode(data, max_bytes=REQUEST_BYTES), protocol=NAME, stage=INPUT,
                          sender=self._server_id, recipient=self.party_id)
        if envelope.round not in self._inputs:
            raise MessageRejected(f"no input is waiting for round {envelope.round} (replayed or stale request)",
                                  envelope.sender)
        vector, weight = self._inputs[envelope.round]
        if envelope.fields != {"vector_length": len(vector), "round_context": self._context}:
            raise MessageRejected(f"request does not match this client's input of length {len(vector)}: "
                                  f"{dict(envelope.fields)}", envelope.sender)
        del self._inputs[envelope.round]  # answer once: a replayed request finds nothing
        return [self._send(self._envelope(envelope.round, INPUT, self._server_id, {"weight": weight},
                                          {"vector": vector * weight}))]

    def _export(self) -> dict[str, Any]:
        return {"inputs": export_inputs(self._inputs), "round_context": self._context}

    def _import(self, state: Mapping[str, Any]) -> None:
        self._inputs, self._context = import_inputs(state["inputs"]), checked_context(state["round_context"])


class PlainServer(ServerSession):
    protocol_name = NAME
    stages = (INPUT,)

    def __init__(self, options: PlainOptions, identity: Identity, roster: Roster, *, session: str,
                 state: Mapping[str, Any] | None = None):
        super().__init__(identity, roster, session, options)
        self.stage = INPUT
        self.round_done = False
        self._round = -1
        self._clients: tuple[str, ...] = ()
        self._length = 0
        self._received: dict[str, tuple[np.ndarray, float]] = {}
        self._load(state)

    def begin_round(self, round_id: int, clients: Sequence[str], vector_length: int, *,
                    round_context: str = "") -> list[Outgoing]:
        clients = checked_round(self._roster, round_id, clients, vector_length)
        fields = {"vector_length": vector_length, "round_context": checked_context(round_context)}
        self._round, self._clients, self._length = round_id, clients, vector_length
        self._received, self.stage, self.round_done = {}, INPUT, False
        return [self._send(self._envelope(round_id, INPUT, client, fields))
                for client in clients]

    def receive(self, data: bytes) -> None:
        if self.round_done:
            raise MessageRejected("the round is over")
        envelope = expect(self._decode(data, max_bytes=REQUEST_BYTES + 8 * self._length), protocol=NAME,
                          round=self._round, stage=INPUT,
                          recipient=self.party_id)
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

    def _export(self) -> dict[str, Any]:
        return {"round": self._round, "clients": list(self._clients), "vector_length": self._length,
                "round_done": self.round_done,
                "received": {client: {"vector": vector.copy(), "weight": weight}
                             for client, (vector, weight) in self._received.items()}}

    def _import(self, state: Mapping[str, Any]) -> None:
        self._round, self._clients = int(state["round"]), tuple(state["clients"])
        self._length, self.round_done = int(state["vector_length"]), bool(state["round_done"])
        self._received = {client: (np.array(item["vector"], dtype=np.float64), float(item["weight"]))
                          for client, item in state["received"].items()}

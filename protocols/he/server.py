"""The server: collects commitments, then the ciphertexts revealed against them, adds them up, asks the key
holder to draw a committee from the clients it counted, relays the key holder's committee announcement and
every counted input to the members, and asks the key holder to decrypt the sum the committee co-signed.

It never holds a secret key. It keeps one running sum (serialized and hashed once, when the verify stage opens:
every attestation and the aggregate reuse those bytes), and each counted input verbatim, in a file of its own
(spool.py), from the input stage until it has relayed them to the committee in the verify stage (the price of a
committee that recomputes the sum). Its memory is therefore constant in the number of clients: the running sum
and the one input in flight, which it hashes once (against the receipt), then parses, checks and adds chunk by
chunk (``ckks.add_ciphertexts``), and writes once to its file; a relayed input is read back from its file only
when the transport sends it. Any failure inside a step is a MessageRejected (the message is refused, nothing
changes) or a RoundAborted (the spooled inputs are then deleted): nothing else leaves the server.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import tenseal as ts

from ..base import AggregateResult, Outgoing, ServerSession, array_bytes, bytes_array, checked_context, checked_round
from ..errors import ConfigurationError, MessageRejected, ProtocolError, RoundAborted
from ..identity import Identity, Roster
from ..wire import Envelope, expect
from . import ckks, messages
from .chunks import Layout, ciphertexts_commitment, ciphertexts_digest
from .config import HEOptions
from .messages import (
    AGGREGATE,
    ATTEST,
    ATTEST_PREFIX,
    COMMIT,
    COMMITTED,
    COMMITTEE,
    CONTEXT,
    DECRYPT,
    DRAW,
    INPUT,
    NAME,
    RECEIPT,
    RECEIPT_PREFIX,
    RESULT,
    SETUP,
    STAGES,
    VERIFY,
)
from .spool import Spool

T = TypeVar("T")


def _contained(method: Callable[..., T]) -> Callable[..., T]:
    """Any error other than the protocol's own inside a server step becomes a protocol error naming it: a
    MessageRejected in ``receive`` (that message is refused, the round goes on), a RoundAborted in ``advance``."""
    @functools.wraps(method)
    def step(self: HEServer, *args: Any) -> T:
        try:
            return method(self, *args)
        except ProtocolError:
            raise
        except Exception as error:  # noqa: BLE001 (the point: nothing but a protocol error leaves a step)
            reason = f"internal error: {type(error).__name__}: {error}"
            if method.__name__ == "receive":
                raise MessageRejected(reason) from None
            raise RoundAborted(self.stage, reason, self._round) from None
    return step


class HEServer(ServerSession):
    protocol_name = NAME
    stages = STAGES

    def __init__(self, options: HEOptions, identity: Identity, roster: Roster, *, session: str,
                 state: Mapping[str, Any] | None = None):
        if roster.keyholder_id is None:
            raise ConfigurationError("the HE protocol needs a key holder on the roster")
        super().__init__(identity, roster, session, options)
        self._keyholder = roster.keyholder_id
        self.stage, self.round_done = COMMIT, False
        self._round, self._clients, self._layout, self._round_context = -1, (), Layout(1, options.slots), ""
        self._inputs = Spool()  # each counted input, verbatim, in a file of its own until relayed to the committee
        self._reset()
        self._load(state)

    def _reset(self) -> None:
        self._context: ts.Context | None = None
        self._context_bytes = b""  # as the key holder sent it: the saved state keeps it, not the parsed context
        self._context_digest = ""
        self._committee: tuple[str, ...] = ()  # drawn by the key holder after the input stage
        self._announcement = b""  # the key holder's signed committee announcement, forwarded to the members
        self._receipts: dict[str, bytes] = {}  # every committed client's receipt
        self._promised: dict[str, str] = {}  # each committed client's ciphertexts digest, read from its receipt
        self._committed: list[list[str]] = []  # the list shown to the clients, fixed when the input stage opens
        self._committed_digest = ""  # ... and its digest, which every input and attestation must carry
        self._inputs.clear()
        self._counted: tuple[str, ...] = ()  # the counted clients, fixed when the draw is requested
        self._sum: list[ts.sealapi.Ciphertext] = []  # the running sum, until the verify stage opens
        self._sum_blobs: list[bytes] = []  # the sum serialized once there, until sent for decryption ...
        self._sum_digest = ""  # ... and its digest, which every attestation must carry
        self._attestations: dict[str, bytes] = {}
        self._result: AggregateResult | None = None

    @property
    def _required(self) -> int:
        return self.options.required(len(self._clients))

    def begin_round(self, round_id: int, clients: Sequence[str], vector_length: int, *,
                    round_context: str = "") -> list[Outgoing]:
        """Ask the key holder for this round's public context (it sends it to the clients and to us)."""
        clients = checked_round(self._roster, round_id, clients, vector_length)
        round_context = checked_context(round_context)
        self._clients, self._round_context = clients, round_context
        self._round, self._layout = round_id, Layout(vector_length, self.options.slots)
        self._reset()
        self.stage, self.round_done = COMMIT, False
        return [self._send(self._envelope(round_id, SETUP, self._keyholder,
                                          {"clients": list(clients), "vector_length": vector_length,
                                           "round_context": round_context}))]

    def _limit(self) -> int:
        cohort = len(self._clients)
        if self.stage == COMMIT:
            return messages.context_limit(self.options, cohort)
        if self.stage == INPUT:
            return messages.ciphertexts_limit(ckks.fresh_ciphertext_bytes(self.options), self._layout.num_chunks,
                                              cohort)
        if self.stage == DECRYPT:
            return messages.small_limit(cohort) + 16 * self._layout.vector_length
        return messages.small_limit(cohort)

    @_contained
    def receive(self, data: bytes) -> None:
        if self.round_done:
            raise MessageRejected("the round is over")
        envelope = expect(self._decode(data, max_bytes=self._limit()), protocol=NAME, round=self._round,
                          recipient=self._keyholder if self.stage == VERIFY else self.party_id)
        handlers = {(COMMIT, CONTEXT): self._receive_context, (COMMIT, COMMIT): self._receive_commit,
                    (INPUT, INPUT): self._receive_input, (DRAW, COMMITTEE): self._receive_committee,
                    (VERIFY, ATTEST): self._receive_attestation, (DECRYPT, RESULT): self._receive_result}
        handler = handlers.get((self.stage, envelope.stage))
        if handler is None:
            raise MessageRejected(f"unexpected {envelope.stage!r} message in stage {self.stage!r}", envelope.sender)
        handler(envelope, data)

    def _receive_context(self, envelope: Envelope, data: bytes) -> None:
        expect(envelope, sender=self._keyholder)
        if self._context is not None:
            raise MessageRejected("this round's context has already arrived", envelope.sender)
        messages.check_context_fields(envelope, self.options, self._clients, self._layout.vector_length,
                                      self._round_context)
        self._context = ckks.load_public_context(envelope.blobs["context"], self.options, envelope.sender)
        self._context_bytes = envelope.blobs["context"]
        self._context_digest = ckks.digest(envelope.blobs["context"])

    def _client_message(self, envelope: Envelope) -> str:
        sender = envelope.sender
        if sender not in self._clients:
            raise MessageRejected("not a client of this round", sender)
        if self._context is None:
            raise MessageRejected("no public context for this round yet", sender)
        return sender

    def _receive_commit(self, envelope: Envelope, data: bytes) -> None:
        sender = self._client_message(envelope)
        if sender in self._receipts:
            raise MessageRejected("duplicate commitment", sender)
        if envelope.fields or set(envelope.blobs) != {"receipt"} or envelope.arrays:
            raise MessageRejected("a commitment carries exactly the blob 'receipt'", sender)
        try:
            receipt = expect(self._decode(envelope.blobs["receipt"], max_bytes=messages.small_limit(1)),
                             protocol=NAME, round=self._round, stage=RECEIPT, sender=sender,
                             recipient=self._keyholder)
            messages.check_receipt(receipt, self._context_digest, self._layout.vector_length, self._round_context)
        except MessageRejected as rejection:
            raise MessageRejected(f"bad receipt: {rejection.reason}", sender) from None
        self._receipts[sender], self._promised[sender] = envelope.blobs["receipt"], receipt.fields["ciphertexts"]

    def _receive_input(self, envelope: Envelope, data: bytes) -> None:
        sender = self._client_message(envelope)
        if sender not in self._receipts:
            raise MessageRejected("an input from a client that did not commit", sender)
        if sender in self._inputs:
            raise MessageRejected("duplicate input", sender)
        if envelope.fields != {"chunks": self._layout.num_chunks, "committed": self._committed_digest}:
            raise MessageRejected(f"expected the fields 'chunks' = {self._layout.num_chunks} and 'committed' = the "
                                  "digest of the committed list sent", sender)
        blobs = messages.chunk_blobs(envelope, self._layout.num_chunks, set())
        # decode verified the payload against its signed digest: the commitment is checked from that digest
        if ciphertexts_commitment([len(blob) for blob in blobs], envelope.payload) != self._promised[sender]:
            raise MessageRejected("the ciphertexts are not those the client committed to", sender)
        first, summed = not self._sum, False
        try:
            with self._inputs.writing(sender, data):  # to its file, meanwhile; refused, nothing of it stays
                self._sum = ckks.add_ciphertexts(self._sum, self._context, blobs, self._layout.chunk_sizes(),
                                                 self.options, sender,
                                                 [messages.chunk_name(index) for index in range(len(blobs))])
                summed = True
        except BaseException:
            if summed:  # added, but its file was not written (a full disk): not counted, so taken out of the sum
                self._sum = [] if first else ckks.subtract_ciphertexts(self._sum, self._context, blobs)
            raise

    def _receive_committee(self, envelope: Envelope, data: bytes) -> None:
        expect(envelope, sender=self._keyholder)
        if self._committee:
            raise MessageRejected("this round's committee has already been announced", envelope.sender)
        self._committee = messages.check_announcement(envelope, self.options, self._counted, self._committed_digest,
                                                      self._round_context)
        self._announcement = data

    def _receive_attestation(self, envelope: Envelope, data: bytes) -> None:
        member = envelope.sender
        if member not in self._committee:
            raise MessageRejected("an attestation from a party that is not on this round's committee", member)
        if member in self._attestations:
            raise MessageRejected("duplicate attestation", member)
        expected = {"counted": list(self._counted), "committed": self._committed_digest, "sum": self._sum_digest,
                    "round_context": self._round_context}
        if dict(envelope.fields) != expected or envelope.blobs or envelope.arrays:
            raise MessageRejected("the attestation is not for the counted inputs, the committed list and the sum "
                                  "this server computed", member)
        self._attestations[member] = data

    def _receive_result(self, envelope: Envelope, data: bytes) -> None:
        expect(envelope, sender=self._keyholder)
        counted = list(self._counted)
        vector = envelope.arrays.get("sum")
        weight = envelope.fields.get("total_weight")
        if (set(envelope.fields) != {"counted", "total_weight"} or envelope.fields["counted"] != counted
                or isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0
                or set(envelope.arrays) != {"sum"} or vector.dtype != np.float64
                or vector.shape != (self._layout.vector_length,) or not np.isfinite(vector).all() or envelope.blobs):
            raise MessageRejected("the result does not match the aggregate sent (counted clients, a float64 'sum' "
                                  "of the vector length, a positive 'total_weight')", envelope.sender)
        self._result = AggregateResult(vector, self._counted, float(weight))
        self.round_done = True

    @_contained
    def advance(self) -> list[Outgoing]:
        try:
            return self._advance()
        except Exception:  # the round is over (RoundAborted, directly or by _contained): its spooled inputs go at once
            self._inputs.clear()
            raise

    def _advance(self) -> list[Outgoing]:
        if self.round_done:
            raise RoundAborted(self.stage, "the round is already over", self._round)
        if self._context is None:
            raise RoundAborted(self.stage, "the key holder sent no public context", self._round)
        if self.stage == COMMIT:
            return self._open_inputs()
        if self.stage == INPUT:
            return self._request_draw()
        if self.stage == DRAW:
            return self._open_verification()
        if self.stage == VERIFY:
            return self._request_decryption()
        raise RoundAborted(DECRYPT, "the key holder released no aggregate (it refused it, or never answered)",
                           self._round)

    def _enough(self, count: int, what: str) -> None:
        if count < self._required:
            raise RoundAborted(self.stage, f"only {count} of {len(self._clients)} clients {what}; at least "
                               f"{self._required} = max(min_clients, ⌈min_fraction · cohort⌉) are needed",
                               self._round)

    def _open_inputs(self) -> list[Outgoing]:
        """Show every committed client the list of all commitments; they reveal against it."""
        self._enough(len(self._receipts), "committed")
        committed = [[client, messages.digest(self._receipts[client])] for client in sorted(self._receipts)]
        requests = [self._send(self._envelope(self._round, COMMITTED, client, {"committed": committed}))
                    for client in sorted(self._receipts)]
        self._committed, self._committed_digest, self.stage = committed, messages.committed_digest(committed), INPUT
        return requests

    def _request_draw(self) -> list[Outgoing]:
        """Fix the counted clients (and the committed list), then ask the key holder to draw the committee from
        them: drawn after this, the committee cannot be chosen by us, nor hold a client that dropped before."""
        self._enough(len(self._inputs), "revealed their input")
        counted = tuple(sorted(self._inputs))
        request = self._send(self._envelope(self._round, DRAW, self._keyholder,
                                            {"counted": list(counted), "committed": self._committed}))
        self._counted, self.stage = counted, DRAW
        return [request]

    def _open_verification(self) -> list[Outgoing]:
        """Forward the key holder's committee announcement and every counted input to each member, then ask it to
        attest. Input by input (each to every member in turn), so that each is read back from its file once."""
        if not self._committee:
            raise RoundAborted(DRAW, "the key holder drew no committee (it refused the draw, or never answered)",
                               self._round)
        if set(self._inputs) != set(self._counted):
            raise RoundAborted(DRAW, "the counted inputs are gone (the round aborted before, which deletes them)",
                               self._round)
        blobs = {RECEIPT_PREFIX + client: receipt for client, receipt in self._receipts.items()}
        outgoing = [Outgoing(member, self._announcement) for member in self._committee]
        outgoing.extend(self._inputs.outgoing(member, client) for client in self._counted for member in self._committee)
        outgoing.extend(self._send(self._envelope(self._round, VERIFY, member, {"counted": list(self._counted)},
                                                  blobs=blobs)) for member in self._committee)
        # the sum is final: serialized and hashed once, for every attestation and the aggregate (32 MB at P = 1M)
        self._sum_blobs = self._serialized_sum()
        self._sum_digest, self._sum, self.stage = ciphertexts_digest(self._sum_blobs), [], VERIFY
        return outgoing

    def _request_decryption(self) -> list[Outgoing]:
        missing = [member for member in self._committee if member not in self._attestations]
        if missing:
            raise RoundAborted(VERIFY, f"committee members {missing} did not attest the sum (every member must: a "
                               "member that drops after the draw aborts the round)", self._round)
        blobs = {messages.chunk_name(index): total for index, total in enumerate(self._sum_blobs)}
        blobs.update({RECEIPT_PREFIX + client: self._receipts[client] for client in self._counted})
        blobs.update({ATTEST_PREFIX + member: self._attestations[member] for member in self._committee})
        request = self._send(self._envelope(self._round, AGGREGATE, self._keyholder,
                                            {"counted": list(self._counted), "committed": self._committed},
                                            blobs=blobs))
        self._sum_blobs, self._sum_digest = [], ""  # sent: free the sum and the inputs
        self._inputs.clear()
        self.stage = DECRYPT
        return [request]

    def result(self) -> AggregateResult:
        if self._result is None:
            raise RoundAborted(self.stage, "the round has not finished", self._round)
        return self._result

    def _export(self) -> dict[str, Any]:
        result = self._result
        return {"stage": self.stage, "round_done": self.round_done, "round": self._round,
                "clients": list(self._clients), "vector_length": self._layout.vector_length,
                "round_context": self._round_context,
                "context": None if self._context is None else bytes_array(self._context_bytes),
                "committee": list(self._committee), "announcement": self._announcement.hex(),
                "receipts": {client: receipt.hex() for client, receipt in self._receipts.items()},
                "promised": dict(self._promised), "committed": [list(entry) for entry in self._committed],
                "committed_digest": self._committed_digest,
                "inputs": {client: bytes_array(data) for client, data in self._inputs.items()},
                "counted": list(self._counted), "sum": [bytes_array(total) for total in self._serialized_sum()],
                "sum_blobs": [bytes_array(total) for total in self._sum_blobs], "sum_digest": self._sum_digest,
                "attestations": {member: data.hex() for member, data in self._attestations.items()},
                "result": None if result is None else {"vector": result.vector.copy(), "counted": list(result.counted),
                                                       "total_weight": result.total_weight}}

    def _serialized_sum(self) -> list[bytes]:
        return ckks.serialize(self._sum, self._layout.chunk_sizes()) if self._sum else []

    def _import(self, state: Mapping[str, Any]) -> None:
        self.stage, self.round_done, self._round = str(state["stage"]), bool(state["round_done"]), int(state["round"])
        self._clients = tuple(state["clients"])
        self._layout = Layout(int(state["vector_length"]), self.options.slots)
        self._round_context = checked_context(state["round_context"])
        if state["context"] is not None:
            self._context_bytes = array_bytes(state["context"])
            self._context = ckks.load_public_context(self._context_bytes, self.options, self._keyholder)
            self._context_digest = ckks.digest(self._context_bytes)
            self._sum = [ckks.ciphertext_from_state(self._context, array_bytes(total)) for total in state["sum"]]
        self._committee, self._announcement = tuple(state["committee"]), bytes.fromhex(state["announcement"])
        self._receipts = {client: bytes.fromhex(receipt) for client, receipt in state["receipts"].items()}
        self._promised = {str(client): str(digest) for client, digest in state["promised"].items()}
        self._committed = [list(entry) for entry in state["committed"]]
        self._committed_digest = str(state["committed_digest"])
        self._inputs.clear()
        for client, data in state["inputs"].items():
            self._inputs.put(client, array_bytes(data))
        self._counted = tuple(state["counted"])
        self._sum_blobs = [array_bytes(total) for total in state["sum_blobs"]]
        self._sum_digest = str(state["sum_digest"])
        self._attestations = {member: bytes.fromhex(data) for member, data in state["attestations"].items()}
        result = state["result"]
        if result is not None:
            self._result = AggregateResult(np.array(result["vector"], dtype=np.float64), tuple(result["counted"]),
                                           float(result["total_weight"]))

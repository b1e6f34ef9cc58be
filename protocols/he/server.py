"""The server: adds ciphertexts as they arrive and asks the key holder to decrypt the sum. It never holds a
secret key, and its memory does not grow with the number of clients (one running sum plus a receipt each).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tenseal as ts

from ..base import AggregateResult, Outgoing, ServerSession, array_bytes, bytes_array, checked_round
from ..errors import ConfigurationError, MessageRejected, RoundAborted
from ..identity import Identity, Roster
from ..wire import Envelope, expect
from . import ckks, messages
from .chunks import Layout, ciphertexts_digest
from .config import HEOptions
from .messages import AGGREGATE, CONTEXT, DECRYPT, INPUT, NAME, RECEIPT, RECEIPT_PREFIX, RESULT, SETUP, STAGES


class HEServer(ServerSession):
    protocol_name = NAME
    stages = STAGES

    def __init__(self, options: HEOptions, identity: Identity, roster: Roster, *, session: str,
                 state: Mapping[str, Any] | None = None):
        if roster.keyholder_id is None:
            raise ConfigurationError("the HE protocol needs a key holder on the roster")
        super().__init__(identity, roster, session, options)
        self._keyholder = roster.keyholder_id
        self.stage, self.round_done = INPUT, False
        self._round, self._clients, self._layout = -1, (), Layout(1, options.slots)
        self._reset()
        self._load(state)

    def _reset(self) -> None:
        self._context: ts.Context | None = None
        self._context_bytes = b""  # as the key holder sent it: the saved state keeps it, not the parsed context
        self._context_digest = ""
        self._sum: list[ts.CKKSVector] = []
        self._receipts: dict[str, bytes] = {}
        self._result: AggregateResult | None = None

    def begin_round(self, round_id: int, clients: Sequence[str], vector_length: int) -> list[Outgoing]:
        """Ask the key holder for this round's public context (it sends it to the clients and to us)."""
        self._clients = checked_round(self._roster, round_id, clients, vector_length)
        self._round, self._layout = round_id, Layout(vector_length, self.options.slots)
        self._reset()
        self.stage, self.round_done = INPUT, False
        return [self._send(self._envelope(round_id, SETUP, self._keyholder,
                                          {"clients": list(self._clients), "vector_length": vector_length}))]

    def receive(self, data: bytes) -> None:
        if self.round_done:
            raise MessageRejected("the round is over")
        envelope = expect(self._decode(data), protocol=NAME, round=self._round, recipient=self.party_id)
        handlers = {(INPUT, CONTEXT): self._receive_context, (INPUT, INPUT): self._receive_input,
                    (DECRYPT, RESULT): self._receive_result}
        handler = handlers.get((self.stage, envelope.stage))
        if handler is None:
            raise MessageRejected(f"unexpected {envelope.stage!r} message in stage {self.stage!r}", envelope.sender)
        handler(envelope)

    def _receive_context(self, envelope: Envelope) -> None:
        expect(envelope, sender=self._keyholder)
        if self._context is not None:
            raise MessageRejected("this round's context has already arrived", envelope.sender)
        messages.check_context_fields(envelope, self.options, self._clients, self._layout.vector_length)
        self._context = ckks.load_public_context(envelope.blobs["context"], self.options, envelope.sender)
        self._context_bytes = envelope.blobs["context"]
        self._context_digest = ckks.digest(envelope.blobs["context"])

    def _receive_input(self, envelope: Envelope) -> None:
        sender = envelope.sender
        if sender not in self._clients:
            raise MessageRejected("not a client of this round", sender)
        if sender in self._receipts:
            raise MessageRejected("duplicate input", sender)
        if self._context is None:
            raise MessageRejected("no public context for this round yet", sender)
        if envelope.fields != {"chunks": self._layout.num_chunks}:
            raise MessageRejected(f"expected the field 'chunks' = {self._layout.num_chunks} (wrong vector length)",
                                  sender)
        blobs = messages.chunk_blobs(envelope, self._layout.num_chunks, {"receipt"})
        self._check_receipt(envelope.blobs["receipt"], sender, ciphertexts_digest(blobs))
        vectors = [ckks.load_ciphertext(self._context, blob, size, self.options, sender, messages.chunk_name(index))
                   for index, (blob, size) in enumerate(zip(blobs, self._layout.chunk_sizes()))]
        if self._sum:
            for total, vector in zip(self._sum, vectors):
                total += vector  # in place, sharing one context: never .copy() (it copies the context)
        else:
            self._sum = vectors
        self._receipts[sender] = envelope.blobs["receipt"]

    def _check_receipt(self, data: bytes, sender: str, ciphertexts: str) -> None:
        try:
            receipt = expect(self._decode(data), protocol=NAME, round=self._round, stage=RECEIPT,
                             sender=sender, recipient=self._keyholder)
        except MessageRejected as rejection:
            raise MessageRejected(f"bad receipt: {rejection.reason}", sender) from None
        expected = {"ciphertexts": ciphertexts, "context": self._context_digest,
                    "vector_length": self._layout.vector_length}
        if dict(receipt.fields) != expected or set(receipt.blobs) != {"seed"} or receipt.arrays:
            raise MessageRejected("the receipt does not match the ciphertexts, this round's context or the vector "
                                  "length", sender)

    def _receive_result(self, envelope: Envelope) -> None:
        expect(envelope, sender=self._keyholder)
        counted = sorted(self._receipts)
        vector = envelope.arrays.get("sum")
        weight = envelope.fields.get("total_weight")
        if (set(envelope.fields) != {"counted", "total_weight"} or envelope.fields["counted"] != counted
                or isinstance(weight, bool) or not isinstance(weight, int | float) or set(envelope.arrays) != {"sum"}
                or vector.dtype != np.float64 or vector.shape != (self._layout.vector_length,)
                or not np.isfinite(vector).all() or envelope.blobs):
            raise MessageRejected("the result does not match the aggregate sent (counted clients, a float64 'sum' "
                                  "of the vector length, a 'total_weight')", envelope.sender)
        self._result = AggregateResult(vector, tuple(counted), float(weight))
        self.round_done = True

    def advance(self) -> list[Outgoing]:
        if self.round_done:
            raise RoundAborted(self.stage, "the round is already over", self._round)
        if self.stage == DECRYPT:
            raise RoundAborted(DECRYPT, "the key holder released no aggregate (it refused it, or never answered)",
                               self._round)
        if self._context is None:
            raise RoundAborted(INPUT, "the key holder sent no public context", self._round)
        if len(self._receipts) < self.options.min_clients:
            raise RoundAborted(INPUT, f"only {len(self._receipts)} of {len(self._clients)} clients sent their input; "
                               f"at least min_clients = {self.options.min_clients} are needed", self._round)
        counted = sorted(self._receipts)
        blobs = {messages.chunk_name(index): total.serialize() for index, total in enumerate(self._sum)}
        blobs.update({RECEIPT_PREFIX + client: self._receipts[client] for client in counted})
        request = self._send(self._envelope(self._round, AGGREGATE, self._keyholder, {"counted": counted},
                                            blobs=blobs))
        self._sum = []  # the key holder has it now; free the memory
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
                "context": None if self._context is None else bytes_array(self._context_bytes),
                "sum": [bytes_array(total.serialize()) for total in self._sum],
                "receipts": {client: receipt.hex() for client, receipt in self._receipts.items()},
                "result": None if result is None else {"vector": result.vector.copy(), "counted": list(result.counted),
                                                       "total_weight": result.total_weight}}

    def _import(self, state: Mapping[str, Any]) -> None:
        self.stage, self.round_done, self._round = str(state["stage"]), bool(state["round_done"]), int(state["round"])
        self._clients = tuple(state["clients"])
        self._layout = Layout(int(state["vector_length"]), self.options.slots)
        if state["context"] is not None:
            self._context_bytes = array_bytes(state["context"])
            self._context = ckks.load_public_context(self._context_bytes, self.options, self._keyholder)
            self._context_digest = ckks.digest(self._context_bytes)
            self._sum = [ckks.ciphertext_from_state(self._context, array_bytes(total)) for total in state["sum"]]
        self._receipts = {client: bytes.fromhex(receipt) for client, receipt in state["receipts"].items()}
        result = state["result"]
        if result is not None:
            self._result = AggregateResult(np.array(result["vector"], dtype=np.float64), tuple(result["counted"]),
                                           float(result["total_weight"]))

"""The key holder: makes a fresh CKKS key every round and decrypts exactly one aggregate with it.

It decrypts only what the server presents as a sum together with the receipts of at least
``min_clients`` distinct clients of that round, each signed by that client, and only if the decrypted
canary slots equal the sum of those clients' canaries (chunks.py). Then it destroys the key. It never
sees an individual ciphertext. What it releases is rounded to ``config.output_step``.

Why a key per round: one secret key decrypts one ciphertext set, so what a decryption leaks about the key
(CKKS decryptions carry noise that depends on it) can never be combined across rounds, and a round whose
aggregate was refused can never be decrypted later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..base import KeyHolderSession, Outgoing, array_bytes, bytes_array
from ..errors import MessageRejected
from ..identity import Identity, Roster
from ..wire import Envelope, expect
from . import ckks, messages
from .chunks import SEED_BYTES, Layout
from .config import HEOptions
from .messages import AGGREGATE, CONTEXT, NAME, RECEIPT, RECEIPT_PREFIX, RESULT, SETUP
from .sealing import open_sealed, private_bytes, public_bytes


@dataclass
class _OpenRound:
    round_id: int
    clients: tuple[str, ...]
    layout: Layout
    context: ts.Context
    seal_key: X25519PrivateKey
    context_digest: str


class HEKeyHolder(KeyHolderSession):
    """Its ``state_dict()`` holds the open round's CKKS secret key and X25519 key: it is as secret as the key
    holder's identity key and must stay with the key holder, and only the latest one may be restored (an
    older one still holds a key that has since decrypted its one aggregate)."""

    protocol_name = NAME

    def __init__(self, options: HEOptions, identity: Identity, roster: Roster, *, session: str,
                 state: Mapping[str, Any] | None = None):
        super().__init__(identity, roster, session, options)
        self._last_round = -1
        self._open: _OpenRound | None = None
        self._load(state)

    def setup(self, recipients: Sequence[str]) -> list[Outgoing]:
        """Nothing before the first round: every round's public context comes with that round."""
        return []

    def handle(self, data: bytes) -> list[Outgoing]:
        envelope = expect(self._decode(data), protocol=NAME, recipient=self.party_id)
        if self._roster.role(envelope.sender) != "server":
            raise MessageRejected("only the server asks the key holder for keys or decryptions", envelope.sender)
        if envelope.stage == SETUP:
            return self._open_round(envelope)
        if envelope.stage == AGGREGATE:
            return self._decrypt(envelope)
        raise MessageRejected(f"unexpected stage {envelope.stage!r}", envelope.sender)

    def _open_round(self, envelope: Envelope) -> list[Outgoing]:
        """A fresh key for a new round; its public half goes, signed, to the server and the round's clients."""
        if envelope.round <= self._last_round:
            raise MessageRejected(f"round {envelope.round} is not after round {self._last_round}, the last one "
                                  "keys were made for (a retried round needs a new round id)", envelope.sender)
        clients, vector_length = messages.round_fields(envelope, self._roster)
        if set(envelope.fields) != {"clients", "vector_length"} or envelope.arrays or envelope.blobs:
            raise MessageRejected("a setup request carries exactly the fields 'clients' and 'vector_length'",
                                  envelope.sender)
        context = ckks.secret_context(self.options)
        public = ckks.public_context_bytes(context)
        seal_key = X25519PrivateKey.generate()
        self._open = _OpenRound(envelope.round, clients, Layout(vector_length, self.options.slots), context,
                                seal_key, ckks.digest(public))
        self._last_round = envelope.round  # replaces (and so destroys) the key of any unfinished round
        fields = {**messages.parameters(self.options), "clients": list(clients), "vector_length": vector_length}
        blobs = {"context": public, "seal_key": public_bytes(seal_key)}
        return [self._send(self._envelope(envelope.round, CONTEXT, recipient, fields, blobs=blobs))
                for recipient in (envelope.sender, *clients)]

    def _decrypt(self, envelope: Envelope) -> list[Outgoing]:
        state = self._open
        if state is None or state.round_id != envelope.round:
            raise MessageRejected(f"no key is open for round {envelope.round} (never made, superseded, or already "
                                  "used for its one decryption)", envelope.sender)
        counted = self._counted(envelope, state)
        blobs = messages.chunk_blobs(envelope, state.layout.num_chunks,
                                     {RECEIPT_PREFIX + client for client in counted})
        seeds = [self._seed(envelope.blobs[RECEIPT_PREFIX + client], client, state) for client in counted]
        if len(set(seeds)) != len(seeds):
            raise MessageRejected("two receipts carry the same seed (a copied contribution)", envelope.sender)
        vectors = [ckks.load_ciphertext(state.context, blob, size, self.options, envelope.sender,
                                        messages.chunk_name(index))
                   for index, (blob, size) in enumerate(zip(blobs, state.layout.chunk_sizes()))]

        self._open = None  # from here on this key is spent, whatever the outcome: one decryption per key
        sums, total_weight, canaries = state.layout.join([ckks.decrypt(vector) for vector in vectors])
        expected = np.sum([state.layout.canaries_from(seed) for seed in seeds], axis=0)
        miss = float(np.max(np.abs(canaries - expected)))
        if not miss <= self.options.output_step:
            raise MessageRejected(f"the aggregate is not the sum of the {len(counted)} listed contributions (canary "
                                  f"error {miss:.3g} > {self.options.output_step:.3g}); nothing is released and this "
                                  f"round's key is destroyed", envelope.sender)
        step = self.options.output_step
        released = np.round(sums / step) * step
        result = self._envelope(envelope.round, RESULT, envelope.sender,
                                {"counted": list(counted), "total_weight": float(np.round(total_weight / step) * step)},
                                {"sum": released})
        return [self._send(result)]

    def _counted(self, envelope: Envelope, state: _OpenRound) -> list[str]:
        counted = envelope.fields.get("counted")
        if set(envelope.fields) != {"counted"} or not isinstance(counted, list) \
                or not all(isinstance(client, str) for client in counted):
            raise MessageRejected("an aggregate carries exactly the field 'counted', a list of client ids",
                                  envelope.sender)
        if len(set(counted)) != len(counted):
            raise MessageRejected(f"the contribution list names a client twice: {counted}", envelope.sender)
        strangers = [client for client in counted if client not in state.clients]
        if strangers:
            raise MessageRejected(f"the contribution list names parties that are not clients of round "
                                  f"{state.round_id}: {strangers}", envelope.sender)
        if len(counted) < self.options.min_clients:
            raise MessageRejected(f"an aggregate of {len(counted)} contributions is below min_clients = "
                                  f"{self.options.min_clients}; refusing to decrypt it", envelope.sender)
        return counted

    def _seed(self, data: bytes, client: str, state: _OpenRound) -> bytes:
        """The canary seed from ``client``'s receipt, after checking the receipt is the client's own, for this round."""
        try:
            receipt = expect(self._decode(data), protocol=NAME, round=state.round_id, stage=RECEIPT,
                             sender=client, recipient=self.party_id)
        except MessageRejected as rejection:
            raise MessageRejected(f"receipt listed for {client!r} refused: {rejection.reason}", rejection.sender) \
                from None
        if (set(receipt.fields) != {"ciphertexts", "context", "vector_length"}
                or receipt.fields["context"] != state.context_digest
                or receipt.fields["vector_length"] != state.layout.vector_length
                or set(receipt.blobs) != {"seed"} or receipt.arrays):
            raise MessageRejected("the receipt is not for this round's key and vector length", client)
        seed = open_sealed(receipt.blobs["seed"], state.seal_key,
                           messages.seal_associated(state.round_id, client, state.context_digest), client)
        if len(seed) != SEED_BYTES:
            raise MessageRejected(f"the sealed seed has {len(seed)} bytes, not {SEED_BYTES}", client)
        return seed

    def _export(self) -> dict[str, Any]:
        state = self._open
        return {"last_round": self._last_round, "open": None if state is None else {
            "round_id": state.round_id, "clients": list(state.clients), "vector_length": state.layout.vector_length,
            "context": bytes_array(ckks.secret_context_bytes(state.context)),
            "seal_key": private_bytes(state.seal_key).hex(),
            "context_digest": state.context_digest}}

    def _import(self, state: Mapping[str, Any]) -> None:
        self._last_round, saved = int(state["last_round"]), state["open"]
        self._open = None if saved is None else _OpenRound(
            int(saved["round_id"]), tuple(saved["clients"]), Layout(int(saved["vector_length"]), self.options.slots),
            ckks.secret_context_from_state(array_bytes(saved["context"]), self.options),
            X25519PrivateKey.from_private_bytes(bytes.fromhex(saved["seal_key"])), str(saved["context_digest"]))

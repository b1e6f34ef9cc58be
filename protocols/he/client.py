"""A client: weights its vector, encrypts it under the round's public key, and signs a receipt for the key holder."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..base import ClientSession, Outgoing, checked_input, export_inputs, import_inputs
from ..errors import ConfigurationError, MessageRejected
from ..identity import Identity, Roster
from ..wire import expect
from . import ckks, messages
from .chunks import SEED_BYTES, Layout, ciphertexts_digest
from .config import HEOptions
from .messages import CONTEXT, INPUT, NAME, RECEIPT
from .sealing import PUBLIC_BYTES, seal


class HEClient(ClientSession):
    protocol_name = NAME

    def __init__(self, options: HEOptions, identity: Identity, roster: Roster, server_id: str, *, session: str,
                 state: Mapping[str, Any] | None = None):
        super().__init__(identity, roster, session, options)
        self._server_id = server_id
        self._inputs: dict[int, tuple[np.ndarray, float]] = {}
        self._load(state)

    def set_input(self, round_id: int, vector: np.ndarray, weight: float) -> None:
        self._inputs = {round_id: checked_input(vector, weight)}

    def handle(self, data: bytes) -> list[Outgoing]:
        """Answer the key holder's context for a round we hold input for with our encrypted input."""
        envelope = expect(self._decode(data), protocol=NAME, stage=CONTEXT, recipient=self.party_id)
        keyholder = envelope.sender
        if self._roster.role(keyholder) != "keyholder":
            raise MessageRejected(f"a public context must come from the key holder, not from a "
                                  f"{self._roster.role(keyholder)!r} (whoever made the key could decrypt our input)",
                                  keyholder)
        if envelope.round not in self._inputs:
            raise MessageRejected(f"no input is waiting for round {envelope.round} (replayed or stale context)",
                                  keyholder)
        vector, weight = self._inputs[envelope.round]
        clients = messages.check_context_fields(envelope, self.options, None, len(vector))
        if self.party_id not in clients:
            raise MessageRejected("the context does not list this client", keyholder)
        if len(envelope.blobs["seal_key"]) != PUBLIC_BYTES:
            raise MessageRejected(f"'seal_key' must be a {PUBLIC_BYTES}-byte X25519 key", keyholder)
        context = ckks.load_public_context(envelope.blobs["context"], self.options, keyholder)
        self._check_fits(vector, weight, len(clients))

        layout = Layout(len(vector), self.options.slots)
        seed = os.urandom(SEED_BYTES)
        ciphertexts = ckks.encrypt(context, layout.split(vector * weight, weight, layout.canaries_from(seed)))
        context_digest = ckks.digest(envelope.blobs["context"])
        sealed = seal(seed, envelope.blobs["seal_key"],
                      messages.seal_associated(envelope.round, self.party_id, context_digest))
        receipt = self._envelope(envelope.round, RECEIPT, keyholder,
                                 {"ciphertexts": ciphertexts_digest(ciphertexts), "context": context_digest,
                                  "vector_length": len(vector)}, blobs={"seed": sealed})
        blobs = {messages.chunk_name(index): ciphertext for index, ciphertext in enumerate(ciphertexts)}
        blobs["receipt"] = self._sign(receipt)
        answer = self._envelope(envelope.round, INPUT, self._server_id, {"chunks": len(ciphertexts)}, blobs=blobs)
        del self._inputs[envelope.round]  # answer once: a replayed context finds nothing
        return [self._send(answer)]

    def _check_fits(self, vector: np.ndarray, weight: float, num_clients: int) -> None:
        """Refuse (before encrypting) an input whose share of the sum could overflow the modulus: CKKS would
        decrypt an overflowing sum to garbage without any error."""
        bound = self.options.per_client_bound(num_clients)
        peak = max(weight * float(np.max(np.abs(vector))), weight, 1.0)
        if peak > bound:
            raise ConfigurationError(f"input too large for the CKKS parameters: max(|weight·value|, weight) = "
                                     f"{peak:.6g} exceeds {bound:.6g} = capacity {self.options.capacity:.6g} / "
                                     f"{num_clients} clients; normalise the weights or raise the data modulus")

    def _export(self) -> dict[str, Any]:
        return {"inputs": export_inputs(self._inputs)}

    def _import(self, state: Mapping[str, Any]) -> None:
        self._inputs = import_inputs(state["inputs"])

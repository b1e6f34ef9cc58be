"""A client: weights its vector, encrypts it under the round's public key, and signs a receipt for the key holder."""

from __future__ import annotations

import os

import numpy as np

from ..base import ClientSession, Outgoing, checked_input
from ..errors import ConfigurationError, MessageRejected
from ..identity import Identity, Roster
from ..wire import Envelope, decode, encode, expect
from . import ckks, messages
from .chunks import SEED_BYTES, Layout, ciphertexts_digest
from .config import HEConfig
from .messages import CONTEXT, INPUT, NAME, RECEIPT
from .sealing import PUBLIC_BYTES, seal


class HEClient(ClientSession):
    def __init__(self, config: HEConfig, identity: Identity, roster: Roster, server_id: str):
        self.party_id = identity.party_id
        self._config, self._identity, self._roster, self._server_id = config, identity, roster, server_id
        self._inputs: dict[int, tuple[np.ndarray, float]] = {}

    def set_input(self, round_id: int, vector: np.ndarray, weight: float) -> None:
        self._inputs = {round_id: checked_input(vector, weight)}

    def handle(self, data: bytes) -> list[Outgoing]:
        """Answer the key holder's context for a round we hold input for with our encrypted input."""
        envelope = expect(decode(data, self._roster), protocol=NAME, stage=CONTEXT, recipient=self.party_id)
        keyholder = envelope.sender
        if self._roster.role(keyholder) != "keyholder":
            raise MessageRejected(f"a public context must come from the key holder, not from a "
                                  f"{self._roster.role(keyholder)!r} (whoever made the key could decrypt our input)",
                                  keyholder)
        if envelope.round not in self._inputs:
            raise MessageRejected(f"no input is waiting for round {envelope.round} (replayed or stale context)",
                                  keyholder)
        vector, weight = self._inputs[envelope.round]
        clients = messages.check_context_fields(envelope, self._config, None, len(vector))
        if self.party_id not in clients:
            raise MessageRejected("the context does not list this client", keyholder)
        if len(envelope.blobs["seal_key"]) != PUBLIC_BYTES:
            raise MessageRejected(f"'seal_key' must be a {PUBLIC_BYTES}-byte X25519 key", keyholder)
        context = ckks.load_public_context(envelope.blobs["context"], self._config, keyholder)
        self._check_fits(vector, weight, len(clients))

        layout = Layout(len(vector), self._config.slots)
        seed = os.urandom(SEED_BYTES)
        ciphertexts = ckks.encrypt(context, layout.split(vector * weight, weight, layout.canaries_from(seed)))
        context_digest = ckks.digest(envelope.blobs["context"])
        sealed = seal(seed, envelope.blobs["seal_key"],
                      messages.seal_associated(envelope.round, self.party_id, context_digest))
        receipt = Envelope(NAME, envelope.round, RECEIPT, self.party_id, keyholder,
                           {"ciphertexts": ciphertexts_digest(ciphertexts), "context": context_digest,
                            "vector_length": len(vector)}, blobs={"seed": sealed})
        blobs = {messages.chunk_name(index): ciphertext for index, ciphertext in enumerate(ciphertexts)}
        blobs["receipt"] = encode(receipt, self._identity)
        answer = Envelope(NAME, envelope.round, INPUT, self.party_id, self._server_id,
                          {"chunks": len(ciphertexts)}, blobs=blobs)
        del self._inputs[envelope.round]  # answer once: a replayed context finds nothing
        return [Outgoing(self._server_id, encode(answer, self._identity))]

    def _check_fits(self, vector: np.ndarray, weight: float, num_clients: int) -> None:
        """Refuse (before encrypting) an input whose share of the sum could overflow the modulus: CKKS would
        decrypt an overflowing sum to garbage without any error."""
        bound = self._config.per_client_bound(num_clients)
        peak = max(weight * float(np.max(np.abs(vector))), weight, 1.0)
        if peak > bound:
            raise ConfigurationError(f"input too large for the CKKS parameters: max(|weight·value|, weight) = "
                                     f"{peak:.6g} exceeds {bound:.6g} = capacity {self._config.capacity:.6g} / "
                                     f"{num_clients} clients; normalise the weights or raise the data modulus")

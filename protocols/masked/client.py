"""The masked protocol's client: a state machine over one round at a time.

Per round: ``set_input`` quantizes (and, for distributed DP, adds integer noise); then each
server request is checked completely before anything changes, and answered exactly once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..base import ClientSession, Outgoing, checked_input
from ..errors import ConfigurationError, MessageRejected
from ..identity import Identity, Roster
from ..wire import Envelope, expect
from . import keys, shamir
from .config import MaskedOptions
from .graph import ring_neighbours
from .prg import MaskExpander
from .stages import (
    ADVERTISE,
    CIPHER_KEY,
    CONSISTENCY,
    MASK_KEY,
    MASK_KEY_SHARE,
    MASKED,
    NAME,
    SELF_MASK_SHARE,
    SHARE,
    STAGES,
    UNMASK,
    share_index,
)


def self_mask_commitment(round_id: int, client: str, seed: bytes) -> str:
    """A hash of the self-mask seed, sent to the server so it can detect bad shares of it."""
    return hashlib.sha256(f"{NAME}/{round_id}/{client}/".encode() + seed).hexdigest()


@dataclass(frozen=True)
class _Round:
    round_id: int
    encoded: np.ndarray  # w·q + z as int64
    weight: int
    expecting: str = ADVERTISE
    ring: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    threshold: int = 0
    cipher_key: X25519PrivateKey | None = None
    mask_key: X25519PrivateKey | None = None
    self_seed: bytes = b""
    peer_keys: dict[str, tuple[X25519PublicKey, X25519PublicKey]] = field(default_factory=dict)
    held_shares: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # peer -> (self-mask, mask-key)
    survivors: tuple[str, ...] = ()


class MaskedClient(ClientSession):
    protocol_name = NAME

    def __init__(self, options: MaskedOptions, identity: Identity, roster: Roster, server_id: str, *, session: str,
                 state: Mapping[str, Any] | None = None):
        super().__init__(identity, roster, session, options)
        self._server_id = server_id
        self._round: _Round | None = None
        self._load(state)

    def set_input(self, round_id: int, vector: np.ndarray, weight: float, *, noise: np.ndarray | None = None) -> None:
        """This round's input. ``weight`` must be a positive integer (an example count); ``noise`` (int64,
        same length, |noise| <= noise_bound) is added to the quantized, weighted input before masking."""
        vector, weight = checked_input(vector, weight)
        if not weight.is_integer():
            raise ConfigurationError(f"masked aggregation needs integer weights (example counts), not {weight}")
        weight = int(weight)
        if self.options.max_weight and weight > self.options.max_weight:
            raise ConfigurationError(f"weight {weight} exceeds max_weight {self.options.max_weight}")
        quantized = self.options.quantizer.quantize(vector, self.options.rng("rounding", round_id, self.party_id))
        encoded = quantized * weight
        if noise is not None:
            noise = np.asarray(noise)
            if noise.shape != vector.shape or noise.dtype.kind not in "iu":
                raise ConfigurationError(f"noise must be an integer vector of length {len(vector)}")
            if noise.size and int(np.abs(noise.astype(np.int64)).max()) > self.options.noise_bound:
                raise ConfigurationError(f"noise exceeds noise_bound {self.options.noise_bound}; raise noise_bound "
                                         "(the overflow check accounts for it)")
            encoded = encoded + noise.astype(np.int64)
        self._round = _Round(round_id, encoded, weight)

    def handle(self, data: bytes) -> list[Outgoing]:
        envelope = expect(self._decode(data), protocol=NAME, sender=self._server_id, recipient=self.party_id)
        state = self._round
        if state is None or envelope.round != state.round_id:
            raise MessageRejected(f"no input is waiting for round {envelope.round} (replayed or stale request)",
                                  envelope.sender)
        if envelope.stage not in STAGES:
            raise MessageRejected(f"unknown stage {envelope.stage!r}", envelope.sender)
        if state.expecting == "done":
            raise MessageRejected(f"round {state.round_id} is over for this client; it answers nothing more",
                                  envelope.sender)
        expect(envelope, stage=state.expecting)
        handler = {ADVERTISE: self._advertise, SHARE: self._share_keys, MASKED: self._masked_input,
                   CONSISTENCY: self._consistency_check, UNMASK: self._unmask}[envelope.stage]
        new_state, answer = handler(state, envelope)
        self._round = new_state  # only now: a rejected request changed nothing
        return [self._send(answer)]

    def _answer(self, state: _Round, stage: str, fields=None, arrays=None, blobs=None) -> Envelope:
        return self._envelope(state.round_id, stage, self._server_id, fields, arrays, blobs)

    def _reject(self, reason: str) -> MessageRejected:
        return MessageRejected(reason, self._server_id)

    def _advertise(self, state: _Round, envelope: Envelope) -> tuple[_Round, Envelope]:
        ring, terms = envelope.fields.get("ring"), envelope.fields.get("terms")
        if set(envelope.fields) != {"ring", "terms"} or envelope.arrays or envelope.blobs:
            raise self._reject("an advertise request holds exactly the fields 'ring' and 'terms'")
        if not isinstance(ring, list) or len(set(map(str, ring))) != len(ring) or self.party_id not in ring \
                or not all(isinstance(c, str) and c in self._roster and self._roster.role(c) == "client"
                           for c in ring):
            raise self._reject("the ring must list distinct enrolled clients, this one included")
        try:
            expected = self.options.round_terms(len(ring), len(state.encoded))
        except ConfigurationError as error:
            raise self._reject(f"this client cannot take part in a round of {len(ring)}: {error}") from None
        if terms != expected:
            raise self._reject(f"the announced terms {terms} differ from this client's {expected}")
        if state.weight > expected["max_weight"]:
            raise ConfigurationError(f"weight {state.weight} exceeds {expected['max_weight']}, the largest weight "
                                     f"that cannot overflow 2^{self.options.modulus_bits} with {len(ring)} clients")
        cipher_key, mask_key = keys.fresh_pair(), keys.fresh_pair()
        new = replace(state, expecting=SHARE, ring=tuple(ring), threshold=expected["threshold"],
                      neighbours=ring_neighbours(tuple(ring), expected["neighbours"])[self.party_id],
                      cipher_key=cipher_key, mask_key=mask_key)
        return new, self._answer(state, ADVERTISE, blobs={CIPHER_KEY: keys.raw_public(cipher_key),
                                                           MASK_KEY: keys.raw_public(mask_key)})

    def _relayed(self, state: _Round, envelope: Envelope, stage: str) -> dict[str, Envelope]:
        """Neighbours' own signed messages that the server relays; each must verify under its sender's key."""
        relayed = {}
        for peer, data in envelope.blobs.items():
            if peer not in state.neighbours:
                raise self._reject(f"relayed message from {peer!r}, who is not a neighbour")
            try:
                inner = expect(self._decode(data), protocol=NAME, round=state.round_id, stage=stage,
                               sender=peer, recipient=self._server_id)
            except MessageRejected as error:
                raise self._reject(f"relayed message of {peer!r}: {error.reason}") from None
            relayed[peer] = inner
        if len(relayed) < state.threshold:
            raise self._reject(f"only {len(relayed)} neighbours are left, fewer than the threshold "
                               f"{state.threshold}; refusing to go on")
        return relayed

    def _share_keys(self, state: _Round, envelope: Envelope) -> tuple[_Round, Envelope]:
        if envelope.fields or envelope.arrays:
            raise self._reject("a share-keys request holds only relayed keys")
        peer_keys = {}
        for peer, inner in self._relayed(state, envelope, ADVERTISE).items():
            if set(inner.blobs) != {CIPHER_KEY, MASK_KEY} or inner.fields or inner.arrays:
                raise self._reject(f"relayed keys of {peer!r} are malformed")
            peer_keys[peer] = (keys.public_key(inner.blobs[CIPHER_KEY], peer),
                               keys.public_key(inner.blobs[MASK_KEY], peer))
        self_seed = os.urandom(32)
        order = tuple(sorted(state.ring))
        xs = {peer: share_index(order, peer) for peer in peer_keys}
        seed_shares = shamir.split(self_seed, state.threshold, xs.values())
        key_shares = shamir.split(keys.raw_private(state.mask_key), state.threshold, xs.values())
        ciphertexts = {peer: keys.encrypt_shares(state.cipher_key, peer_keys[peer][0], NAME, state.round_id,
                                                 self.party_id, peer, seed_shares[x] + key_shares[x])
                       for peer, x in xs.items()}
        commitment = self_mask_commitment(state.round_id, self.party_id, self_seed)
        new = replace(state, expecting=MASKED, peer_keys=peer_keys, self_seed=self_seed)
        return new, self._answer(state, SHARE, fields={"self_mask_commitment": commitment}, blobs=ciphertexts)

    def _masked_input(self, state: _Round, envelope: Envelope) -> tuple[_Round, Envelope]:
        if envelope.fields or envelope.arrays:
            raise self._reject("a masked-input request holds only relayed shares")
        held = {}
        for peer, ciphertext in envelope.blobs.items():
            if peer not in state.peer_keys:
                raise self._reject(f"shares from {peer!r}, whose keys this client never received")
            plaintext = keys.decrypt_shares(state.cipher_key, state.peer_keys[peer][0], NAME, state.round_id, peer,
                                            self.party_id, ciphertext)
            if len(plaintext) != 2 * shamir.SHARE_BYTES:
                raise self._reject(f"the shares from {peer!r} have the wrong length")
            held[peer] = (plaintext[:shamir.SHARE_BYTES], plaintext[shamir.SHARE_BYTES:])
        if len(held) < state.threshold:
            raise self._reject(f"only {len(held)} neighbours shared keys, fewer than the threshold "
                               f"{state.threshold}; masking with so few would not protect this input")
        masked = self._mask(state, sorted(held))
        new = replace(state, expecting=CONSISTENCY, held_shares=held)
        return new, self._answer(state, MASKED, fields={"weight": state.weight}, arrays={"masked": masked})

    def _mask(self, state: _Round, partners: list[str]) -> np.ndarray:
        """(w·q + z + PRG(b) + Σ ±PRG(s_ij)) mod 2^m, in the smallest word type holding m bits."""
        config = self.options
        words = (state.encoded.view(np.uint64) & np.uint64(config.word_mask)).astype(config.word_dtype)
        expander = MaskExpander(len(words), config.word_dtype)
        expander.add(words, state.self_seed)
        for peer in partners:
            seed = keys.pairwise_seed(state.mask_key, state.peer_keys[peer][1], state.round_id, self.party_id, peer)
            (expander.add if self.party_id < peer else expander.subtract)(words, seed)
        if config.modulus_bits < 8 * words.itemsize:
            np.bitwise_and(words, words.dtype.type(config.word_mask), out=words)
        return words

    def _consistency_check(self, state: _Round, envelope: Envelope) -> tuple[_Round, Envelope]:
        survivors = envelope.fields.get("survivors")
        if set(envelope.fields) != {"survivors"} or envelope.arrays or envelope.blobs \
                or not isinstance(survivors, list) or survivors != sorted(set(map(str, survivors))) \
                or self.party_id not in survivors \
                or not set(survivors) <= set(state.ring):
            raise self._reject("the survivor set must be a sorted list of this round's clients, this one included")
        partners_left = set(survivors) & set(state.held_shares)
        if len(partners_left) < state.threshold:
            raise self._reject(f"only {len(partners_left)} of this client's mask partners survive, fewer than the "
                               f"threshold {state.threshold}; refusing to go on")
        new = replace(state, expecting=UNMASK, survivors=tuple(survivors))
        return new, self._answer(state, CONSISTENCY, fields={"survivors": survivors})

    def _unmask(self, state: _Round, envelope: Envelope) -> tuple[_Round, Envelope]:
        self_mask_of, mask_key_of = envelope.fields.get("self_mask_of"), envelope.fields.get("mask_key_of")
        if set(envelope.fields) != {"self_mask_of", "mask_key_of"} or envelope.arrays \
                or not isinstance(self_mask_of, list) or not isinstance(mask_key_of, list) \
                or not all(isinstance(peer, str) for peer in self_mask_of + mask_key_of):
            raise self._reject("an unmask request lists 'self_mask_of' and 'mask_key_of'")
        for peer, inner in self._relayed(state, envelope, CONSISTENCY).items():
            if inner.fields != {"survivors": list(state.survivors)}:
                raise self._reject(f"{peer!r} signed a different survivor set; refusing to reveal any share")
        both = set(self_mask_of) & set(mask_key_of)
        if both:
            raise self._reject(f"asked for both the self-mask and the mask-key share of {sorted(both)}; refusing")
        survivors = set(state.survivors)
        for peer in self_mask_of:
            if peer not in state.held_shares or peer not in survivors:
                raise self._reject(f"asked for the self-mask share of {peer!r}, which did not survive or whose "
                                   "share this client does not hold; refusing")
        for peer in mask_key_of:
            if peer not in state.held_shares or peer in survivors:
                raise self._reject(f"asked for the mask-key share of {peer!r}, which survived or whose share this "
                                   "client does not hold; refusing (it would unmask that input)")
        blobs = {SELF_MASK_SHARE + peer: state.held_shares[peer][0] for peer in self_mask_of}
        blobs |= {MASK_KEY_SHARE + peer: state.held_shares[peer][1] for peer in mask_key_of}
        # the round is over for this client: forget its secrets, answer nothing more
        done = _Round(state.round_id, np.zeros(0, np.int64), state.weight, expecting="done")
        return done, self._answer(state, UNMASK, blobs=blobs)

    # -- state ----------------------------------------------------------------------------------------------------
    def _export(self) -> dict[str, Any]:
        state = self._round
        if state is None:
            return {"round": None}
        return {"round": {
            "round_id": state.round_id, "encoded": state.encoded.copy(), "weight": state.weight,
            "expecting": state.expecting, "ring": list(state.ring), "neighbours": list(state.neighbours),
            "threshold": state.threshold,
            "cipher_key": None if state.cipher_key is None else keys.raw_private(state.cipher_key).hex(),
            "mask_key": None if state.mask_key is None else keys.raw_private(state.mask_key).hex(),
            "self_seed": state.self_seed.hex(),
            "peer_keys": {peer: [keys.raw_public(cipher).hex(), keys.raw_public(mask).hex()]
                          for peer, (cipher, mask) in state.peer_keys.items()},
            "held_shares": {peer: [self_mask.hex(), mask_key.hex()]
                            for peer, (self_mask, mask_key) in state.held_shares.items()},
            "survivors": list(state.survivors),
        }}

    def _import(self, state: Mapping[str, Any]) -> None:
        saved = state["round"]
        if saved is None:
            self._round = None
            return

        def private(value: str | None) -> X25519PrivateKey | None:
            return None if value is None else X25519PrivateKey.from_private_bytes(bytes.fromhex(value))

        self._round = _Round(
            round_id=int(saved["round_id"]), encoded=np.array(saved["encoded"], dtype=np.int64),
            weight=int(saved["weight"]), expecting=str(saved["expecting"]), ring=tuple(saved["ring"]),
            neighbours=tuple(saved["neighbours"]), threshold=int(saved["threshold"]),
            cipher_key=private(saved["cipher_key"]), mask_key=private(saved["mask_key"]),
            self_seed=bytes.fromhex(saved["self_seed"]),
            peer_keys={peer: (X25519PublicKey.from_public_bytes(bytes.fromhex(cipher)),
                              X25519PublicKey.from_public_bytes(bytes.fromhex(mask)))
                       for peer, (cipher, mask) in saved["peer_keys"].items()},
            held_shares={peer: (bytes.fromhex(self_mask), bytes.fromhex(mask_key))
                         for peer, (self_mask, mask_key) in saved["held_shares"].items()},
            survivors=tuple(saved["survivors"]))

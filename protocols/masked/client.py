"""The masked protocol's client: a state machine over one round at a time.

Per round: ``set_input`` quantizes (and, for distributed DP, adds integer noise); then each
server request is checked completely before anything changes, and answered exactly once.
Against a malicious server (issue 10): the client enforces ``min_clients`` and its own round terms,
signs its view (``view.py``) in every answer that others rely on, draws the ring by commit–reveal with
the whole cohort, and reveals shares only after t neighbours signed the same view, ring and survivors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ..base import ClientSession, Outgoing, checked_context, checked_input
from ..errors import ConfigurationError, MessageRejected, ProtocolError
from ..identity import Identity, Roster
from ..wire import Envelope, expect
from . import keys, shamir
from .config import MaskedOptions
from .graph import neighbours_of
from .packing import pack, wire_width
from .prg import apply_masks
from .stages import (
    ADVERTISE,
    CIPHER_KEY,
    COMMIT,
    CONSISTENCY,
    MASK_KEY,
    MASK_KEY_SHARE,
    MASKED,
    NAME,
    NONCE,
    SELF_MASK_SHARE,
    SHARE,
    STAGES,
    UNMASK,
    control_bytes,
    share_index,
)
from .view import NONCE_BYTES, nonce_commitment, ring_order, ring_seed, self_mask_commitment, view_digest


@dataclass(frozen=True)
class _Round:
    round_id: int
    encoded: np.ndarray  # w·q + z modulo 2^(word bits), in the word type (two's complement for negative noise)
    weight: int
    context: str = ""
    expecting: str = COMMIT
    cohort: tuple[str, ...] = ()
    view: str = ""
    nonce: bytes = b""
    commitments: dict[str, str] = field(default_factory=dict)  # cohort member -> its nonce commitment
    ring_seed: str = ""
    neighbours: tuple[str, ...] = ()  # this client's, on the ring drawn from ring_seed
    degree: int = 0  # k: the neighbours each client has (the round terms' "neighbours")
    threshold: int = 0
    cipher_key: X25519PrivateKey | None = None
    mask_key: X25519PrivateKey | None = None
    self_seed: bytes = b""
    peer_keys: dict[str, tuple[X25519PublicKey, X25519PublicKey]] = field(default_factory=dict)
    partners: tuple[str, ...] = ()  # the neighbours this client masked with
    held_shares: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # peer -> (self-mask, mask-key)
    survivors: tuple[str, ...] = ()
    min_survivors: int = 0  # the fewest survivors whose inputs this one's may be unmasked with (set_input)


class MaskedClient(ClientSession):
    """One site's side of the masked protocol, hardened against a malicious server (issue 10): it signs the view
    it derived itself, draws the ring by commit–reveal with every other client, and checks every relayed
    message against that view before it reveals anything."""

    protocol_name = NAME

    def __init__(self, options: MaskedOptions, identity: Identity, roster: Roster, server_id: str, *, session: str,
                 state: Mapping[str, Any] | None = None):
        super().__init__(identity, roster, session, options)
        self._server_id = server_id
        self._round: _Round | None = None
        self._limit = control_bytes(len(roster))  # no request to a client carries a vector
        self._load(state)

    def set_input(self, round_id: int, vector: np.ndarray, weight: float, *, round_context: str = "",
                  noise: np.ndarray | None = None, min_survivors: int = 0,
                  rounding_norm_bound: float | None = None) -> int:
        """This round's input; returns how many entries were clipped to ±clip_range (the caller reports them).
        ``weight`` must be a positive integer (an example count); ``noise`` (int64, same length,
        |noise| <= noise_bound) is added to the quantized, weighted input before masking.

        Distributed DP: ``min_survivors`` is the fewest inputs this one may be unmasked with; the client refuses
        a cohort (at commit) or a survivor set (at the consistency check, before it reveals any share) smaller
        than that, so a sum that holds this input always holds at least that many noise shares, however many
        dropouts the server claims. ``rounding_norm_bound`` (grid steps) turns on conditional randomized
        rounding (``Quantizer.quantize``)."""
        vector, weight = checked_input(vector, weight, copy=False)  # only read: quantize writes a fresh array
        context = checked_context(round_context)
        if not weight.is_integer():
            raise ConfigurationError(f"masked aggregation needs integer weights (example counts), not {weight}")
        weight = int(weight)
        if self.options.max_weight and weight > self.options.max_weight:
            raise ConfigurationError(f"weight {weight} exceeds max_weight {self.options.max_weight}")
        clients = len(self._roster.client_ids)
        if isinstance(min_survivors, bool) or not isinstance(min_survivors, int) \
                or not 0 <= min_survivors <= clients:
            raise ConfigurationError(f"min_survivors must be an integer in 0..{clients} (the enrolled clients), "
                                     f"not {min_survivors!r}")
        clip_range = self.options.clip_range
        clipped = np.count_nonzero(vector > clip_range) + np.count_nonzero(vector < -clip_range)
        word = self.options.word_dtype
        encoded = self.options.quantizer.quantize(vector, self.options.rng("rounding", round_id, self.party_id),
                                                  rounding_norm_bound, dtype=word)
        encoded *= word.type(weight % (1 << 8 * word.itemsize))  # in place, modulo 2^(word bits), as the sum is
        if noise is not None:
            noise = np.asarray(noise)
            if noise.shape != vector.shape or noise.dtype.kind not in "iu":
                raise ConfigurationError(f"noise must be an integer vector of length {len(vector)}")
            if noise.size and int(np.abs(noise.astype(np.int64)).max()) > self.options.noise_bound:
                raise ConfigurationError(f"noise exceeds noise_bound {self.options.noise_bound}; raise noise_bound "
                                         "(the overflow check accounts for it)")
            encoded += noise.astype(np.int64, copy=False).astype(word)  # two's complement: z modulo 2^(word bits)
        self._round = _Round(round_id, encoded, weight, context, min_survivors=min_survivors)
        return int(clipped)

    def handle(self, data: bytes) -> list[Outgoing]:
        """The answer to one server request. Any failure inside, whatever its type, is a MessageRejected (as at
        the HE key holder): a malformed or hostile request never escapes as another error, and since the new
        round state is assigned only after the answer is signed, a refused request changes nothing."""
        try:
            return self._handle(data)
        except MessageRejected:
            raise
        except ProtocolError as error:
            raise MessageRejected(str(error)) from None
        except Exception as error:  # noqa: BLE001 - the point: nothing but a refusal leaves the client
            raise MessageRejected(f"this client could not process the request ({type(error).__name__}: {error})") \
                from None

    def _handle(self, data: bytes) -> list[Outgoing]:
        envelope = expect(self._decode(data, max_bytes=self._limit), protocol=NAME, sender=self._server_id,
                          recipient=self.party_id)
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
        handler = {COMMIT: self._commit, ADVERTISE: self._advertise, SHARE: self._share_keys,
                   MASKED: self._masked_input, CONSISTENCY: self._consistency_check, UNMASK: self._unmask}
        new_state, answer = handler[envelope.stage](state, envelope)
        outgoing = self._send(answer)
        self._round = new_state  # only now: a rejected request changed nothing
        return [outgoing]

    def _answer(self, state: _Round, stage: str, fields=None, arrays=None, blobs=None) -> Envelope:
        return self._envelope(state.round_id, stage, self._server_id, fields, arrays, blobs)

    def _reject(self, reason: str) -> MessageRejected:
        return MessageRejected(reason, self._server_id)

    def _commit(self, state: _Round, envelope: Envelope) -> tuple[_Round, Envelope]:
        cohort, terms = envelope.fields.get("cohort"), envelope.fields.get("terms")
        if set(envelope.fields) != {"cohort", "terms", "round_context"} or envelope.arrays or envelope.blobs:
            raise self._reject("a commit request holds exactly the fields 'cohort', 'terms' and 'round_context'")
        if not isinstance(cohort, list) or not all(isinstance(c, str) for c in cohort) \
                or cohort != sorted(set(cohort)) or self.party_id not in cohort \
                or not all(c in self._roster and self._roster.role(c) == "client" for c in cohort):
            raise self._reject("the cohort must be a sorted list of distinct enrolled clients, this one included")
        if len(cohort) < self.options.min_clients:
            raise self._reject(f"the cohort lists {len(cohort)} clients, fewer than this client's min_clients "
                               f"{self.options.min_clients}; refusing a round that small")
        if len(cohort) < state.min_survivors:
            raise self._reject(f"the cohort lists {len(cohort)} clients, fewer than the {state.min_survivors} "
                               "survivors this round's input needs (its noise share is sized for them)")
        try:
            expected = self.options.round_terms(len(cohort), len(state.encoded))
        except ConfigurationError as error:
            raise self._reject(f"this client cannot take part in a round of {len(cohort)}: {error}") from None
        if terms != expected:
            raise self._reject(f"the announced terms {terms} differ from this client's {expected}")
        if envelope.fields["round_context"] != state.context:
            raise self._reject(f"the announced round context {envelope.fields['round_context']!r} differs from "
                               f"this client's {state.context!r}")
        if state.weight > expected["max_weight"]:  # this client's own input is at fault, not the request
            raise MessageRejected(f"this client's input weight {state.weight} exceeds {expected['max_weight']}, the "
                                  f"largest that cannot overflow 2^{self.options.modulus_bits} with {len(cohort)} "
                                  "clients")
        view = view_digest(self.session, state.round_id, cohort, expected, state.context)
        nonce = os.urandom(NONCE_BYTES)
        new = replace(state, expecting=ADVERTISE, cohort=tuple(cohort), view=view, nonce=nonce,
                      degree=expected["neighbours"], threshold=expected["threshold"])
        return new, self._answer(state, COMMIT, {"view": view, "commitment": nonce_commitment(view, nonce)})

    def _relayed(self, state: _Round, envelope: Envelope, stage: str, expected: tuple[str, ...],
                 everyone: bool) -> dict[str, Envelope]:
        """Peers' own signed messages that the server relays: each must verify under its sender's key, and come
        from ``expected`` (all of them if ``everyone``, else at least t of them)."""
        if not set(envelope.blobs) <= set(expected):
            strangers = sorted(set(envelope.blobs) - set(expected))
            raise self._reject(f"relayed messages from {strangers}, who are not expected at stage {stage!r}")
        if everyone and set(envelope.blobs) != set(expected):
            missing = sorted(set(expected) - set(envelope.blobs))
            raise self._reject(f"the messages of {missing} are missing; every cohort member's is needed before the "
                               "ring is drawn (withholding one would let the server choose among rings)")
        relayed = {}
        peers = list(envelope.blobs)
        decoded = self._decode_each([envelope.blobs[peer] for peer in peers], max_bytes=self._limit)
        for peer, inner in zip(peers, decoded):  # in the request's order: the first bad message is the one named
            try:
                if isinstance(inner, MessageRejected):
                    raise inner
                expect(inner, protocol=NAME, round=state.round_id, stage=stage, sender=peer,
                       recipient=self._server_id)
            except MessageRejected as error:
                raise self._reject(f"relayed message of {peer!r}: {error.reason}") from None
            if inner.fields.get("view") != state.view:
                raise self._reject(f"{peer!r} signed another view of this round (cohort, terms or context differ); "
                                   "refusing to go on")
            relayed[peer] = inner
        if len(relayed) < state.threshold:
            raise self._reject(f"only {len(relayed)} neighbours are left, fewer than the threshold "
                               f"{state.threshold}; refusing to go on")
        return relayed

    def _advertise(self, state: _Round, envelope: Envelope) -> tuple[_Round, Envelope]:
        if envelope.fields or envelope.arrays:
            raise self._reject("an advertise request holds only the relayed commitments")
        commitments = {}
        for peer, inner in self._relayed(state, envelope, COMMIT, state.cohort, everyone=True).items():
            commitment = inner.fields.get("commitment")
            if set(inner.fields) != {"view", "commitment"} or inner.arrays or inner.blobs \
                    or not isinstance(commitment, str) or len(commitment) != 64:
                raise self._reject(f"the relayed commitment of {peer!r} is malformed")
            commitments[peer] = commitment
        if commitments[self.party_id] != nonce_commitment(state.view, state.nonce):
            raise self._reject("the relayed commitment of this client is not the one it made")
        cipher_key, mask_key = keys.fresh_pair(), keys.fresh_pair()
        new = replace(state, expecting=SHARE, commitments=commitments, cipher_key=cipher_key, mask_key=mask_key)
        return new, self._answer(state, ADVERTISE, {"view": state.view},
                                 blobs={CIPHER_KEY: keys.raw_public(cipher_key), MASK_KEY: keys.raw_public(mask_key),
                                        NONCE: state.nonce})

    def _share_keys(self, state: _Round, envelope: Envelope) -> tuple[_Round, Envelope]:
        if envelope.fields or envelope.arrays:
            raise self._reject("a share-keys request holds only the relayed advertisements")
        advertised = {}
        for peer, inner in self._relayed(state, envelope, ADVERTISE, state.cohort, everyone=True).items():
            nonce = inner.blobs.get(NONCE, b"")
            if set(inner.blobs) != {CIPHER_KEY, MASK_KEY, NONCE} or set(inner.fields) != {"view"} or inner.arrays:
                raise self._reject(f"the relayed advertisement of {peer!r} is malformed")
            if len(nonce) != NONCE_BYTES:
                raise self._reject(f"{peer!r} revealed a ring nonce of {len(nonce)} bytes, not {NONCE_BYTES}")
            if nonce_commitment(state.view, nonce) != state.commitments[peer]:
                raise self._reject(f"{peer!r} revealed a nonce that does not match its commitment")
            advertised[peer] = inner.blobs
        mine = advertised[self.party_id]
        if (mine[CIPHER_KEY], mine[MASK_KEY]) != (keys.raw_public(state.cipher_key), keys.raw_public(state.mask_key)):
            raise self._reject("the relayed advertisement of this client is not the one it sent")
        seed = ring_seed(self.session, state.round_id, state.view, {peer: blobs[NONCE]
                                                                   for peer, blobs in advertised.items()})
        neighbours = neighbours_of(ring_order(seed, state.cohort), state.degree, self.party_id)
        try:
            peer_keys = {peer: (keys.public_key(advertised[peer][CIPHER_KEY], peer),
                                keys.public_key(advertised[peer][MASK_KEY], peer)) for peer in neighbours}
        except MessageRejected as error:
            raise self._reject(error.reason) from None
        self_seed = os.urandom(32)
        order = tuple(sorted(state.cohort))
        xs = {peer: share_index(order, peer) for peer in neighbours}
        seed_shares = shamir.split(self_seed, state.threshold, xs.values())
        key_shares = shamir.split(keys.raw_private(state.mask_key), state.threshold, xs.values())
        ciphertexts = {peer: keys.encrypt_shares(state.cipher_key, peer_keys[peer][0], NAME, self.session, state.view,
                                                 state.round_id, self.party_id, peer, seed_shares[x] + key_shares[x])
                       for peer, x in xs.items()}
        commitment = self_mask_commitment(self.session, state.view, state.round_id, self.party_id, self_seed)
        new = replace(state, expecting=MASKED, ring_seed=seed, neighbours=neighbours, peer_keys=peer_keys,
                      self_seed=self_seed)
        return new, self._answer(state, SHARE, fields={"self_mask_commitment": commitment}, blobs=ciphertexts)

    def _masked_input(self, state: _Round, envelope: Envelope) -> tuple[_Round, Envelope]:
        """Masks with every neighbour whose shares arrived. Shares that do not decrypt (a malicious peer, or a
        tampering server) do not stop the round: the pairwise seed needs only the peer's public key, so this
        client still masks with it, holds none of its shares, and names it in ``bad_shares_from`` so that the
        server never asks it for them."""
        if envelope.fields or envelope.arrays:
            raise self._reject("a masked-input request holds only relayed shares")
        strangers = sorted(set(envelope.blobs) - set(state.peer_keys))
        if strangers:
            raise self._reject(f"shares from {strangers}, whose keys this client never received")
        held, bad = {}, []
        for peer, ciphertext in sorted(envelope.blobs.items()):
            try:
                plaintext = keys.decrypt_shares(state.cipher_key, state.peer_keys[peer][0], NAME, self.session,
                                                state.view, state.round_id, peer, self.party_id, ciphertext)
            except MessageRejected:
                plaintext = b""
            if len(plaintext) != 2 * shamir.SHARE_BYTES:
                bad.append(peer)
                continue
            held[peer] = (plaintext[:shamir.SHARE_BYTES], plaintext[shamir.SHARE_BYTES:])
        partners = tuple(sorted(envelope.blobs))
        if len(partners) < state.threshold:
            raise self._reject(f"only {len(partners)} neighbours shared keys, fewer than the threshold "
                               f"{state.threshold}; masking with so few would not protect this input")
        masked = self._mask(state, partners)
        # once the masked input is sent the round needs its input no more: the next state (and any checkpoint of it)
        # does not hold it
        new = replace(state, encoded=np.zeros(0, state.encoded.dtype), expecting=CONSISTENCY, partners=partners,
                      held_shares=held)
        return new, self._answer(state, MASKED, fields={"weight": state.weight, "bad_shares_from": bad},
                                 arrays={"masked": masked})

    def _mask(self, state: _Round, partners: tuple[str, ...]) -> np.ndarray:
        """(w·q + z + PRG(b) + Σ ±PRG(s_ij)) mod 2^m, computed in the smallest word type holding m bits and
        packed to ⌈m/8⌉ bytes a value (``packing``). On a copy: masking the state's input in place would save the
        copy (a few ms for 1M values) but could not be undone when a mask worker fails half-way through its span,
        and a refused request must leave the state as it was."""
        config = self.options
        words = state.encoded.copy()
        plus, minus = [state.self_seed], []
        for peer in partners:
            seed = keys.pairwise_seed(state.mask_key, state.peer_keys[peer][1], self.session, state.view,
                                      state.round_id, self.party_id, peer)
            (plus if self.party_id < peer else minus).append(seed)
        apply_masks(words, add=plus, subtract=minus)
        if config.modulus_bits < 8 * words.itemsize:
            np.bitwise_and(words, words.dtype.type(config.word_mask), out=words)
        return pack(words, wire_width(config.modulus_bits))

    def _consistency_check(self, state: _Round, envelope: Envelope) -> tuple[_Round, Envelope]:
        survivors = envelope.fields.get("survivors")
        if set(envelope.fields) != {"survivors"} or envelope.arrays or envelope.blobs \
                or not isinstance(survivors, list) or not all(isinstance(c, str) for c in survivors) \
                or survivors != sorted(set(survivors)) or self.party_id not in survivors \
                or not set(survivors) <= set(state.cohort):
            raise self._reject("the survivor set must be a sorted list of this round's clients, this one included")
        if len(survivors) < self.options.min_clients:
            raise self._reject(f"the survivor set lists {len(survivors)} clients, fewer than this client's "
                               f"min_clients {self.options.min_clients}: the sum would hide this input among too few")
        if len(survivors) < state.min_survivors:
            raise self._reject(f"the survivor set lists {len(survivors)} clients, fewer than the {state.min_survivors} "
                               "this round's input needs: the sum would hold less noise than planned")
        partners_left = set(survivors) & set(state.partners)
        if len(partners_left) < state.threshold:
            raise self._reject(f"only {len(partners_left)} of this client's mask partners survive, fewer than the "
                               f"threshold {state.threshold}; refusing to go on")
        new = replace(state, expecting=UNMASK, survivors=tuple(survivors))
        return new, self._answer(state, CONSISTENCY, fields=self._signed_view(new))

    @staticmethod
    def _signed_view(state: _Round) -> dict[str, Any]:
        """What a consistency signature covers: the view, the ring drawn from every nonce, the survivor set."""
        return {"view": state.view, "ring": state.ring_seed, "survivors": list(state.survivors)}

    def _unmask(self, state: _Round, envelope: Envelope) -> tuple[_Round, Envelope]:
        self_mask_of, mask_key_of = envelope.fields.get("self_mask_of"), envelope.fields.get("mask_key_of")
        if set(envelope.fields) != {"self_mask_of", "mask_key_of"} or envelope.arrays \
                or not isinstance(self_mask_of, list) or not isinstance(mask_key_of, list) \
                or not all(isinstance(peer, str) for peer in self_mask_of + mask_key_of):
            raise self._reject("an unmask request lists 'self_mask_of' and 'mask_key_of'")
        signed = self._signed_view(state)
        for peer, inner in self._relayed(state, envelope, CONSISTENCY, state.neighbours, everyone=False).items():
            if inner.fields != signed or inner.arrays or inner.blobs:
                raise self._reject(f"{peer!r} signed a different survivor set or ring; refusing to reveal any share")
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
            "context": state.context, "expecting": state.expecting, "cohort": list(state.cohort), "view": state.view,
            "nonce": state.nonce.hex(), "commitments": dict(state.commitments), "ring_seed": state.ring_seed,
            "neighbours": list(state.neighbours), "degree": state.degree, "threshold": state.threshold,
            "partners": list(state.partners),
            "cipher_key": None if state.cipher_key is None else keys.raw_private(state.cipher_key).hex(),
            "mask_key": None if state.mask_key is None else keys.raw_private(state.mask_key).hex(),
            "self_seed": state.self_seed.hex(),
            "peer_keys": {peer: [keys.raw_public(cipher).hex(), keys.raw_public(mask).hex()]
                          for peer, (cipher, mask) in state.peer_keys.items()},
            "held_shares": {peer: [self_mask.hex(), mask_key.hex()]
                            for peer, (self_mask, mask_key) in state.held_shares.items()},
            "survivors": list(state.survivors), "min_survivors": state.min_survivors,
        }}

    def _import(self, state: Mapping[str, Any]) -> None:
        saved = state["round"]
        if saved is None:
            self._round = None
            return

        def private(value: str | None) -> X25519PrivateKey | None:
            return None if value is None else X25519PrivateKey.from_private_bytes(bytes.fromhex(value))

        self._round = _Round(
            round_id=int(saved["round_id"]), encoded=np.asarray(saved["encoded"]).astype(self.options.word_dtype),
            weight=int(saved["weight"]), context=checked_context(saved["context"]),
            expecting=str(saved["expecting"]), cohort=tuple(saved["cohort"]), view=str(saved["view"]),
            nonce=bytes.fromhex(saved["nonce"]), commitments=dict(saved["commitments"]),
            ring_seed=str(saved["ring_seed"]), neighbours=tuple(saved["neighbours"]), degree=int(saved["degree"]),
            threshold=int(saved["threshold"]), partners=tuple(saved["partners"]),
            cipher_key=private(saved["cipher_key"]), mask_key=private(saved["mask_key"]),
            self_seed=bytes.fromhex(saved["self_seed"]),
            peer_keys={peer: (X25519PublicKey.from_public_bytes(bytes.fromhex(cipher)),
                              X25519PublicKey.from_public_bytes(bytes.fromhex(mask)))
                       for peer, (cipher, mask) in saved["peer_keys"].items()},
            held_shares={peer: (bytes.fromhex(self_mask), bytes.fromhex(mask_key))
                         for peer, (self_mask, mask_key) in saved["held_shares"].items()},
            survivors=tuple(saved["survivors"]), min_survivors=int(saved["min_survivors"]))

"""The masked protocol's server: relays keys and shares, sums masked inputs, removes the masks.

Stage by stage it keeps the set of clients still live (U1 ⊇ U2 ⊇ U3 ⊇ U4 ⊇ U5 in Bonawitz et
al.'s notation) and, when a stage closes, aborts as soon as some client whose secrets the
result will need has fewer than t live neighbours to hold its shares. The masked inputs are
summed as they arrive (modulo 2^m, in the word type), so memory stays at one vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..base import AggregateResult, Outgoing, ServerSession, checked_round
from ..errors import MessageRejected, ProtocolError, RoundAborted
from ..identity import Identity, Roster
from ..wire import Envelope, expect
from . import keys, shamir
from .client import self_mask_commitment
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

_CIPHERTEXT_BYTES = keys.NONCE_BYTES + 2 * shamir.SHARE_BYTES + keys.TAG_BYTES


@dataclass(frozen=True, eq=False)
class MaskedAggregate(AggregateResult):
    """The aggregate plus the exact integer sum Σ(w_i q_i + z_i) it was dequantized from."""

    integer_sum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass
class _Round:
    round_id: int
    clients: tuple[str, ...]
    length: int
    terms: dict
    ring: tuple[str, ...]
    neighbours: dict[str, tuple[str, ...]]
    threshold: int
    live: set[str]  # who may answer the current stage
    advertised: dict[str, bytes] = field(default_factory=dict)  # signed envelopes, relayed verbatim
    mask_keys: dict[str, bytes] = field(default_factory=dict)
    ciphertexts: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commitments: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    total: np.ndarray | None = None
    consistency: dict[str, bytes] = field(default_factory=dict)
    survivors: tuple[str, ...] = ()
    dropped_needed: tuple[str, ...] = ()
    requests: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    revealed: dict[str, dict[str, bytes]] = field(default_factory=dict)


class MaskedServer(ServerSession):
    protocol_name = NAME
    stages = STAGES

    def __init__(self, options: MaskedOptions, identity: Identity, roster: Roster, *, session: str,
                 state: Mapping[str, Any] | None = None):
        super().__init__(identity, roster, session, options)
        self._round: _Round | None = None
        self._result: MaskedAggregate | None = None
        self._aborted = False
        self.stage = ADVERTISE
        self.round_done = False
        self._load(state)

    # -- round control ----------------------------------------------------------------------------------------
    def begin_round(self, round_id: int, clients: Sequence[str], vector_length: int) -> list[Outgoing]:
        clients = checked_round(self._roster, round_id, clients, vector_length)
        terms = self.options.round_terms(len(clients), vector_length)  # refuses overflowing or unsafe settings
        ring = self.options.ring(round_id, clients)
        self._round = _Round(round_id, clients, vector_length, terms, ring,
                             ring_neighbours(ring, terms["neighbours"]), terms["threshold"], set(clients))
        self._result, self._aborted, self.stage, self.round_done = None, False, ADVERTISE, False
        return [self._request(client, {"ring": list(ring), "terms": terms}) for client in clients]

    def advance(self) -> list[Outgoing]:
        state = self._current()
        step = {ADVERTISE: self._after_advertise, SHARE: self._after_share, MASKED: self._after_masked,
                CONSISTENCY: self._after_consistency, UNMASK: self._after_unmask}[self.stage]
        try:
            return step(state)
        except RoundAborted:
            self._aborted = True
            raise

    def result(self) -> MaskedAggregate:
        if self._result is None:
            raise ProtocolError("the round has not finished")
        return self._result

    def _current(self) -> _Round:
        if self._round is None or self.round_done or self._aborted:
            raise ProtocolError("no round in progress")
        return self._round

    def _request(self, client: str, fields=None, blobs=None) -> Outgoing:
        return self._send(self._envelope(self._round.round_id, self.stage, client, fields, None, blobs))

    def _abort(self, reason: str) -> RoundAborted:
        return RoundAborted(self.stage, reason, self._round.round_id)

    def _require_holders(self, state: _Round, needed, holders: set[str]) -> None:
        """Abort unless every needed client has at least t neighbours among ``holders``."""
        for client in sorted(needed):
            count = len(holders.intersection(state.neighbours[client]))
            if count < state.threshold:
                raise self._abort(f"{client}'s secrets would have only {count} share holders left, fewer than the "
                                  f"threshold {state.threshold} (too many dropouts)")

    # -- receiving ----------------------------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        if self._round is None or self.round_done or self._aborted:
            raise MessageRejected("no round in progress")
        state = self._round
        envelope = expect(self._decode(data), protocol=NAME, round=state.round_id, stage=self.stage,
                          recipient=self.party_id)
        sender = envelope.sender
        if sender not in state.live:
            raise MessageRejected(f"not expected at stage {self.stage!r} (not a live client of this round)", sender)
        received = {ADVERTISE: state.advertised, SHARE: state.ciphertexts, MASKED: state.weights,
                    CONSISTENCY: state.consistency, UNMASK: state.revealed}[self.stage]
        if sender in received:
            raise MessageRejected(f"duplicate message at stage {self.stage!r}", sender)
        {ADVERTISE: self._receive_keys, SHARE: self._receive_shares, MASKED: self._receive_masked,
         CONSISTENCY: self._receive_signature, UNMASK: self._receive_unmask}[self.stage](state, envelope, data)

    def _receive_keys(self, state: _Round, envelope: Envelope, data: bytes) -> None:
        blobs = envelope.blobs
        if set(blobs) != {CIPHER_KEY, MASK_KEY} or envelope.fields or envelope.arrays \
                or any(len(blobs[k]) != keys.KEY_BYTES for k in blobs) or blobs[CIPHER_KEY] == blobs[MASK_KEY]:
            raise MessageRejected("expected two distinct 32-byte X25519 public keys", envelope.sender)
        state.advertised[envelope.sender] = data
        state.mask_keys[envelope.sender] = blobs[MASK_KEY]

    def _receive_shares(self, state: _Round, envelope: Envelope, data: bytes) -> None:
        sender = envelope.sender
        expected = set(state.neighbours[sender]) & set(state.advertised)
        commitment = envelope.fields.get("self_mask_commitment")
        if set(envelope.blobs) != expected or envelope.arrays or set(envelope.fields) != {"self_mask_commitment"} \
                or not isinstance(commitment, str) or len(commitment) != 64:
            raise MessageRejected("expected a commitment and one encrypted share pair per live neighbour", sender)
        if any(len(ciphertext) != _CIPHERTEXT_BYTES for ciphertext in envelope.blobs.values()):
            raise MessageRejected(f"encrypted shares must be {_CIPHERTEXT_BYTES} bytes", sender)
        state.ciphertexts[sender] = dict(envelope.blobs)
        state.commitments[sender] = commitment

    def _receive_masked(self, state: _Round, envelope: Envelope, data: bytes) -> None:
        sender, masked = envelope.sender, envelope.arrays.get("masked")
        weight = envelope.fields.get("weight")
        if set(envelope.arrays) != {"masked"} or envelope.blobs or set(envelope.fields) != {"weight"}:
            raise MessageRejected("expected the array 'masked' and the field 'weight'", sender)
        if masked.dtype != self.options.word_dtype or masked.shape != (state.length,):
            raise MessageRejected(f"expected {state.length} words of {self.options.word_dtype}, got {masked.shape} "
                                  f"{masked.dtype}", sender)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= state.terms["max_weight"]:
            raise MessageRejected(f"weight must be an integer in 1..{state.terms['max_weight']}", sender)
        if self.options.modulus_bits < 8 * masked.itemsize and int(masked.max(initial=0)) > self.options.word_mask:
            raise MessageRejected(f"masked words must be below 2^{self.options.modulus_bits}", sender)
        if state.total is None:
            state.total = np.zeros(state.length, self.options.word_dtype)
        np.add(state.total, masked, out=state.total)  # wraps modulo 2^width, a multiple of 2^m
        state.weights[sender] = weight

    def _receive_signature(self, state: _Round, envelope: Envelope, data: bytes) -> None:
        if envelope.fields != {"survivors": list(state.survivors)} or envelope.arrays or envelope.blobs:
            raise MessageRejected("the signed survivor set differs from the announced one", envelope.sender)
        state.consistency[envelope.sender] = data

    def _receive_unmask(self, state: _Round, envelope: Envelope, data: bytes) -> None:
        self_mask_of, mask_key_of = state.requests[envelope.sender]
        wanted = {SELF_MASK_SHARE + peer for peer in self_mask_of} | {MASK_KEY_SHARE + peer for peer in mask_key_of}
        if set(envelope.blobs) != wanted or envelope.fields or envelope.arrays \
                or any(len(share) != shamir.SHARE_BYTES for share in envelope.blobs.values()):
            raise MessageRejected("expected exactly the requested shares", envelope.sender)
        state.revealed[envelope.sender] = dict(envelope.blobs)

    # -- closing stages -----------------------------------------------------------------------------------------
    def _after_advertise(self, state: _Round) -> list[Outgoing]:
        live = set(state.advertised)
        self._require_holders(state, live, live)
        state.live, self.stage = live, SHARE
        return [self._request(client, blobs={peer: state.advertised[peer] for peer in state.neighbours[client]
                                          if peer in live}) for client in sorted(live)]

    def _after_share(self, state: _Round) -> list[Outgoing]:
        live = set(state.ciphertexts)
        self._require_holders(state, live, live)
        state.live, self.stage = live, MASKED
        return [self._request(client, blobs={peer: state.ciphertexts[peer][client] for peer in state.neighbours[client]
                                          if peer in live}) for client in sorted(live)]

    def _after_masked(self, state: _Round) -> list[Outgoing]:
        survivors = set(state.weights)
        if not survivors:
            raise self._abort("no masked input arrived")
        dropped = set(state.ciphertexts) - survivors
        # a dropped client's mask key is needed only if some survivor masked with it
        state.dropped_needed = tuple(sorted(c for c in dropped if survivors.intersection(state.neighbours[c])))
        self._require_holders(state, survivors | set(state.dropped_needed), survivors)
        state.live, state.survivors, self.stage = survivors, tuple(sorted(survivors)), CONSISTENCY
        return [self._request(client, {"survivors": list(state.survivors)}) for client in state.survivors]

    def _after_consistency(self, state: _Round) -> list[Outgoing]:
        live = set(state.consistency)
        self._require_holders(state, set(state.survivors) | set(state.dropped_needed), live)
        state.live, self.stage = live, UNMASK
        messages = []
        for client in sorted(live):
            near = state.neighbours[client]
            request = (tuple(p for p in near if p in state.survivors), tuple(p for p in near
                                                                             if p in state.dropped_needed))
            state.requests[client] = request
            signatures = {peer: state.consistency[peer] for peer in near if peer in live}
            messages.append(self._request(client, {"self_mask_of": list(request[0]), "mask_key_of": list(request[1])},
                                       signatures))
        return messages

    def _after_unmask(self, state: _Round) -> list[Outgoing]:
        order = tuple(sorted(state.clients))
        expander = MaskExpander(state.length, self.options.word_dtype)
        total = state.total
        for client in state.survivors:
            seed = self._reconstruct(state, order, client, SELF_MASK_SHARE)
            if self_mask_commitment(state.round_id, client, seed) != state.commitments[client]:
                raise self._abort(f"the shares of {client}'s self-mask do not match its commitment")
            expander.subtract(total, seed)
        for client in state.dropped_needed:
            private = X25519PrivateKey.from_private_bytes(self._reconstruct(state, order, client, MASK_KEY_SHARE))
            if keys.raw_public(private) != state.mask_keys[client]:
                raise self._abort(f"the shares of {client}'s mask key do not match its advertised key")
            for survivor in state.survivors:
                if survivor in state.neighbours[client]:  # the survivor masked with this client: undo its term
                    public = keys.public_key(state.mask_keys[survivor], survivor)
                    seed = keys.pairwise_seed(private, public, state.round_id, client, survivor)
                    (expander.subtract if survivor < client else expander.add)(total, seed)
        integer_sum = self._signed_sum(total, len(state.survivors))
        total_weight = sum(state.weights.values())
        vector = self.options.quantizer.dequantize_sum(integer_sum, total_weight)
        self._result = MaskedAggregate(vector, state.survivors, float(total_weight), integer_sum)
        self.round_done = True
        return []

    def _reconstruct(self, state: _Round, order: tuple[str, ...], client: str, prefix: str) -> bytes:
        shares = {share_index(order, holder): revealed[prefix + client] for holder, revealed in state.revealed.items()
                  if prefix + client in revealed}
        if len(shares) < state.threshold:
            raise self._abort(f"only {len(shares)} shares of {client}'s secrets arrived, fewer than the threshold "
                              f"{state.threshold} (too many dropouts)")
        try:
            return shamir.combine(shares, state.threshold)
        except ProtocolError as error:
            raise self._abort(f"{client}'s shares: {error}") from None

    def _signed_sum(self, total: np.ndarray, counted: int) -> np.ndarray:
        """The signed integer sum from its residue mod 2^m: the counted sum lies in [-c·B, 2^m - c·B)."""
        offset = np.uint64(counted * self.options.noise_bound)
        mask = np.uint64(self.options.word_mask)
        shifted = (total.astype(np.uint64) + offset) & mask
        return shifted.astype(np.int64) - np.int64(offset)

    # -- state --------------------------------------------------------------------------------------------------
    def _export(self) -> dict[str, Any]:
        result = self._result
        return {"stage": self.stage, "round_done": self.round_done, "aborted": self._aborted,
                "round": None if self._round is None else _export_round(self._round),
                "result": None if result is None else {
                    "vector": result.vector.copy(), "counted": list(result.counted),
                    "total_weight": result.total_weight, "integer_sum": result.integer_sum.copy()}}

    def _import(self, state: Mapping[str, Any]) -> None:
        self.stage, self.round_done, self._aborted = str(state["stage"]), bool(state["round_done"]), \
            bool(state["aborted"])
        self._round = None if state["round"] is None else _import_round(state["round"], self.options.word_dtype)
        result = state["result"]
        self._result = None if result is None else MaskedAggregate(
            np.array(result["vector"], dtype=np.float64), tuple(result["counted"]), float(result["total_weight"]),
            np.array(result["integer_sum"], dtype=np.int64))


def _hex_map(values: Mapping[str, bytes]) -> dict[str, str]:
    return {key: value.hex() for key, value in values.items()}


def _bytes_map(values: Mapping[str, str]) -> dict[str, bytes]:
    return {key: bytes.fromhex(value) for key, value in values.items()}


def _export_round(state: _Round) -> dict[str, Any]:
    """A round's state as plain values; the neighbourhoods are left out (they follow from ring and terms)."""
    return {
        "round_id": state.round_id, "clients": list(state.clients), "length": state.length, "terms": dict(state.terms),
        "ring": list(state.ring), "live": sorted(state.live), "advertised": _hex_map(state.advertised),
        "mask_keys": _hex_map(state.mask_keys),
        "ciphertexts": {sender: _hex_map(shares) for sender, shares in state.ciphertexts.items()},
        "commitments": dict(state.commitments), "weights": dict(state.weights),
        "total": None if state.total is None else state.total.copy(),
        "consistency": _hex_map(state.consistency), "survivors": list(state.survivors),
        "dropped_needed": list(state.dropped_needed),
        "requests": {client: [list(self_mask_of), list(mask_key_of)]
                     for client, (self_mask_of, mask_key_of) in state.requests.items()},
        "revealed": {holder: _hex_map(shares) for holder, shares in state.revealed.items()},
    }


def _import_round(saved: Mapping[str, Any], word_dtype: np.dtype) -> _Round:
    terms, ring = dict(saved["terms"]), tuple(saved["ring"])
    total = saved["total"]
    return _Round(
        round_id=int(saved["round_id"]), clients=tuple(saved["clients"]), length=int(saved["length"]), terms=terms,
        ring=ring, neighbours=ring_neighbours(ring, int(terms["neighbours"])), threshold=int(terms["threshold"]),
        live=set(saved["live"]), advertised=_bytes_map(saved["advertised"]), mask_keys=_bytes_map(saved["mask_keys"]),
        ciphertexts={sender: _bytes_map(shares) for sender, shares in saved["ciphertexts"].items()},
        commitments=dict(saved["commitments"]), weights={client: int(w) for client, w in saved["weights"].items()},
        total=None if total is None else np.array(total, dtype=word_dtype),
        consistency=_bytes_map(saved["consistency"]),
        survivors=tuple(saved["survivors"]), dropped_needed=tuple(saved["dropped_needed"]),
        requests={client: (tuple(self_mask_of), tuple(mask_key_of))
                  for client, (self_mask_of, mask_key_of) in saved["requests"].items()},
        revealed={holder: _bytes_map(shares) for holder, shares in saved["revealed"].items()})

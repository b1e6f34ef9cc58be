"""The masked protocol's server: relays keys and shares, sums masked inputs, removes the masks.

Stage by stage it keeps the set of clients still live (U1 ⊇ U2 ⊇ U3 ⊇ U4 ⊇ U5 in Bonawitz et
al.'s notation) and, when a stage closes, aborts as soon as some client whose secrets the
result will need has fewer than t live neighbours to hold its shares. The masked inputs are
summed as they arrive (modulo 2^m, in the word type), so memory stays at one vector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .. import parallel
from ..base import AggregateResult, Outgoing, ServerSession, checked_context, checked_round
from ..errors import MessageRejected, ProtocolError, RoundAborted
from ..identity import Identity, Roster
from ..wire import Envelope, detached, expect
from . import keys, shamir
from .config import MaskedOptions
from .graph import ring_neighbours
from .packing import accumulate, high_bits_clear, wire_width
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
    masked_input_bytes,
    share_index,
)
from .view import NONCE_BYTES, nonce_commitment, ring_order, ring_seed, self_mask_commitment, view_digest

_CIPHERTEXT_BYTES = keys.NONCE_BYTES + 2 * shamir.SHARE_BYTES + keys.TAG_BYTES
DECODE_BATCH_BYTES = 1 << 18  # receive_each decodes at most this many bytes of messages ahead of taking them in


@dataclass(frozen=True, eq=False)
class MaskedAggregate(AggregateResult):
    """The aggregate plus the exact integer sum Σ(w_i q_i + z_i) it was dequantized from, and ``flagged``: the
    clients whose revealed Shamir shares were off the committed secret's polynomial (ignored, see shamir.recover)."""

    integer_sum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    flagged: tuple[str, ...] = ()


@dataclass
class _Round:
    round_id: int
    clients: tuple[str, ...]  # the cohort, sorted
    length: int
    terms: dict
    context: str
    view: str
    live: set[str]  # who may answer the current stage
    ring_seed: str = ""  # from every member's nonce, computed once when advertise_keys closes
    ring: tuple[str, ...] = ()  # the cohort ordered by ring_seed
    neighbours: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the signed commitments and advertisements are relayed verbatim; the fields the server checks or uses are kept
    # beside them, parsed, so that no later step has to verify a signed message a second time
    committed: dict[str, bytes] = field(default_factory=dict)
    nonce_commitments: dict[str, str] = field(default_factory=dict)
    advertised: dict[str, bytes] = field(default_factory=dict)
    nonces: dict[str, bytes] = field(default_factory=dict)
    mask_keys: dict[str, bytes] = field(default_factory=dict)
    ciphertexts: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commitments: dict[str, str] = field(default_factory=dict)  # self-mask commitments
    weights: dict[str, int] = field(default_factory=dict)
    bad_shares: dict[str, tuple[str, ...]] = field(default_factory=dict)  # client -> peers whose shares it lacks
    total: np.ndarray | None = None
    consistency: dict[str, bytes] = field(default_factory=dict)
    survivors: tuple[str, ...] = ()
    dropped_needed: tuple[str, ...] = ()
    requests: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    revealed: dict[str, dict[str, bytes]] = field(default_factory=dict)

    @property
    def threshold(self) -> int:
        return int(self.terms["threshold"])


class MaskedServer(ServerSession):
    """The server's side. Every error inside a step, whatever its type, ends the round with RoundAborted
    (issue 10 item 6): a malicious client's message can make a round fail, never crash the caller."""

    protocol_name = NAME
    stages = STAGES

    def __init__(self, options: MaskedOptions, identity: Identity, roster: Roster, *, session: str,
                 state: Mapping[str, Any] | None = None):
        super().__init__(identity, roster, session, options)
        self._round: _Round | None = None
        self._result: MaskedAggregate | None = None
        self._aborted = False
        self.stage = COMMIT
        self.round_done = False
        self._load(state)

    # -- round control ----------------------------------------------------------------------------------------
    def begin_round(self, round_id: int, clients: Sequence[str], vector_length: int, *,
                    round_context: str = "") -> list[Outgoing]:
        clients = tuple(sorted(checked_round(self._roster, round_id, clients, vector_length)))
        context = checked_context(round_context)
        terms = self.options.round_terms(len(clients), vector_length)  # refuses overflowing, unsafe or small rounds
        view = view_digest(self.session, round_id, clients, terms, context)
        self._round = _Round(round_id, clients, vector_length, terms, context, view, set(clients))
        self._result, self._aborted, self.stage, self.round_done = None, False, COMMIT, False
        return self._request_from_each(clients, {"cohort": list(clients), "terms": terms, "round_context": context})

    def advance(self) -> list[Outgoing]:
        state = self._current()
        step = {COMMIT: self._after_commit, ADVERTISE: self._after_advertise, SHARE: self._after_share,
                MASKED: self._after_masked, CONSISTENCY: self._after_consistency, UNMASK: self._after_unmask}
        try:
            return step[self.stage](state)
        except RoundAborted:
            self._aborted = True
            raise
        except Exception as error:  # noqa: BLE001 - any fault inside a step is a clean abort, never a crash
            self._aborted = True
            raise self._abort(f"{type(error).__name__}: {error}") from error

    def result(self) -> MaskedAggregate:
        if self._result is None:
            raise ProtocolError("the round has not finished")
        return self._result

    def _current(self) -> _Round:
        if self._round is None or self.round_done or self._aborted:
            raise RoundAborted(self.stage, "no round in progress",
                               None if self._round is None else self._round.round_id)
        return self._round

    def _request(self, client: str, fields=None, blobs=None) -> Outgoing:
        return self._send(self._envelope(self._round.round_id, self.stage, client, fields, None, blobs))

    def _request_from_each(self, clients: Sequence[str], fields=None, blobs=None) -> list[Outgoing]:
        """The same request to each of ``clients`` (the round's terms, the survivors, every member's signed message
        relayed), encoded once: only the recipient differs."""
        return self._send_to_each(self._envelope(self._round.round_id, self.stage, clients[0], fields, None, blobs),
                                  clients)

    def _abort(self, reason: str) -> RoundAborted:
        return RoundAborted(self.stage, reason, self._round.round_id)

    @staticmethod
    def _holders(state: _Round, client: str, among: set[str]) -> set[str]:
        """Who among ``among`` holds ``client``'s shares: its neighbours that did not report them undecryptable."""
        return {holder for holder in among.intersection(state.neighbours[client])
                if client not in state.bad_shares.get(holder, ())}

    def _require_holders(self, state: _Round, needed, holders: set[str]) -> None:
        """Abort unless every needed client has at least t share holders among ``holders``."""
        for client in sorted(needed):
            count = len(self._holders(state, client, holders))
            if count < state.threshold:
                raise self._abort(f"{client}'s secrets would have only {count} share holders left, fewer than the "
                                  f"threshold {state.threshold} (too many dropouts)")

    def _limit(self, state: _Round) -> int:
        if self.stage == MASKED:
            return masked_input_bytes(len(state.clients), state.length, wire_width(self.options.modulus_bits))
        return control_bytes(len(state.clients))

    # -- receiving ----------------------------------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        self._take(data, None)

    def receive_each(self, messages: Iterable[bytes]) -> Iterator[MessageRejected | None]:
        """``ServerSession.receive_each``. At a control stage (every stage but the masked input's) the batch's
        signatures are checked first, side by side on the worker threads (``wire.decode_each``): a stage brings
        about 100 small signed messages, whose Ed25519 checks are most of their cost (issue 16). Masked inputs are
        taken one by one, each hashed on a worker while it is added (``_receive_masked``), so that one 4 MB input
        at a time is decoded. At most ``DECODE_BATCH_BYTES`` of messages are decoded ahead, and refusals come back
        without their tracebacks (``wire.detached``), so a client's many bloated messages cost bounded memory."""
        messages = list(messages)
        if self.stage == MASKED or self._round is None or self.round_done or self._aborted:
            yield from super().receive_each(messages)
            return
        limit = self._limit(self._round)
        start = 0
        while start < len(messages):
            # at most DECODE_BATCH_BYTES of messages decoded ahead: their parsed headers are all held until taken
            # in, and a client may answer with many large, malformed ones
            stop, size = start + 1, len(messages[start])
            while stop < len(messages) and size + len(messages[stop]) <= DECODE_BATCH_BYTES:
                size += len(messages[stop])
                stop += 1
            for data, item in zip(messages[start:stop], self._decode_each(messages[start:stop], max_bytes=limit)):
                try:
                    self._take(data, item)
                except MessageRejected as rejection:
                    yield detached(rejection)  # its frames would hold this window's decoded messages
                else:
                    yield None
            start = stop

    def _take(self, data: bytes, decoded: Envelope | MessageRejected | None) -> None:
        """``receive`` of ``data``; ``decoded``: what ``_decode`` gives it (envelope or refusal) where the caller
        has decoded it already, None where it has not."""
        if self._round is None or self.round_done or self._aborted:
            raise MessageRejected("no round in progress")
        state = self._round
        if isinstance(decoded, MessageRejected):
            raise decoded
        if decoded is not None:
            envelope, check_payload = decoded, None
        elif self.stage == MASKED:  # the payload is hashed while it is added (_receive_masked)
            envelope, check_payload = self._decode_checking_payload_later(data, max_bytes=self._limit(state))
        else:
            envelope, check_payload = self._decode(data, max_bytes=self._limit(state)), None
        envelope = expect(envelope, protocol=NAME, round=state.round_id, stage=self.stage, recipient=self.party_id)
        sender = envelope.sender
        if sender not in state.live:
            raise MessageRejected(f"not expected at stage {self.stage!r} (not a live client of this round)", sender)
        received = {COMMIT: state.committed, ADVERTISE: state.advertised, SHARE: state.ciphertexts,
                    MASKED: state.weights, CONSISTENCY: state.consistency, UNMASK: state.revealed}[self.stage]
        if sender in received:
            raise MessageRejected(f"duplicate message at stage {self.stage!r}", sender)
        handler = {COMMIT: self._receive_commitment, ADVERTISE: self._receive_keys, SHARE: self._receive_shares,
                   CONSISTENCY: self._receive_signature, UNMASK: self._receive_unmask}
        try:
            if self.stage == MASKED:
                self._receive_masked(state, envelope, check_payload)
            else:
                handler[self.stage](state, envelope, data)
        except MessageRejected:
            raise
        except Exception as error:  # noqa: BLE001 - handlers check before they store: nothing was applied
            raise MessageRejected(f"unreadable {self.stage} message ({type(error).__name__}: {error})",
                                  sender) from None

    def _receive_commitment(self, state: _Round, envelope: Envelope, data: bytes) -> None:
        commitment = envelope.fields.get("commitment")
        if set(envelope.fields) != {"view", "commitment"} or envelope.arrays or envelope.blobs \
                or not isinstance(commitment, str) or len(commitment) != 64:
            raise MessageRejected("expected the fields 'view' and 'commitment'", envelope.sender)
        if envelope.fields["view"] != state.view:
            raise MessageRejected("committed to another view of this round", envelope.sender)
        state.committed[envelope.sender] = data
        state.nonce_commitments[envelope.sender] = commitment

    def _receive_keys(self, state: _Round, envelope: Envelope, data: bytes) -> None:
        blobs, sender = envelope.blobs, envelope.sender
        if set(blobs) != {CIPHER_KEY, MASK_KEY, NONCE} or envelope.fields != {"view": state.view} or envelope.arrays \
                or blobs[CIPHER_KEY] == blobs[MASK_KEY]:
            raise MessageRejected("expected two distinct X25519 public keys, the nonce and the view", sender)
        if len(blobs[NONCE]) != NONCE_BYTES:
            raise MessageRejected(f"the ring nonce has {len(blobs[NONCE])} bytes, not {NONCE_BYTES}", sender)
        keys.public_key(blobs[CIPHER_KEY], sender)  # refuses low-order points now, not in advance() later
        keys.public_key(blobs[MASK_KEY], sender)
        if nonce_commitment(state.view, blobs[NONCE]) != state.nonce_commitments[sender]:
            raise MessageRejected("the revealed nonce does not match the commitment", sender)
        state.advertised[sender] = data
        state.nonces[sender] = blobs[NONCE]
        state.mask_keys[sender] = blobs[MASK_KEY]

    def _receive_shares(self, state: _Round, envelope: Envelope, data: bytes) -> None:
        sender = envelope.sender
        commitment = envelope.fields.get("self_mask_commitment")
        if set(envelope.blobs) != set(state.neighbours[sender]) or envelope.arrays \
                or set(envelope.fields) != {"self_mask_commitment"} \
                or not isinstance(commitment, str) or len(commitment) != 64:
            raise MessageRejected("expected a commitment and one encrypted share pair per neighbour", sender)
        if any(len(ciphertext) != _CIPHERTEXT_BYTES for ciphertext in envelope.blobs.values()):
            raise MessageRejected(f"encrypted shares must be {_CIPHERTEXT_BYTES} bytes", sender)
        state.ciphertexts[sender] = dict(envelope.blobs)
        state.commitments[sender] = commitment

    def _receive_masked(self, state: _Round, envelope: Envelope, check_payload: Callable[[], None]) -> None:
        """Checks the fields, then adds the masked vector while a worker thread checks the payload against its signed
        digest (``wire.decode_checking_payload_later``): the two passes over 4 MB overlap (issue 16). On a mismatch
        the vector is subtracted again, which is exact modulo 2^(word bits), and the message refused: nothing of it
        stays."""
        sender, masked = envelope.sender, envelope.arrays.get("masked")
        weight, bad = envelope.fields.get("weight"), envelope.fields.get("bad_shares_from")
        if set(envelope.arrays) != {"masked"} or envelope.blobs or set(envelope.fields) != {"weight",
                                                                                            "bad_shares_from"}:
            raise MessageRejected("expected the array 'masked' and the fields 'weight' and 'bad_shares_from'", sender)
        width = wire_width(self.options.modulus_bits)
        if masked.dtype != np.uint8 or masked.shape != (state.length, width):
            raise MessageRejected(f"expected {state.length} values packed in {width} bytes each (a ({state.length}, "
                                  f"{width}) uint8 array), got {masked.shape} {masked.dtype}", sender)
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= state.terms["max_weight"]:
            raise MessageRejected(f"weight must be an integer in 1..{state.terms['max_weight']}", sender)
        relayed_to = {peer for peer in state.neighbours[sender] if peer in state.ciphertexts}
        if not isinstance(bad, list) or not all(isinstance(peer, str) for peer in bad) or bad != sorted(set(bad)) \
                or not set(bad) <= relayed_to:
            raise MessageRejected("'bad_shares_from' must list, sorted, neighbours whose shares were relayed", sender)
        if not high_bits_clear(masked, self.options.modulus_bits):
            raise MessageRejected(f"masked words must be below 2^{self.options.modulus_bits}", sender)
        total = np.zeros(state.length, self.options.word_dtype) if state.total is None else state.total
        hashing = parallel.start(check_payload)
        if hashing.done():  # no second thread: checked first, nothing to undo
            hashing.result()
        # one thread adds while the other hashes: here a 4 MB addition on two threads was no faster than on one
        accumulate(total, masked, threads=1)  # wraps modulo 2^(word bits), a multiple of 2^m
        try:
            hashing.result()
        except BaseException:
            accumulate(total, masked, subtract=True, threads=1)  # the exact undo: the sum is as it was
            raise
        state.total = total
        state.weights[sender] = weight
        state.bad_shares[sender] = tuple(bad)

    def _receive_signature(self, state: _Round, envelope: Envelope, data: bytes) -> None:
        signed = {"view": state.view, "ring": state.ring_seed, "survivors": list(state.survivors)}
        if envelope.fields != signed or envelope.arrays or envelope.blobs:
            raise MessageRejected("the signed view, ring or survivor set differs from the announced one",
                                  envelope.sender)
        state.consistency[envelope.sender] = data

    def _receive_unmask(self, state: _Round, envelope: Envelope, data: bytes) -> None:
        self_mask_of, mask_key_of = state.requests[envelope.sender]
        wanted = {SELF_MASK_SHARE + peer for peer in self_mask_of} | {MASK_KEY_SHARE + peer for peer in mask_key_of}
        if set(envelope.blobs) != wanted or envelope.fields or envelope.arrays \
                or any(len(share) != shamir.SHARE_BYTES for share in envelope.blobs.values()):
            raise MessageRejected("expected exactly the requested shares", envelope.sender)
        state.revealed[envelope.sender] = dict(envelope.blobs)

    # -- closing stages -----------------------------------------------------------------------------------------
    def _require_everyone(self, state: _Round, answered, what: str) -> None:
        missing = sorted(set(state.clients) - set(answered))
        if missing:
            raise self._abort(f"{len(missing)} cohort members ({', '.join(missing[:5])}) sent no {what}; the ring "
                              "needs every member's, so the round must restart with a new cohort")

    def _after_commit(self, state: _Round) -> list[Outgoing]:
        self._require_everyone(state, state.committed, "commitment")
        self.stage = ADVERTISE
        return self._request_from_each(state.clients, blobs=dict(state.committed))  # relayed verbatim

    def _after_advertise(self, state: _Round) -> list[Outgoing]:
        self._require_everyone(state, state.advertised, "key advertisement")
        state.ring_seed = ring_seed(self.session, state.round_id, state.view, state.nonces)
        state.ring = ring_order(state.ring_seed, state.clients)
        state.neighbours = ring_neighbours(state.ring, state.terms["neighbours"])
        live = set(state.clients)
        self._require_holders(state, live, live)
        state.live, self.stage = live, SHARE
        return self._request_from_each(state.clients, blobs=dict(state.advertised))

    def _after_share(self, state: _Round) -> list[Outgoing]:
        live = set(state.ciphertexts)
        self._require_holders(state, live, live)
        state.live, self.stage = live, MASKED
        return [self._request(client, blobs={peer: state.ciphertexts[peer][client] for peer in state.neighbours[client]
                                          if peer in live}) for client in sorted(live)]

    def _after_masked(self, state: _Round) -> list[Outgoing]:
        survivors = set(state.weights)
        if len(survivors) < self.options.min_clients:
            raise self._abort(f"only {len(survivors)} masked inputs arrived, fewer than min_clients = "
                              f"{self.options.min_clients} (every client refuses to unmask a smaller sum)")
        dropped = set(state.ciphertexts) - survivors
        # a dropped client's mask key is needed only if some survivor masked with it
        state.dropped_needed = tuple(sorted(c for c in dropped if survivors.intersection(state.neighbours[c])))
        self._require_holders(state, survivors | set(state.dropped_needed), survivors)
        state.live, state.survivors, self.stage = survivors, tuple(sorted(survivors)), CONSISTENCY
        return self._request_from_each(state.survivors, {"survivors": list(state.survivors)})

    def _after_consistency(self, state: _Round) -> list[Outgoing]:
        live = set(state.consistency)
        self._require_holders(state, set(state.survivors) | set(state.dropped_needed), live)
        state.live, self.stage = live, UNMASK
        messages = []
        for client in sorted(live):
            near = [peer for peer in state.neighbours[client] if peer not in state.bad_shares[client]]
            request = (tuple(p for p in near if p in state.survivors),
                       tuple(p for p in near if p in state.dropped_needed))
            state.requests[client] = request
            signatures = {peer: state.consistency[peer] for peer in state.neighbours[client] if peer in live}
            messages.append(self._request(client, {"self_mask_of": list(request[0]), "mask_key_of": list(request[1])},
                                       signatures))
        return messages

    def _after_unmask(self, state: _Round) -> list[Outgoing]:
        order = tuple(state.clients)
        total, flagged, plus, minus = state.total, set(), [], []
        for client in state.survivors:
            commitment = state.commitments[client]
            minus.append(self._reconstruct(state, order, client, SELF_MASK_SHARE, flagged,
                                           lambda secret, c=client, h=commitment:
                                           self_mask_commitment(self.session, state.view, state.round_id, c,
                                                                secret) == h))
        for client in state.dropped_needed:
            advertised = state.mask_keys[client]
            secret = self._reconstruct(state, order, client, MASK_KEY_SHARE, flagged, lambda secret, a=advertised:
                                       keys.raw_public(X25519PrivateKey.from_private_bytes(secret)) == a)
            private = X25519PrivateKey.from_private_bytes(secret)
            for survivor in state.survivors:
                if survivor in state.neighbours[client]:  # the survivor masked with this client: undo its term
                    public = keys.public_key(state.mask_keys[survivor], survivor)
                    seed = keys.pairwise_seed(private, public, self.session, state.view, state.round_id, client,
                                              survivor)
                    (minus if survivor < client else plus).append(seed)
        apply_masks(total, add=plus, subtract=minus)
        integer_sum = self._signed_sum(total, len(state.survivors))
        total_weight = sum(state.weights.values())
        self._check_range(integer_sum, len(state.survivors), total_weight)
        vector = self.options.quantizer.dequantize_sum(integer_sum, total_weight)
        self._result = MaskedAggregate(vector, state.survivors, float(total_weight), integer_sum,
                                       tuple(sorted(flagged)))
        self.round_done = True
        return []

    def _reconstruct(self, state: _Round, order: tuple[str, ...], client: str, prefix: str, flagged: set[str],
                     verify) -> bytes:
        """``client``'s secret from any t consistent revealed shares (shamir.recover); adds the holders of shares
        off the committed secret's polynomial to ``flagged``."""
        holders = {share_index(order, holder): holder for holder, revealed in state.revealed.items()
                   if prefix + client in revealed}
        if len(holders) < state.threshold:
            raise self._abort(f"only {len(holders)} shares of {client}'s secrets arrived, fewer than the threshold "
                              f"{state.threshold} (too many dropouts)")
        shares = {x: state.revealed[holder][prefix + client] for x, holder in holders.items()}
        try:
            secret, bad = shamir.recover(shares, state.threshold, verify)
        except ProtocolError as error:
            raise self._abort(f"{client}'s shares: {error}") from None
        flagged.update(holders[x] for x in bad)
        return secret

    def _check_range(self, integer_sum: np.ndarray, counted: int, total_weight: int) -> None:
        """Every entry of an honest sum lies in [−c·B, Σw·L + c·B] (c counted clients, B the noise bound, L the
        grid's top, Σw the counted weights); anything else means some client sent values outside the protocol's
        range (issue 10 item 6), so the round aborts rather than apply a forged aggregate."""
        slack = counted * self.options.noise_bound
        low, high = -slack, total_weight * self.options.quantizer.levels + slack
        if integer_sum.size and (integer_sum.min() < low or integer_sum.max() > high):
            outside = int(np.count_nonzero((integer_sum < low) | (integer_sum > high)))
            raise self._abort(f"{outside} entries of the decoded sum lie outside [{low}, {high}]: a client sent "
                              "values outside the protocol's range")

    def _signed_sum(self, total: np.ndarray, counted: int) -> np.ndarray:
        """The signed integer sum from its residue mod 2^m: the counted sum lies in [-c·B, 2^m - c·B)."""
        offset = np.int64(counted * self.options.noise_bound)
        shifted = total.astype(np.int64)  # the one new array: the rest is in place (two's complement wraps)
        shifted += offset
        shifted &= np.int64(self.options.word_mask)
        shifted -= offset
        return shifted

    # -- state --------------------------------------------------------------------------------------------------
    def _export(self) -> dict[str, Any]:
        result = self._result
        return {"stage": self.stage, "round_done": self.round_done, "aborted": self._aborted,
                "round": None if self._round is None else _export_round(self._round),
                "result": None if result is None else {
                    "vector": result.vector.copy(), "counted": list(result.counted),
                    "total_weight": result.total_weight, "integer_sum": result.integer_sum.copy(),
                    "flagged": list(result.flagged)}}

    def _import(self, state: Mapping[str, Any]) -> None:
        self.stage, self.round_done, self._aborted = str(state["stage"]), bool(state["round_done"]), \
            bool(state["aborted"])
        saved = state["round"]
        self._round = None if saved is None else _import_round(saved, self.options.word_dtype)
        result = state["result"]
        self._result = None if result is None else MaskedAggregate(
            np.array(result["vector"], dtype=np.float64), tuple(result["counted"]), float(result["total_weight"]),
            np.array(result["integer_sum"], dtype=np.int64), tuple(result["flagged"]))


def _hex_map(values: Mapping[str, bytes]) -> dict[str, str]:
    return {key: value.hex() for key, value in values.items()}


def _bytes_map(values: Mapping[str, str]) -> dict[str, bytes]:
    return {key: bytes.fromhex(value) for key, value in values.items()}


def _export_round(state: _Round) -> dict[str, Any]:
    """A round's state as plain values; the ring and neighbourhoods are left out (they follow from the ring seed,
    the cohort and the terms)."""
    return {
        "round_id": state.round_id, "clients": list(state.clients), "length": state.length, "terms": dict(state.terms),
        "context": state.context, "view": state.view, "ring_seed": state.ring_seed, "live": sorted(state.live),
        "committed": _hex_map(state.committed), "nonce_commitments": dict(state.nonce_commitments),
        "advertised": _hex_map(state.advertised), "nonces": _hex_map(state.nonces),
        "mask_keys": _hex_map(state.mask_keys),
        "bad_shares": {client: list(peers) for client, peers in state.bad_shares.items()},
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
    terms, clients, seed = dict(saved["terms"]), tuple(saved["clients"]), str(saved["ring_seed"])
    ring = ring_order(seed, clients) if seed else ()
    total = saved["total"]
    return _Round(
        round_id=int(saved["round_id"]), clients=clients, length=int(saved["length"]), terms=terms,
        context=checked_context(saved["context"]), view=str(saved["view"]), ring_seed=seed,
        ring=ring, neighbours=ring_neighbours(ring, int(terms["neighbours"])) if ring else {},
        live=set(saved["live"]), committed=_bytes_map(saved["committed"]),
        nonce_commitments=dict(saved["nonce_commitments"]), advertised=_bytes_map(saved["advertised"]),
        nonces=_bytes_map(saved["nonces"]), mask_keys=_bytes_map(saved["mask_keys"]),
        bad_shares={client: tuple(peers) for client, peers in saved["bad_shares"].items()},
        ciphertexts={sender: _bytes_map(shares) for sender, shares in saved["ciphertexts"].items()},
        commitments=dict(saved["commitments"]), weights={client: int(w) for client, w in saved["weights"].items()},
        total=None if total is None else np.array(total, dtype=word_dtype),
        consistency=_bytes_map(saved["consistency"]),
        survivors=tuple(saved["survivors"]), dropped_needed=tuple(saved["dropped_needed"]),
        requests={client: (tuple(self_mask_of), tuple(mask_key_of))
                  for client, (self_mask_of, mask_key_of) in saved["requests"].items()},
        revealed={holder: _bytes_map(shares) for holder, shares in saved["revealed"].items()})

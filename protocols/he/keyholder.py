"""The key holder: makes a fresh CKKS key every round, draws the round's committee once the server has fixed
the counted inputs, and decrypts exactly one aggregate with that key: the exact sum of the inputs its committee
co-signed.

It decrypts only a ciphertext (1) whose SHA-256 every member of the committee it drew signed, on exactly the
counted list and committed-list digest it drew them for, each member having recomputed the homomorphic sum
itself from the counted ciphertexts and checked them against the commitments every site revealed against
(client.py, messages.py); (2) of at least ``required(cohort)`` distinct, signed receipts of that round's
clients, for this session, key, vector length and round context; (3) whose decrypted canary slots equal the
sum of those clients' canaries (chunks.py: they bind the sum to the counted receipts' seeds), once the sum of
their masks is subtracted (masks.py); (4) whose
decrypted total weight and values lie in the range the counted inputs can produce (``min_weight``,
``max_weight``, ``input_bound``), so a zero or tiny total weight never reaches a division. Then it destroys the
key. What it releases is rounded to ``config.output_step`` (Li-Micciancio 2021).

Why a committee (issue 10, item 1): with the public context alone the server can multiply one site's ciphertext
by a plaintext polynomial that is ≈ 1 on the canary slots and ≈ 0 elsewhere and add it to another's: receipts,
quorum and canaries all pass. Canaries (secret positions or not) cannot tell such a combination from the sum;
only someone who recomputes the sum can. The quorum is the whole committee: one honest member refuses a crafted
ciphertext. Committee members hold only the public context.

Why the committee is drawn after the input stage: the server first fixes the counted clients and the committed
list (the "draw" request); only then does the key holder draw ``committee_size`` of the counted clients with OS
randomness (``secrets``), once per round (a second draw request is refused: otherwise the server could ask
again until it got colluders), and sign the announcement the server forwards to the members. So the server
cannot bias the draw, and a client that dropped before its input was counted can never be a member: drawn at
setup, a member that dropped at any point aborted the round (at 10 % dropout and n = 10, about 27 % of
rounds). A member that drops after the draw, before it attests, still aborts the round.

Why masks (issue 10, red-team 2, break 1): a colluding site can submit (c0, c1 + P) for a public P; the sum
passes every check above and decrypts to Σm + P·s, so the released values carry the secret key s. Each client
therefore adds to c0 a uniform polynomial mod q expanded from the seed it seals to this key holder alone, and
the key holder removes the counted clients' masks from the attested sum just before decrypting: a key learnt
from the release decrypts any single ciphertext (held by the server and the committee) only to its input plus a
uniform mask. The release itself, and the key holder's trust, are unchanged.

Why a key per round: one secret key decrypts one ciphertext set, so what a decryption leaks about the key
(CKKS decryptions carry noise that depends on it) can never be combined across rounds, and a round whose
aggregate was refused can never be decrypted later.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..base import KeyHolderSession, Outgoing, array_bytes, bytes_array, checked_context
from ..errors import MessageRejected, ProtocolError
from ..identity import Identity, Roster
from ..wire import Envelope, expect
from . import ckks, masks, messages
from .chunks import SEED_BYTES, Layout, ciphertexts_digest
from .config import HEOptions
from .messages import (
    AGGREGATE,
    ATTEST,
    ATTEST_PREFIX,
    COMMITTEE,
    CONTEXT,
    DRAW,
    NAME,
    RECEIPT,
    RECEIPT_PREFIX,
    RESULT,
    SETUP,
)
from .sealing import open_sealed, private_bytes, public_bytes


@dataclass
class _OpenRound:
    round_id: int
    clients: tuple[str, ...]
    layout: Layout
    round_context: str
    context: ts.Context
    seal_key: X25519PrivateKey
    context_digest: str
    # fixed by the one draw of the round: the counted clients, the committed-list digest, the members drawn
    counted: tuple[str, ...] = ()
    committed: str = ""
    committee: tuple[str, ...] = ()


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
        """Any failure inside is a MessageRejected: nothing else leaves the key holder."""
        try:
            envelope = expect(self._decode(data, max_bytes=self._limit()), protocol=NAME, recipient=self.party_id)
            if self._roster.role(envelope.sender) != "server":
                raise MessageRejected("only the server asks the key holder for keys or decryptions", envelope.sender)
            if envelope.stage == SETUP:
                return self._open_round(envelope)
            if envelope.stage == DRAW:
                return self._draw(envelope)
            if envelope.stage == AGGREGATE:
                return self._decrypt(envelope)
            raise MessageRejected(f"unexpected stage {envelope.stage!r}", envelope.sender)
        except ProtocolError as error:
            if isinstance(error, MessageRejected):
                raise
            raise MessageRejected(str(error)) from None
        except Exception as error:  # noqa: BLE001 (the point: nothing but a refusal leaves the key holder)
            raise MessageRejected(f"internal error: {type(error).__name__}: {error}") from None

    def _limit(self) -> int:
        """The largest message the server can legitimately send now (issue 10, item 9): a setup request, at most
        the roster's clients (the next round's may come at any time); a draw request, at most the open round's
        cohort; an aggregate, only after the draw, the round's ciphertexts with its receipts and attestations."""
        setup = messages.small_limit(len(self._roster))
        state = self._open
        if state is None or not state.committee:
            return setup
        aggregate = messages.ciphertexts_limit(ckks.fresh_ciphertext_bytes(self.options), state.layout.num_chunks,
                                               len(state.clients) + len(state.committee))
        return max(setup, aggregate)

    def _open_round(self, envelope: Envelope) -> list[Outgoing]:
        """A fresh key for a new round; its public context goes, signed, to the server and the clients."""
        if envelope.round <= self._last_round:
            raise MessageRejected(f"round {envelope.round} is not after round {self._last_round}, the last one "
                                  "keys were made for (a retried round needs a new round id)", envelope.sender)
        clients, vector_length, round_context = messages.round_fields(envelope, self._roster)
        if len(clients) < self.options.min_clients:
            raise MessageRejected(f"a cohort of {len(clients)} clients can never reach min_clients = "
                                  f"{self.options.min_clients}", envelope.sender)
        context = ckks.secret_context(self.options)
        public = ckks.public_context_bytes(context)
        seal_key = X25519PrivateKey.generate()
        self._open = _OpenRound(envelope.round, clients, Layout(vector_length, self.options.slots), round_context,
                                context, seal_key, ckks.digest(public))
        self._last_round = envelope.round  # replaces (and so destroys) the key of any unfinished round
        fields = {**messages.parameters(self.options), "clients": list(clients), "vector_length": vector_length,
                  "round_context": round_context}
        blobs = {"context": public, "seal_key": public_bytes(seal_key)}
        return [self._send(self._envelope(envelope.round, CONTEXT, recipient, fields, blobs=blobs))
                for recipient in (envelope.sender, *clients)]

    def _round_for(self, envelope: Envelope) -> _OpenRound:
        state = self._open
        if state is None or state.round_id != envelope.round:
            raise MessageRejected(f"no key is open for round {envelope.round} (never made, superseded, or already "
                                  "used for its one decryption)", envelope.sender)
        return state

    def _counted(self, envelope: Envelope, state: _OpenRound) -> tuple[list[list[str]], list[str]]:
        """The committed list and the counted clients of a draw request or an aggregate, checked."""
        if set(envelope.fields) != {"counted", "committed"}:
            raise MessageRejected(f"a {envelope.stage} request carries exactly the fields 'counted' and 'committed'",
                                  envelope.sender)
        committed = messages.committed_list(envelope.fields["committed"], state.clients, envelope.sender)
        counted = messages.counted_list(envelope.fields["counted"], [client for client, _ in committed],
                                        self.options.required(len(state.clients)), envelope.sender)
        return committed, counted

    def _draw(self, envelope: Envelope) -> list[Outgoing]:
        """Draw the committee from the counted clients the server has now fixed, once per round, and sign it."""
        state = self._round_for(envelope)
        if state.committee:
            raise MessageRejected(f"the committee of round {envelope.round} has already been drawn: a second draw "
                                  "is refused (the server could redraw until it got colluders)", envelope.sender)
        if envelope.blobs or envelope.arrays:
            raise MessageRejected("a draw request carries no blobs or arrays", envelope.sender)
        committed, counted = self._counted(envelope, state)
        size = messages.committee_size(self.options, len(counted))
        state.committee = tuple(sorted(secrets.SystemRandom().sample(counted, size)))
        state.counted, state.committed = tuple(counted), messages.committed_digest(committed)
        announcement = {"counted": counted, "committed": state.committed, "committee": list(state.committee),
                        "round_context": state.round_context}
        return [self._send(self._envelope(envelope.round, COMMITTEE, envelope.sender, announcement))]

    def _decrypt(self, envelope: Envelope) -> list[Outgoing]:
        state = self._round_for(envelope)
        if not state.committee:
            raise MessageRejected(f"no committee has been drawn for round {envelope.round}: nothing to decrypt yet",
                                  envelope.sender)
        committed, counted = self._counted(envelope, state)
        if counted != list(state.counted) or messages.committed_digest(committed) != state.committed:
            raise MessageRejected("the aggregate is for other counted clients or another committed list than the "
                                  "committee was drawn for", envelope.sender)
        receipt_digests = dict(map(tuple, committed))
        blobs = messages.chunk_blobs(envelope, state.layout.num_chunks,
                                     {RECEIPT_PREFIX + client for client in counted}
                                     | {ATTEST_PREFIX + member for member in state.committee})
        self._check_attestations(envelope, state, counted, ciphertexts_digest(blobs))
        seeds = []
        for client in counted:
            receipt = envelope.blobs[RECEIPT_PREFIX + client]
            if messages.digest(receipt) != receipt_digests[client]:
                raise MessageRejected(f"the receipt of {client!r} is not the one it committed", envelope.sender)
            seeds.append(self._seed(receipt, client, state))
        if len(set(seeds)) != len(seeds):
            raise MessageRejected("two receipts carry the same seed (a copied contribution)", envelope.sender)
        sizes = state.layout.chunk_sizes()
        ciphertexts = [ckks.load_ciphertext(state.context, blob, size, self.options, envelope.sender,
                                            messages.chunk_name(index))
                       for index, (blob, size) in enumerate(zip(blobs, sizes))]

        self._open = None  # from here on this key is spent, whatever the outcome: one decryption per key
        summed = masks.summed_masks(seeds, state.layout.num_chunks, ckks.data_moduli(state.context),
                                    self.options.poly_modulus_degree)
        sums, total_weight, canaries = state.layout.join(ckks.decrypt_unmasked(state.context, ciphertexts, sizes,
                                                                               summed))
        expected = np.sum([state.layout.canaries_from(seed) for seed in seeds], axis=0)
        miss = float(np.max(np.abs(canaries - expected)))
        step = self.options.output_step
        if not miss <= step:
            raise MessageRejected(f"the aggregate is not the sum of the {len(counted)} listed contributions (canary "
                                  f"error {miss:.3g} > {step:.3g}); nothing is released and this round's key is "
                                  "destroyed", envelope.sender)
        self._check_ranges(sums, total_weight, len(counted), len(state.clients), envelope.sender)
        released = np.round(sums / step) * step
        result = self._envelope(envelope.round, RESULT, envelope.sender,
                                {"counted": list(counted), "total_weight": float(np.round(total_weight / step) * step)},
                                {"sum": released})
        return [self._send(result)]

    def _check_attestations(self, envelope: Envelope, state: _OpenRound, counted: list[str], total: str) -> None:
        """Every member drawn signed the counted list and committed-list digest it was drawn for and the digest of
        exactly the ciphertexts presented (mod-q addition is exact and serialization deterministic, so an
        honest server's sum and each member's are byte-identical)."""
        expected = {"counted": counted, "committed": state.committed, "sum": total,
                    "round_context": state.round_context}
        for member in state.committee:
            try:
                attestation = expect(self._decode(envelope.blobs[ATTEST_PREFIX + member],
                                                  max_bytes=messages.small_limit(len(state.clients))),
                                     protocol=NAME, round=state.round_id, stage=ATTEST, sender=member,
                                     recipient=self.party_id)
            except MessageRejected as rejection:
                raise MessageRejected(f"attestation listed for {member!r} refused: {rejection.reason}",
                                      envelope.sender) from None
            if dict(attestation.fields) != expected or attestation.blobs or attestation.arrays:
                raise MessageRejected(f"committee member {member!r} did not attest this aggregate (other counted "
                                      "clients, commitments or sum): refusing to decrypt it", envelope.sender)

    def _check_ranges(self, sums: np.ndarray, total_weight: float, counted: int, cohort: int, sender: str) -> None:
        """Refuse a sum that ``counted`` inputs within the configured ranges cannot produce (issue 10, item 6):
        malicious sites can encrypt anything, and a zero or tiny total weight would blow up the division."""
        step = self.options.output_step
        low, high = self.options.weight_range(cohort)
        if not counted * low - step <= total_weight <= counted * high + step:
            raise MessageRejected(f"the total weight {total_weight:.6g} of {counted} inputs is outside "
                                  f"[{counted} · min_weight, {counted} · max_weight] = [{counted * low:.6g}, "
                                  f"{counted * high:.6g}]: nothing is released", sender)
        limit = (total_weight * self.options.input_bound if self.options.input_bound
                 else counted * self.options.per_client_bound(cohort))
        peak = float(np.max(np.abs(sums)))
        if not peak <= limit + step:
            raise MessageRejected(f"a summed entry of magnitude {peak:.6g} exceeds what {counted} inputs within "
                                  f"input_bound can produce ({limit:.6g}): nothing is released", sender)

    def _seed(self, data: bytes, client: str, state: _OpenRound) -> bytes:
        """The canary seed from ``client``'s receipt, after checking the receipt is the client's own, for this round."""
        try:
            receipt = expect(self._decode(data, max_bytes=messages.small_limit(1)), protocol=NAME,
                             round=state.round_id, stage=RECEIPT, sender=client, recipient=self.party_id)
        except MessageRejected as rejection:
            raise MessageRejected(f"receipt listed for {client!r} refused: {rejection.reason}", rejection.sender) \
                from None
        messages.check_receipt(receipt, state.context_digest, state.layout.vector_length, state.round_context)
        seed = open_sealed(receipt.blobs["seed"], state.seal_key,
                           messages.seal_associated(self.session, state.round_id, client, state.context_digest),
                           client)
        if len(seed) != SEED_BYTES:
            raise MessageRejected(f"the sealed seed has {len(seed)} bytes, not {SEED_BYTES}", client)
        return seed

    def _export(self) -> dict[str, Any]:
        state = self._open
        return {"last_round": self._last_round, "open": None if state is None else {
            "round_id": state.round_id, "clients": list(state.clients), "vector_length": state.layout.vector_length,
            "round_context": state.round_context, "context": bytes_array(ckks.secret_context_bytes(state.context)),
            "seal_key": private_bytes(state.seal_key).hex(), "context_digest": state.context_digest,
            "counted": list(state.counted), "committed": state.committed, "committee": list(state.committee)}}

    def _import(self, state: Mapping[str, Any]) -> None:
        self._last_round, saved = int(state["last_round"]), state["open"]
        self._open = None if saved is None else _OpenRound(
            int(saved["round_id"]), tuple(saved["clients"]), Layout(int(saved["vector_length"]), self.options.slots),
            checked_context(saved["round_context"]),
            ckks.secret_context_from_state(array_bytes(saved["context"]), self.options),
            X25519PrivateKey.from_private_bytes(bytes.fromhex(saved["seal_key"])), str(saved["context_digest"]),
            tuple(saved["counted"]), str(saved["committed"]), tuple(saved["committee"]))

"""A client: commits to its encrypted input, reveals it only against the list of every commitment, and, when
the key holder drew it into the round's committee (after the input stage, from the clients the server counted),
recomputes the sum and co-signs its digest.

As a committee member it holds only the public context: it cannot decrypt anything. It checks what the key
holder cannot see (that every counted ciphertext is the one its site committed to before any ciphertext was
revealed, and that the sum is exactly theirs) and signs the digest of the sum it computed itself; the key
holder decrypts only a ciphertext whose digest every member signed, so one honest member is enough to stop
a crafted ciphertext (issue 10, item 1). It takes part only on the key holder's signed committee announcement
(the server forwards it): one that names it, for the committed list it revealed against and this round
context. It keeps a running sum, never the counted inputs.

Every ciphertext it uploads carries, in its first part, a uniform mask mod q that only the key holder can remove
(masks.py): whoever learns the round's secret key (e.g. from a colluding site's malformed ciphertext, issue 10,
red-team 2) still decrypts a single input only to noise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tenseal as ts

from ..base import (
    ClientSession,
    Outgoing,
    array_bytes,
    bytes_array,
    checked_context,
    checked_input,
    export_inputs,
    import_inputs,
)
from ..errors import ConfigurationError, MessageRejected, ProtocolError
from ..identity import Identity, Roster
from ..wire import Envelope, expect
from ..x25519 import check_x25519_public_key
from . import ckks, masks, messages
from .chunks import SEED_BYTES, Layout, ciphertexts_commitment, ciphertexts_digest
from .config import HEOptions
from .messages import (
    ATTEST,
    COMMIT,
    COMMITTED,
    COMMITTEE,
    CONTEXT,
    INPUT,
    NAME,
    RECEIPT,
    RECEIPT_PREFIX,
    VERIFY,
)
from .sealing import seal


@dataclass
class _Round:
    """What a client keeps of the round it committed to (and, as a committee member, its running sum)."""

    round_id: int
    keyholder: str
    clients: tuple[str, ...]
    vector_length: int
    context_bytes: bytes
    receipt: bytes
    ciphertexts: list[bytes] | None  # None once uploaded
    committed: str = ""  # the digest of the committed list it revealed against (every relayed input must carry it)
    counted: tuple[str, ...] = ()  # member: the counted clients and the committee the key holder announced
    committee: tuple[str, ...] = ()
    seen: dict[str, str] = field(default_factory=dict)  # member: relayed client -> its ciphertexts digest
    total: list[ts.sealapi.Ciphertext] = field(default_factory=list)  # member: the running sum
    context: ts.Context | None = None  # member: the parsed public context


class HEClient(ClientSession):
    protocol_name = NAME

    def __init__(self, options: HEOptions, identity: Identity, roster: Roster, server_id: str, *, session: str,
                 state: Mapping[str, Any] | None = None):
        super().__init__(identity, roster, session, options)
        self._server_id = server_id
        self._inputs: dict[int, tuple[np.ndarray, float]] = {}
        self._context = ""
        self._round: _Round | None = None
        self._load(state)

    def set_input(self, round_id: int, vector: np.ndarray, weight: float, *, round_context: str = "") -> int:
        """Refuses (ProtocolError) a weight outside [min_weight, max_weight] or an entry beyond
        ``input_bound`` where those are set: the key holder refuses a sum outside what such inputs produce,
        so an honest client learns it here instead. Nothing is clipped: returns 0."""
        array, weight = checked_input(vector, weight)
        options = self.options
        if weight < options.min_weight or (options.max_weight and weight > options.max_weight):
            raise ProtocolError(f"the weight {weight:g} is outside [min_weight, max_weight] = [{options.min_weight:g}, "
                                f"{options.max_weight or float('inf'):g}]")
        peak = float(np.max(np.abs(array)))
        if options.input_bound and peak > options.input_bound:
            raise ProtocolError(f"an input entry of magnitude {peak:.6g} exceeds input_bound = {options.input_bound:g}")
        self._inputs, self._context = {round_id: (array, weight)}, checked_context(round_context)
        return 0

    def handle(self, data: bytes) -> list[Outgoing]:
        """Any failure inside is a protocol error: a MessageRejected for whatever a message did (the session
        stays as it was), a ConfigurationError only for this client's own input (``_check_fits``). A runner
        refuses a message on MessageRejected alone, so a stray TypeError on a crafted field must not escape."""
        try:
            return self._handle(data)
        except ProtocolError:
            raise
        except Exception as error:  # noqa: BLE001 (the point: nothing but a protocol error leaves the client)
            raise MessageRejected(f"internal error: {type(error).__name__}: {error}") from None

    def _handle(self, data: bytes) -> list[Outgoing]:
        envelope = self._decode(data, max_bytes=self._limit())
        expect(envelope, protocol=NAME)
        if envelope.stage == CONTEXT:
            return self._commit(expect(envelope, recipient=self.party_id))
        state = self._round
        if state is None or envelope.round != state.round_id:
            raise MessageRejected(f"no round {envelope.round} is open at this client (replayed or stale message)",
                                  envelope.sender)
        if envelope.stage == COMMITTED:
            return self._reveal(expect(envelope, sender=self._server_id, recipient=self.party_id), state)
        if envelope.stage == COMMITTEE:
            self._join(expect(envelope, recipient=self._server_id), state)
            return []
        if self.party_id not in state.committee:
            raise MessageRejected(f"unexpected {envelope.stage!r} message: not on this round's committee",
                                  envelope.sender)
        if envelope.stage == INPUT:
            self._add_relayed(expect(envelope, recipient=self._server_id), state)
            return []
        if envelope.stage == VERIFY:
            return self._attest(expect(envelope, sender=self._server_id, recipient=self.party_id), state)
        raise MessageRejected(f"unexpected stage {envelope.stage!r}", envelope.sender)

    def _limit(self) -> int:
        """The largest message this client can legitimately be sent now (issue 10, item 9): a context message,
        listing at most the roster's clients (the next round's may come at any time; it also bounds the open
        round's committed list and announcement); only a committee member, once announced, is relayed
        ciphertexts and the receipts of the round's cohort."""
        context = messages.context_limit(self.options, len(self._roster))
        state = self._round
        if state is None or self.party_id not in state.committee:
            return context
        layout = Layout(state.vector_length, self.options.slots)
        return max(context, messages.ciphertexts_limit(ckks.fresh_ciphertext_bytes(self.options), layout.num_chunks,
                                                       len(state.clients)))

    def _commit(self, envelope: Envelope) -> list[Outgoing]:
        """Encrypt under the round's key, each chunk masked (masks.py) from the seed sealed to the key holder
        alone; keep the ciphertexts and send only the signed receipt."""
        keyholder = envelope.sender
        if self._roster.role(keyholder) != "keyholder":
            raise MessageRejected(f"a public context must come from the key holder, not from a "
                                  f"{self._roster.role(keyholder)!r} (whoever made the key could decrypt our input)",
                                  keyholder)
        if envelope.round not in self._inputs:
            raise MessageRejected(f"no input is waiting for round {envelope.round} (replayed or stale context)",
                                  keyholder)
        vector, weight = self._inputs[envelope.round]
        clients = messages.check_context_fields(envelope, self.options, None, len(vector), self._context)
        if self.party_id not in clients:
            raise MessageRejected("the context does not list this client", keyholder)
        seal_key = check_x25519_public_key(envelope.blobs["seal_key"], "the key holder", sender=keyholder)
        context = ckks.load_public_context(envelope.blobs["context"], self.options, keyholder)
        self._check_fits(vector, weight, len(clients))

        layout = Layout(len(vector), self.options.slots)
        seed = os.urandom(SEED_BYTES)
        ciphertexts = ckks.encrypt(context, layout.split(vector * weight, weight, layout.canaries_from(seed)),
                                   masks.masks(seed, layout.num_chunks, ckks.data_moduli(context),
                                               self.options.poly_modulus_degree))
        context_digest = ckks.digest(envelope.blobs["context"])
        sealed = seal(seed, seal_key, messages.seal_associated(self.session, envelope.round, self.party_id,
                                                                context_digest))
        receipt = self._sign(self._envelope(envelope.round, RECEIPT, keyholder,
                                            {"ciphertexts": ciphertexts_digest(ciphertexts), "context": context_digest,
                                             "vector_length": len(vector), "round_context": self._context},
                                            blobs={"seed": sealed}))
        answer = self._envelope(envelope.round, COMMIT, self._server_id, blobs={"receipt": receipt})
        self._round = _Round(envelope.round, keyholder, clients, len(vector), envelope.blobs["context"], receipt,
                             ciphertexts)
        del self._inputs[envelope.round]  # answer once: a replayed context finds nothing
        return [self._send(answer)]

    def _reveal(self, envelope: Envelope, state: _Round) -> list[Outgoing]:
        """Upload the ciphertexts only against a list of commitments that holds ours and is large enough."""
        if state.ciphertexts is None:
            raise MessageRejected("this client has already revealed its input for this round", envelope.sender)
        if set(envelope.fields) != {"committed"} or envelope.blobs or envelope.arrays:
            raise MessageRejected("a reveal request carries exactly the field 'committed'", envelope.sender)
        committed = messages.committed_list(envelope.fields["committed"], state.clients, envelope.sender)
        if [self.party_id, messages.digest(state.receipt)] not in committed:
            raise MessageRejected("the committed list does not hold this client's receipt", envelope.sender)
        required = self.options.required(len(state.clients))
        if len(committed) < required:
            raise MessageRejected(f"only {len(committed)} clients committed; an aggregate needs {required}, so this "
                                  "client reveals nothing", envelope.sender)
        blobs = {messages.chunk_name(index): ciphertext for index, ciphertext in enumerate(state.ciphertexts)}
        digest = messages.committed_digest(committed)
        answer = self._envelope(state.round_id, INPUT, self._server_id, {"chunks": len(state.ciphertexts),
                                                                         "committed": digest}, blobs=blobs)
        state.ciphertexts, state.committed = None, digest
        return [self._send(answer)]

    def _join(self, envelope: Envelope, state: _Round) -> None:
        """Take part as a committee member only on the key holder's own signed announcement (relayed by the
        server), naming this client, drawn for the committed list it revealed against and this round context."""
        if envelope.sender != state.keyholder:
            raise MessageRejected(f"a committee announcement must be signed by the key holder {state.keyholder!r}, "
                                  f"not by {envelope.sender!r} (the server may not pick the members)", envelope.sender)
        if state.committee:
            raise MessageRejected("this round's committee has already been announced to this client", envelope.sender)
        if not state.committed:
            raise MessageRejected("a committee announcement for a round this client revealed no input in",
                                  envelope.sender)
        counted = messages.counted_list(envelope.fields.get("counted"), state.clients,
                                        self.options.required(len(state.clients)), envelope.sender)
        committee = messages.check_announcement(envelope, self.options, counted, state.committed, self._context)
        if self.party_id not in committee:
            raise MessageRejected("the committee announcement does not name this client", envelope.sender)
        state.counted, state.committee = tuple(counted), committee

    def _member_context(self, state: _Round) -> ts.Context:
        if state.context is None:
            state.context = ckks.load_public_context(state.context_bytes, self.options, state.keyholder)
        return state.context

    def _add_relayed(self, envelope: Envelope, state: _Round) -> None:
        """Committee member: check one relayed input and add it to the running sum."""
        sender = envelope.sender
        if sender not in state.counted:
            raise MessageRejected("a relayed input from a client the key holder's announcement does not count", sender)
        if sender in state.seen:
            raise MessageRejected("this client's input was already relayed", sender)
        layout = Layout(state.vector_length, self.options.slots)
        committed = envelope.fields.get("committed")
        if set(envelope.fields) != {"chunks", "committed"} or envelope.fields["chunks"] != layout.num_chunks \
                or not isinstance(committed, str):
            raise MessageRejected("a relayed input carries exactly the fields 'chunks' (of this vector length) and "
                                  "'committed'", sender)
        if committed != state.committed:
            raise MessageRejected("this input was revealed against another list of commitments than this member's "
                                  "own (a site was shown a different list)", sender)
        blobs = messages.chunk_blobs(envelope, layout.num_chunks, set())
        state.total = ckks.add_ciphertexts(state.total, self._member_context(state), blobs, layout.chunk_sizes(),
                                           self.options, sender,
                                           [messages.chunk_name(index) for index in range(len(blobs))])
        # decode verified the payload against its signed digest: the commitment comes from that digest
        state.seen[sender] = ciphertexts_commitment([len(blob) for blob in blobs], envelope.payload)

    def _attest(self, envelope: Envelope, state: _Round) -> list[Outgoing]:
        """Committee member: check the commitments against the inputs summed, then sign the sum's digest."""
        sender = envelope.sender
        if not state.seen:
            raise MessageRejected("no input was relayed to this committee member (nothing to attest)", sender)
        names = {name for name in envelope.blobs if name.startswith(RECEIPT_PREFIX)}
        if set(envelope.fields) != {"counted"} or set(envelope.blobs) != names or envelope.arrays:
            raise MessageRejected("a verify request carries exactly the field 'counted' and the committed receipts",
                                  sender)
        receipts = {name[len(RECEIPT_PREFIX):]: envelope.blobs[name] for name in names}
        fields = {}
        for client, data in receipts.items():
            if client not in state.clients:
                raise MessageRejected(f"a committed receipt of {client!r}, not a client of this round", sender)
            receipt = expect(self._decode(data, max_bytes=messages.small_limit(1)), protocol=NAME,
                             round=state.round_id, stage=RECEIPT, sender=client, recipient=state.keyholder)
            messages.check_receipt(receipt, ckks.digest(state.context_bytes), state.vector_length, self._context)
            fields[client] = receipt.fields["ciphertexts"]
        committed = [[client, messages.digest(receipts[client])] for client in sorted(receipts)]
        committed_digest = messages.committed_digest(committed)
        if committed_digest != state.committed:
            raise MessageRejected("the committed receipts are not the list the inputs were revealed against", sender)
        if len(set(fields.values())) != len(fields):
            raise MessageRejected("two receipts commit to the same ciphertexts (a copied contribution)", sender)
        counted = messages.counted_list(envelope.fields["counted"], sorted(receipts),
                                        self.options.required(len(state.clients)), sender)
        if counted != list(state.counted) or set(counted) != set(state.seen):
            raise MessageRejected(f"the counted clients {counted} are not those the key holder drew the committee "
                                  f"for {list(state.counted)} and whose inputs were relayed {sorted(state.seen)}",
                                  sender)
        wrong = [client for client in counted if state.seen[client] != fields[client]]
        if wrong:
            raise MessageRejected(f"the inputs of {wrong} are not the ciphertexts their receipts committed to", sender)
        total = ciphertexts_digest(self._serialized_total(state))
        attestation = self._sign(self._envelope(state.round_id, ATTEST, state.keyholder,
                                                {"counted": counted, "committed": committed_digest, "sum": total,
                                                 "round_context": self._context}))
        self._round = None  # attest once; the running sum is no longer needed
        return [Outgoing(self._server_id, attestation)]

    def _serialized_total(self, state: _Round) -> list[bytes]:
        """Committee member: its running sum serialized (``ckks.serialize``), as the server serializes its own."""
        sizes = Layout(state.vector_length, self.options.slots).chunk_sizes()
        return ckks.serialize(state.total, sizes) if state.total else []

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
        state = self._round
        return {"inputs": export_inputs(self._inputs), "round_context": self._context, "round": None if state is None
                else {"round_id": state.round_id, "keyholder": state.keyholder, "clients": list(state.clients),
                      "vector_length": state.vector_length, "context": bytes_array(state.context_bytes),
                      "receipt": state.receipt.hex(),
                      "ciphertexts": None if state.ciphertexts is None else [bytes_array(c) for c in state.ciphertexts],
                      "committed": state.committed, "counted": list(state.counted),
                      "committee": list(state.committee), "seen": dict(state.seen),
                      "total": [bytes_array(total) for total in self._serialized_total(state)]}}

    def _import(self, state: Mapping[str, Any]) -> None:
        self._inputs, self._context = import_inputs(state["inputs"]), checked_context(state["round_context"])
        saved = state["round"]
        if saved is None:
            self._round = None
            return
        ciphertexts = saved["ciphertexts"]
        restored = _Round(int(saved["round_id"]), str(saved["keyholder"]), tuple(saved["clients"]),
                          int(saved["vector_length"]), array_bytes(saved["context"]), bytes.fromhex(saved["receipt"]),
                          None if ciphertexts is None else [array_bytes(c) for c in ciphertexts],
                          str(saved["committed"]), tuple(saved["counted"]), tuple(saved["committee"]),
                          {str(k): str(v) for k, v in saved["seen"].items()})
        if saved["total"]:
            context = self._member_context(restored)
            restored.total = [ckks.ciphertext_from_state(context, array_bytes(total)) for total in saved["total"]]
        self._round = restored

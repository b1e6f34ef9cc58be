"""The CKKS protocol: precision, dropouts, a key holder that decrypts only verified sums, and hostile input.

Most tests use N = 4096 (moduli [60, 40], the default scale): the same precision and checks as the
default N = 8192, at half the cost. The harness runs the parties by hand so tests can intercept,
forge and replay messages.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import tenseal as ts

from protocols import (
    ConfigurationError,
    Identity,
    MessageRejected,
    ProtocolError,
    Roster,
    RoundAborted,
    decode,
    encode,
    make_protocol,
    new_session_id,
    simulate_round,
)
from protocols.he import HEOptions, HEProtocol, masks, messages
from protocols.he.chunks import Layout, ciphertexts_digest
from protocols.wire import Envelope

SMALL = {"poly_modulus_degree": 4096}
LENGTH = 2500  # two ciphertexts at N = 4096


def updates(n: int, length: int = LENGTH, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.5, 0.5, size=length) for _ in range(n)]


def weighted_sum(xs, ws, skip=()):
    return sum(w * x for i, (w, x) in enumerate(zip(ws, xs)) if i not in skip)


class Harness:
    """A server, a key holder and ``n`` clients with fresh identities, driven message by message through the
    stages commit, input, draw, verify and decrypt, so that tests can intercept, forge and replay messages."""

    def __init__(self, n: int = 3, length: int = LENGTH, **options):
        self.protocol = make_protocol("he", **{**SMALL, **options})
        self.length = length
        self.server_identity = Identity.generate("server")
        self.keyholder_identity = Identity.generate("keyholder")
        self.client_identities = [Identity.generate(f"client-{i}") for i in range(n)]
        self.identities = {i.party_id: i for i in [self.server_identity, self.keyholder_identity,
                                                   *self.client_identities]}
        self.roster = Roster.from_identities(self.server_identity, self.client_identities, self.keyholder_identity)
        self.session = new_session_id()
        self.server = self.protocol.server(self.server_identity, self.roster, session=self.session)
        self.keyholder = self.protocol.keyholder(self.keyholder_identity, self.roster, session=self.session)
        self.clients = {i.party_id: self.protocol.client(i, self.roster, session=self.session)
                        for i in self.client_identities}
        self.xs = updates(n, length)
        self.ws = [float(w) for w in np.random.default_rng(1).integers(1, 300, size=n)]

    def open(self, round_id: int = 0, round_context: str = "") -> dict[str, bytes]:
        """Inputs set, the key holder's contexts delivered to the server; returns {recipient: context message}."""
        for client, x, w in zip(self.clients.values(), self.xs, self.ws):
            client.set_input(round_id, x, w, round_context=round_context)
        [request] = self.server.begin_round(round_id, list(self.clients), self.length, round_context=round_context)
        self.contexts = {m.recipient: m.data for m in self.keyholder.handle(request.data)}
        self.server.receive(self.contexts["server"])
        return self.contexts

    def commit(self, skip=()) -> dict[str, bytes]:
        """Every client not in ``skip`` commits; returns {client: commit message} (the server has them)."""
        commits = {}
        for name in self.clients:
            if name not in skip:
                [answer] = self.clients[name].handle(self.contexts[name])
                commits[name] = answer.data
                self.server.receive(answer.data)
        return commits

    def reveal(self, skip=()) -> dict[str, bytes]:
        """The server shows the committed list; every client not in ``skip`` reveals. Returns the inputs."""
        self.requests = {m.recipient: m.data for m in self.server.advance()}
        inputs = {}
        for name, request in self.requests.items():
            if name not in skip:
                [answer] = self.clients[name].handle(request)
                inputs[name] = answer.data
                self.server.receive(answer.data)
        return inputs

    def start(self, round_id: int = 0, skip=(), round_context: str = "") -> dict[str, bytes]:
        """A round up to the clients' inputs (the clients in ``skip`` vanish before revealing)."""
        self.open(round_id, round_context)
        self.commit()
        return self.reveal(skip={f"client-{index}" for index in skip})

    def draw(self) -> bytes:
        """The server closes the input stage and asks the key holder to draw the committee from the counted
        clients; returns the key holder's announcement (the server has it)."""
        [self.draw_request] = self.server.advance()
        [announcement] = self.keyholder.handle(self.draw_request.data)
        self.server.receive(announcement.data)
        self.committee = tuple(self.read(announcement.data).fields["committee"])
        return announcement.data

    def verify(self) -> list[bytes]:
        """The committee is drawn (unless it already is); the server relays the announcement and the inputs to
        it, and it attests; returns the attestations."""
        if self.server.stage == "input":
            self.draw()
        attestations = []
        for message in self.server.advance():
            for answer in self.clients[message.recipient].handle(message.data):
                attestations.append(answer.data)
                self.server.receive(answer.data)
        return attestations

    def finish(self):
        self.verify()
        [aggregate] = self.server.advance()
        [result] = self.keyholder.handle(aggregate.data)
        self.server.receive(result.data)
        assert self.server.round_done
        return self.server.result()

    def public_context(self) -> ts.Context:
        return ts.context_from(self.read(self.contexts["server"]).blobs["context"])

    def read(self, data: bytes) -> Envelope:
        return decode(data, self.roster, session=self.session)

    def sign(self, envelope: Envelope) -> bytes:
        """``envelope`` signed by its sender's own key, in this session unless it names another."""
        stamped = dataclasses.replace(envelope, session=envelope.session or self.session, roster=self.roster.digest)
        return encode(stamped, self.identities[envelope.sender])

    def receipts(self, commits: dict[str, bytes]) -> dict[str, bytes]:
        return {name: self.read(data).blobs["receipt"] for name, data in commits.items()}

    def forged_aggregate(self, round_id: int, chunks: list[bytes], receipts: dict[str, bytes],
                         attestations: dict[str, bytes], counted: list[str] | None = None,
                         committed: list[list[str]] | None = None) -> bytes:
        """An aggregate the (malicious) server signs with whatever ciphertexts, receipts and attestations it likes."""
        blobs = {f"c{i:06d}": c for i, c in enumerate(chunks)}
        blobs.update({f"r-{name}": receipt for name, receipt in receipts.items()})
        blobs.update({f"a-{name}": attestation for name, attestation in attestations.items()})
        committed = committed if committed is not None else [[name, hashlib.sha256(receipts[name]).hexdigest()]
                                                             for name in sorted(receipts)]
        return self.sign(Envelope("he", round_id, "aggregate", "server", "keyholder",
                                  {"counted": counted if counted is not None else sorted(receipts),
                                   "committed": committed}, blobs=blobs))


def chunks_of(harness: Harness, data: bytes) -> list[bytes]:
    envelope = harness.read(data)
    return [envelope.blobs[name] for name in sorted(envelope.blobs) if name.startswith("c")]


def summed(context: ts.Context, *chunk_lists: list[bytes]) -> list[bytes]:
    totals = [ts.ckks_vector_from(context, chunk) for chunk in chunk_lists[0]]
    for chunks in chunk_lists[1:]:
        for total, chunk in zip(totals, chunks):
            total += ts.ckks_vector_from(context, chunk)
    return [total.serialize() for total in totals]


# --- correctness ---------------------------------------------------------------------------------------------

def test_default_parameters_meet_the_documented_precision_and_size():
    """10 clients, values in [-0.5, 0.5], integer weights up to 300, the default N = 8192."""
    options = HEOptions()
    xs = updates(10, length=5000)
    ws = [float(w) for w in np.random.default_rng(2).integers(1, 301, size=10)]
    error = np.abs(simulate_round("he", xs, ws) - weighted_sum(xs, ws)).max()
    assert error <= options.output_step / 2 + 1e-6  # 2^-17 from rounding the release, ~1e-7 of CKKS noise
    assert options.output_step == 2.0**-16
    assert make_protocol("he").bytes_per_parameter() <= 10 * 4  # at most 10x float32 (measured: 32.07)


def test_result_reports_counted_clients_and_total_weight():
    harness = Harness(3)
    harness.start()
    result = harness.finish()
    assert result.counted == ("client-0", "client-1", "client-2")
    assert result.total_weight == pytest.approx(sum(harness.ws), abs=1e-4)
    np.testing.assert_allclose(result.vector, weighted_sum(harness.xs, harness.ws), atol=1e-5)


@pytest.mark.parametrize("dropped", ["client-0", "client-1", "client-2", "client-3"])
def test_any_client_that_drops_before_revealing_is_left_out_and_the_round_goes_on(dropped):
    """The committee is drawn from the counted clients only after the input stage: a client that dropped before
    its input was counted can never be a member, so it can never abort the round (drawn at setup, it could)."""
    harness = Harness(4, length=300)
    harness.open()
    harness.commit()
    harness.reveal(skip={dropped})
    result = harness.finish()
    assert dropped not in harness.committee and dropped not in result.counted and len(result.counted) == 3
    skip = {list(harness.clients).index(dropped)}
    np.testing.assert_allclose(result.vector, weighted_sum(harness.xs, harness.ws, skip=skip), atol=1e-5)


def test_a_committee_member_that_drops_before_attesting_still_aborts_the_round_at_the_verify_stage():
    """The price of a committee that must all co-sign: a member lost between the draw and its attestation."""
    harness = Harness(4, length=10, committee_size=2)
    harness.start()
    harness.draw()
    member = harness.committee[0]
    for message in harness.server.advance():
        if message.recipient != member:
            for answer in harness.clients[message.recipient].handle(message.data):
                harness.server.receive(answer.data)
    with pytest.raises(RoundAborted, match=f"committee members \\['{member}'\\] did not attest") as caught:
        harness.server.advance()
    assert caught.value.stage == "verify"


def test_too_few_commitments_abort_the_round_at_the_commit_stage():
    with pytest.raises(RoundAborted, match="only 2 of 3 clients committed; at least 3") as caught:
        simulate_round("he", updates(3, length=10), dropouts={0: "commit"}, **SMALL)
    assert caught.value.stage == "commit"


def test_a_key_holder_that_refuses_aborts_the_round_at_the_decrypt_stage():
    harness = Harness(3)
    harness.start()
    harness.verify()
    [aggregate] = harness.server.advance()
    with pytest.raises(MessageRejected):  # a tampered aggregate, say: the key holder never answers
        harness.keyholder.handle(aggregate.data[:-1] + bytes([aggregate.data[-1] ^ 1]))
    with pytest.raises(RoundAborted) as caught:
        harness.server.advance()
    assert caught.value.stage == "decrypt"


def test_the_server_and_the_committee_serialize_the_same_sum_byte_for_byte():
    harness = Harness(3)
    harness.start()
    attestations = [harness.read(data).fields["sum"] for data in harness.verify()]
    server_sum = ciphertexts_digest(harness.server._sum_blobs)
    assert attestations == [server_sum] * len(harness.committee)


# --- the server can add but not read -------------------------------------------------------------------------

def test_the_server_context_is_public_and_cannot_decrypt():
    harness = Harness(3)
    inputs = harness.start()
    context = harness.server._context
    assert not context.is_private() and not context.has_secret_key()
    ciphertext = ts.ckks_vector_from(context, chunks_of(harness, inputs["client-0"])[0])
    with pytest.raises(ValueError, match="secret"):
        ciphertext.decrypt()


def test_the_server_refuses_a_context_that_carries_the_secret_key():
    harness = Harness(3)
    [request] = harness.server.begin_round(0, list(harness.clients), harness.length)
    honest = harness.read(harness.keyholder.handle(request.data)[0].data)
    secret = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[60, 40])
    leaky = Envelope("he", 0, "context", "keyholder", "server", honest.fields,
                     blobs={"context": secret.serialize(save_secret_key=True), "seal_key": honest.blobs["seal_key"]})
    with pytest.raises(MessageRejected, match="secret key"):
        harness.server.receive(harness.sign(leaky))


def test_the_server_sums_as_inputs_arrive_but_keeps_each_counted_input_until_the_committee_has_it():
    # one running sum of ciphertexts, plus every counted input as its client signed it (the committee needs them
    # verbatim): the server's memory grows with the number of counted clients until the verify stage
    harness = Harness(6, length=100)
    inputs = harness.start()
    assert len(harness.server._sum) == Layout(100, 2048).num_chunks == 1
    assert len(harness.server._inputs) == len(inputs) == 6


# --- ciphertext masks: a single ciphertext decrypts to noise under any key ------------------------------------


def test_every_mask_is_uniform_mod_its_prime_and_differs_per_chunk_and_per_client():
    """χ² on the top four bits of r/q over 6 masks × 4096 coefficients (15 degrees of freedom; 37.7 is the
    0.999 quantile): a sampler short of the prime's range (e.g. 59-bit words: half the buckets empty) fails it. No two
    chunks of one client, nor the same chunk of two clients, share a coefficient (2^-60 each by chance)."""
    moduli = [1152921504606830593]  # the data prime SEAL picks for N = 4096, moduli [60, 40]
    first, second = (masks.masks(bytes([client]) * 32, 3, moduli, 4096) for client in (1, 2))
    values = np.concatenate([mask.ravel() for mask in first + second])
    assert values.dtype == np.uint64 and int(values.max()) < moduli[0]
    counts = np.bincount((values.astype(np.float64) / moduli[0] * 16).astype(np.int64), minlength=16)
    expected = values.size / 16
    assert np.sum((counts - expected) ** 2 / expected) < 37.7
    pairs = [(first[0], first[1]), (first[1], first[2]), (first[0], second[0]), (first[2], second[2])]
    assert all(not np.any(a == b) for a, b in pairs)
    assert np.array_equal(masks.chunk_mask(bytes([1]) * 32, 2, moduli, 4096), first[2])  # the key holder's copy


def test_a_single_ciphertext_decrypts_to_noise_even_with_the_secret_key_and_the_sum_to_the_inputs():
    """What a recovered key is worth (tests/test_redteam2_issue10.py): each counted ciphertext, decrypted with the
    round's own secret key, is its input plus a uniform mask (~2^25 per slot against inputs of at most 150); the
    released sum is still exact."""
    harness = Harness(3, length=10)
    inputs = harness.start()
    secret = harness.keyholder._open.context
    for index, client in enumerate(harness.clients):
        [chunk] = chunks_of(harness, inputs[client])
        decrypted = np.asarray(ts.ckks_vector_from(secret, chunk).decrypt())[:harness.length]
        assert np.median(np.abs(decrypted - harness.ws[index] * harness.xs[index][:10])) > 1e5
    np.testing.assert_allclose(harness.finish().vector, weighted_sum(harness.xs, harness.ws), atol=1e-5)


def test_masks_cover_every_data_prime_of_a_multi_prime_level():
    """Two data primes (40 and 30 bits): each mask row is uniform mod its own prime, and the key holder removes
    both rows exactly (a wrong RNS layout would decrypt to noise)."""
    options = {"coeff_mod_bit_sizes": (40, 30, 30), "global_scale_bits": 30}
    xs, ws = updates(3, length=100), [3.0, 1.0, 2.0]
    step = HEOptions(**SMALL, **options).output_step
    np.testing.assert_allclose(simulate_round("he", xs, ws, **SMALL, **options), weighted_sum(xs, ws), atol=step)


# --- the key holder decrypts only a verified sum -------------------------------------------------------------

def honest_aggregate(harness: Harness) -> Envelope:
    harness.verify()
    [aggregate] = harness.server.advance()
    return harness.read(aggregate.data)


def test_the_key_holder_refuses_an_aggregate_a_committee_member_did_not_attest():
    harness = Harness(3)
    harness.start()
    envelope = honest_aggregate(harness)
    blobs = {name: blob for name, blob in envelope.blobs.items() if name != f"a-{harness.committee[0]}"}
    with pytest.raises(MessageRejected, match="expected the blobs"):
        harness.keyholder.handle(harness.sign(dataclasses.replace(envelope, blobs=blobs)))
    forged = {**envelope.blobs, f"a-{harness.committee[0]}": envelope.blobs[f"a-{harness.committee[-1]}"]}
    with pytest.raises(MessageRejected, match="attestation listed for"):
        harness.keyholder.handle(harness.sign(dataclasses.replace(envelope, blobs=forged)))
    [result] = harness.keyholder.handle(harness.sign(envelope))  # refusals changed nothing: the honest one works
    np.testing.assert_allclose(harness.read(result.data).arrays["sum"], weighted_sum(harness.xs, harness.ws),
                               atol=1e-5)


def test_the_key_holder_refuses_a_list_that_names_a_client_twice():
    harness = Harness(3)
    harness.start()
    envelope = honest_aggregate(harness)
    fields = {**envelope.fields, "counted": ["client-0", "client-0", "client-1", "client-2"]}
    with pytest.raises(MessageRejected, match="distinct clients"):
        harness.keyholder.handle(harness.sign(dataclasses.replace(envelope, fields=fields)))


def test_the_key_holder_decrypts_once_per_round_and_only_forward():
    harness = Harness(3)
    harness.start(round_id=4)
    harness.verify()
    [aggregate] = harness.server.advance()
    harness.keyholder.handle(aggregate.data)
    with pytest.raises(MessageRejected, match="oversized message"):  # no open round carries ciphertexts any more
        harness.keyholder.handle(aggregate.data)  # replayed: a second decryption under the same key
    with pytest.raises(MessageRejected, match="no key is open for round 4"):  # the key itself is gone
        harness.keyholder.handle(harness.forged_aggregate(4, [b""], {}, {}))
    with pytest.raises(MessageRejected, match="round 3 is not after round 4"):
        harness.keyholder.handle(harness.sign(Envelope("he", 3, "setup", "server", "keyholder",
                                                       {"clients": ["client-0"], "vector_length": 5,
                                                        "round_context": ""})))


def test_only_the_server_may_ask_the_key_holder():
    harness = Harness(3)
    request = Envelope("he", 0, "setup", "client-0", "keyholder", {"clients": ["client-0"], "vector_length": 5,
                                                                   "round_context": ""})
    with pytest.raises(MessageRejected, match="only the server"):
        harness.keyholder.handle(harness.sign(request))


@pytest.mark.parametrize("round_context", ["x" * 129, "model\nB", "modèle", 7])
def test_the_key_holder_refuses_a_setup_request_whose_round_context_is_not_one_and_names_the_server(round_context):
    harness = Harness(3)
    request = Envelope("he", 0, "setup", "server", "keyholder", {"clients": list(harness.clients), "vector_length": 5,
                                                                 "round_context": round_context})
    with pytest.raises(MessageRejected, match="field 'round_context'") as caught:
        harness.keyholder.handle(harness.sign(request))
    assert caught.value.sender == "server"  # the refusal is charged to the party that sent it
    assert harness.keyholder._open is None  # and opens no round


def test_the_server_serializes_and_hashes_the_sum_once_for_every_attestation_and_the_aggregate(monkeypatch):
    # at P = 1M the sum is about 32 MB: it is serialized and hashed once, when the verify stage opens, and
    # reused for each member's attestation and for the aggregate request
    harness = Harness(4)
    harness.start()
    harness.draw()
    outgoing = harness.server.advance()
    attestations = [answer.data for message in outgoing for answer in harness.clients[message.recipient].handle(
        message.data)]

    def again(*args):
        raise AssertionError("the server serialized or hashed the sum again")

    with monkeypatch.context() as patched:
        patched.setattr("protocols.he.ckks.serialize", again)
        patched.setattr("protocols.he.server.ciphertexts_digest", again)
        for attestation in attestations:
            harness.server.receive(attestation)
        [aggregate] = harness.server.advance()
    [result] = harness.keyholder.handle(aggregate.data)
    harness.server.receive(result.data)
    np.testing.assert_allclose(harness.server.result().vector, weighted_sum(harness.xs, harness.ws), atol=1e-5)


def test_the_committee_is_drawn_by_the_key_holder_from_the_counted_clients_after_the_input_stage():
    harness = Harness(5, length=10, committee_size=3)
    harness.start(skip={4})
    assert all("committee" not in harness.read(data).fields for data in harness.contexts.values())
    [draw] = harness.server.advance()
    request = harness.read(draw.data)
    assert request.recipient == "keyholder" and request.stage == "draw"
    assert request.fields["counted"] == ["client-0", "client-1", "client-2", "client-3"]
    [answer] = harness.keyholder.handle(harness.sign(request))
    announcement = harness.read(answer.data)
    assert announcement.sender == "keyholder" and announcement.stage == "committee"
    committee = announcement.fields["committee"]
    assert len(committee) == 3 and set(committee) <= set(request.fields["counted"])
    assert announcement.fields["committed"] == messages.committed_digest(request.fields["committed"])


def test_the_key_holder_draws_once_per_round_so_the_server_cannot_redraw_until_it_gets_colluders():
    harness = Harness(4, length=10, committee_size=1)
    harness.start()
    harness.draw()
    with pytest.raises(MessageRejected, match="already been drawn: a second draw is refused"):
        harness.keyholder.handle(harness.draw_request.data)
    fewer = harness.read(harness.draw_request.data)  # nor with another counted set
    fewer = dataclasses.replace(fewer, fields={**fewer.fields, "counted": fewer.fields["counted"][:3]})
    with pytest.raises(MessageRejected, match="already been drawn"):
        harness.keyholder.handle(harness.sign(fewer))
    result = harness.finish()  # the refusals changed nothing
    np.testing.assert_allclose(result.vector, weighted_sum(harness.xs, harness.ws), atol=1e-5)


def test_a_member_refuses_a_committee_announcement_the_key_holder_did_not_sign():
    """A server that names its own committee (colluders, or a member it wants to mislead) is refused."""
    harness = Harness(4, length=10, committee_size=2)
    harness.start()
    data = harness.draw()
    genuine = harness.read(data)
    outsider = next(name for name in harness.clients if name not in harness.committee)
    own = dataclasses.replace(genuine, sender="server",
                              fields={**genuine.fields, "committee": sorted([outsider, harness.committee[0]])})
    with pytest.raises(MessageRejected, match="must be signed by the key holder"):
        harness.clients[outsider].handle(harness.sign(own))
    at = data.rfind(harness.committee[-1].encode())  # the key holder's announcement, a member's name swapped
    with pytest.raises(MessageRejected, match="bad signature from 'keyholder'"):
        harness.clients[outsider].handle(data[:at] + outsider.encode() + data[at + len(outsider):])
    with pytest.raises(MessageRejected, match="does not name this client"):
        harness.clients[outsider].handle(harness.sign(genuine))
    with pytest.raises(MessageRejected, match="not on this round's committee"):  # so it takes no relayed input
        harness.clients[outsider].handle(harness.server._inputs[harness.committee[0]])


# --- hostile or broken input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.array([1.0, np.nan, 0.0]), np.array([np.inf, 0.0, 0.0])])
def test_nan_or_inf_is_refused_on_the_client_before_encryption(bad):
    harness = Harness(2, length=3)
    with pytest.raises(ProtocolError, match="NaN or infinite"):
        harness.clients["client-0"].set_input(0, bad, 1.0)


def test_the_server_rejects_forged_truncated_or_replayed_input_and_keeps_its_state():
    harness = Harness(3)
    inputs = harness.start(skip={2})
    [late] = harness.clients["client-2"].handle(harness.requests["client-2"])
    data = late.data
    with pytest.raises(MessageRejected, match="bad signature from 'client-2'"):
        harness.server.receive(data[:-1] + bytes([data[-1] ^ 0x40]))
    with pytest.raises(MessageRejected, match="truncated"):
        harness.server.receive(data[:len(data) // 2])
    with pytest.raises(MessageRejected, match="duplicate input"):
        harness.server.receive(inputs["client-0"])
    harness.server.receive(data)
    np.testing.assert_allclose(harness.finish().vector, weighted_sum(harness.xs, harness.ws), atol=1e-5)


def test_the_server_rejects_a_wrong_vector_length():
    harness = Harness(3)
    harness.start(skip={1})
    [answer] = harness.clients["client-1"].handle(harness.requests["client-1"])
    envelope = harness.read(answer.data)
    short = ts.ckks_vector(harness.public_context(), [0.0] * 10).serialize()
    one_chunk = Envelope("he", 0, "input", "client-1", "server", {**envelope.fields, "chunks": 1},
                         blobs={"c000000": short})
    with pytest.raises(MessageRejected, match="expected the fields 'chunks' = 2"):
        harness.server.receive(harness.sign(one_chunk))


def test_receipts_from_another_session_are_refused_by_the_server():
    harness = Harness(3)
    harness.open()
    [answer] = harness.clients["client-1"].handle(harness.contexts["client-1"])
    envelope = harness.read(answer.data)
    genuine = harness.read(envelope.blobs["receipt"])
    elsewhere = harness.sign(dataclasses.replace(genuine, session=new_session_id()))  # the client's own signature
    with pytest.raises(MessageRejected, match="bad receipt: message of session"):
        harness.server.receive(harness.sign(dataclasses.replace(envelope, blobs={"receipt": elsewhere})))


def test_the_server_rejects_input_that_does_not_match_its_commitment():
    harness = Harness(3)
    inputs = harness.start(skip={1})
    [answer] = harness.clients["client-1"].handle(harness.requests["client-1"])
    envelope = harness.read(answer.data)
    swapped = harness.read(inputs["client-0"]).blobs
    with pytest.raises(MessageRejected, match="not those the client committed to"):
        harness.server.receive(harness.sign(dataclasses.replace(envelope, blobs=swapped)))


def test_a_client_refuses_input_of_another_length_than_the_round():
    harness = Harness(3, length=10)
    harness.clients["client-0"].set_input(0, np.zeros(11), 1.0)
    [request] = harness.server.begin_round(0, list(harness.clients), 10)
    context = next(m.data for m in harness.keyholder.handle(request.data) if m.recipient == "client-0")
    with pytest.raises(MessageRejected, match="vector_length"):
        harness.clients["client-0"].handle(context)


def context_for(harness: Harness, recipient: str = "client-0") -> bytes:
    harness.clients[recipient].set_input(0, np.zeros(harness.length), 1.0)
    [request] = harness.server.begin_round(0, list(harness.clients), harness.length)
    return next(m.data for m in harness.keyholder.handle(request.data) if m.recipient == recipient)


def test_a_client_refuses_a_tampered_public_context():
    harness = Harness(3, length=10)
    data = context_for(harness)
    middle = len(data) // 2  # inside the serialized context: the payload the key holder's signed header binds
    with pytest.raises(MessageRejected, match="from 'keyholder' rejected: the payload does not match its signed "
                                              "digest"):
        harness.clients["client-0"].handle(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])
    harness.clients["client-0"].handle(data)  # the genuine one still works


def test_a_client_accepts_a_context_only_from_the_key_holder():
    """Whoever made the key could decrypt the client's input: a server's own context must be refused."""
    harness = Harness(3, length=10)
    genuine = harness.read(context_for(harness))
    own = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[60, 40])
    public = own.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    forged = Envelope("he", 0, "context", "server", "client-0", genuine.fields,
                      blobs={"context": public, "seal_key": genuine.blobs["seal_key"]})
    with pytest.raises(MessageRejected, match="must come from the key holder"):
        harness.clients["client-0"].handle(harness.sign(forged))


@pytest.mark.parametrize("change, reason", [("secret key", "carries a secret key"),
                                            ("other parameters", "are not the configured"),
                                            ("garbage", "does not parse")])
def test_a_client_refuses_a_signed_context_that_is_not_a_public_context_of_the_parameters(change, reason):
    harness = Harness(3, length=10)
    genuine = harness.read(context_for(harness))
    if change == "secret key":
        context = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[60, 40]).serialize(save_secret_key=True)
    elif change == "other parameters":
        context = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 40]).serialize()
    else:
        context = b"\x00" * 100
    forged = Envelope("he", 0, "context", "keyholder", "client-0", genuine.fields,
                      blobs={"context": context, "seal_key": genuine.blobs["seal_key"]})
    with pytest.raises(MessageRejected, match=reason):
        harness.clients["client-0"].handle(harness.sign(forged))


def test_a_client_answers_a_context_once():
    harness = Harness(3, length=10)
    data = context_for(harness)
    harness.clients["client-0"].handle(data)
    with pytest.raises(MessageRejected, match="no input is waiting"):
        harness.clients["client-0"].handle(data)


def test_a_client_refuses_input_that_could_overflow_the_modulus():
    options = HEOptions(**SMALL)
    with pytest.raises(ConfigurationError, match="input too large"):
        simulate_round("he", [np.full(4, 0.5)] * 3, [1.0, 1.0, options.capacity], **SMALL)


def test_a_client_refuses_its_own_input_outside_the_configured_ranges():
    harness = Harness(3, length=4, min_weight=1.0, max_weight=10.0, input_bound=0.5)
    client = harness.clients["client-0"]
    with pytest.raises(ProtocolError, match="outside \\[min_weight, max_weight\\]"):
        client.set_input(0, np.zeros(4), 11.0)
    with pytest.raises(ProtocolError, match="outside"):
        client.set_input(0, np.zeros(4), 0.5)
    with pytest.raises(ProtocolError, match="exceeds input_bound"):
        client.set_input(0, np.full(4, 0.6), 1.0)
    assert client.set_input(0, np.full(4, 0.5), 10.0) == 0  # nothing clipped


# --- configuration -------------------------------------------------------------------------------------------

def test_options_by_name_and_their_validation():
    protocol = make_protocol("he", poly_modulus_degree=4096, coeff_mod_bit_sizes=[50, 40], global_scale_bits=35,
                             min_clients=3)
    assert isinstance(protocol, HEProtocol) and protocol.options.coeff_mod_bit_sizes == (50, 40)
    assert protocol.stages == ("commit", "input", "draw", "verify", "decrypt") and protocol.needs_keyholder
    with pytest.raises(ConfigurationError, match="128-bit security"):
        make_protocol("he", poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 60])
    with pytest.raises(ConfigurationError, match="global_scale_bits"):
        make_protocol("he", global_scale_bits=21)
    with pytest.raises(ConfigurationError, match="leave"):
        make_protocol("he", coeff_mod_bit_sizes=[40, 40], global_scale_bits=40)
    with pytest.raises(ConfigurationError, match="poly_modulus_degree"):
        make_protocol("he", poly_modulus_degree=5000)
    with pytest.raises(ConfigurationError, match="min_clients"):
        make_protocol("he", min_clients=3).check(2, 10)
    with pytest.raises(ConfigurationError, match="min_fraction"):
        make_protocol("he", min_fraction=0)
    with pytest.raises(ConfigurationError, match="committee_size"):
        make_protocol("he", committee_size=0)
    with pytest.raises(ConfigurationError, match="max_weight"):
        make_protocol("he", min_weight=2.0, max_weight=1.0)
    defaults = HEOptions()
    assert (defaults.min_clients, defaults.min_fraction, defaults.committee_size) == (3, 0.5, 3)
    assert [defaults.required(n) for n in (1, 3, 6, 7, 100)] == [3, 3, 3, 4, 50]

"""The CKKS protocol: precision, dropouts, a key holder that decrypts only verified sums, and hostile input.

Most tests use N = 4096 (moduli [60, 40], the default scale): the same precision and checks as the
default N = 8192, at half the cost. The harness runs the parties by hand so tests can intercept,
forge and replay messages.
"""

from __future__ import annotations

import dataclasses

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
from protocols.he import HEOptions, HEProtocol
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
    """A server, a key holder and ``n`` clients with fresh identities, driven message by message."""

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

    def start(self, round_id: int = 0, skip=()):
        """Begin a round up to the clients' inputs; returns {client: input bytes} (the server has them too)."""
        for client, x, w in zip(self.clients.values(), self.xs, self.ws):
            client.set_input(round_id, x, w)
        [request] = self.server.begin_round(round_id, list(self.clients), self.length)
        self.contexts = {m.recipient: m.data for m in self.keyholder.handle(request.data)}
        self.server.receive(self.contexts["server"])
        inputs = {}
        for index, name in enumerate(self.clients):
            if index in skip:
                continue
            [answer] = self.clients[name].handle(self.contexts[name])
            inputs[name] = answer.data
            self.server.receive(answer.data)
        return inputs

    def finish(self):
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

    def forged_aggregate(self, round_id: int, chunks: list[bytes], receipts: dict[str, bytes],
                         counted: list[str] | None = None) -> bytes:
        """An aggregate the (malicious) server signs with whatever ciphertexts and receipts it likes."""
        blobs = {f"c{i:06d}": c for i, c in enumerate(chunks)}
        blobs.update({f"r-{name}": receipt for name, receipt in receipts.items()})
        return self.sign(Envelope("he", round_id, "aggregate", "server", "keyholder",
                                  {"counted": counted if counted is not None else sorted(receipts)}, blobs=blobs))


def chunks_of(harness: Harness, data: bytes) -> list[bytes]:
    envelope = harness.read(data)
    return [envelope.blobs[name] for name in sorted(envelope.blobs) if name.startswith("c")]


def receipt_of(harness: Harness, data: bytes) -> bytes:
    return harness.read(data).blobs["receipt"]


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


def test_dropped_clients_are_left_out_of_the_sum():
    xs = updates(4, length=300)
    ws = [1.0, 2.0, 3.0, 4.0]
    out = simulate_round("he", xs, ws, dropouts={1: "input", 3: "input"}, **SMALL)
    np.testing.assert_allclose(out, weighted_sum(xs, ws, skip={1, 3}), atol=1e-5)


def test_too_few_inputs_abort_the_round_at_the_input_stage():
    with pytest.raises(RoundAborted, match="min_clients = 3") as caught:
        simulate_round("he", updates(3, length=10), dropouts={0: "input"}, min_clients=3, **SMALL)
    assert caught.value.stage == "input"


def test_a_key_holder_that_refuses_aborts_the_round_at_the_decrypt_stage():
    harness = Harness(2)
    harness.start()
    [aggregate] = harness.server.advance()
    with pytest.raises(MessageRejected):  # a tampered aggregate, say: the key holder never answers
        harness.keyholder.handle(aggregate.data[:-1] + bytes([aggregate.data[-1] ^ 1]))
    with pytest.raises(RoundAborted) as caught:
        harness.server.advance()
    assert caught.value.stage == "decrypt"


# --- the server can add but not read -------------------------------------------------------------------------

def test_the_server_context_is_public_and_cannot_decrypt():
    harness = Harness(2)
    inputs = harness.start()
    context = harness.server._context
    assert not context.is_private() and not context.has_secret_key()
    ciphertext = ts.ckks_vector_from(context, chunks_of(harness, inputs["client-0"])[0])
    with pytest.raises(ValueError, match="secret"):
        ciphertext.decrypt()


def test_the_server_refuses_a_context_that_carries_the_secret_key():
    harness = Harness(2)
    [request] = harness.server.begin_round(0, list(harness.clients), harness.length)
    honest = harness.read(harness.keyholder.handle(request.data)[0].data)
    secret = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[60, 40])
    leaky = Envelope("he", 0, "context", "keyholder", "server", honest.fields,
                     blobs={"context": secret.serialize(save_secret_key=True), "seal_key": honest.blobs["seal_key"]})
    with pytest.raises(MessageRejected, match="secret key"):
        harness.server.receive(harness.sign(leaky))


def test_server_memory_holds_one_running_sum_whatever_the_number_of_clients():
    harness = Harness(6, length=100)
    harness.start()
    assert len(harness.server._sum) == Layout(100, 2048).num_chunks == 1


# --- the key holder decrypts only a verified sum -------------------------------------------------------------

def test_the_key_holder_refuses_a_single_ciphertext_presented_as_the_aggregate():
    harness = Harness(3)
    inputs = harness.start()
    receipts = {name: receipt_of(harness, data) for name, data in inputs.items()}
    forged = harness.forged_aggregate(0, chunks_of(harness, inputs["client-0"]), receipts)
    with pytest.raises(MessageRejected, match="not the sum of the 3 listed contributions"):
        harness.keyholder.handle(forged)
    with pytest.raises(MessageRejected, match="no key is open"):  # the key is spent: not even the honest sum now
        harness.finish()


@pytest.mark.parametrize("combination", [
    pytest.param(lambda c: [c[0], c[0]], id="one client twice"),
    pytest.param(lambda c: [c[0], c[1]], id="a subset of the list"),
    pytest.param(lambda c: [c[0], c[1], c[2], c[2]], id="one contribution doubled"),
])
def test_the_key_holder_refuses_any_other_combination_of_contributions(combination):
    harness = Harness(3)
    inputs = harness.start()
    chunks = [chunks_of(harness, inputs[name]) for name in harness.clients]
    receipts = {name: receipt_of(harness, data) for name, data in inputs.items()}
    forged = harness.forged_aggregate(0, summed(harness.public_context(), *combination(chunks)), receipts)
    with pytest.raises(MessageRejected, match="not the sum"):
        harness.keyholder.handle(forged)


def test_the_key_holder_accepts_the_honest_sum_of_a_listed_subset():
    harness = Harness(3)
    inputs = harness.start()
    chunks = [chunks_of(harness, inputs[name]) for name in ("client-0", "client-2")]
    receipts = {name: receipt_of(harness, inputs[name]) for name in ("client-0", "client-2")}
    [result] = harness.keyholder.handle(harness.forged_aggregate(0, summed(harness.public_context(), *chunks),
                                                                 receipts))
    released = harness.read(result.data).arrays["sum"]
    np.testing.assert_allclose(released, weighted_sum(harness.xs, harness.ws, skip={1}), atol=1e-5)


def test_the_key_holder_refuses_fewer_than_min_clients_contributions():
    harness = Harness(3)
    inputs = harness.start()
    forged = harness.forged_aggregate(0, chunks_of(harness, inputs["client-0"]),
                                      {"client-0": receipt_of(harness, inputs["client-0"])})
    with pytest.raises(MessageRejected, match="below min_clients = 2"):
        harness.keyholder.handle(forged)


def test_the_key_holder_refuses_a_list_that_names_a_client_twice():
    harness = Harness(3)
    inputs = harness.start()
    receipts = {name: receipt_of(harness, data) for name, data in inputs.items()}
    forged = harness.forged_aggregate(0, chunks_of(harness, inputs["client-0"]), receipts,
                                      counted=["client-0", "client-0", "client-1", "client-2"])
    with pytest.raises(MessageRejected, match="twice"):
        harness.keyholder.handle(forged)


def test_the_key_holder_refuses_a_list_without_the_listed_clients_receipts():
    harness = Harness(3)
    inputs = harness.start()
    receipts = {name: receipt_of(harness, inputs[name]) for name in ("client-0", "client-2")}
    forged = harness.forged_aggregate(0, chunks_of(harness, inputs["client-0"]), receipts,
                                      counted=["client-0", "client-1"])
    with pytest.raises(MessageRejected, match="expected the blobs"):
        harness.keyholder.handle(forged)


def forge_receipt(harness: Harness, signer: Identity) -> bytes:
    return encode(Envelope("he", 0, "receipt", signer.party_id, "keyholder",
                           {"ciphertexts": "0" * 64, "context": "0" * 64, "vector_length": harness.length},
                           blobs={"seed": bytes(80)}, session=harness.session, roster=harness.roster.digest), signer)


@pytest.mark.parametrize("case, reason", [
    ("signed by the server", "unexpected sender 'server', expected 'client-1'"),
    ("signed by a stranger using a client's name", "bad signature from 'client-1'"),
    ("from a party that is not a client of the round", "not clients of round 0: \\['mallory'\\]"),
    ("tampered in transit", "bad signature from 'client-1'"),
])
def test_the_key_holder_refuses_receipts_not_signed_by_that_roster_client(case, reason):
    harness = Harness(3)
    inputs = harness.start()
    receipts = {name: receipt_of(harness, data) for name, data in inputs.items()}
    if case == "signed by the server":
        receipts["client-1"] = forge_receipt(harness, harness.server_identity)
    elif case == "signed by a stranger using a client's name":
        receipts["client-1"] = forge_receipt(harness, Identity.generate("client-1"))
    elif case == "from a party that is not a client of the round":
        receipts["mallory"] = forge_receipt(harness, Identity.generate("mallory"))
    else:
        good = receipts["client-1"]
        receipts["client-1"] = good[:-70] + bytes([good[-70] ^ 1]) + good[-69:]  # a byte of the sealed seed
    forged = harness.forged_aggregate(0, chunks_of(harness, inputs["client-0"]), receipts)
    with pytest.raises(MessageRejected, match=reason):
        harness.keyholder.handle(forged)


def test_the_key_holder_refuses_receipts_from_another_round():
    harness = Harness(2)
    old = harness.start(round_id=0)
    harness.finish()
    new = harness.start(round_id=1)
    chunks = summed(harness.public_context(), *[chunks_of(harness, new[name]) for name in harness.clients])
    stale = {name: receipt_of(harness, data) for name, data in old.items()}
    with pytest.raises(MessageRejected, match="unexpected round 0, expected 1"):
        harness.keyholder.handle(harness.forged_aggregate(1, chunks, stale))
    np.testing.assert_allclose(harness.finish().vector, weighted_sum(harness.xs, harness.ws), atol=1e-5)


def test_the_key_holder_decrypts_once_per_round_and_only_forward():
    harness = Harness(2)
    harness.start(round_id=4)
    [aggregate] = harness.server.advance()
    harness.keyholder.handle(aggregate.data)
    with pytest.raises(MessageRejected, match="no key is open for round 4"):
        harness.keyholder.handle(aggregate.data)  # replayed: a second decryption under the same key
    with pytest.raises(MessageRejected, match="round 3 is not after round 4"):
        harness.keyholder.handle(harness.sign(Envelope("he", 3, "setup", "server", "keyholder",
                                                       {"clients": ["client-0"], "vector_length": 5})))


def test_only_the_server_may_ask_the_key_holder():
    harness = Harness(2)
    request = Envelope("he", 0, "setup", "client-0", "keyholder", {"clients": ["client-0"], "vector_length": 5})
    with pytest.raises(MessageRejected, match="only the server"):
        harness.keyholder.handle(harness.sign(request))


# --- hostile or broken input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.array([1.0, np.nan, 0.0]), np.array([np.inf, 0.0, 0.0])])
def test_nan_or_inf_is_refused_on_the_client_before_encryption(bad):
    harness = Harness(2, length=3)
    with pytest.raises(ProtocolError, match="NaN or infinite"):
        harness.clients["client-0"].set_input(0, bad, 1.0)


def test_the_server_rejects_forged_truncated_or_replayed_input_and_keeps_its_state():
    harness = Harness(3)
    inputs = harness.start(skip={2})
    [late] = harness.clients["client-2"].handle(harness.contexts["client-2"])
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
    harness = Harness(2)
    harness.start(skip={1})
    [answer] = harness.clients["client-1"].handle(harness.contexts["client-1"])
    envelope = harness.read(answer.data)
    short = ts.ckks_vector(harness.public_context(), [0.0] * 10).serialize()
    receipt = harness.read(envelope.blobs["receipt"])
    chunks = [short, envelope.blobs["c000001"]]
    fields = {**receipt.fields, "ciphertexts": ciphertexts_digest(chunks)}
    resigned = harness.sign(Envelope("he", 0, "receipt", "client-1", "keyholder", fields, blobs=receipt.blobs))
    bad = Envelope("he", 0, "input", "client-1", "server", {"chunks": 2},
                   blobs={"c000000": short, "c000001": chunks[1], "receipt": resigned})
    with pytest.raises(MessageRejected, match="holds 10 slots, expected 2048"):
        harness.server.receive(harness.sign(bad))
    one_chunk = Envelope("he", 0, "input", "client-1", "server", {"chunks": 1},
                         blobs={"c000000": short, "receipt": resigned})
    with pytest.raises(MessageRejected, match="wrong vector length"):
        harness.server.receive(harness.sign(one_chunk))


def test_receipts_from_another_session_are_refused_by_the_server_and_the_key_holder():
    harness = Harness(2)
    inputs = harness.start(skip={1})
    [answer] = harness.clients["client-1"].handle(harness.contexts["client-1"])
    envelope = harness.read(answer.data)
    genuine = harness.read(envelope.blobs["receipt"])
    elsewhere = harness.sign(dataclasses.replace(genuine, session=new_session_id()))  # the client's own signature
    with pytest.raises(MessageRejected, match="bad receipt: message of session"):
        harness.server.receive(harness.sign(dataclasses.replace(envelope, blobs={**envelope.blobs,
                                                                                 "receipt": elsewhere})))
    chunks = summed(harness.public_context(), chunks_of(harness, inputs["client-0"]), chunks_of(harness, answer.data))
    receipts = {"client-0": receipt_of(harness, inputs["client-0"]), "client-1": elsewhere}
    with pytest.raises(MessageRejected, match="receipt listed for 'client-1' refused: message of session"):
        harness.keyholder.handle(harness.forged_aggregate(0, chunks, receipts))


def test_the_server_rejects_input_whose_receipt_does_not_match_its_ciphertexts():
    harness = Harness(2)
    inputs = harness.start(skip={1})
    [answer] = harness.clients["client-1"].handle(harness.contexts["client-1"])
    envelope = harness.read(answer.data)
    swapped = dict(envelope.blobs, receipt=receipt_of(harness, inputs["client-0"]))
    with pytest.raises(MessageRejected, match="bad receipt"):
        harness.server.receive(harness.sign(Envelope("he", 0, "input", "client-1", "server", envelope.fields,
                                                     blobs=swapped)))


def test_a_client_refuses_input_of_another_length_than_the_round():
    harness = Harness(2, length=10)
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
    harness = Harness(2, length=10)
    data = context_for(harness)
    middle = len(data) // 2  # inside the serialized context
    with pytest.raises(MessageRejected, match="bad signature from 'keyholder'"):
        harness.clients["client-0"].handle(data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1:])
    harness.clients["client-0"].handle(data)  # the genuine one still works


def test_a_client_accepts_a_context_only_from_the_key_holder():
    """Whoever made the key could decrypt the client's input: a server's own context must be refused."""
    harness = Harness(2, length=10)
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
    harness = Harness(2, length=10)
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
    harness = Harness(2, length=10)
    data = context_for(harness)
    harness.clients["client-0"].handle(data)
    with pytest.raises(MessageRejected, match="no input is waiting"):
        harness.clients["client-0"].handle(data)


def test_a_client_refuses_input_that_could_overflow_the_modulus():
    options = HEOptions(**SMALL)
    with pytest.raises(ConfigurationError, match="input too large"):
        simulate_round("he", [np.full(4, 0.5), np.full(4, 0.5)], [1.0, options.capacity], **SMALL)


# --- configuration -------------------------------------------------------------------------------------------

def test_options_by_name_and_their_validation():
    protocol = make_protocol("he", poly_modulus_degree=4096, coeff_mod_bit_sizes=[50, 40], global_scale_bits=35,
                             min_clients=3)
    assert isinstance(protocol, HEProtocol) and protocol.options.coeff_mod_bit_sizes == (50, 40)
    assert protocol.stages == ("input", "decrypt") and protocol.needs_keyholder
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

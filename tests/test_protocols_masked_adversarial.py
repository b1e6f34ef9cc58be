"""The masked protocol under bad input: every rejection is clean and leaves the party as it was.

The attacks of issue 10 (a malicious server or malicious clients) are in test_attacks_masked.py."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from protocols import (
    Envelope,
    Identity,
    MessageRejected,
    ProtocolError,
    Roster,
    RoundAborted,
    decode,
    encode,
    make_protocol,
    new_session_id,
    parallel,
)
from protocols.masked import client as masked_client
from protocols.masked import keys as masked_keys
from protocols.masked import prg
from protocols.masked.stages import (
    ADVERTISE,
    COMMIT,
    CONSISTENCY,
    MASKED,
    SHARE,
    UNMASK,
    control_bytes,
    masked_input_bytes,
)
from protocols.wire import MAGIC, SIGNATURE_BYTES, VERSION, payload_digest


class Harness:
    """Runs a masked round one stage at a time, so tests can tamper between stages."""

    def __init__(self, n: int = 5, length: int = 8, **options):
        options = {"graph": "complete", "threshold": 3, **options}
        self.protocol = make_protocol("masked", **options)
        self.server_identity = Identity.generate("server")
        self.identities = {f"client-{i}": Identity.generate(f"client-{i}") for i in range(n)}
        self.roster = Roster.from_identities(self.server_identity, list(self.identities.values()))
        self.session = new_session_id()
        self.server = self.protocol.server(self.server_identity, self.roster, session=self.session)
        self.clients = {name: self.protocol.client(identity, self.roster, session=self.session)
                        for name, identity in self.identities.items()}
        self.length, self.round_id = length, 0
        for client in self.clients.values():
            client.set_input(0, np.linspace(-0.2, 0.2, length), 1)
        self.requests = {o.recipient: o.data for o in self.server.begin_round(0, list(self.clients), length)}
        self.answers: dict[str, bytes] = {}

    def answer(self, skip=()) -> dict[str, bytes]:
        """Every client (but ``skip``) answers its pending request; nothing is sent to the server yet."""
        self.answers = {name: self.clients[name].handle(data)[0].data for name, data in self.requests.items()
                        if name not in skip}
        return self.answers

    def submit(self) -> None:
        for data in self.answers.values():
            self.server.receive(data)

    def advance(self) -> None:
        self.requests = {o.recipient: o.data for o in self.server.advance()}

    def stage(self, skip=()) -> None:
        self.answer(skip)
        self.submit()
        self.advance()

    def read(self, data: bytes) -> Envelope:
        return decode(data, self.roster, session=self.session)

    def forge(self, sender: str, recipient: str, stage: str, fields=None, arrays=None, blobs=None,
              round_id: int = 0, session: str | None = None) -> bytes:
        """A message signed by ``sender``'s own key, in this session unless ``session`` says otherwise."""
        identity = self.server_identity if sender == "server" else self.identities[sender]
        return encode(Envelope("masked", round_id, stage, sender, recipient, fields or {}, arrays or {}, blobs or {},
                               session or self.session, self.roster.digest), identity)


def test_forged_signature_is_rejected_and_changes_nothing():
    h = Harness()
    answers = h.answer()
    impostor = Identity.generate("client-1")
    original = h.read(answers["client-1"])
    forged = encode(Envelope("masked", 0, COMMIT, "client-1", "server", dict(original.fields), {}, {}, h.session,
                             h.roster.digest), impostor)
    with pytest.raises(MessageRejected, match="bad signature from 'client-1'"):
        h.server.receive(forged)
    h.submit()  # the genuine message is still accepted afterwards
    h.advance()
    assert h.server.stage == ADVERTISE


def test_unknown_sender_is_rejected():
    h = Harness()
    stranger = Identity.generate("client-99")
    data = encode(Envelope("masked", 0, ADVERTISE, "client-99", "server", {}, {}, {}, h.session, h.roster.digest),
                  stranger)
    with pytest.raises(MessageRejected, match="unknown sender 'client-99'"):
        h.server.receive(data)


def test_duplicate_sender_is_rejected():
    h = Harness()
    answers = h.answer()
    h.server.receive(answers["client-0"])
    with pytest.raises(MessageRejected, match="duplicate"):
        h.server.receive(answers["client-0"])


def test_messages_from_another_stage_or_round_are_rejected_as_replays():
    h = Harness()
    h.stage()
    advertise_answers = h.answer()
    h.submit()
    h.advance()
    with pytest.raises(MessageRejected, match="unexpected stage 'advertise_keys', expected 'share_keys'"):
        h.server.receive(advertise_answers["client-0"])
    # a client replays nothing either: the old advertise request is for a stage it has left
    old_request = h.forge("server", "client-0", ADVERTISE)
    with pytest.raises(MessageRejected, match="unexpected stage"):
        h.clients["client-0"].handle(old_request)
    with pytest.raises(MessageRejected, match="round 7"):
        h.clients["client-0"].handle(h.forge("server", "client-0", SHARE, round_id=7))


def test_truncated_or_oversized_messages_are_rejected():
    h = Harness()
    data = h.answer()["client-0"]
    with pytest.raises(MessageRejected, match="truncated"):
        h.server.receive(data[:-70])
    with pytest.raises(MessageRejected, match="oversized"):
        decode(data, h.roster, session=h.session, max_bytes=100)


def test_wrong_vector_length_or_word_type_is_rejected_by_the_server():
    h = Harness()
    for _ in range(3):
        h.stage()
    fields = {"weight": 1, "bad_shares_from": []}
    for arrays in [{"masked": np.zeros((h.length + 1, 4), np.uint8)}, {"masked": np.zeros((h.length, 8), np.uint8)},
                   {"masked": np.zeros(h.length, np.uint32)}, {"masked": np.zeros((h.length, 4), np.uint32)}]:
        with pytest.raises(MessageRejected,
                           match=r"expected 8 values packed in 4 bytes each \(a \(8, 4\) uint8 array\)"):
            h.server.receive(h.forge("client-0", "server", MASKED, fields, arrays))
    with pytest.raises(MessageRejected, match="weight"):
        h.server.receive(h.forge("client-0", "server", MASKED, {**fields, "weight": 0},
                                 {"masked": np.zeros((8, 4), np.uint8)}))


def test_a_packed_value_above_the_modulus_is_refused_by_the_server():
    """At m = 20 a value travels in 3 bytes; the 4 bits above m must be zero, or the message is refused whole."""
    h = Harness(modulus_bits=20, quantization_bits=4)
    for _ in range(3):
        h.stage()
    honest = h.read(h.answer()["client-0"])
    packed = honest.arrays["masked"].copy()
    packed[5, 2] |= 0x10  # bit 20 of value 5
    with pytest.raises(MessageRejected, match="masked words must be below 2\\^20"):
        h.server.receive(h.forge("client-0", "server", MASKED, dict(honest.fields), {"masked": packed}))
    assert "client-0" not in h.server._round.weights  # refused whole: nothing was added


@pytest.mark.parametrize("position", ["first", "after others"])
def test_a_masked_vector_whose_payload_does_not_match_its_signed_digest_leaves_the_sum_exactly_as_it_was(position):
    """The server adds a masked vector while another thread checks its payload against the signed digest (issue 16).
    A vector changed after signing (the header and its signature intact) must be refused and subtracted again:
    any trace of it in the sum would survive unmasking as an error no one could attribute."""
    h = Harness()
    for _ in range(3):
        h.stage()
    answers = h.answer()
    if position == "after others":
        for name in ("client-0", "client-2"):
            h.server.receive(answers[name])
    before = None if h.server._round.total is None else h.server._round.total.copy()
    tampered = bytearray(answers["client-1"])
    tampered[-64 - 5] ^= 0x01  # a byte of the masked vector's last value, just before the signature
    with pytest.raises(MessageRejected, match="the payload does not match its signed digest"):
        h.server.receive(bytes(tampered))
    after = h.server._round.total
    assert (after is None) if before is None else np.array_equal(after, before)
    assert "client-1" not in h.server._round.weights
    for name, data in answers.items():  # the genuine message is still accepted afterwards
        if position == "first" or name not in ("client-0", "client-2"):
            h.server.receive(data)
    h.advance()
    for _ in range(2):
        h.stage()
    np.testing.assert_allclose(h.server.result().vector, 5 * np.linspace(-0.2, 0.2, h.length), atol=0.01)


def test_a_client_refuses_a_round_that_does_not_match_its_input_or_options():
    h = Harness()
    request = h.read(h.requests["client-0"])
    wrong_length = dict(request.fields["terms"], vector_length=h.length + 1)
    with pytest.raises(MessageRejected, match="differ"):
        h.clients["client-0"].handle(h.forge("server", "client-0", COMMIT, {**request.fields, "terms": wrong_length}))
    weaker = dict(request.fields["terms"], threshold=1)  # t <= k/2 would let a server collect both share kinds
    with pytest.raises(MessageRejected, match="differ"):
        h.clients["client-0"].handle(h.forge("server", "client-0", COMMIT, {**request.fields, "terms": weaker}))
    h.answer()  # the genuine request still works


def test_a_client_refuses_a_round_its_own_weight_would_overflow_and_blames_no_one():
    h = Harness()
    h.clients["client-0"].set_input(0, np.zeros(h.length), 2**40)  # no max_weight set: the round's bound applies
    with pytest.raises(MessageRejected, match="this client's input weight 1099511627776 exceeds") as refused:
        h.clients["client-0"].handle(h.requests["client-0"])
    assert refused.value.sender is None  # the server's request was fine: the input is at fault


def test_any_failure_inside_a_client_step_is_a_clean_refusal_that_changes_nothing(monkeypatch):
    h = Harness()
    client = h.clients["client-0"]
    before = client.state_dict()["state"]["round"]

    def broken_step(state, envelope):
        raise ValueError("a bug or a hostile request the checks missed")

    monkeypatch.setattr(client, "_commit", broken_step)
    with pytest.raises(MessageRejected, match=r"could not process the request \(ValueError: a bug") as refused:
        client.handle(h.requests["client-0"])
    assert refused.value.sender is None
    monkeypatch.undo()
    after = client.state_dict()["state"]["round"]
    assert np.array_equal(after.pop("encoded"), before.pop("encoded")) and after == before
    assert after["expecting"] == COMMIT
    h.stage()  # the genuine request is still answered, and the round goes on
    assert h.server.stage == ADVERTISE


@pytest.mark.parametrize("failing", ["a mask worker", "packing", "signing"])
@pytest.mark.parametrize("modulus_bits", [32, 20])
def test_a_masked_input_request_that_fails_anywhere_leaves_the_client_state_as_it_was(monkeypatch, modulus_bits,
                                                                                     failing):
    """Whether a mask worker fails half-way through its span, packing fails or the signature cannot be made, the
    client refuses the request and its state is what it was: answering the same request again gives a correct sum,
    not an input masked twice (or in part). m = 20 < 32 bits: the words are reduced modulo 2^m."""
    monkeypatch.setenv(parallel.THREADS_VARIABLE, "2")  # two spans: the second one's worker fails
    h = Harness(modulus_bits=modulus_bits)
    for _ in range(3):  # commit, advertise, share keys: every client now waits for the masked-input request
        h.stage()
    client = h.clients["client-0"]
    before = client.state_dict()["state"]["round"]
    real_span = prg._apply_span

    def failing_span(accumulator, seeds, start, stop):
        if start > 0:
            raise MemoryError("no memory for the keystream buffer")
        return real_span(accumulator, seeds, start, stop)

    def fail(*arguments):
        raise OSError("the signing key's file cannot be read")

    with monkeypatch.context() as patch:
        if failing == "a mask worker":
            patch.setattr(prg, "_apply_span", failing_span)
        else:
            patch.setattr(*((masked_client, "pack") if failing == "packing" else (client, "_sign")), fail)
        with pytest.raises(MessageRejected, match="could not process the request"):
            client.handle(h.requests["client-0"])
    after = client.state_dict()["state"]["round"]
    assert np.array_equal(after.pop("encoded"), before.pop("encoded")) and after == before
    assert after["expecting"] == MASKED
    for _ in range(3):  # masked input (client-0 answers the same request again), consistency, unmask
        h.stage()
    np.testing.assert_allclose(h.server.result().vector, 5 * np.linspace(-0.2, 0.2, h.length), atol=0.01)


def unsigned_message_with_a_list_for_dtype(h: Harness, sender: str) -> bytes:
    """Well framed, canonical, unsigned: refused at its header, before any signature is checked."""
    header = {"arrays": [{"dtype": ["uint8"], "name": "a", "shape": [0]}], "blobs": [], "fields": {},
              "payload": payload_digest([b""]), "protocol": "masked", "recipient": "server", "round": 0,
              "roster": h.roster.digest, "sender": sender, "session": h.session, "stage": "s"}
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<HI", VERSION, len(raw)) + raw + bytes(SIGNATURE_BYTES)


def test_the_server_refuses_a_header_with_a_list_for_a_dtype_instead_of_crashing():
    h = Harness()
    with pytest.raises(MessageRejected, match="dtype must be one of"):
        h.server.receive(unsigned_message_with_a_list_for_dtype(h, "client-0"))
    h.stage()  # nothing changed: the round goes on
    assert h.server.stage == ADVERTISE


def test_a_client_names_the_first_bad_relayed_message_whatever_follows_it():
    """The relayed messages are checked together (their signatures side by side), yet the refusal names the first
    bad one in the request's order and blames the server, as when they were checked one by one."""
    h = Harness()
    h.stage()  # commit: the requests are now advertise requests relaying every client's commitment
    request = h.read(h.requests["client-1"])
    blobs = dict(request.blobs)
    forged = bytearray(blobs["client-0"])
    forged[-1] ^= 1
    blobs["client-0"] = bytes(forged)
    blobs["client-3"] = unsigned_message_with_a_list_for_dtype(h, "client-3")
    tampered = h.forge("server", "client-1", ADVERTISE, dict(request.fields), dict(request.arrays), blobs)
    with pytest.raises(MessageRejected, match="relayed message of 'client-0': bad signature") as refused:
        h.clients["client-1"].handle(tampered)
    assert refused.value.sender == "server"


def test_after_masking_a_client_state_no_longer_holds_its_input():
    h = Harness()
    for _ in range(4):  # through the masked input
        h.stage()
    assert all(client.state_dict()["state"]["round"]["encoded"].size == 0 for client in h.clients.values())


def test_nan_or_inf_is_rejected_on_the_client_before_masking():
    h = Harness()
    for bad in (np.array([0.0, np.nan]), np.array([np.inf, 0.0]), np.array([-np.inf, 1.0])):
        with pytest.raises(ProtocolError, match="NaN or infinite"):
            h.clients["client-0"].set_input(1, bad, 1)


def test_substituted_neighbour_keys_are_detected_by_the_client():
    h = Harness()
    h.stage()
    h.stage()
    request = h.read(h.requests["client-0"])
    relayed = dict(request.blobs)
    # the server swaps in keys of its own, signed by itself: the relayed message must be the neighbour's
    own = h.forge("server", "server", ADVERTISE, blobs={"cipher_key": b"\x09" * 32, "mask_key": b"\x07" * 32})
    relayed["client-1"] = own
    with pytest.raises(MessageRejected, match="relayed message of 'client-1'"):
        h.clients["client-0"].handle(h.forge("server", "client-0", SHARE, blobs=relayed))
    h.answer()  # unchanged: the genuine request is answered


def test_a_neighbour_message_relayed_from_another_session_is_refused():
    h = Harness()
    h.stage()
    h.stage()
    request = h.read(h.requests["client-0"])
    relayed = dict(request.blobs)
    # client-1's own signed key advertisement, for this round and stage, but from another run
    relayed["client-1"] = h.forge("client-1", "server", ADVERTISE, blobs={"cipher_key": b"\x09" * 32,
                                                                         "mask_key": b"\x07" * 32},
                                  session=new_session_id())
    with pytest.raises(MessageRejected, match="relayed message of 'client-1': message of session"):
        h.clients["client-0"].handle(h.forge("server", "client-0", SHARE, blobs=relayed))
    h.answer()  # unchanged: the genuine request is answered


def test_tampered_share_ciphertexts_do_not_decrypt_and_are_reported_not_fatal():
    h = Harness()
    for _ in range(3):
        h.stage()
    request = h.read(h.requests["client-0"])
    blobs = dict(request.blobs)
    blobs["client-1"] = blobs["client-1"][:-1] + bytes([blobs["client-1"][-1] ^ 1])
    state = h.clients["client-0"].state_dict()
    answer = h.read(h.clients["client-0"].handle(h.forge("server", "client-0", MASKED, blobs=blobs))[0].data)
    assert answer.fields["bad_shares_from"] == ["client-1"]
    # shares meant for client-2 offered to client-0 fail too (keys and associated data bind the ids)
    h.clients["client-0"] = h.protocol.client(h.identities["client-0"], h.roster, session=h.session, state=state)
    blobs = dict(request.blobs)
    blobs["client-1"] = h.read(h.requests["client-2"]).blobs["client-1"]
    answer = h.read(h.clients["client-0"].handle(h.forge("server", "client-0", MASKED, blobs=blobs))[0].data)
    assert answer.fields["bad_shares_from"] == ["client-1"]


def unmask_ready(skip_masked=("client-4",)) -> Harness:
    h = Harness()
    for _ in range(3):
        h.stage()
    h.stage(skip=skip_masked)  # client-4 shared keys but never sent a masked input
    h.stage()
    assert h.server.stage == UNMASK
    return h


def test_a_client_never_reveals_both_shares_of_one_peer():
    h = unmask_ready()
    request = h.read(h.requests["client-0"])
    both = {"self_mask_of": ["client-1", "client-4"], "mask_key_of": ["client-4"]}
    with pytest.raises(MessageRejected, match="both the self-mask and the mask-key share of \\['client-4'\\]"):
        h.clients["client-0"].handle(h.forge("server", "client-0", UNMASK, both, blobs=dict(request.blobs)))
    survivor_key = {"self_mask_of": [], "mask_key_of": ["client-1"]}
    with pytest.raises(MessageRejected, match="mask-key share of 'client-1'"):
        h.clients["client-0"].handle(h.forge("server", "client-0", UNMASK, survivor_key, blobs=dict(request.blobs)))
    dropped_self = {"self_mask_of": ["client-4"], "mask_key_of": []}
    with pytest.raises(MessageRejected, match="self-mask share of 'client-4'"):
        h.clients["client-0"].handle(h.forge("server", "client-0", UNMASK, dropped_self, blobs=dict(request.blobs)))
    answer = h.read(h.clients["client-0"].handle(h.requests["client-0"])[0].data)
    assert sorted(answer.blobs) == ["mask_key/client-4", "self_mask/client-1", "self_mask/client-2",
                                    "self_mask/client-3"]
    # having answered, the client answers no second unmask request (that could ask for the other share)
    swapped = {"self_mask_of": [], "mask_key_of": ["client-1"]}
    with pytest.raises(MessageRejected, match="over for this client"):
        h.clients["client-0"].handle(h.forge("server", "client-0", UNMASK, swapped, blobs=dict(request.blobs)))


def test_a_client_checks_the_signed_survivor_sets_before_revealing_anything():
    h = unmask_ready()
    request = h.read(h.requests["client-0"])
    blobs = dict(request.blobs)
    signed = dict(h.read(blobs["client-2"]).fields)
    blobs["client-1"] = h.forge("client-1", "server", CONSISTENCY, {**signed, "survivors": ["client-0", "client-1"]})
    with pytest.raises(MessageRejected, match="different survivor set"):
        h.clients["client-0"].handle(h.forge("server", "client-0", UNMASK, dict(request.fields), blobs=blobs))
    too_few = {peer: blobs[peer] for peer in list(request.blobs)[:2]}
    with pytest.raises(MessageRejected, match="fewer than the threshold"):
        h.clients["client-0"].handle(h.forge("server", "client-0", UNMASK, dict(request.fields), blobs=too_few))


def test_a_client_refuses_a_survivor_set_that_would_expose_it():
    h = Harness()
    for _ in range(4):
        h.stage()
    assert h.server.stage == CONSISTENCY
    tiny = {"survivors": ["client-0", "client-1"]}
    with pytest.raises(MessageRejected, match="fewer than this client's min_clients 3"):
        h.clients["client-0"].handle(h.forge("server", "client-0", CONSISTENCY, tiny))
    enough_sites_too_few_partners = {"survivors": ["client-0", "client-1", "client-2"]}
    with pytest.raises(MessageRejected, match="fewer than the threshold"):
        h.clients["client-0"].handle(h.forge("server", "client-0", CONSISTENCY, enough_sites_too_few_partners))


def test_an_aborted_round_yields_no_result_and_accepts_nothing_more():
    h = Harness()
    answers = h.answer(skip=("client-0", "client-1", "client-2"))
    h.submit()
    with pytest.raises(RoundAborted, match="'commit'"):
        h.advance()
    with pytest.raises(ProtocolError):
        h.server.result()
    with pytest.raises(MessageRejected, match="no round in progress"):
        h.server.receive(answers["client-3"])


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def critical_value(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square(df), Wilson–Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def test_what_the_server_sees_of_one_masked_input_is_indistinguishable_from_uniform(monkeypatch):
    # deterministic key material, so the test is reproducible; the input is as structured as it gets
    counter = iter(range(1, 10_000))
    monkeypatch.setattr("protocols.masked.client.os.urandom", lambda size: bytes([next(counter) % 256]) * size)
    monkeypatch.setattr(masked_keys, "fresh_pair", lambda: masked_keys.X25519PrivateKey.from_private_bytes(
        bytes([next(counter) % 256]) * 32))
    h = Harness(n=3, length=16384, threshold=2)
    for client in h.clients.values():
        client.set_input(0, np.zeros(h.length), 1)
    for _ in range(3):
        h.stage()
    packed = h.read(h.answer()["client-0"]).arrays["masked"]  # (P, 4) bytes: m = 32 packs to whole words
    masked = packed.reshape(-1).view("<u4")
    raw_bytes = np.frombuffer(masked.tobytes(), np.uint8)
    assert chi_square(np.bincount(raw_bytes, minlength=256)) < critical_value(255)
    for shift in (0, 8, 16, 24):  # each byte lane of the words, bucketed by value
        lane = (masked >> np.uint32(shift)) & np.uint32(0xFF)
        assert chi_square(np.bincount(lane, minlength=256)) < critical_value(255)
    top = masked >> np.uint32(26)  # 64 buckets of the word range
    assert chi_square(np.bincount(top, minlength=64)) < critical_value(63)
    # the unmasked encoding, by contrast, is a single value: the test has power
    assert chi_square(np.bincount(np.full(h.length, 32767 & 0xFF), minlength=256)) > critical_value(255)


def same_values(a, b) -> bool:
    """Equality of two ``state_dict()`` outputs (numpy arrays compared by dtype, shape and value)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype \
            and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_values(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def empty_array_of_huge_extent(h: Harness, stage: str) -> bytes:
    """Signed by a client, 0 payload bytes: an array of shape [0, 2^31 − 1, 2^31 − 1, 2^31 − 1]."""
    big = 2**31 - 1
    header = {"arrays": [{"dtype": "uint8", "name": "a", "shape": [0, big, big, big]}], "blobs": [], "fields": {},
              "payload": payload_digest([b""]), "protocol": "masked", "recipient": "server", "round": 0,
              "roster": h.roster.digest, "sender": "client-5", "session": h.session, "stage": stage}
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<HI", VERSION, len(raw)) + raw
    return body + h.identities["client-5"].sign(body)


def outcomes_one_by_one(server, batch: list[bytes]) -> list[tuple[str, str | None] | None]:
    outcomes = []
    for data in batch:
        try:
            server.receive(data)
        except MessageRejected as rejection:
            outcomes.append((rejection.reason, rejection.sender))
        else:
            outcomes.append(None)
    return outcomes


@pytest.mark.parametrize("threads", ["1", "2"])
def test_a_batch_taken_in_together_gives_each_message_the_outcome_and_the_server_the_state_of_one_by_one(
        threads, monkeypatch):
    """``receive_each`` checks a control stage's signatures side by side (issue 16); at every stage, a batch that
    mixes every kind of bad message with the genuine answers (one sender's twice) must be refused message for
    message with the same reasons as ``receive`` one by one, leaving the same server state."""
    monkeypatch.setenv(parallel.THREADS_VARIABLE, threads)
    h = Harness(n=6)
    previous: dict[str, bytes] = {}
    for stage in (COMMIT, ADVERTISE, SHARE, MASKED, CONSISTENCY, UNMASK):
        assert h.server.stage == stage
        answers = h.answer()
        forged = bytearray(answers["client-2"])
        forged[-1] ^= 1
        other_session = h.forge("client-4", "server", stage, session=new_session_id())
        payload_changed = bytearray(h.forge("client-5", "server", stage, blobs={"x": b"abc"}))
        payload_changed[-SIGNATURE_BYTES - 1] ^= 1  # the header and its signature still verify; the payload not
        batch = [bytes(forged), answers["client-0"], unsigned_message_with_a_list_for_dtype(h, "client-1"),
                 bytes(payload_changed), MAGIC + bytes(max(control_bytes(6), masked_input_bytes(6, h.length, 4)) + 1),
                 empty_array_of_huge_extent(h, stage),
                 *answers.values(), answers["client-1"], other_session, answers["client-3"][:-70],
                 *list(previous.values())[:1], b"not a message"]
        assert len(batch) >= 8  # enough for wire.decode_each to use its worker threads
        one_by_one = h.protocol.server(h.server_identity, h.roster, session=h.session, state=h.server.state_dict())
        expected = outcomes_one_by_one(one_by_one, batch)
        if stage != MASKED:  # a masked input's fields are checked before its payload (hashed while added)
            assert expected[3][0].startswith("the payload does not match its signed digest")
        assert expected[4][0].startswith("oversized message") and "spans more than" in expected[5][0]
        outcomes = [None if rejection is None else (rejection.reason, rejection.sender)
                    for rejection in h.server.receive_each(iter(batch))]  # any iterable, a one-shot one too
        assert outcomes == expected
        assert outcomes.count(None) == len(answers)  # each genuine answer taken in once, whatever surrounds it
        assert same_values(h.server.state_dict(), one_by_one.state_dict())
        previous = answers
        h.advance()
    assert h.server.round_done
    refused = list(h.server.receive_each(list(previous.values())))
    assert [rejection.reason for rejection in refused] == ["no round in progress"] * len(previous)


def test_a_batch_of_bloated_messages_costs_the_server_bounded_memory_however_many_there_are():
    """``receive_each`` decodes ahead of taking messages in; a client answering with many control-size messages whose
    headers parse into many small objects must not make the server hold them all at once (found in review)."""
    import tracemalloc

    h = Harness(n=6)

    def bloated() -> bytes:
        header = {"arrays": [], "blobs": [], "fields": {"a": []}, "payload": payload_digest([b""]),
                  "protocol": "masked", "recipient": "server", "round": 0, "roster": h.roster.digest,
                  "sender": "client-5", "session": h.session, "stage": COMMIT}
        room = control_bytes(6) - 10 - SIGNATURE_BYTES - len(json.dumps(header, separators=(",", ":"))) - 16
        header["fields"]["a"] = [[]] * (room // 3)
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        return MAGIC + struct.pack("<HI", VERSION, len(raw)) + raw + bytes(SIGNATURE_BYTES)

    message = bloated()
    peaks = []
    for count in (50, 200):
        tracemalloc.start()
        refused = list(h.server.receive_each([message] * count))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert all(r is not None and r.reason == "bad signature from 'client-5'" for r in refused)
    assert peaks[1] < 1.5 * peaks[0]  # not 4x: bounded by the decode window, not by the count

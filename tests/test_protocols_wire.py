"""The wire format: canonical, signed, and strict about everything it accepts."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import (
    ConfigurationError,
    Envelope,
    Identity,
    MessageRejected,
    ProtocolError,
    Roster,
    check_session_id,
    decode,
    encode,
    expect,
    new_session_id,
    parallel,
    peek,
    wire,
)
from protocols.wire import (
    MAGIC,
    PARALLEL_DECODE_COUNT,
    SIGNATURE_BYTES,
    VERSION,
    decode_each,
    encode_to_each,
    payload_digest,
)

SERVER = Identity.generate("server")
ALICE = Identity.generate("client-0")
MALLORY = Identity.generate("client-0")  # same id, key not on the roster
ROSTER = Roster.from_identities(SERVER, [ALICE])
SESSION = new_session_id()


def envelope(**changes) -> Envelope:
    values = dict(protocol="masked", round=3, stage="masked_input", sender="client-0", recipient="server",
                  fields={"weight": 2, "note": "x", "scale": 0.5, "ids": ["a", "b"]},
                  arrays={"vector": np.arange(5, dtype=np.uint32), "noise": np.array([[1.5, -2.0]])},
                  blobs={"share": b"\x00\x01secret", "empty": b""}, session=SESSION, roster=ROSTER.digest)
    values.update(changes)
    return Envelope(**values)


def read(data: bytes, **options) -> Envelope:
    """``decode`` as a party of SESSION that pins ROSTER."""
    return decode(data, ROSTER, session=SESSION, **options)


def same(a: Envelope, b: Envelope) -> bool:
    return (
        (a.protocol, a.round, a.stage, a.sender, a.recipient, a.session, a.roster)
        == (b.protocol, b.round, b.stage, b.sender, b.recipient, b.session, b.roster)
        and json.dumps(a.fields, sort_keys=True) == json.dumps(b.fields, sort_keys=True)
        and a.arrays.keys() == b.arrays.keys()
        and all(a.arrays[k].dtype == b.arrays[k].dtype and np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays)
        and {k: bytes(v) for k, v in a.blobs.items()} == {k: bytes(v) for k, v in b.blobs.items()}
    )


def test_round_trip_keeps_every_field_array_and_blob():
    original = envelope()
    decoded = read(encode(original, ALICE))
    assert same(original, decoded)
    assert decoded.arrays["noise"].shape == (1, 2)


def test_decoded_arrays_are_read_only_views_of_the_message_not_copies():
    data = encode(envelope(), ALICE)
    vector = read(data).arrays["vector"]
    assert not vector.flags.writeable and not vector.flags.owndata  # a view into ``data``: a receiver never copies
    with pytest.raises(ValueError, match="read-only"):
        vector[0] = 7


def test_a_flipped_header_bit_breaks_the_signature():
    data = bytearray(encode(envelope(), ALICE))
    data[data.index(b'"stage"') + 10] ^= 1  # inside the signed header, still canonical JSON
    with pytest.raises(MessageRejected, match="bad signature"):
        read(bytes(data))


def test_the_payload_digest_is_blake3_of_the_domain_and_the_payload_whatever_its_parts_and_threads(monkeypatch):
    """The digest depends on the payload bytes only: not on how the sender held them (parts) nor on how many threads
    hashed them (a payload of PARALLEL_HASH_BYTES or more is hashed on several); it is BLAKE3 over the domain and
    the payload (the wire module docstring), checked here against BLAKE3's published empty-input value."""
    import blake3

    from protocols import wire
    assert blake3.blake3(b"").hexdigest() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    for payload in (bytes(range(256)) * 4099, bytes(range(251)) * (wire.PARALLEL_HASH_BYTES // 251 + 3)):
        expected = blake3.blake3(wire._PAYLOAD_DOMAIN + payload).hexdigest()
        for threads in ("1", "2", "5"):
            monkeypatch.setenv("FEDDAT_SECURE_THREADS", threads)
            for cuts in ([], [1], [65_535, 65_539], [17, 400_000, 700_001]):
                bounds = [0, *cuts, len(payload)]
                parts = [payload[a:b] for a, b in zip(bounds, bounds[1:])]
                assert wire.payload_digest(parts) == expected
    assert wire.payload_digest([]) == blake3.blake3(wire._PAYLOAD_DOMAIN).hexdigest()


def test_same_content_gives_the_same_bytes_whatever_the_insertion_order():
    first = envelope(fields={"a": 1, "b": [1, 2]}, arrays={"x": np.zeros(2), "y": np.ones(3, np.uint8)},
                     blobs={"p": b"1", "q": b"2"})
    second = envelope(fields={"b": [1, 2], "a": 1}, arrays={"y": np.ones(3, np.uint8), "x": np.zeros(2)},
                      blobs={"q": b"2", "p": b"1"})
    assert encode(first, ALICE) == encode(second, ALICE)


def test_big_endian_input_arrays_encode_like_native_ones():
    native = envelope(arrays={"v": np.arange(4, dtype=np.uint32)})
    swapped = envelope(arrays={"v": np.arange(4, dtype=np.dtype(">u4")).astype(np.dtype(">u4"))})
    assert encode(native, ALICE) == encode(swapped, ALICE)


def test_unknown_sender_is_rejected_by_name():
    stranger = Identity.generate("client-9")
    with pytest.raises(MessageRejected, match="unknown sender 'client-9'"):
        read(encode(envelope(sender="client-9"), stranger))


def test_forged_signature_is_rejected():
    with pytest.raises(MessageRejected, match="bad signature from 'client-0'") as caught:
        read(encode(envelope(), MALLORY))
    assert caught.value.sender == "client-0"


def test_a_single_flipped_payload_bit_is_refused_naming_the_signed_and_calculated_digests():
    """Ed25519 signs the prefix and header; the header's digest binds every payload byte."""
    data = bytearray(encode(envelope(), ALICE))
    data[-SIGNATURE_BYTES - 3] ^= 1
    with pytest.raises(MessageRejected, match="payload does not match its signed digest: expected [0-9a-f]{64}, "
                                              "calculated [0-9a-f]{64}"):
        read(bytes(data))


@pytest.mark.parametrize("cut", [1, SIGNATURE_BYTES, SIGNATURE_BYTES + 5])
def test_truncated_messages_are_rejected(cut):
    data = encode(envelope(), ALICE)
    with pytest.raises(MessageRejected):
        read(data[:-cut])


def test_trailing_bytes_are_rejected():
    data = encode(envelope(), ALICE)
    with pytest.raises(MessageRejected):
        read(data + b"\x00")


def test_oversized_message_is_rejected_before_parsing():
    data = encode(envelope(), ALICE)
    with pytest.raises(MessageRejected, match="oversized message"):
        read(data, max_bytes=len(data) - 1)


def test_bad_magic_and_version_are_named():
    data = encode(envelope(), ALICE)
    with pytest.raises(MessageRejected, match="magic"):
        read(b"XXXX" + data[4:])
    with pytest.raises(MessageRejected, match=f"version {VERSION + 1}"):
        read(data[:4] + struct.pack("<H", VERSION + 1) + data[6:])
    with pytest.raises(MessageRejected, match="version 1"):  # before session ids: such a message is refused whole
        read(data[:4] + struct.pack("<H", 1) + data[6:])
    assert VERSION == 4  # v3's SHA-256 hash list under the same header: refused whole, never checked as BLAKE3
    with pytest.raises(MessageRejected, match="unsupported message version 3"):
        read(data[:4] + struct.pack("<H", 3) + data[6:])


def forge(header: dict, payload: bytes = b"", identity: Identity = ALICE) -> bytes:
    """A correctly framed and signed message with an arbitrary header (its 'payload' digest filled in unless
    the header sets one or leaves the key out)."""
    header = {"payload": payload_digest([payload]), **header} if "payload" not in header else header
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<HI", VERSION, len(raw)) + raw
    return body + payload + identity.sign(body)


def good_header(**changes) -> dict:
    header = {"protocol": "plain", "round": 0, "stage": "input", "sender": "client-0", "recipient": "server",
              "session": SESSION, "roster": ROSTER.digest, "fields": {}, "arrays": [], "blobs": []}
    header.update(changes)
    return header


@pytest.mark.parametrize(("changes", "message"), [
    ({"round": "1"}, "'round' must be an integer"),
    ({"round": -1}, "'round' must be an integer"),
    ({"round": True}, "'round' must be an integer"),
    ({"stage": ""}, "'stage' must be a string"),
    ({"recipient": "../etc"}, "'recipient' must be a party id"),
    ({"fields": []}, "'fields' must be an object"),
    ({"arrays": [{"name": "v", "dtype": "object", "shape": [1]}]}, "dtype must be one of"),
    ({"arrays": [{"name": "v", "dtype": ["uint8"], "shape": [1]}]}, "dtype must be one of"),  # unhashable: no crash
    ({"arrays": [{"name": "v", "dtype": {"uint8": 1}, "shape": [1]}]}, "dtype must be one of"),
    ({"arrays": [{"name": "v", "dtype": "uint8", "shape": [-1]}]}, "shape must be"),
    ({"arrays": [{"name": "v", "dtype": "uint8", "shape": [1], "x": 0}]}, "exactly"),
    ({"blobs": [{"name": "b", "size": 1}, {"name": "a", "size": 1}]}, "unique and sorted"),
    ({"blobs": [{"name": "a", "size": 0}, {"name": "a", "size": 0}]}, "unique and sorted"),
    ({"session": SESSION.upper()}, "'session' must be a session id"),
    ({"session": SESSION[:-1]}, "'session' must be a session id"),
    ({"session": None}, "'session' must be a session id"),
    ({"roster": ROSTER.digest[:32]}, "'roster' must be a roster digest"),
    ({"roster": 7}, "'roster' must be a roster digest"),
])
def test_header_schema_violations_are_named(changes, message):
    with pytest.raises(MessageRejected, match=message):
        read(forge(good_header(**changes)))


def test_a_header_no_check_foresaw_is_refused_by_name_never_a_crash(monkeypatch):
    """Defence in depth: an exception other than a refusal inside the header checks (a header shape nobody wrote a
    check for) is a MessageRejected naming it, so no party's loop ever sees a TypeError from a peer's bytes."""
    def unforeseen(header):
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(wire, "_check_header", unforeseen)
    with pytest.raises(MessageRejected, match=r"malformed header \(TypeError: unhashable type"):
        read(forge(good_header()))


def test_decode_each_refuses_an_unhashable_dtype_in_its_place_and_decodes_the_rest():
    bad = forge(good_header(arrays=[{"name": "v", "dtype": ["uint8"], "shape": [0]}]))
    decoded = decode_each([encode(envelope(), ALICE), bad, encode(envelope(), ALICE)], ROSTER, session=SESSION)
    assert isinstance(decoded[0], Envelope) and isinstance(decoded[2], Envelope)
    assert isinstance(decoded[1], MessageRejected) and "dtype must be one of" in decoded[1].reason


def test_missing_or_extra_header_keys_are_rejected():
    header = good_header()
    del header["stage"]
    with pytest.raises(MessageRejected, match="missing \\['stage'\\]"):
        read(forge(header))
    with pytest.raises(MessageRejected, match="unexpected \\['extra'\\]"):
        read(forge(good_header(extra=1)))


def test_non_canonical_header_is_rejected_even_when_signed():
    raw = json.dumps(good_header(payload=payload_digest([b""])), sort_keys=True, indent=1).encode()
    body = MAGIC + struct.pack("<HI", VERSION, len(raw)) + raw
    with pytest.raises(MessageRejected, match="canonical"):
        read(body + ALICE.sign(body))


@pytest.mark.parametrize("fields", [b'{"x":NaN}', b'{"x":-Infinity}', b'{"x":1e999}', b'{"x":[0,{"y":-1e400}]}'])
def test_non_finite_json_numbers_are_rejected(fields):
    """NaN and Infinity are not JSON; 1e999 is, and parses to infinity: both refused, nested or not."""
    raw = b'{"arrays":[],"blobs":[],"fields":' + fields + b',"payload":"' + payload_digest([b""]).encode() + \
          b'","protocol":"p","recipient":"server","round":0,' \
          b'"roster":"' + ROSTER.digest.encode() + b'","sender":"client-0","session":"' + SESSION.encode() + \
          b'","stage":"s"}'
    body = MAGIC + struct.pack("<HI", VERSION, len(raw)) + raw
    with pytest.raises(MessageRejected, match="not a finite number"):
        read(body + ALICE.sign(body))


def test_array_sizes_must_match_the_payload_exactly():
    spec = [{"name": "v", "dtype": "uint32", "shape": [4]}]
    with pytest.raises(MessageRejected, match="truncated"):
        read(forge(good_header(arrays=spec), b"\x00" * 15))
    assert read(forge(good_header(arrays=spec), b"\x00" * 16)).arrays["v"].shape == (4,)


def test_a_huge_declared_shape_is_refused_without_allocating():
    spec = [{"name": "v", "dtype": "float64", "shape": [2**30, 2**30]}]
    with pytest.raises(MessageRejected, match="spans more than"):
        read(forge(good_header(arrays=spec)))
    spec = [{"name": "v", "dtype": "float64", "shape": [2**20, 100]}]  # within the bound: the payload is short
    with pytest.raises(MessageRejected, match="truncated"):
        read(forge(good_header(arrays=spec)))


def test_an_empty_array_with_huge_other_dimensions_is_refused_not_raised():
    """0 × (2^31 − 1)^3 values is 0 payload bytes, so every size check passed, and numpy's reshape then raised
    ValueError out of decode (found in review of issue 16's batched receive)."""
    big = 2**31 - 1
    spec = [{"name": "v", "dtype": "uint8", "shape": [0, big, big, big]}]
    with pytest.raises(MessageRejected, match="spans more than"):
        read(forge(good_header(arrays=spec)))
    assert read(forge(good_header(arrays=[{"name": "v", "dtype": "uint8", "shape": [0, 3]}]))).arrays["v"].shape \
        == (0, 3)


def test_encode_refuses_what_decode_would_reject():
    with pytest.raises(ProtocolError):
        encode(envelope(fields={"x": float("nan")}), ALICE)
    with pytest.raises(ProtocolError):
        encode(envelope(arrays={"v": np.array(["a"])}), ALICE)
    with pytest.raises(ProtocolError, match="signing identity"):
        encode(envelope(sender="server"), ALICE)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_decode_each_gives_each_message_what_decode_gives_it_in_order_whatever_the_threads(monkeypatch, threads):
    """A relay checked side by side: every envelope as decode returns it, every refusal as decode raises it, each in
    its own place, so a caller names the same first bad message with one thread or several."""
    monkeypatch.setenv(parallel.THREADS_VARIABLE, threads)
    good = [encode(envelope(round=index), ALICE) for index in range(PARALLEL_DECODE_COUNT + 3)]
    forged = bytearray(good[4])
    forged[-1] ^= 1
    messages = good[:4] + [bytes(forged)] + good[4:9] + [encode(envelope(), MALLORY)] + good[9:]
    decoded = decode_each(messages, ROSTER, session=SESSION)
    assert len(decoded) == len(messages)
    for data, item in zip(messages, decoded):
        try:
            expected = read(data)
        except MessageRejected as refusal:
            assert isinstance(item, MessageRejected) and item.reason == refusal.reason
        else:
            assert isinstance(item, Envelope) and same(expected, item)
    assert [index for index, item in enumerate(decoded) if isinstance(item, MessageRejected)] == [4, 10]


def test_expect_names_the_mismatch_which_stops_replays():
    decoded = read(encode(envelope(), ALICE))
    assert expect(decoded, protocol="masked", round=3, stage="masked_input", recipient="server") is decoded
    with pytest.raises(MessageRejected, match="unexpected round 3, expected 4"):
        expect(decoded, round=4)
    with pytest.raises(MessageRejected, match="unexpected stage 'masked_input', expected 'unmask'"):
        expect(decoded, stage="unmask")


# --- session and roster binding ---------------------------------------------------------------------------------

OTHER_ROSTER = Roster.from_identities(SERVER, [ALICE, Identity.generate("client-1")])  # Alice is enrolled in both


def test_a_message_signed_under_another_roster_is_refused_naming_both_digests():
    data = encode(envelope(roster=OTHER_ROSTER.digest), ALICE)  # validly signed by Alice, but under the other roster
    with pytest.raises(MessageRejected, match=f"signed under roster {OTHER_ROSTER.digest}, this party pins "
                                              f"{ROSTER.digest}") as caught:
        read(data)
    assert caught.value.sender == "client-0"
    assert decode(data, OTHER_ROSTER, session=SESSION).roster == OTHER_ROSTER.digest


def test_the_roster_digest_is_checked_before_the_signature():
    forged = encode(envelope(roster=OTHER_ROSTER.digest), MALLORY)  # wrong roster and a bad signature
    with pytest.raises(MessageRejected, match="signed under roster"):
        read(forged)


def test_a_message_of_another_session_is_refused():
    other = new_session_id()
    data = encode(envelope(session=other), ALICE)
    with pytest.raises(MessageRejected, match=f"message of session {other}, this party is in session {SESSION}"):
        read(data)


def test_only_a_first_contact_accepts_any_session_and_every_receiver_must_say_which():
    other = new_session_id()
    data = encode(envelope(session=other), ALICE)
    assert decode(data, ROSTER, session=None).session == other
    with pytest.raises(TypeError):
        decode(data, ROSTER)  # no default: forgetting the session is a programming error, not "any session"
    with pytest.raises(ConfigurationError, match="invalid session id"):
        decode(data, ROSTER, session="not-a-session")


@pytest.mark.parametrize("changes", [
    {"session": ""}, {"session": "0" * 31}, {"session": "A" * 32}, {"session": "0" * 33}, {"roster": ""},
    {"roster": "0" * 63}, {"roster": "G" * 64},
], ids=["no session", "short session", "upper-case session", "long session", "no roster", "short roster",
        "non-hex roster"])
def test_malformed_session_ids_and_roster_digests_cannot_be_encoded(changes):
    with pytest.raises(ProtocolError, match="cannot encode message"):
        encode(envelope(**changes), ALICE)


def test_session_ids_are_128_random_bits_in_lowercase_hex():
    first, second = new_session_id(), new_session_id()
    assert check_session_id(first) == first and len(first) == 32 and first != second
    for bad in ("", first.upper(), first[:-1], 7, None):
        with pytest.raises(ConfigurationError, match="invalid session id"):
            check_session_id(bad)


def test_peek_reads_the_header_without_verifying_anything():
    data = encode(envelope(), ALICE)
    header = peek(data)
    assert (header.protocol, header.round, header.stage, header.sender, header.recipient, header.session,
            header.roster) == ("masked", 3, "masked_input", "client-0", "server", SESSION, ROSTER.digest)
    assert header.fields["weight"] == 2 and not header.arrays and not header.blobs
    # it reads a forged message just as well: only decode decides what may be acted on
    assert peek(encode(envelope(), MALLORY)).sender == "client-0"
    for unreadable in (b"", b"XXXX" + data[4:], data[:20], "text"):
        assert peek(unreadable) is None


VALID = encode(envelope(), ALICE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_ever_raise_message_rejected(data):
    with pytest.raises(MessageRejected):
        read(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(VALID)), st.binary(max_size=16))
def test_mutated_valid_messages_only_ever_raise_message_rejected(edits, cut, tail):
    data = bytearray(VALID)
    for position, value in edits:
        data[position] = value
    mutated = bytes(data[:cut]) + tail
    if mutated == VALID:
        return
    with pytest.raises(MessageRejected):
        read(mutated)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=10), max_size=4),
    st.lists(st.integers(0, 2**32 - 1), max_size=20))
def test_any_fields_and_vectors_round_trip_to_identical_bytes(fields, values):
    original = envelope(fields=fields, arrays={"v": np.array(values, dtype=np.uint32)})
    data = encode(original, ALICE)
    decoded = read(data)
    assert same(original, decoded)
    assert encode(decoded, ALICE) == data


def test_encoding_one_message_to_each_recipient_is_byte_for_byte_encoding_it_to_each_in_turn():
    """The masked server relays the same n signed messages to each of n clients and encodes the payload once
    (issue 16): every message must still be exactly what ``encode`` makes for its recipient, so that it decodes,
    verifies and hashes (audit logs) as before, and a field holding another party's id is not rewritten."""
    identity = Identity.generate("server")
    roster = Roster.from_identities(identity, [Identity.generate(f"client-{i}") for i in range(3)])
    session = new_session_id()
    envelope = Envelope("masked", 4, "advertise_keys", "server", "client-0", {"note": "client-0", "n": [1, 2.5]},
                        {"v": np.arange(5, dtype=np.uint32)}, {"client-0": b"a", "client-1": b"bc"}, session,
                        roster.digest)
    recipients = ["client-0", "client-1", "client-2"]
    each = encode_to_each(envelope, recipients, identity)
    assert each == [encode(dataclasses.replace(envelope, recipient=r), identity) for r in recipients]
    assert [decode(data, roster, session=session).recipient for data in each] == recipients
    assert decode(each[2], roster, session=session).fields["note"] == "client-0"
    with pytest.raises(ProtocolError, match="header field 'recipient' must be a party id, not 'bad id'"):
        encode_to_each(envelope, ["client-0", "bad id"], identity)


def test_a_party_signs_exactly_what_rfc_8032_ed25519_signs_whichever_library_makes_it():
    """Identity.sign goes through libsodium for speed (issue 16); Ed25519 is deterministic, so every signature must
    be the one OpenSSL makes with the same key, and verify under the roster's public key."""
    for size in (0, 1, 300, 70_000):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert SERVER.sign(data) == SERVER.private_key.sign(data)
        SERVER.public_key.verify(SERVER.sign(data), data)


def test_anything_unforeseen_while_reading_a_message_is_a_refusal_in_its_place(monkeypatch):
    """No message may crash its receiver: an exception no check foresaw, anywhere in reading one message, is that
    message's refusal, with the same words from decode and from decode_each (whose other messages are unaffected)."""
    good = encode(envelope(), ALICE)
    odd = encode(envelope(round=7), ALICE)
    opened = wire._Framed.opened

    def fails_on_round_7(self):
        if self.header["round"] == 7:
            raise ValueError("array is too big")
        return opened(self)

    monkeypatch.setattr(wire._Framed, "opened", fails_on_round_7)
    with pytest.raises(MessageRejected, match=r"malformed message \(ValueError: array is too big\)") as raised:
        read(odd)
    decoded = decode_each([good, odd, good], ROSTER, session=SESSION)
    assert isinstance(decoded[0], Envelope) and isinstance(decoded[2], Envelope)
    assert decoded[1].reason == raised.value.reason
    assert decoded[1].__traceback__ is None and decoded[1].__context__ is None
    with pytest.raises(ConfigurationError):  # the receiver's own bad argument is still its error, not a refusal
        decode(good, ROSTER, session="not-a-session")

"""The wire format: canonical bytes, and strict decoding of anything else."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feddat_secure.federation.messages import MAGIC, Message, MessageError, decode, encode, expect

TENSORS = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(4, dtype=np.float32)}


def sample(**changes) -> Message:
    fields = dict(kind="update", round=3, sender="client0", recipient="server", tensors=TENSORS,
                  meta={"num_examples": 10})
    fields.update(changes)
    return Message(**fields)


def test_round_trip_keeps_every_field():
    decoded = decode(encode(sample()))
    assert (decoded.kind, decoded.round, decoded.sender, decoded.recipient) == ("update", 3, "client0", "server")
    assert decoded.meta == {"num_examples": 10}
    for name, value in TENSORS.items():
        np.testing.assert_array_equal(decoded.tensors[name], value)


def test_same_content_gives_the_same_bytes():
    reordered = sample(tensors=dict(reversed(list(TENSORS.items()))), meta={"num_examples": 10})
    assert encode(sample()) == encode(reordered)


def test_decoded_tensors_are_writable_copies():
    decoded = decode(encode(sample()))
    decoded.tensors["a"][0] = 5.0


@pytest.mark.parametrize("cut", [3, 12, 40])
def test_truncated_message_is_rejected(cut):
    data = encode(sample())
    with pytest.raises(MessageError):
        decode(data[: len(data) - cut])


def test_trailing_bytes_are_rejected():
    with pytest.raises(MessageError, match="unexpected bytes"):
        decode(encode(sample()) + b"\x00\x00\x00\x00")


def test_wrong_magic_and_unknown_version_are_rejected():
    data = encode(sample())
    with pytest.raises(MessageError, match="magic"):
        decode(b"XXXX" + data[4:])
    with pytest.raises(MessageError, match="version 9"):
        decode(MAGIC + struct.pack("<H", 9) + data[6:])


def test_oversized_message_is_rejected_before_parsing():
    with pytest.raises(MessageError, match="exceeds the limit"):
        decode(encode(sample()), max_bytes=64)


def test_nan_or_inf_is_refused_on_both_ends():
    with pytest.raises(MessageError, match="NaN"):
        encode(sample(tensors={"a": np.array([1.0, np.nan], dtype=np.float32)}))
    data = bytearray(encode(sample(tensors={"a": np.zeros(1, dtype=np.float32)})))
    data[-4:] = np.array([np.inf], dtype=np.float32).tobytes()
    with pytest.raises(MessageError, match="NaN or inf"):
        decode(bytes(data))


def test_non_canonical_header_is_rejected():
    data = encode(sample(tensors={}))
    header_length = struct.unpack_from("<I", data, 6)[0]
    header = data[10:10 + header_length].replace(b'"kind":', b'"kind" :')
    forged = data[:6] + struct.pack("<I", len(header)) + header
    with pytest.raises(MessageError, match="canonical"):
        decode(forged)


@pytest.mark.parametrize("changes, problem", [
    ({"kind": "bogus"}, "unknown message kind"),
    ({"round": -1}, "non-negative"),
    ({"sender": ""}, "sender"),
    ({"recipient": "x" * 65}, "recipient"),
])
def test_bad_envelope_is_refused_when_encoding(changes, problem):
    with pytest.raises(MessageError, match=problem):
        encode(sample(**changes))


def test_replay_from_another_round_or_kind_is_rejected_by_the_receiver():
    message = decode(encode(sample()))
    expect(message, kind="update", round_index=3, recipient="server")
    with pytest.raises(MessageError, match="round 3"):
        expect(message, kind="update", round_index=4, recipient="server")
    with pytest.raises(MessageError, match="expected a 'metrics'"):
        expect(message, kind="metrics", round_index=3, recipient="server")
    with pytest.raises(MessageError, match="addressed to"):
        expect(message, kind="update", round_index=3, recipient="client1")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_message_error(data):
    try:
        decode(MAGIC + data[:6] + data[6:])
    except MessageError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=8))
def test_any_corruption_of_a_valid_message_is_rejected_or_decodes_cleanly(position, junk):
    data = bytearray(encode(sample()))
    position = position % len(data)
    data[position:position + len(junk)] = junk
    try:
        decoded = decode(bytes(data))
    except MessageError:
        return
    assert all(np.all(np.isfinite(t)) for t in decoded.tensors.values())

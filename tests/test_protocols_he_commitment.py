"""A receipt commits to its ciphertexts through the wire's payload digest (issue 16): whoever decoded an input
message checks it against the receipt from the header it verified, without a second pass over the ciphertexts,
and the commitment binds where the payload is cut into ciphertexts, so the same bytes cut otherwise are refused."""

from __future__ import annotations

import dataclasses
import hashlib

import blake3
import pytest
import tenseal as ts
from test_protocols_he import Harness

from protocols import MessageRejected, RoundAborted
from protocols.he.chunks import ciphertexts_commitment, ciphertexts_digest
from protocols.wire import payload_digest


def server_sum(harness) -> list[bytes]:
    """The server's running sum, serialized."""
    return harness.server._serialized_sum()


def recut(blobs) -> dict[str, bytes]:
    """The same payload cut elsewhere, into two ciphertexts that still parse: the last protobuf field of the first
    (its scale, tag 0x19 and 8 bytes) moves to the front of the second, whose own scale field follows and wins."""
    first, second = blobs["c000000"], blobs["c000001"]
    assert first[-9] == 0x19
    return {"c000000": first[:-9], "c000001": first[-9:] + second}


def altered(blobs) -> dict[str, bytes]:
    """One ciphertext byte changed."""
    second = bytearray(blobs["c000001"])
    second[len(second) // 2] ^= 0x01
    return {**blobs, "c000001": bytes(second)}


def test_a_receipt_commits_to_the_payload_digest_of_the_input_message_that_reveals_it():
    harness = Harness(3)
    harness.open()
    commits = harness.commit()
    inputs = harness.reveal()
    for client, data in inputs.items():
        revealed = harness.read(data)
        blobs = [revealed.blobs[name] for name in sorted(revealed.blobs)]
        promised = harness.read(harness.read(commits[client]).blobs["receipt"]).fields["ciphertexts"]
        assert revealed.payload == payload_digest(blobs)
        assert ciphertexts_commitment([len(blob) for blob in blobs], revealed.payload) == promised
        assert ciphertexts_digest(blobs) == promised


def test_the_same_bytes_cut_into_other_ciphertexts_commit_to_another_value():
    harness = Harness(3)
    blobs = harness.read(harness.start()["client-1"]).blobs
    context = harness.public_context()
    recut_blobs = recut(blobs)
    for blob in recut_blobs.values():
        ts.ckks_vector_from(context, blob)  # both pieces are ciphertexts the server would parse
    assert payload_digest(list(recut_blobs.values())) == payload_digest([blobs["c000000"], blobs["c000001"]])
    assert ciphertexts_digest(list(recut_blobs.values())) != ciphertexts_digest([blobs["c000000"], blobs["c000001"]])


@pytest.mark.parametrize("change", [recut, altered])
def test_the_server_refuses_a_recut_or_altered_payload_under_the_old_commitment_and_keeps_its_state(change):
    harness = Harness(3)
    harness.start(skip={1})
    before = server_sum(harness)
    [answer] = harness.clients["client-1"].handle(harness.requests["client-1"])
    genuine = harness.read(answer.data)
    forged = harness.sign(dataclasses.replace(genuine, blobs=change(genuine.blobs)))  # signed by client-1 itself
    with pytest.raises(MessageRejected, match="not those the client committed to"):
        harness.server.receive(forged)
    assert server_sum(harness) == before
    assert "client-1" not in harness.server._inputs
    harness.server.receive(answer.data)  # the genuine input is still welcome
    assert "client-1" in harness.server._inputs


def test_a_committee_member_refuses_to_attest_a_recut_input_a_colluding_site_and_server_relay():
    harness = Harness(3)
    inputs = harness.start()
    harness.draw()
    genuine = harness.read(inputs["client-1"])
    forged = harness.sign(dataclasses.replace(genuine, blobs=recut(genuine.blobs)))
    refused = set()
    for message in harness.server.advance():
        data = forged if message.data == inputs["client-1"] else message.data
        try:
            for answer in harness.clients[message.recipient].handle(data):
                harness.server.receive(answer.data)
        except MessageRejected as rejection:
            assert "the inputs of ['client-1'] are not the ciphertexts their receipts committed to" in rejection.reason
            refused.add(message.recipient)
    assert refused == set(harness.committee)
    with pytest.raises(RoundAborted, match="did not attest"):
        harness.server.advance()


class _Counted:
    """A hash (hashlib.sha256, blake3.blake3) that adds the bytes it hashes to ``counted``: every payload pass."""

    counted = 0

    def __init__(self, make, data: bytes = b"", **options) -> None:
        self._hash = make(**options)
        self.update(data)

    def update(self, data) -> None:
        _Counted.counted += memoryview(data).nbytes
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._hash.digest()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def count_hashed_bytes(monkeypatch) -> None:
    for module, name in ((hashlib, "sha256"), (blake3, "blake3")):
        make = getattr(module, name)
        monkeypatch.setattr(module, name, lambda data=b"", *, _make=make, **options: _Counted(_make, data, **options))
    _Counted.counted = 0


@pytest.mark.parametrize("party", ["server", "member"])
def test_the_server_and_each_member_hash_an_input_once(monkeypatch, party):
    # the wire verifies the payload against its signed digest; the commitment check reuses that digest
    harness = Harness(3)
    inputs = harness.start(skip={1} if party == "server" else ())
    if party == "server":
        [answer] = harness.clients["client-1"].handle(harness.requests["client-1"])
        receive, data = harness.server.receive, answer.data
    else:
        harness.draw()
        outgoing = harness.server.advance()
        member = harness.committee[0]
        for message in outgoing:  # the announcement, so that the member takes relayed inputs
            if message.recipient == member and message.data not in inputs.values():
                harness.clients[member].handle(message.data)
                break
        receive, data = harness.clients[member].handle, inputs["client-1"]
    count_hashed_bytes(monkeypatch)
    receive(data)
    assert 0.9 * len(data) < _Counted.counted < 1.1 * len(data)  # the payload, once

"""The HE server keeps counted inputs in files, not in memory (issue 16): its memory does not grow with the number
of clients, every input still reaches the committee verbatim, and the files go when the round ends or aborts."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import sys

import numpy as np
import pytest
import tenseal as ts
from test_protocols_he import Harness, weighted_sum

from protocols import MessageRejected, RoundAborted
from protocols.he.chunks import ciphertexts_digest


def server_sum(harness) -> list[bytes]:
    """The server's running sum, serialized."""
    return harness.server._serialized_sum()


def input_bytes_held(server) -> int:
    """Bytes of every bytes object reachable from ``server`` (its Python state; the TenSEAL sum is C++ memory)."""
    seen, stack, total = set(), [server], 0
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, type | type(sys)):
            continue
        seen.add(id(item))
        if isinstance(item, bytes | bytearray):
            total += len(item)
        else:
            stack.extend(gc.get_referents(item))
    return total


@pytest.mark.parametrize("n", [3, 8])
def test_the_server_holds_no_input_in_memory_once_it_is_counted_whatever_the_number_of_clients(n):
    harness = Harness(n)
    inputs = harness.start()
    assert len(harness.server._inputs) == n
    assert input_bytes_held(harness.server) < min(len(data) for data in inputs.values())


def test_every_counted_input_reaches_each_member_byte_for_byte_and_its_file_goes_with_the_aggregate():
    harness = Harness(4, committee_size=2)
    inputs = harness.start(skip={3})
    folder = harness.server._inputs.folder
    assert sorted(path.read_bytes() for path in folder.iterdir()) == sorted(inputs.values())
    harness.draw()
    relayed = {}
    for message in harness.server.advance():
        relayed.setdefault(message.recipient, []).append(message.data)
    for member in harness.committee:
        assert [data for data in relayed[member] if data in inputs.values()] == list(inputs.values())
    for member, messages in relayed.items():
        for data in messages:
            for answer in harness.clients[member].handle(data):
                harness.server.receive(answer.data)
    [aggregate] = harness.server.advance()
    assert not folder.exists()
    [result] = harness.keyholder.handle(aggregate.data)
    harness.server.receive(result.data)
    np.testing.assert_allclose(harness.server.result().vector, weighted_sum(harness.xs, harness.ws, skip={3}),
                               atol=1e-5)


def test_the_files_go_when_the_round_aborts_at_the_input_stage():
    harness = Harness(3, min_fraction=1.0)
    harness.start(skip={2})
    folder = harness.server._inputs.folder
    assert len(list(folder.iterdir())) == 2
    with pytest.raises(RoundAborted, match="only 2 of 3 clients revealed their input"):
        harness.server.advance()
    assert not folder.exists()


def test_an_input_changed_on_disk_is_refused_by_the_committee_and_the_round_aborts_without_its_files():
    harness = Harness(3)
    harness.start()
    harness.draw()
    folder = harness.server._inputs.folder
    victim = sorted(folder.iterdir())[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of a ciphertext, under the client's signature
    victim.write_bytes(bytes(data))
    forged_for = set()
    for message in harness.server.advance():
        try:
            for answer in harness.clients[message.recipient].handle(message.data):
                harness.server.receive(answer.data)
        except MessageRejected as rejection:
            if rejection.sender == "client-1" and "the payload does not match its signed digest" in rejection.reason:
                forged_for.add(message.recipient)
    assert forged_for == set(harness.committee)
    with pytest.raises(RoundAborted, match="did not attest"):
        harness.server.advance()
    assert not folder.exists()


def test_an_input_refused_after_some_of_its_ciphertexts_were_added_leaves_no_file_and_the_sum_as_it_was():
    # a client commits to a first ciphertext that is fine and a second that is not: the server adds the first
    # before it parses the second, and must take it out again
    harness = Harness(3)
    harness.open()
    commits = harness.commit()
    honest = harness.reveal(skip={"client-2"})
    before = server_sum(harness)
    genuine = harness.read(harness.clients["client-2"].handle(harness.requests["client-2"])[0].data)
    chunks = [genuine.blobs["c000000"], ts.ckks_vector(harness.public_context(), [0.0] * 10).serialize()]
    receipt = harness.read(harness.read(commits["client-2"]).blobs["receipt"])
    forged_receipt = harness.sign(dataclasses.replace(
        receipt, fields={**receipt.fields, "ciphertexts": ciphertexts_digest(chunks)}))
    harness.server._promised["client-2"] = ciphertexts_digest(chunks)  # as if it had committed to these
    harness.server._receipts["client-2"] = forged_receipt
    forged = dataclasses.replace(genuine, blobs={"c000000": chunks[0], "c000001": chunks[1]})
    with pytest.raises(MessageRejected, match="ciphertext 'c000001' holds 10 slots"):
        harness.server.receive(harness.sign(forged))
    assert server_sum(harness) == before
    assert sorted(hashlib.sha256(path.read_bytes()).digest() for path in harness.server._inputs.folder.iterdir()) \
        == sorted(hashlib.sha256(data).digest() for data in honest.values())
    assert "client-2" not in harness.server._inputs

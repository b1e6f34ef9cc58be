"""Issue 13, items 5-8 (part): size-0 tree heads and proofs, ASCII times compared as instants, one outcome per
received message written after the decision, and messages that lead with the root cause.

Each test plays the attacker (or the auditor) with the package's own classes, wire messages and commands."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_audit_cli import main, run_dir  # noqa: F401 - run_dir is a fixture
from test_audit_support import Clock, build_run, index_of, read_lines, rechain, sign_line, write_lines

from audits import AuditLog, log_path, merkle, reconcile, verify_path
from audits.entries import TREE_HEAD_CONTEXT, SchemaError, SignedTreeHead, canonical_json, parse_entry, parse_time
from audits.proofs import ProofError, check_consistency_proof, consistency_proof
from feddat_secure.federation.channel import PartyAudit, Served
from protocols import Envelope, Identity, MessageRejected, Outgoing
from protocols.wire import encode

BOGUS = hashlib.sha256(b"any history the attacker likes").digest()


# ------------------------------------------------------------------------------ item 5: the empty tree


def test_a_consistency_proof_from_size_0_must_name_the_empty_tree_root():
    leaves = [merkle.leaf_hash(b"entry %d" % i) for i in range(5)]
    root = merkle.root(leaves)
    assert merkle.verify_consistency(0, merkle.EMPTY_ROOT, 5, root, [])  # RFC 9162 2.1.1: MTH({}) = SHA-256()
    assert not merkle.verify_consistency(0, BOGUS, 5, root, [])
    assert not merkle.verify_consistency(0, BOGUS, 0, BOGUS, [])


def _signed_head_dict(key: Ed25519PrivateKey, party: str, size: int, root: bytes, time: str) -> dict:
    """A tree head as the attacker holding ``party``'s key signs it, bypassing SignedTreeHead's own checks."""
    body = {"party": party, "root": root.hex(), "time": time, "tree_size": size}
    return {**body, "sig": key.sign(TREE_HEAD_CONTEXT + canonical_json(body)).hex()}


def test_a_signed_size_0_tree_head_with_a_bogus_root_is_refused_everywhere(tmp_path):
    key = Ed25519PrivateKey.generate()
    time = "2025-06-15T15:06:40.001000Z"
    with pytest.raises(SchemaError, match="size 0 must carry the empty tree's root"):
        SignedTreeHead.sign(key, "server", 0, BOGUS, time)
    forged = _signed_head_dict(key, "server", 0, BOGUS, time)
    with pytest.raises(SchemaError, match="size 0 must carry the empty tree's root"):
        SignedTreeHead.from_dict(forged)
    # ... also as the old head of a consistency proof a reviewer is handed
    run = build_run(tmp_path / "run")
    roster = run.roster
    proof = json.loads(consistency_proof(run.path("server"), 4).to_json())
    proof["old"] = _signed_head_dict(run.keys["server"], "server", 0, BOGUS, proof["old"]["time"])
    proof["path"] = []
    with pytest.raises(ProofError, match="size 0 must carry the empty tree's root"):
        check_consistency_proof(proof, roster)
    proof["old"] = _signed_head_dict(run.keys["server"], "server", 0, merkle.EMPTY_ROOT, proof["old"]["time"])
    assert check_consistency_proof(proof, roster)


def test_verify_catches_a_recorded_size_0_head_with_a_bogus_root(tmp_path):
    """The attacker holds client_0's and the server's keys and plants a size-0 server head in client_0's log."""
    run = build_run(tmp_path)
    path = run.path("client_0")
    lines = read_lines(path)
    at = index_of(lines, "peer_tree_head")
    value = json.loads(lines[at])
    value["sth"] = _signed_head_dict(run.keys["server"], "server", 0, BOGUS, value["sth"]["time"])
    lines[at] = sign_line(value, run.keys["client_0"])
    write_lines(path, rechain(lines, at, run.keys["client_0"]))
    report = verify_path(tmp_path, run.roster)
    assert not report.ok
    first = report.first_problem
    assert (first.path, first.line) == (path, at + 1)
    assert "size 0 must carry the empty tree's root" in first.reason


# ------------------------------------------------------------------------------ item 7: times


def test_times_take_ascii_digits_only_and_are_compared_as_instants(tmp_path):
    fullwidth = "".join(chr(0xFF10 + int(c)) if c.isdigit() else c for c in "2025-06-15T15:06:40.001000Z")
    with pytest.raises(SchemaError, match="ASCII digits"):
        parse_time(fullwidth)
    assert parse_time("2025-06-15T15:06:40.001000Z") == datetime(2025, 6, 15, 15, 6, 40, 1000, tzinfo=UTC)
    # An attacker with the party's key rewrites a time in full-width digits (canonical JSON escapes them, so the
    # line is still ASCII and canonical): the verifier refuses the line and names the field.
    run = build_run(tmp_path, rounds=1)
    path = run.path("server")
    lines = read_lines(path)
    value = json.loads(lines[2])
    value["time"] = "".join(chr(0xFF10 + int(c)) if c.isdigit() else c for c in value["time"])
    lines[2] = sign_line(value, run.keys["server"])
    write_lines(path, rechain(lines, 2, run.keys["server"]))
    with pytest.raises(SchemaError, match="time must be a UTC time .* in ASCII digits"):
        parse_entry(lines[2])
    report = verify_path(tmp_path, run.roster)
    assert report.first_problem.path == path and report.first_problem.line == 3
    assert "ASCII digits" in report.first_problem.reason


# ------------------------------------------------------------------------------ item 6: outcomes


SERVER = Identity.generate("server")
SITE = Identity.generate("client_0")


def _message(sender: Identity, stage: str) -> bytes:
    return encode(Envelope("runner", 0, stage, sender.party_id, "client_0", {}, session="0" * 32,
                           roster="0" * 64), sender)


class _Site:
    """A replying party that answers 'train' with one message and refuses everything else."""

    party_id = "client_0"

    def handle(self, data: bytes) -> list[Outgoing]:
        if data == _message(SERVER, "train"):
            return [Outgoing("server", b"update")]
        raise MessageRejected("not a request of this run")


def _logs(tmp_path):
    clock = Clock()
    keys = {"server": SERVER.private_key, "client_0": SITE.private_key}
    logs = {p: AuditLog.create(log_path(tmp_path, p), p, keys[p], clock=clock) for p in keys}
    served = Served(_Site(), PartyAudit(logs["client_0"], {p: k.public_key() for p, k in keys.items()}),
                    server_id="server")
    return logs, served


def _events(log: AuditLog) -> list[dict]:
    return [json.loads(line) for line in log.path.read_text().splitlines()]


def test_each_request_gets_one_outcome_written_after_the_decision(tmp_path):
    logs, served = _logs(tmp_path)
    train, stale = _message(SERVER, "train"), _message(SERVER, "stale")
    for data in (train, stale):
        logs["server"].record("message_sent", peer="client_0", data=data)
        for answer in served.handle(data):
            logs["server"].record("message_received", peer="client_0", data=answer.data)
    site = [e for e in _events(logs["client_0"]) if e["digest"] is not None]
    assert [(e["event"], e["peer"]) for e in site] == [
        ("message_received", "server"),  # accepted, then its answer
        ("message_sent", "server"),
        ("message_rejected", "server"),  # the server's signed message, refused: attributed to the server
    ]
    assert site[2]["digest"] == hashlib.sha256(stale).hexdigest() and site[2]["size"] == len(stale)
    report = reconcile(tmp_path)
    assert report.ok and report.matched == 3 and not report.unmatched
    [refused] = report.refused
    assert refused.sender == "server" and refused.reason == "not a request of this run"
    assert report.summary().endswith("1 of them refused by their recipient (listed below)")


def test_junk_is_not_attributed_to_the_peer_that_delivered_it(tmp_path):
    """Bytes no roster party signed (garbage on the socket, a message forged in the server's name) are recorded
    without a peer; reconcile pairs them with a send of the same bytes if some party recorded one, else lists
    them as refused bytes no party sent, never as the server's."""
    logs, served = _logs(tmp_path)
    mallory = Identity.generate("server")  # the server's id, a key not on the roster
    forged, junk = _message(mallory, "train"), b"\x00junk on the agent's socket"
    relayed_junk = b"bytes the server did send, unsigned"
    logs["server"].record("message_sent", peer="client_0", data=relayed_junk)
    for data in (forged, junk, relayed_junk):
        assert served.handle(data) == []
    site = [e for e in _events(logs["client_0"]) if e["digest"] is not None]
    assert [(e["event"], e["peer"], e["meta"]["via"]) for e in site] == [("message_rejected", None, "server")] * 3
    report = reconcile(tmp_path)
    assert report.matched == 1 and [e.reason for e in report.refused] == ["not a request of this run"]
    assert report.refused[0].sender == "server"  # by the server's own record of sending those bytes
    assert {e.digest for e in report.unsent_refusals} == {hashlib.sha256(d).hexdigest() for d in (forged, junk)}
    assert all(e.sender is None for e in report.unsent_refusals)
    assert "no party of the run recorded sending them" in report.unsent_refusals[0].describe()


# ------------------------------------------------------------------------------ item 8: messages


def test_reconcile_leads_with_the_log_that_does_not_verify(run_dir, capsys):  # noqa: F811
    path = run_dir / "audit" / "server.audit.jsonl"
    lines = read_lines(path)
    lines[5], lines[6] = lines[6], lines[5]
    write_lines(path, lines)
    assert main(["audit", "reconcile", str(run_dir)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # the consequences are counted, not listed as if independent
    assert out[0].startswith(f"NOT RECONCILED: the log of 'server' does not verify ({path}: line 6 (seq 6): ")
    assert out[0].endswith("7 exchange(s) the other logs record with 'server' cannot be matched because of that")
    # `verify` and `proof` name the same first bad line, numbered the same way (1-based line, the entry's seq)
    assert main(["audit", "verify", str(path)]) == 1
    verified = capsys.readouterr().out
    assert main(["audit", "proof", str(path), "--index", "1"]) == 1
    proved = capsys.readouterr().out
    assert f"{path}: line 6 (seq 6): sequence number 6 where 5 was expected" in verified
    assert f"{path}: line 6 (seq 6): sequence number 6 where 5 was expected" in proved


def test_check_proof_says_the_embedded_entry_is_broken_not_the_file(run_dir, capsys):  # noqa: F811
    log = run_dir / "audit" / "server.audit.jsonl"
    out = run_dir / "audit" / "proof.json"
    assert main(["audit", "proof", str(log), "--index", "2", "--out", str(out)]) == 0
    proof = json.loads(out.read_text())
    proof["entry"] = proof["entry"][:-3]
    out.write_text(json.dumps(proof))
    capsys.readouterr()
    assert main(["audit", "check-proof", str(out)]) == 1
    assert capsys.readouterr().out.strip() == ("INVALID: the proof's entry (its 'entry' field) is not a valid log "
                                               "entry: not valid JSON")

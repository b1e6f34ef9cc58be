"""Inclusion and consistency proofs that a third party checks with the roster alone."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from test_audit_support import Clock, build_run

from audits import (
    AuditError,
    AuditLog,
    ConsistencyProof,
    InclusionProof,
    ProofError,
    SignedTreeHead,
    check_consistency_proof,
    check_inclusion_proof,
    check_log,
    consistency_proof,
    inclusion_proof,
)
from audits.entries import canonical_json


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("run"))


def test_every_entry_is_provable_against_the_final_tree_head(run):
    path = run.path("client_0")
    entries = check_log(path, None).entries
    for index in range(len(entries) - 1):  # the final tree head entry itself is covered by no tree head
        proof = inclusion_proof(path, index)
        assert proof.tree_head.tree_size == len(entries) - 1
        assert proof.entry == entries[index].line
        assert check_inclusion_proof(proof, run.roster)
        assert check_inclusion_proof(proof.to_json(), run.roster)
        assert InclusionProof.from_json(proof.to_json()) == proof
    with pytest.raises(ValueError, match="not covered"):
        inclusion_proof(path, len(entries) - 1)
    with pytest.raises(ValueError, match="has no entry"):
        inclusion_proof(path, len(entries))


def test_a_proof_against_an_earlier_tree_head(run):
    path = run.path("server")
    sizes = [sth.tree_size for sth in check_log(path, None).tree_heads]
    proof = inclusion_proof(path, 2, tree_size=sizes[0])
    assert proof.tree_head.tree_size == sizes[0] and check_inclusion_proof(proof, run.roster)
    with pytest.raises(ValueError, match="does not cover"):
        inclusion_proof(path, sizes[0], tree_size=sizes[0])
    with pytest.raises(ValueError, match="no signed tree head of size"):
        inclusion_proof(path, 2, tree_size=sizes[0] + 1)


def _tampered(proof: InclusionProof, **changes) -> dict:
    value = proof.to_dict()
    value.update(changes)
    return value


def test_a_tampered_inclusion_proof_fails(run):
    path = run.path("server")
    proof = inclusion_proof(path, 6)
    entry = json.loads(proof.entry)
    forged = dict(entry, meta={"note": "forged"})
    bad_path = list(proof.to_dict()["path"])
    bad_path[1] = "0" * 64
    wrong_size = dict(proof.tree_head.to_dict(), tree_size=proof.tree_head.tree_size + 1)
    intruder = Ed25519PrivateKey.generate()
    t = proof.tree_head
    resigned = SignedTreeHead.sign(intruder, t.party, t.tree_size, t.root, t.time).to_dict()
    other = inclusion_proof(path, 7)
    cases = {
        "changed entry": (_tampered(proof, entry=canonical_json(forged).decode()), "signature does not verify"),
        "another entry": (_tampered(proof, entry=other.entry.decode()), "not the proof's index"),
        "another index": (_tampered(other, index=6), "not the proof's index"),
        "changed path": (_tampered(proof, path=bad_path), "does not prove entry 6"),
        "shorter path": (_tampered(proof, path=bad_path[:-1]), "does not prove"),
        "changed tree size": (_tampered(proof, tree_head=wrong_size), "does not verify"),
        "tree head by another key": (_tampered(proof, tree_head=resigned), "does not verify"),
        "not a proof": ({"format": "something else"}, "not a feddat-secure-audit-inclusion-proof"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ProofError, match=message):
            check_inclusion_proof(value, run.roster)
            pytest.fail(name)
    with pytest.raises(ProofError, match="not on the roster"):
        check_inclusion_proof(proof, {"client_0": run.roster["client_0"]})
    with pytest.raises(ProofError, match="must be JSON"):
        check_inclusion_proof(b"\xff", run.roster)


def test_an_entry_from_another_party_is_not_included(run):
    proof = inclusion_proof(run.path("server"), 3)
    foreign = inclusion_proof(run.path("client_0"), 3)
    with pytest.raises(ProofError, match="the entry is of 'client_0' but the tree head is of 'server'"):
        check_inclusion_proof(_tampered(proof, entry=foreign.entry.decode()), run.roster)


def test_consistency_proofs_between_tree_heads(run):
    path = run.path("server")
    sizes = [sth.tree_size for sth in check_log(path, None).tree_heads]
    for old in sizes[:-1]:
        proof = consistency_proof(path, old)
        assert (proof.old.tree_size, proof.new.tree_size) == (old, sizes[-1])
        assert check_consistency_proof(proof.to_json(), run.roster)
        assert ConsistencyProof.from_json(proof.to_json()) == proof
    proof = consistency_proof(path, sizes[1], sizes[3])
    value = proof.to_dict()
    value["path"][0] = "1" * 64
    with pytest.raises(ProofError, match="does not prove the tree of 'server'"):
        check_consistency_proof(value, run.roster)
    mixed = consistency_proof(run.path("client_0"), check_log(run.path("client_0"), None).tree_heads[0].tree_size)
    with pytest.raises(ProofError, match="different parties"):
        check_consistency_proof(ConsistencyProof(proof.old, mixed.new, proof.path), run.roster)


def test_a_log_that_does_not_verify_proves_nothing(run, tmp_path):
    path = tmp_path / "cut.audit.jsonl"
    path.write_bytes(run.path("server").read_bytes()[:-10])
    with pytest.raises(AuditError, match="does not verify"):
        inclusion_proof(path, 1)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 60), st.integers(1, 9), st.data())
def test_any_entry_of_any_log_is_provable(tmp_path_factory, entries, every, data):
    key = Ed25519PrivateKey.generate()
    path = tmp_path_factory.mktemp("log") / "p.audit.jsonl"
    log = AuditLog.create(path, "p", key, tree_head_every=every, fsync_every=1000, clock=Clock())
    for r in range(entries):
        log.record("round_started", round=r)
    log.close()
    heads = check_log(path, None).tree_heads
    sth = data.draw(st.sampled_from(heads))
    index = data.draw(st.integers(0, sth.tree_size - 1))
    assert check_inclusion_proof(inclusion_proof(path, index, sth.tree_size), {"p": key.public_key()})
    old = data.draw(st.sampled_from([h for h in heads if h.tree_size <= sth.tree_size]))
    assert check_consistency_proof(consistency_proof(path, old.tree_size, sth.tree_size), {"p": key.public_key()})

"""Issue 13, items 8 (part) and 9: one round numbering, an explicit resume entry, verification linear in entries.

The auditor reads a party's log beside ``metrics.jsonl`` and the console: round 1 must be round 1 in all of them
(the wire envelope and the code count from 0; the log, what people read, counts from 1). A resumed run must say so
in every party's log, with what it continued from, instead of leaving a second ``round_started`` to guess from.
And ``audit verify`` on a long run must cost time linear in its entries, however many tree heads were exchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audits import AuditLog, merkle, parse_entry, verify_path
from audits.entries import SchemaError
from feddat_secure.cli import _roster_keys
from feddat_secure.federation import envelopes as E
from feddat_secure.federation.channel import PartyAudit, Served
from feddat_secure.federation.keyholder_app import KeyHolder
from feddat_secure.federation.party_folder import PartyFolder
from feddat_secure.federation.runner import run
from feddat_secure.privacy.accounting import GaussianEvent
from feddat_secure.privacy.dataset_ledger import DatasetLedger, LevelBudget, RecordSet
from protocols import Identity, Roster, make_protocol, new_session_id
from tests.conftest import small_config

PARTIES = ("server", "client0", "client1", "client2", "keyholder")


def entries_of(run_dir: Path, party: str) -> list[dict]:
    path = run_dir / "parties" / party / f"{party}.audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A 2-round HE run (server, 3 sites, key holder) killed after round 2 ran but before it was checkpointed,
    then resumed. Returns the run folder, the session ids of the two starts and the SHA-256 of each party's
    checkpoint as it was on disk when the run was resumed."""
    config = small_config(tmp_path_factory.mktemp("resume"), secure_aggregation={"protocol": "he"})
    run_dir = Path(config.output_dir) / config.name

    def crash_in_round_2(text: str) -> None:
        if text.startswith("round   2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(config, progress=False, echo=crash_in_round_2)
    checkpoints = {}  # round 1 is each party's last checkpoint in common: the run resumes from it
    for party in PARTIES[:-1]:  # the key holder keeps no checkpoint
        path = PartyFolder(run_dir / "parties" / party, party).checkpoint(1)
        checkpoints[party] = hashlib.sha256(path.read_bytes()).hexdigest()
    first = {party: [e for e in entries_of(run_dir, party) if e["event"] == "run_started"][0]["meta"]["session"]
             for party in PARTIES}
    result = run(config, resume=True, progress=False, echo=lambda _: None)
    return result.run_dir, first, checkpoints


@pytest.mark.slow
def test_every_partys_log_records_the_resume_and_what_it_continued_from(resumed_run):
    run_dir, first_session, checkpoints = resumed_run
    for party in PARTIES:
        entries = entries_of(run_dir, party)
        resumed = [e for e in entries if e["event"] == "run_resumed"]
        assert len(resumed) == 1, party
        entry = resumed[0]
        started = [e for e in entries if e["event"] == "run_started"]
        assert [s["meta"]["session"] for s in started][0] == first_session[party]
        # written in the new session, right after it started; it names the session it continues and where
        assert entries[entries.index(started[1]) + 1] is entry, party
        assert entry["meta"]["resumes_session"] == first_session[party] != started[1]["meta"]["session"]
        assert entry["round"] == 2, party  # the run continues at round 2 (round 1 was checkpointed)
        assert entry["meta"]["checkpoint_sha256"] == checkpoints.get(party), party  # None for the key holder
    assert verify_path(run_dir / "parties", _roster_keys(run_dir / "roster.json"), require_closed=True).ok


@pytest.mark.slow
def test_audit_logs_number_rounds_from_1_as_metrics_and_the_console_do(resumed_run):
    run_dir = resumed_run[0]
    metrics = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [1, 2]
    server = entries_of(run_dir, "server")
    assert [e["round"] for e in server if e["event"] == "round_started"] == [1, 2, 2]  # round 2 ran twice
    assert [e["round"] for e in server if e["event"] == "aggregate_computed"] == [1, 2, 2]
    for party in PARTIES:
        entries = entries_of(run_dir, party)
        # every entry with a round (decisions and every message, whose round is its wire envelope's + 1)
        assert {e["round"] for e in entries if e["round"] is not None} == {1, 2}, party
        trained = {e["round"] for e in entries if e["event"].startswith("message_") and e["stage"] == "feddat:train"}
        assert trained <= {1, 2}, party
    for site in PARTIES[1:4]:
        assert [e["round"] for e in entries_of(run_dir, site) if e["event"] == "adapter_applied"] == [1, 2, 2]


def test_a_resume_entry_without_its_round_or_session_is_refused_when_written_and_when_read(tmp_path):
    key = Ed25519PrivateKey.generate()
    log = AuditLog.create(tmp_path / "site.audit.jsonl", "site", key)
    with pytest.raises(SchemaError, match="run_resumed needs round"):
        log.record("run_resumed", meta={"resumes_session": "a" * 32})
    with pytest.raises(SchemaError, match="run_resumed needs round"):
        log.record("run_resumed", round=2, meta={"checkpoint_sha256": None})
    entry = log.record("run_resumed", round=2, meta={"resumes_session": "a" * 32, "checkpoint_sha256": None})
    assert parse_entry(entry.line).round == 2
    forged = json.loads(entry.line)
    forged["round"] = None  # the verifier refuses it on its own, before any signature is looked at
    line = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(SchemaError, match="run_resumed entry needs the round"):
        parse_entry(line)


def test_the_key_holder_refuses_a_resume_that_names_no_session():
    """A server's signed ``open`` that says ``resume`` must name the session it continues, as a session id: the key
    holder writes it into its log, and anything else (a long string the log's meta limits refuse) would stop it."""
    server, keyholder = Identity.generate("server"), Identity.generate("keyholder")
    roster = Roster.from_identities(server, [Identity.generate(f"client{i}") for i in range(3)], keyholder)
    party = KeyHolder(keyholder, roster, None, config_digest="c" * 64, protocol=make_protocol("he"),
                      audit=PartyAudit(None, {}))
    served = Served(party, party.audit, server_id="server")
    stamp = E.Stamp(server, roster)
    stamp.session = new_session_id()
    for claimed in ("x" * 300, None):
        request = stamp.envelope(E.OPEN, 1, "keyholder", {"config_sha256": "c" * 64, "next_round": 1,
                                                          "resume": True, "resumes_session": claimed,
                                                          "clients": ["client0", "client1"]})
        with pytest.raises(Exception, match="'resumes_session' must be a session id"):
            party.handle(request)
        assert served.handle(request) == []  # refused (and logged), never an exception out of the party


def test_a_dataset_ledger_numbers_its_charges_from_1_and_reads_them_back(tmp_path):
    ledger = DatasetLedger(tmp_path, RecordSet.of(hashlib.sha256(f"record {i}".encode()).digest() for i in range(4)))
    budget = {"record": LevelBudget("record", 10.0, 1e-5, "rdp")}
    contents = ledger.charge("run-a", 0, {"record": [GaussianEvent(1.0, 0.1, 10)]}, budget)
    raw = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    assert [e["round"] for e in raw if e["event"] == "privacy_charged"] == [1]  # what a reader of the file sees
    assert [c.round for c in contents.charges] == [0]  # the 0-based index the accountants use
    assert contents.to_json()["charges"][0]["round"] == 1


def test_verifying_exchanged_tree_heads_hashes_each_entry_a_bounded_number_of_times(tmp_path, monkeypatch):
    """Issue 13 item 9: ``verify`` must stay linear in a log's entries however many tree heads its party handed
    out. Counted in Merkle node hashes, not seconds: a consistency proof rebuilt from the leaves for each
    recorded head costs O(entries) per head (O(entries × heads) in all); here at most a few hashes per entry."""
    keys = {party: Ed25519PrivateKey.generate() for party in ("server", "site")}
    site = AuditLog.create(tmp_path / "site.audit.jsonl", "site", keys["site"], fsync_every=10**9)
    server = AuditLog.create(tmp_path / "server.audit.jsonl", "server", keys["server"], fsync_every=10**9)
    heads, per_head = 64, 32
    for i in range(heads):
        for _ in range(per_head):
            site.record("round_started", round=i + 1)
        server.record_peer_tree_head("site", site.signed_tree_head(), public_key=keys["site"].public_key())
    site.close()
    server.close()
    lines = sum(1 for _ in (tmp_path / "site.audit.jsonl").open()) + sum(1 for _ in (tmp_path / "server.audit.jsonl")
                                                                          .open())
    hashed = []
    original = merkle.node_hash
    monkeypatch.setattr(merkle, "node_hash", lambda left, right: hashed.append(1) or original(left, right))
    report = verify_path(tmp_path, {party: key.public_key() for party, key in keys.items()}, require_closed=True)
    assert report.ok and report.peer_checks == heads
    assert len(hashed) <= 4 * lines, f"{len(hashed)} node hashes for {lines} entries"

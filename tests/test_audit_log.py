"""The writer: what an entry holds (and never holds), tree heads, durability, crash recovery."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from test_audit_support import Clock, read_lines, rechain, write_lines

import audits
from audits import AuditError, AuditLog, SchemaError, SignedTreeHead, check_log, torn_path, verify_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def new_log(tmp_path, key, **kwargs):
    kwargs.setdefault("clock", Clock())
    return AuditLog.create(tmp_path / "server.audit.jsonl", "server", key, **kwargs)


def verify(log_or_path, key, party="server"):
    path = log_or_path.path if isinstance(log_or_path, AuditLog) else log_or_path
    return verify_path(path, {party: key.public_key()})


def test_an_entry_holds_the_digest_and_size_of_the_bytes_never_the_bytes(tmp_path, key):
    log = new_log(tmp_path, key)
    secret = b"raw update values \x00\x01\x02 that must never be written" * 10
    entry = log.record("message_sent", round=3, stage="update", peer="client_0", data=secret,
                       meta={"protocol": "secagg+", "epsilon": 0.5})
    assert entry.digest == hashlib.sha256(secret).hexdigest() and entry.size == len(secret)
    assert (entry.seq, entry.round, entry.stage, entry.peer) == (1, 3, "update", "client_0")
    log.close()
    text = log.path.read_bytes()
    assert secret[:18] not in text and secret.hex()[:32].encode() not in text
    written = json.loads(read_lines(log.path)[1])
    assert written["digest"] == entry.digest and written["size"] == len(secret)
    assert written["meta"] == {"protocol": "secagg+", "epsilon": 0.5}
    first = json.loads(read_lines(log.path)[0])
    assert first["event"] == "log_opened" and first["meta"]["key_id"] == audits.key_id(key.public_key())
    assert verify(log, key).ok


def test_a_precomputed_digest_is_accepted_instead_of_the_bytes(tmp_path, key):
    log = new_log(tmp_path, key)
    digest = hashlib.sha256(b"x").hexdigest()
    assert log.record("message_received", peer="c", digest=digest, size=1).digest == digest
    with pytest.raises(ValueError):
        log.record("message_received", peer="c", data=b"x", digest=digest, size=1)
    with pytest.raises(SchemaError):
        log.record("message_received", peer="c", digest=digest.upper(), size=1)


@pytest.mark.parametrize(("event", "kwargs", "message"), [
    ("message_dropped", {}, "cannot be recorded"),
    ("tree_head", {}, "cannot be recorded"),
    ("log_opened", {}, "cannot be recorded"),
    ("message_sent", {"data": b"x"}, "needs peer"),
    ("message_received", {"peer": "c"}, "needs peer and the exact bytes"),
    ("message_rejected", {"peer": "c", "data": b"x"}, "meta={'reason'"),
    ("round_started", {"round": -1}, "round must be"),
    ("round_started", {"round": True}, "round must be"),
    ("round_started", {"stage": "has space"}, "stage must be"),
    ("round_started", {"peer": ""}, "peer must be"),
    ("privacy_spent", {"meta": {"noise": b"\x00\x01"}}, "never stores raw data"),
    ("privacy_spent", {"meta": {"update": [0.1, 0.2]}}, "never raw data or values"),
    ("privacy_spent", {"meta": {"ids": ["a"] * 17}}, "at most 16 short strings"),
    ("privacy_spent", {"meta": {"blob": "A" * 257}}, "at most 256"),
    ("privacy_spent", {"meta": {"nested": {"a": 1}}}, "only JSON scalars"),
    ("privacy_spent", {"meta": {"Bad-Key": 1}}, "lowercase name"),
    ("privacy_spent", {"meta": {f"k{i}": i for i in range(17)}}, "at most 16 are allowed"),
    ("privacy_spent", {"meta": {"epsilon": float("nan")}}, "finite"),
])
def test_malformed_records_are_refused_and_nothing_is_written(tmp_path, key, event, kwargs, message):
    log = new_log(tmp_path, key)
    before = log.path.read_bytes()
    with pytest.raises((SchemaError, ValueError, TypeError), match=message.replace("[", r"\[").replace("{", r"\{")):
        log.record(event, **kwargs)
    assert log.path.read_bytes() == before


def test_every_documented_event_is_recordable_or_written_by_the_log():
    text = (ROOT / "docs" / "audit.md").read_text()
    for event in audits.EVENTS:
        assert f"`{event}`" in text, f"{event} is not documented"
    assert set(audits.RECORDABLE_EVENTS) == set(audits.EVENTS) - {"log_opened", "tree_head", "peer_tree_head",
                                                                  "log_recovered"}


def test_tree_heads_are_written_every_n_entries_and_cover_everything_before_them(tmp_path, key):
    log = new_log(tmp_path, key, tree_head_every=5)
    for i in range(12):
        log.record("round_started", round=i)
    heads = [json.loads(line) for line in read_lines(log.path) if json.loads(line)["event"] == "tree_head"]
    assert [(h["seq"], h["sth"]["tree_size"]) for h in heads] == [(5, 5), (11, 11)]
    sth = log.signed_tree_head()
    assert sth.tree_size == 15 and log.signed_tree_head() == sth  # no new entry, same head
    sth.verify(key.public_key())
    assert SignedTreeHead.from_bytes(sth.to_bytes()) == sth
    final = log.close()
    assert final.tree_size == 16 and log.close() == final and log.closed
    last = json.loads(read_lines(log.path)[-1])
    assert last["event"] == "tree_head" and last["meta"] == {"final": True}
    with pytest.raises(AuditError, match="closed"):
        log.record("run_stopped")
    report = verify(log, key)
    assert report.ok and report.logs[0].closed and len(report.logs[0].tree_heads) == 4


def test_a_tree_head_must_be_canonical_and_signed_by_its_party(tmp_path, key):
    log = new_log(tmp_path, key)
    sth = log.signed_tree_head()
    with pytest.raises(SchemaError, match="canonical"):
        SignedTreeHead.from_bytes(json.dumps(sth.to_dict(), indent=1))
    with pytest.raises(AuditError, match="does not verify"):
        sth.verify(Ed25519PrivateKey.generate().public_key())
    client = AuditLog.create(tmp_path / "c.audit.jsonl", "client_0", Ed25519PrivateKey.generate())
    with pytest.raises(AuditError, match="not of 'someone'"):
        client.record_peer_tree_head("someone", sth)
    with pytest.raises(AuditError, match="does not verify"):
        client.record_peer_tree_head("server", sth, public_key=Ed25519PrivateKey.generate().public_key())
    entry = client.record_peer_tree_head("server", sth.to_bytes(), public_key=key.public_key())
    assert entry.sth == sth and entry.peer == "server"
    with pytest.raises(AuditError, match="own tree heads"):
        log.record_peer_tree_head("server", sth)


def test_bad_settings_are_refused_before_any_file_is_created(tmp_path, key):
    for kwargs in ({"run_id": "x" * 300}, {"tree_head_every": 0}, {"fsync_every": True}):
        with pytest.raises((SchemaError, ValueError)):
            new_log(tmp_path, key, **kwargs)
    with pytest.raises(SchemaError):
        AuditLog.create(tmp_path / "x.audit.jsonl", "", key)
    assert list(tmp_path.iterdir()) == []


def test_time_never_goes_backwards_even_when_the_clock_does(tmp_path, key):
    times = iter([1_800_000_000.0, 1_800_000_005.0, 1_799_999_000.0, 1_800_000_006.0, 1_800_000_007.0])
    log = new_log(tmp_path, key, clock=lambda: next(times))
    for _ in range(3):
        log.record("round_started")
    stamps = [json.loads(line)["time"] for line in read_lines(log.path)]
    assert stamps == sorted(stamps) and stamps[1] == stamps[2]  # the step back is absorbed
    log.close()
    assert verify(log, key).ok


def test_fsync_runs_per_entry_by_default_and_batched_on_request(tmp_path, key, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(audits.log.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    log = new_log(tmp_path, key)
    calls.clear()
    for _ in range(10):
        log.record("round_started")
    assert len(calls) == 10
    batched = AuditLog.create(tmp_path / "b.audit.jsonl", "server", key, fsync_every=8, tree_head_every=1000)
    calls.clear()
    for _ in range(10):
        batched.record("round_started")
    assert len(calls) == 1
    batched.signed_tree_head()  # handing out a tree head always syncs first
    assert len(calls) == 2
    batched.record("round_started")
    batched.sync()
    assert len(calls) == 3
    batched.close()
    assert verify(batched.path, key).ok


def test_concurrent_records_are_serialised(tmp_path, key):
    log = new_log(tmp_path, key, tree_head_every=7, fsync_every=16)

    def work(i):
        for r in range(40):
            log.record("message_received", round=r, peer=f"client_{i}", data=b"%d-%d" % (i, r))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    report = verify(log, key)
    assert report.ok and len(report.logs[0].entries) == 1 + 160 + 161 // 7 + 1  # log_opened counts


def test_create_refuses_an_existing_log(tmp_path, key):
    new_log(tmp_path, key).close()
    with pytest.raises(FileExistsError):
        new_log(tmp_path, key)


# ------------------------------------------------------------------------------------------------ recovery


def _crash_mid_entry(tmp_path, key, entries=5):
    """A log whose last line was torn: the first ``len // 2`` bytes of a real next entry."""
    log = new_log(tmp_path, key, tree_head_every=3)
    for r in range(entries):
        log.record("round_started", round=r)
    os.close(log._fd)  # the process "dies" without closing the log
    path = log.path
    lines = read_lines(path)
    half = lines[-1][: len(lines[-1]) // 2]
    with open(path, "ab") as stream:
        stream.write(half)
    return path, lines, half


def test_a_torn_last_line_is_set_aside_recorded_and_reported(tmp_path, key, caplog):
    path, lines, half = _crash_mid_entry(tmp_path, key)
    assert "incomplete last line" in verify(path, key).first_problem.reason
    with caplog.at_level("WARNING", logger="audits"):
        log = AuditLog.open(path, "server", key, tree_head_every=3, clock=Clock(2e9))
    assert log.recovery is not None and log.recovery.size == len(half)
    assert log.recovery.digest == hashlib.sha256(half).hexdigest()
    assert torn_path(path).read_bytes() == half
    assert "set aside an incomplete last entry" in caplog.text
    recovered = json.loads(read_lines(path)[len(lines)])
    assert recovered["event"] == "log_recovered" and recovered["seq"] == len(lines)
    assert (recovered["digest"], recovered["size"]) == (log.recovery.digest, len(half))
    assert recovered["meta"] == {"side_file": torn_path(path).name, "offset": 0}
    log.record("run_stopped")
    log.close()
    report = verify(path, key)
    assert report.ok, report.summary()
    assert read_lines(path)[: len(lines)] == lines  # nothing before the torn line changed


def test_a_crash_of_the_writing_process_is_recovered(tmp_path, key):
    """A real process writes entries, dies halfway through writing one, and the log is recovered."""
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    child = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from cryptography.hazmat.primitives.serialization import load_pem_private_key
import audits.log as audit_log
key = load_pem_private_key({pem!r}, None)
log = audit_log.AuditLog.create({str(tmp_path / "server.audit.jsonl")!r}, "server", key)
for r in range(4):
    log.record("round_started", round=r)
def torn_write(fd, data):
    os.write(fd, data[: len(data) // 2])
    os._exit(9)  # killed mid-write
audit_log._write_all = torn_write
log.record("message_sent", round=4, peer="client_0", data=b"update")
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert result.returncode == 9, result.stderr
    path = tmp_path / "server.audit.jsonl"
    assert not path.read_bytes().endswith(b"\n")
    log = AuditLog.open(path, "server", key)
    assert log.recovery is not None and log.size == 6  # log_opened, 4 rounds, log_recovered
    log.close()
    assert verify(path, key).ok


def test_an_interrupted_recovery_is_completed_without_duplicating_the_fragment(tmp_path, key):
    path, lines, half = _crash_mid_entry(tmp_path, key)
    torn_path(path).write_bytes(half)  # recovery died after saving the fragment, before cutting the log
    AuditLog.open(path, "server", key).close()
    assert torn_path(path).read_bytes() == half and verify(path, key).ok

    path2, lines2, half2 = _crash_mid_entry(tmp_path / "second", key)
    torn_path(path2).write_bytes(half2)  # ... died after cutting the log, before recording it
    write_lines(path2, lines2)
    problem = verify(path2, key).first_problem
    assert "no log_recovered entry records" in problem.reason
    log = AuditLog.open(path2, "server", key)
    assert log.recovery.size == len(half2)
    log.close()
    assert verify(path2, key).ok


def test_an_edited_side_file_is_detected(tmp_path, key):
    path, _, half = _crash_mid_entry(tmp_path, key)
    AuditLog.open(path, "server", key).close()
    torn_path(path).write_bytes(half[:-1] + b"X")
    assert "does not hold the" in verify(path, key).first_problem.reason
    torn_path(path).unlink()
    assert "does not hold the" in verify(path, key).first_problem.reason


def test_a_crash_before_the_first_entry_is_recovered(tmp_path, key):
    path = tmp_path / "server.audit.jsonl"
    path.write_bytes(b'{"digest":null,"ev')
    log = AuditLog.open(path, "server", key)
    assert log.recovery.size == 18
    log.close()
    entries = [json.loads(line)["event"] for line in read_lines(path)]
    assert entries == ["log_opened", "log_recovered", "tree_head"]
    assert verify(path, key).ok


def test_a_crash_right_after_creating_the_file_is_recovered(tmp_path, key):
    path = tmp_path / "server.audit.jsonl"
    path.touch()
    log = AuditLog.open(path, "server", key)
    assert log.recovery is None
    log.close()
    assert [json.loads(line)["event"] for line in read_lines(path)] == ["log_opened", "tree_head"]
    assert verify(path, key).ok


def test_open_refuses_a_tampered_closed_or_foreign_log(tmp_path, key):
    log = new_log(tmp_path, key)
    for r in range(4):
        log.record("round_started", round=r)
    os.close(log._fd)
    lines = read_lines(log.path)
    tampered = json.loads(lines[2])
    tampered["round"] = 9
    write_lines(log.path, rechain(lines[:2] + [json.dumps(tampered, sort_keys=True, separators=(",", ":")).encode()]
                                  + lines[3:], 2))
    with pytest.raises(AuditError, match="does not verify"):
        AuditLog.open(log.path, "server", key)
    write_lines(log.path, lines)
    with pytest.raises(AuditError, match="does not verify"):
        AuditLog.open(log.path, "server", Ed25519PrivateKey.generate())
    with pytest.raises(AuditError, match="of party 'server' in the log of 'client_0'"):
        AuditLog.open(log.path, "client_0", key)
    reopened = AuditLog.open(log.path, "server", key)
    assert reopened.recovery is None and reopened.size == 5
    reopened.close()
    with pytest.raises(AuditError, match="closed"):
        AuditLog.open(log.path, "server", key)
    assert check_log(log.path, {"server": key.public_key()}).ok

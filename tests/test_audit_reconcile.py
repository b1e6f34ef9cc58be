"""Reconciliation: every sent message against the peer's record of receiving it, and back."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_audit_support import Clock, build_run

from audits import AuditError, AuditLog, log_path, reconcile


def test_an_honest_run_reconciles(tmp_path):
    build_run(tmp_path, rounds=2)
    report = reconcile(tmp_path)
    assert report.ok and report.matched == 8 and not report.unmatched
    assert report.summary() == "reconciled: 8 exchanges in 3 logs, each recorded by both sides"


def _pair(folder):
    clock = Clock()
    logs = {p: AuditLog.create(log_path(folder, p), p, Ed25519PrivateKey.generate(), clock=clock)
            for p in ("server", "client_0")}
    return logs["server"], logs["client_0"]


def test_a_message_the_client_sent_and_the_server_never_recorded_is_reported(tmp_path):
    server, client = _pair(tmp_path)
    client.record("message_sent", round=0, stage="update", peer="server", data=b"update 0")
    server.record("message_received", round=0, stage="update", peer="client_0", data=b"update 0")
    lost = client.record("message_sent", round=1, stage="update", peer="server", data=b"update 1")
    server.close()
    client.close()
    report = reconcile(tmp_path)
    assert not report.ok and report.matched == 1 and not report.received_only
    [missing] = report.sent_only
    assert (missing.path, missing.line, missing.seq) == (log_path(tmp_path, "client_0"), lost.seq + 1, lost.seq)
    assert (missing.sender, missing.recipient, missing.digest, missing.round) == ("client_0", "server", lost.digest, 1)
    summary = report.summary()
    assert summary.startswith("UNMATCHED: 1 exchange(s) recorded by one side only (1 sent, 0 received), 1 matched")
    assert "'client_0' sent to 'server' (round 1, stage update, 8 bytes" in summary
    assert "'server' has no record of it" in summary


def test_a_receipt_without_a_send_and_a_rejection_are_matched_by_digest(tmp_path):
    server, client = _pair(tmp_path)
    client.record("message_sent", round=0, peer="server", data=b"malformed")
    server.record("message_rejected", round=0, peer="client_0", data=b"malformed", meta={"reason": "bad magic"})
    server.record("message_received", round=0, peer="client_0", data=b"injected by someone else")
    client.record("message_sent", round=0, peer="server", data=b"same bytes twice")
    client.record("message_sent", round=0, peer="server", data=b"same bytes twice")
    server.record("message_received", round=0, peer="client_0", data=b"same bytes twice")
    report = reconcile(tmp_path)
    assert report.matched == 2
    assert [e.event for e in report.received_only] == ["message_received"]
    assert "has no record of sending it" in report.received_only[0].describe()
    assert len(report.sent_only) == 1 and report.sent_only[0].seq == 3


def test_a_peer_without_a_log_and_an_unreadable_log_are_reported(tmp_path):
    server, client = _pair(tmp_path)
    server.record("message_sent", round=0, peer="client_9", data=b"to nobody")
    client.record("message_received", round=0, peer="server", data=b"x")
    server.record("message_sent", round=0, peer="client_0", data=b"x")
    with open(client.path, "ab") as stream:
        stream.write(b'{"torn')
    report = reconcile(tmp_path)
    assert report.missing_logs == ["client_9"] and report.matched == 1
    assert report.problems and "incomplete last line" in report.problems[0].reason
    assert "no log of 'client_9'" in "\n".join([report.summary(), *report.details()])


def test_a_missing_or_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        reconcile(tmp_path / "absent")
    with pytest.raises(AuditError, match="no audit logs"):
        reconcile(tmp_path)

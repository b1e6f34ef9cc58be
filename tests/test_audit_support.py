"""Helpers shared by the audit tests (imported as ``test_audit_support``): a small run folder of real
signed logs, and the tools an attacker would use on them (rewrite lines, re-sign, recompute the chain)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audits import AuditLog, log_path, verify_path
from audits.entries import ENTRY_CONTEXT, canonical_json

PARTIES = ("server", "client_0", "client_1")


class Clock:
    """A deterministic clock: each call is 1 ms after the previous one."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


@dataclass
class Run:
    folder: Path
    keys: dict[str, Ed25519PrivateKey]

    @property
    def roster(self):
        return {party: key.public_key() for party, key in self.keys.items()}

    def path(self, party: str) -> Path:
        return log_path(self.folder, party)


def build_run(folder: Path, *, rounds: int = 2, tree_head_every: int = 4, close: bool = True,
              keys: dict[str, Ed25519PrivateKey] | None = None, note: str = "as it happened") -> Run:
    """Server and two clients: per round the server sends each client a message and its tree head, each client
    answers with a message and its tree head; every side records what it sent and received."""
    keys = keys or {party: Ed25519PrivateKey.generate() for party in PARTIES}
    clock = Clock()
    logs = {party: AuditLog.create(log_path(folder, party), party, keys[party], tree_head_every=tree_head_every,
                                   clock=clock, run_id="test-run") for party in PARTIES}
    server = logs["server"]
    for party in PARTIES:
        logs[party].record("run_started", meta={"protocol": "plain"})
    for r in range(rounds):
        server.record("round_started", round=r, stage="train", meta={"participants": list(PARTIES[1:])})
        for client in PARTIES[1:]:
            down = f"train round {r} for {client}".encode()
            server.record("message_sent", round=r, stage="train", peer=client, data=down)
            logs[client].record("message_received", round=r, stage="train", peer="server", data=down)
            logs[client].record_peer_tree_head("server", server.signed_tree_head().to_bytes(),
                                               public_key=keys["server"].public_key())
            up = f"update round {r} from {client}".encode()
            logs[client].record("message_sent", round=r, stage="update", peer="server", data=up)
            server.record("message_received", round=r, stage="update", peer=client, data=up)
            server.record_peer_tree_head(client, logs[client].signed_tree_head(),
                                         public_key=keys[client].public_key())
        server.record("aggregate_computed", round=r, stage="update", data=b"aggregate %d" % r,
                      meta={"updates": 2, "note": note})
        for client in PARTIES[1:]:
            logs[client].record("adapter_applied", round=r, stage="train", meta={"adapter": "shared"})
    for party in PARTIES:
        logs[party].record("run_stopped", meta={"reason": "finished"})
        if close:
            logs[party].close()
    return Run(folder, keys)


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def sign_line(value: dict, key: Ed25519PrivateKey) -> bytes:
    """The line an attacker holding ``key`` would write for ``value`` (any ``sig`` replaced)."""
    body = {k: v for k, v in value.items() if k != "sig"}
    body["sig"] = key.sign(ENTRY_CONTEXT + canonical_json(body)).hex()
    return canonical_json(body)


def rechain(lines: list[bytes], start: int, key: Ed25519PrivateKey | None = None) -> list[bytes]:
    """Recompute ``prev`` from line ``start`` on (what an attacker does after editing an entry); with ``key``
    also re-sign each of those lines, otherwise keep their (now stale) signatures."""
    out = list(lines[:start])
    for line in lines[start:]:
        value = json.loads(line)
        value["prev"] = hashlib.sha256(out[-1]).hexdigest() if out else "0" * 64
        out.append(sign_line(value, key) if key else canonical_json(value))
    return out


def index_of(lines: list[bytes], event: str, nth: int = 0) -> int:
    hits = [i for i, line in enumerate(lines) if json.loads(line)["event"] == event]
    return hits[nth]


def test_the_helpers_build_a_run_that_verifies(tmp_path):
    run = build_run(tmp_path)
    report = verify_path(tmp_path, run.roster)
    assert report.ok, report.summary()
    assert report.peer_checks == 8  # 2 rounds x 2 clients, each direction
    assert rechain(read_lines(run.path("server")), 0) == read_lines(run.path("server"))

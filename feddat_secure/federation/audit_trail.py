"""Every party's tamper-evident audit log for one run (``<run>/audit/``), fed by the runner.

Each exchange is recorded on both sides: ``message_sent`` in the sender's log and
``message_received`` in the recipient's, with the SHA-256 digest and size of the exact bytes,
so ``feddat-secure audit reconcile`` can match them. Entries are fsynced before the exchange
continues (audits.AuditLog's default). Signed tree heads travel between the server and every
client after each round, as ordinary ``tree_head`` messages, so neither side can later rewrite
its history without the other's log showing it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from audits import AuditLog, SignedTreeHead, log_path
from protocols import Identity

AUDIT_DIR = "audit"


class AuditTrail:
    """The logs of ``identities``' parties; ``enabled=False`` records nothing (and costs nothing)."""

    def __init__(self, run_dir: Path, identities: Mapping[str, Identity], *, enabled: bool, tree_head_every: int,
                 resume: bool, run_id: str) -> None:
        self.enabled = enabled
        self.folder = run_dir / AUDIT_DIR
        self._public_keys = {party: identity.public_key for party, identity in identities.items()}
        self._logs: dict[str, AuditLog] = {}
        if not enabled:
            return
        for party, identity in identities.items():
            path = log_path(self.folder, party)
            if resume:
                self._logs[party] = AuditLog.open(path, party, identity.private_key, tree_head_every=tree_head_every,
                                                  peers=self._public_keys)
            else:
                self._logs[party] = AuditLog.create(path, party, identity.private_key,
                                                    tree_head_every=tree_head_every, run_id=run_id)

    def event(self, party: str, event: str, **fields: Any) -> None:
        if self.enabled:
            self._logs[party].record(event, **fields)

    def events(self, parties: Iterable[str], event: str, **fields: Any) -> None:
        for party in parties:
            self.event(party, event, **fields)

    def exchange(self, sender: str, recipient: str, data: bytes, *, round: int, stage: str) -> None:
        """Record one message on both sides, before the recipient acts on it."""
        if self.enabled:
            self._logs[sender].record("message_sent", round=round, stage=stage, peer=recipient, data=data)
            self._logs[recipient].record("message_received", round=round, stage=stage, peer=sender, data=data)

    def rejected(self, recipient: str, sender: str, data: bytes, reason: str, *, round: int, stage: str) -> None:
        self.event(recipient, "message_rejected", round=round, stage=stage, peer=sender, data=data,
                   meta={"reason": reason[:256]})

    def tree_head(self, party: str) -> str:
        """``party``'s signed tree head over its log so far, as JSON to send to a peer."""
        return self._logs[party].signed_tree_head().to_json()

    def peer_tree_head(self, party: str, peer: str, tree_head: str) -> None:
        """Record (after checking its signature) the tree head ``peer`` sent to ``party``."""
        self._logs[party].record_peer_tree_head(peer, SignedTreeHead.from_bytes(tree_head),
                                                public_key=self._public_keys[peer])

    def close(self, reason: str) -> dict[str, dict]:
        """``run_stopped`` and the final signed tree head in every log; returns the final tree heads."""
        heads = {}
        for party, log in self._logs.items():
            log.record("run_stopped", meta={"reason": reason[:256]})
            heads[party] = log.close().to_dict()
        return heads

"""What one party keeps on its own disk, and nowhere else.

A party's folder (in a simulation ``runs/<name>/parties/<party>/``; in a deployment the site's own disk)::

    identity.pem            its Ed25519 private key (0600, folder 0700; only this party ever reads it)
    enrolment.json          its public enrolment (id, role, public key)
    roster.json             the roster it pinned (its SHA-256 is in every message it signs or accepts)
    <party>.audit.jsonl     its own audit log: only what it sent and received
    privacy_ledger.json     its privacy ledgers (sites: record level; the server: client level)
    metrics.jsonl           a site under DP: what it computed from its records and kept (losses, clipped count,
                            accuracies per round); the server's folder: the run's rounds (deployments)
    checkpoints/            its round checkpoints (resume restores each party from its own)
    outputs                 a site's adapters and head (PEFT format), the server's global state
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audits import AuditLog, log_path
from protocols import Identity, Roster

from .channel import PartyAudit

PARTIES_DIR = "parties"
_CHECKPOINT = re.compile(r"round-(\d{6})\.safetensors")


@dataclass(frozen=True)
class PartyFolder:
    path: Path
    party_id: str

    @property
    def audit_log(self) -> Path:
        return log_path(self.path, self.party_id)

    @property
    def ledger(self) -> Path:
        from ..privacy.run_privacy import LEDGER_FILE

        return self.path / LEDGER_FILE

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def roster(self) -> Path:
        return self.path / "roster.json"

    def checkpoint(self, next_round: int) -> Path:
        """The checkpoint of this party's state when ``next_round`` (0-based) is the next to run."""
        return self.path / "checkpoints" / f"round-{next_round:06d}.safetensors"

    def checkpoints(self) -> dict[int, Path]:
        folder = self.path / "checkpoints"
        found = {}
        for path in folder.iterdir() if folder.is_dir() else ():
            match = _CHECKPOINT.fullmatch(path.name)
            if match:
                found[int(match.group(1))] = path
        return found

    def keep_checkpoints_from(self, next_round: int) -> None:
        """Drop checkpoints older than ``next_round``: the server may still resume from that one."""
        for number, path in self.checkpoints().items():
            if number < next_round:
                path.unlink()

    def drop_checkpoints(self) -> None:
        for path in self.checkpoints().values():
            path.unlink()
        folder = self.path / "checkpoints"
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()

    def open_audit(self, identity: Identity, roster: Roster, *, enabled: bool, tree_head_every: int, resume: bool,
                   run_id: str) -> PartyAudit:
        """This party's own audit log (created, or continued on resume), checking peers' heads with the roster."""
        keys: dict[str, Ed25519PublicKey] = {entry.party_id: entry.public_key for entry in roster.entries}
        if not enabled:
            return PartyAudit(None, keys)
        if resume:
            log = AuditLog.open(self.audit_log, self.party_id, identity.private_key, tree_head_every=tree_head_every,
                                peers=keys)
        else:
            log = AuditLog.create(self.audit_log, self.party_id, identity.private_key,
                                  tree_head_every=tree_head_every, run_id=run_id)
        return PartyAudit(log, keys)


def keep_rounds_until(path: Path, rounds: int) -> None:
    """Drop the lines of a per-round JSON-lines file (``metrics.jsonl``) after round ``rounds`` (1-based): what a
    crash between writing a round's line and checkpointing it left behind, before the round runs again."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["round"] <= rounds]
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)

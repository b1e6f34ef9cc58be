"""Tamper-evident audit logs of every exchange, and their verifier.

A package of its own (standard library and ``cryptography``); it never imports torch or
``feddat_secure``. Each party keeps an append-only JSON Lines log (:class:`AuditLog`) whose
entries are signed with its Ed25519 identity key, hash-chained, and covered by signed Merkle
tree heads in the style of RFC 9162; the runner records the digest and size of the exact bytes
of every exchange (``feddat_secure.federation.messages``), never the bytes themselves.
:func:`verify_path`, :func:`reconcile` and the proofs check logs against a roster
(party id -> Ed25519 public key). The format and what it protects against: ``docs/audit.md``.
"""

from .entries import (
    EVENTS,
    FORMAT,
    RECORDABLE_EVENTS,
    AuditError,
    Entry,
    SchemaError,
    SignedTreeHead,
    key_id,
    parse_entry,
)
from .log import AuditLog, Recovery, owner_data_dir, replace_durably
from .proofs import (
    ConsistencyProof,
    InclusionProof,
    ProofError,
    check_consistency_proof,
    check_inclusion_proof,
    consistency_proof,
    inclusion_proof,
)
from .receipt import (
    Receipt,
    ReceiptError,
    check_receipt,
    default_receipt_dir,
    load_receipt,
    receipt_path,
    resolve_receipt_dir,
    write_receipt,
)
from .reconcile import Exchange, ReconciliationReport, reconcile
from .verify import (
    LOG_SUFFIX,
    LogReport,
    PartyRecord,
    Problem,
    Roster,
    RunRecord,
    VerificationReport,
    check_log,
    find_logs,
    log_path,
    torn_path,
    verify_path,
)

__all__ = [
    "EVENTS", "FORMAT", "LOG_SUFFIX", "RECORDABLE_EVENTS", "AuditError", "AuditLog", "ConsistencyProof", "Entry",
    "Exchange", "InclusionProof", "LogReport", "PartyRecord", "Problem", "ProofError", "Receipt", "ReceiptError",
    "ReconciliationReport", "Recovery", "Roster", "RunRecord", "SchemaError", "SignedTreeHead", "VerificationReport",
    "check_consistency_proof", "check_inclusion_proof", "check_log", "check_receipt", "consistency_proof",
    "default_receipt_dir", "find_logs", "inclusion_proof", "key_id", "load_receipt", "log_path", "owner_data_dir",
    "parse_entry", "receipt_path", "reconcile", "replace_durably", "resolve_receipt_dir", "torn_path", "verify_path",
    "write_receipt",
]

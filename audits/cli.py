"""The ``audit`` commands, for the host program's argparse parser.

``add_audit_commands(subparsers, load_roster)`` registers ``audit verify``, ``audit reconcile``,
``audit proof`` and ``audit check-proof``; each sets ``handler`` (``args -> exit code``) as the
command's default. Exit codes: 0 intact / valid / reconciled; 1 tampered, invalid or unmatched;
2 a user error (a missing file or folder, no roster, an index the log cannot prove).
``load_roster(path)`` reads a roster file into a mapping party id -> Ed25519 public key; any
exception it raises is reported as an unreadable roster (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .entries import AuditError
from .proofs import InclusionProof, ProofError, check_inclusion_proof, inclusion_proof
from .reconcile import reconcile
from .verify import verify_path

ROSTER_FILE = "roster.json"
RosterLoader = Callable[[Path], Mapping[str, Ed25519PublicKey]]


class _UserError(Exception):
    pass


def add_audit_commands(subparsers: argparse._SubParsersAction, load_roster: RosterLoader) -> argparse.ArgumentParser:
    """Register ``audit {verify,reconcile,proof,check-proof}`` under ``subparsers``; returns the ``audit`` parser."""
    audit = subparsers.add_parser("audit", help="verify, reconcile and prove tamper-evident audit logs",
                                  description="Verify, reconcile and prove tamper-evident audit logs.")
    commands = audit.add_subparsers(dest="audit_command", required=True)

    verify = commands.add_parser("verify", help="check one log or a whole run folder of logs",
                                 description="Check hash chains, Merkle tree heads, signatures against the roster, "
                                             "sequence, time and schema; in a folder, also every exchanged tree "
                                             "head against its party's log.")
    verify.add_argument("path", help="a log (*.audit.jsonl) or a folder of logs")
    verify.add_argument("--roster", help=f"roster file (default: {ROSTER_FILE} in the folder or its parent)")
    verify.add_argument("--all", action="store_true", help="list every problem, not only the first")
    verify.add_argument("--require-closed", action="store_true",
                        help="a log without its final tree head is a problem (for runs that ended normally)")
    verify.set_defaults(handler=lambda args: _guard(_verify, args, load_roster))

    rec = commands.add_parser("reconcile", help="match every sent message with its peer's receipt",
                              description="Match every message_sent entry with the peer's outcome for it, "
                                          "message_received or message_rejected (same digest); list refused "
                                          "messages, and exchanges only one side recorded (a log that does not "
                                          "verify or is missing is named first, as their cause). Checks no "
                                          "signatures: run 'audit verify' for that.")
    rec.add_argument("run_dir", help="a run folder (or any folder holding *.audit.jsonl logs)")
    rec.set_defaults(handler=lambda args: _guard(_reconcile, args, load_roster))

    proof = commands.add_parser("proof", help="inclusion proof of one entry against a signed tree head",
                                description="Write a JSON inclusion proof of entry N (its seq) against the log's "
                                            "latest signed tree head, or the one of --tree-size entries.")
    proof.add_argument("log", help="the log holding the entry")
    proof.add_argument("--index", type=int, required=True, help="the entry's sequence number")
    proof.add_argument("--tree-size", type=int, help="prove against the log's tree head of this size")
    proof.add_argument("--out", help="write the proof here (default: standard output)")
    proof.set_defaults(handler=lambda args: _guard(_proof, args, load_roster))

    check = commands.add_parser("check-proof", help="check an inclusion proof against the roster",
                                description="Check an inclusion proof written by 'audit proof'.")
    check.add_argument("proof", help="PROOF.json")
    check.add_argument("--roster", help=f"roster file (default: {ROSTER_FILE} in the proof's folder or its parent)")
    check.set_defaults(handler=lambda args: _guard(_check_proof, args, load_roster))
    return audit


def _guard(handler, args: argparse.Namespace, load_roster: RosterLoader) -> int:
    try:
        return handler(args, load_roster)
    except _UserError as error:
        print(f"feddat-secure: error: {error}", file=sys.stderr)
        return 2


def _roster(given: str | None, base: Path, load_roster: RosterLoader) -> Mapping[str, Ed25519PublicKey]:
    if given is not None:
        path = Path(given)
    else:
        candidates = [base / ROSTER_FILE, base.parent / ROSTER_FILE]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise _UserError(f"no {ROSTER_FILE} in {candidates[0].parent} or {candidates[1].parent}; "
                             "pass --roster FILE")
    if not path.is_file():
        raise _UserError(f"no roster file {path}")
    try:
        return load_roster(path)
    except Exception as error:  # the host's loader raises its own error types for a bad file
        raise _UserError(f"cannot read roster {path}: {error}") from None


def _verify(args: argparse.Namespace, load_roster: RosterLoader) -> int:
    path = Path(args.path)
    if not path.exists():
        raise _UserError(f"no such log or folder: {path}")
    roster = _roster(args.roster, path.resolve() if path.is_dir() else path.resolve().parent, load_roster)
    try:
        report = verify_path(path, roster, require_closed=args.require_closed)
    except (OSError, AuditError) as error:
        raise _UserError(str(error)) from None
    print(report.summary())
    if args.all:
        for problem in report.problems[1:]:
            print(f"  {problem}")
    return 0 if report.ok else 1


def _reconcile(args: argparse.Namespace, load_roster: RosterLoader) -> int:
    try:
        report = reconcile(Path(args.run_dir))
    except (OSError, AuditError) as error:
        raise _UserError(str(error)) from None
    print(report.summary())
    for line in report.details():
        print(line)
    return 0 if report.ok else 1


def _proof(args: argparse.Namespace, load_roster: RosterLoader) -> int:
    log = Path(args.log)
    if not log.is_file():
        raise _UserError(f"no such log: {log}")
    try:
        proof = inclusion_proof(log, args.index, args.tree_size)
    except ValueError as error:
        raise _UserError(str(error)) from None
    except AuditError as error:
        print(f"NOT INTACT: {error}")
        return 1
    if args.out:
        Path(args.out).write_text(proof.to_json())
        print(f"inclusion proof of entry {args.index} of {proof.tree_head.party!r} against its signed tree head of "
              f"size {proof.tree_head.tree_size} written to {args.out}")
    else:
        sys.stdout.write(proof.to_json())
    return 0


def _check_proof(args: argparse.Namespace, load_roster: RosterLoader) -> int:
    path = Path(args.proof)
    if not path.is_file():
        raise _UserError(f"no such proof file: {path}")
    roster = _roster(args.roster, path.resolve().parent, load_roster)
    try:
        proof = InclusionProof.from_json(path.read_bytes())
        check_inclusion_proof(proof, roster)
    except ProofError as error:
        print(f"INVALID: {error}")
        return 1
    sth = proof.tree_head
    print(f"valid: entry {proof.index} of {sth.party!r} is in its signed tree of size {sth.tree_size} "
          f"(root {sth.root.hex()[:16]}..., {sth.time})")
    return 0

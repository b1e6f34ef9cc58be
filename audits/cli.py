"""The ``audit`` commands, for the host program's argparse parser.

``add_audit_commands(subparsers, load_roster)`` registers ``audit verify``, ``audit reconcile``,
``audit proof`` and ``audit check-proof``; each sets ``handler`` (``args -> exit code``) as the
command's default. Exit codes: 0 intact / valid / reconciled; 1 tampered, invalid or unmatched;
2 a user error (a missing file or folder, no roster, an index the log cannot prove).
``load_roster(path)`` reads a roster file into a mapping party id -> Ed25519 public key; any
exception it raises is reported as an unreadable roster (exit 2). ``roster_digest(path)`` is the host's
digest of a roster file, the value every party pins (default: SHA-256 of the file's bytes);
``find_run_record(folder)`` finds the record a finished run wrote about its logs (the host's manifest) for
the folder being verified: ``(file, record)``, or None when there is none (the run did not finish).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .entries import AuditError
from .proofs import InclusionProof, ProofError, check_inclusion_proof, inclusion_proof
from .receipt import ReceiptError, check_receipt, load_receipt
from .reconcile import reconcile
from .verify import Problem, RunRecord, VerificationReport, verify_path

ROSTER_FILE = "roster.json"
RosterLoader = Callable[[Path], Mapping[str, Ed25519PublicKey]]
RosterDigest = Callable[[Path], str]
RunRecordFinder = Callable[[Path], "tuple[Path, RunRecord] | None"]


class _UserError(Exception):
    pass


def add_audit_commands(subparsers: argparse._SubParsersAction, load_roster: RosterLoader, *,
                       roster_digest: RosterDigest | None = None,
                       find_run_record: RunRecordFinder | None = None) -> argparse.ArgumentParser:
    """Register ``audit {verify,reconcile,proof,check-proof}`` under ``subparsers``; returns the ``audit`` parser.
    With ``find_run_record``, verifying a folder needs the finished run's record unless ``--allow-unfinished``."""
    digest_of = roster_digest or _file_sha256
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
    verify.add_argument("--roster-sha256", metavar="HEX",
                        help="the roster digest every party pinned; the roster used must have it (without it, a "
                             "roster replaced together with the logs goes unnoticed)")
    verify.add_argument("--receipt", metavar="FILE",
                        help="the run's audit receipt, kept outside the run folder: every party's log must extend its "
                             "signed tree head in it, and the roster must be the one it names")
    if find_run_record is not None:
        verify.add_argument("--allow-unfinished", action="store_true",
                            help="verify a run that did not finish (no manifest): closure cannot be checked; a "
                                 "finished run is always checked against its manifest")
    verify.set_defaults(handler=lambda args: _guard(_verify, args, load_roster, digest_of, find_run_record))

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


def _guard(handler, args: argparse.Namespace, *context) -> int:
    try:
        return handler(args, *context)
    except _UserError as error:
        print(f"feddat-secure: error: {error}", file=sys.stderr)
        return 2


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _warn(message: str) -> None:
    print(f"feddat-secure: warning: {message}", file=sys.stderr)


def _roster_path(given: str | None, base: Path) -> Path:
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
    return path


def _roster(given: str | None, base: Path, load_roster: RosterLoader) -> Mapping[str, Ed25519PublicKey]:
    path = _roster_path(given, base)
    try:
        return load_roster(path)
    except Exception as error:  # the host's loader raises its own error types for a bad file
        raise _UserError(f"cannot read roster {path}: {error}") from None


def _verify(args: argparse.Namespace, load_roster: RosterLoader, roster_digest: RosterDigest,
            find_run_record: RunRecordFinder | None) -> int:
    path = Path(args.path)
    if not path.exists():
        raise _UserError(f"no such log or folder: {path}")
    base = path.resolve() if path.is_dir() else path.resolve().parent
    roster_file = _roster_path(args.roster, base)
    roster = _roster(str(roster_file), base, load_roster)
    digest = roster_digest(roster_file)
    # Which roster, and whether it is pinned: a roster taken from the folder being verified proves nothing
    # against whoever replaced it together with the logs (issue 13, fault 3).
    print(f"roster: {roster_file} (sha256 {digest})")
    pinned = args.roster_sha256
    if pinned is not None and pinned.strip().lower() != digest:
        print(f"NOT INTACT: the roster {roster_file} has sha256 {digest}, not the pinned {pinned.strip().lower()}: "
              "it is not the run's roster (its keys, and so every signature checked against them, prove nothing)")
        return 1
    if pinned is None and args.receipt is None:  # a receipt names the roster's digest: checked against it below
        _warn("roster not pinned: signatures are checked against this roster's keys only; whoever replaced the "
              "roster and the logs together would pass. Pass --roster-sha256 with the digest every party pinned")
    record = None
    if find_run_record is not None:
        try:
            found = find_run_record(base)
        except Exception as error:  # the host raises its own error types for a malformed manifest
            print(f"NOT INTACT: the run's record of its logs cannot be read: {error}")
            return 1
        if found is not None:
            print(f"run record: {found[0]} ({len(found[1].parties)} parties, their final signed tree heads)")
            record = found[1]
        elif not args.allow_unfinished:
            print(f"NOT INTACT: {path} has no record of a finished run (manifest): the run did not finish, or its "
                  "manifest was removed, and whether every log is complete cannot be checked; pass "
                  "--allow-unfinished to verify a run that crashed")
            return 1
        else:
            _warn("unfinished run (no manifest): whether every party's log is complete and closed could not be "
                  "checked; a cut tail after the last exchanged tree head, or a removed log of a party that "
                  "exchanged none, would pass")
    try:
        report = verify_path(path, roster, require_closed=args.require_closed, record=record,
                             roster_sha256=digest)
    except (OSError, AuditError) as error:
        raise _UserError(str(error)) from None
    anchored = None if args.receipt is None else \
        _check_against_receipt(args, report, roster, digest)
    print(report.summary())
    if anchored is not None and report.ok:
        print(anchored)
    if args.all:
        for problem in report.problems[1:]:
            print(f"  {problem}")
    return 0 if report.ok else 1


def _check_against_receipt(args: argparse.Namespace, report: VerificationReport,
                           roster: Mapping[str, Ed25519PublicKey], roster_sha256: str) -> str:
    """Add to ``report`` every problem of its logs against the receipt in ``args.receipt`` (a receipt that cannot
    be read is a user error; one that is malformed or not authentic is a problem: the evidence fails); returns
    the line that says what the receipt anchored."""
    file = Path(args.receipt)
    if not file.is_file():
        raise _UserError(f"no such receipt file: {file}")
    if not report.folder:
        raise _UserError("--receipt checks a folder of logs (a run folder), not a single log")
    try:
        receipt, digest = load_receipt(file)
    except ReceiptError as error:
        report.problems.append(Problem(file, None, None, str(error)))
        return ""
    except OSError as error:
        raise _UserError(f"cannot read receipt {file}: {error}") from None
    report.problems.extend(check_receipt(receipt, report, roster, receipt_file=file, roster_sha256=roster_sha256))
    return (f"receipt {file} (SHA-256 {digest}, signed by {receipt.signer!r}, session {receipt.session}): the logs of "
            f"{', '.join(map(repr, receipt.parties))} extend their signed tree heads in it; roster SHA-256 "
            f"{roster_sha256} as it names")


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

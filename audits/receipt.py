"""The audit receipt: a run's signed tree heads, kept outside the run folder by whoever must be able to tell later.

Every log is signed by its own party, but whoever holds every party's key (a simulated run's folder holds them
all) can rewrite and re-sign every log, the roster included, and the logs then verify against each other. A
receipt is the run's history anchored somewhere else: a small file with the last signed tree head (RFC 9162
§4.10 style) the server holds of every party, its own final one, and the roster digest every party pinned, signed by
the server and written, when the run closes, into a receipts folder outside every run folder. A reviewer (or a
site) who keeps a copy can later check any copy of the run's logs against it: each party's log must extend
its head in the receipt (an RFC 9162 §2.1.4 consistency proof from the receipt's head to the log's final one),
the server's log must end with exactly the head the receipt holds, and the roster must be the one it names.
Rewriting a log then contradicts a file the rewriter does not hold.

Why the server signs: it is the only party that receives every other party's tree head (sites never talk to
each other), in signed close replies it records in its own log; its signature makes the set its own
statement, so a server that later presents other logs contradicts a receipt it signed. The receipt adds no
trust in the server: each head in it is also signed by its own party, and the check recomputes everything
from the logs.

Format (JSON, keys sorted; ``signature`` is Ed25519 by ``signer``'s roster key over
``"feddat-secure audit receipt v1\\0"`` followed by the canonical JSON of every other key)::

    {"format": "feddat-secure-audit-receipt/1", "run": <run name>, "session": <session id>,
     "roster_sha256": <the roster digest every party pins (Roster.digest)>, "signer": <party>,
     "tree_heads": {<party>: <signed tree head>, ...}, "signature": <128 hex digits>}
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import merkle
from .entries import AuditError, SchemaError, SignedTreeHead, canonical_json, check_party
from .log import owner_data_dir, replace_durably
from .verify import LogReport, Problem, Roster, VerificationReport, closing_tail_problem

RECEIPT_FORMAT = "feddat-secure-audit-receipt/1"
RECEIPT_CONTEXT = b"feddat-secure audit receipt v1\x00"
RECEIPT_SUFFIX = ".receipt.json"
RECEIPT_DIR_ENV = "FEDDAT_SECURE_RECEIPT_DIR"
RECEIPT_KEYS = frozenset({"format", "run", "session", "roster_sha256", "signer", "tree_heads", "signature"})
MAX_RECEIPT_BYTES = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")


class ReceiptError(AuditError):
    """A receipt file is malformed, or its signature does not verify."""


def default_receipt_dir() -> Path:
    """``$FEDDAT_SECURE_RECEIPT_DIR``, else ``$XDG_DATA_HOME/feddat-secure/audit-receipts`` (XDG Base Directory
    spec: ``~/.local/share`` when unset): outside every run folder, like the dataset privacy ledgers."""
    return owner_data_dir(RECEIPT_DIR_ENV, "audit-receipts")


def resolve_receipt_dir(configured: str | Path | None) -> Path:
    """The receipts folder: ``configured`` when given (``[audit] receipt_dir``), else :func:`default_receipt_dir`."""
    return Path(configured).expanduser() if configured else default_receipt_dir()


def receipt_path(folder: Path | str, run: str, session: str) -> Path:
    """Where the receipt of ``run``'s session ``session`` lives in ``folder``: ``<run>-<session>.receipt.json``."""
    return Path(folder) / f"{quote(run, safe='')}-{quote(session, safe='')}{RECEIPT_SUFFIX}"


@dataclass(frozen=True)
class Receipt:
    """Every party's last signed tree head held by ``signer`` at the end of ``run``'s session, and the roster's
    SHA-256, signed by ``signer``."""

    run: str
    session: str
    roster_sha256: str
    signer: str
    tree_heads: Mapping[str, SignedTreeHead]
    signature: bytes = field(repr=False)

    @classmethod
    def sign(cls, key: Ed25519PrivateKey, *, signer: str, run: str, session: str, roster_sha256: str,
             tree_heads: Mapping[str, SignedTreeHead]) -> Receipt:
        unsigned = cls(run, session, roster_sha256, signer, dict(tree_heads), b"")
        unsigned._check()
        return cls(run, session, roster_sha256, signer, dict(tree_heads), key.sign(unsigned.signed_bytes()))

    def _check(self) -> None:
        for value, what in ((self.run, "run"), (self.session, "session"), (self.signer, "signer")):
            if not isinstance(value, str) or not value or len(value) > 256 or not value.isprintable():
                raise ReceiptError(f"receipt: {what} must be a printable string of 1 to 256 characters")
        if not isinstance(self.roster_sha256, str) or not _HEX64.fullmatch(self.roster_sha256):
            raise ReceiptError("receipt: roster_sha256 must be 64 lowercase hex digits")
        if self.signer not in self.tree_heads:
            raise ReceiptError(f"receipt: the signer {self.signer!r} holds no tree head of its own in it")
        for party, head in self.tree_heads.items():
            if head.party != party:
                raise ReceiptError(f"receipt: the tree head listed for {party!r} is of {head.party!r}")

    def _body(self) -> dict[str, Any]:
        return {"format": RECEIPT_FORMAT, "run": self.run, "session": self.session,
                "roster_sha256": self.roster_sha256, "signer": self.signer,
                "tree_heads": {party: head.to_dict() for party, head in sorted(self.tree_heads.items())}}

    def signed_bytes(self) -> bytes:
        return RECEIPT_CONTEXT + canonical_json(self._body())

    def to_json(self) -> str:
        return json.dumps({**self._body(), "signature": self.signature.hex()}, indent=1, sort_keys=True,
                          ensure_ascii=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Receipt:
        """Strict parsing: exactly the format's keys, each tree head well-formed (signatures are not checked
        here: :meth:`verify` does that with the roster)."""
        try:
            value = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ReceiptError("the receipt is not valid JSON") from None
        if not isinstance(value, dict) or set(value) != RECEIPT_KEYS or value.get("format") != RECEIPT_FORMAT:
            raise ReceiptError(f"not a {RECEIPT_FORMAT} object with exactly the keys {sorted(RECEIPT_KEYS)}")
        heads = value["tree_heads"]
        if not isinstance(heads, dict) or not heads:
            raise ReceiptError("receipt: tree_heads must be an object of party -> signed tree head")
        signature = value["signature"]
        if not isinstance(signature, str) or not _HEX128.fullmatch(signature):
            raise ReceiptError("receipt: signature must be 128 lowercase hex digits")
        try:
            parsed = {check_party(party, "receipt party"): SignedTreeHead.from_dict(head)
                      for party, head in heads.items()}
        except SchemaError as error:
            raise ReceiptError(f"receipt: {error}") from None
        receipt = cls(value["run"], value["session"], value["roster_sha256"], value["signer"], parsed,
                      bytes.fromhex(signature))
        receipt._check()
        return receipt

    @property
    def parties(self) -> list[str]:
        return sorted(self.tree_heads)

    def verify(self, roster: Roster) -> list[str]:
        """Why the receipt is not authentic under ``roster`` (empty: it is): the signer's signature over the
        whole receipt, and every tree head's signature by its own party (each is evidence of its own)."""
        reasons = []
        key = roster.get(self.signer)
        if key is None:
            reasons.append(f"the receipt's signer {self.signer!r} is not on the roster")
        else:
            try:
                key.verify(self.signature, self.signed_bytes())
            except InvalidSignature:
                reasons.append(f"the receipt's signature does not verify against the roster key of its signer "
                               f"{self.signer!r} (the receipt was changed, or the roster is not the run's)")
        for party, head in sorted(self.tree_heads.items()):
            if party not in roster:
                reasons.append(f"the receipt holds a tree head of {party!r}, who is not on the roster")
                continue
            try:
                head.verify(roster[party])
            except AuditError as error:
                reasons.append(f"in the receipt: {error}")
        return reasons


def load_receipt(path: Path | str) -> tuple[Receipt, str]:
    """(the receipt in ``path``, the SHA-256 of the file's bytes); :class:`ReceiptError` if it is malformed,
    :class:`OSError` if it cannot be read."""
    data = Path(path).read_bytes()
    if len(data) > MAX_RECEIPT_BYTES:
        raise ReceiptError(f"{path} is {len(data)} bytes, more than a receipt's limit of {MAX_RECEIPT_BYTES}")
    return Receipt.from_json(data), hashlib.sha256(data).hexdigest()


def write_receipt(receipt: Receipt, folder: Path | str) -> Path:
    """Write ``receipt`` to ``folder`` (created 0700) as ``<run>-<session>.receipt.json``, durably (written to a
    temporary file, fsynced, renamed, the folder fsynced). A receipt is never replaced by another: an existing
    file with other bytes raises :class:`ReceiptError`."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = receipt_path(folder, receipt.run, receipt.session)
    data = receipt.to_json().encode()
    if path.exists():
        if path.read_bytes() == data:
            return path
        raise ReceiptError(f"{path} already holds another receipt of run {receipt.run!r}, session "
                           f"{receipt.session!r}; it is never replaced")
    return replace_durably(path, data)


def check_receipt(receipt: Receipt, report: VerificationReport, roster: Roster, *, receipt_file: Path | str,
                  roster_sha256: str | None) -> list[Problem]:
    """The problems of a folder of logs (already verified into ``report`` by :func:`~.verify.verify_path`)
    against ``receipt``, each naming the party: the roster is not the receipt's (``roster_sha256``: SHA-256 of
    the roster file used; None when the caller has no file); the receipt is not authentic under ``roster``; a
    party of the receipt has no log, or a log the receipt does not name; a log cut below its head in the
    receipt, or whose history is not consistent with it (RFC 9162 §2.1.4 proof from the receipt's head to the
    log's latest own head); the signer's log not ending with exactly its final head in the receipt; a log of a
    party not closed; the signer's log naming another session."""
    where = Path(receipt_file)
    problems: list[Problem] = []

    def problem(reason: str, path: Path = where) -> None:
        problems.append(Problem(path, None, None, reason))

    if roster_sha256 is not None and roster_sha256 != receipt.roster_sha256:
        problem(f"the roster used has SHA-256 {roster_sha256}, the receipt names {receipt.roster_sha256}: the "
                "roster is not the run's (was it replaced?)")
    for reason in receipt.verify(roster):
        problem(reason)
    by_party: dict[str, LogReport] = {}
    for log in report.logs:
        if log.party is not None:
            by_party.setdefault(log.party, log)
    for party in sorted(set(by_party) - set(receipt.tree_heads)):
        problem(f"a log of {party!r}, a party the receipt does not name", by_party[party].path)
    for party, head in sorted(receipt.tree_heads.items()):
        log = by_party.get(party)
        if log is None:
            problem(f"the receipt holds the tree head of {party!r} (size {head.tree_size}), but the folder holds no "
                    f"log of {party!r} (was it removed?)")
            continue
        reason = _against_head(log, head, signer=party == receipt.signer, receiver=receipt.signer)
        if reason is not None:
            problem(f"the log of {party!r} {reason}", log.path)
        elif party == receipt.signer:
            sessions = [e.meta.get("session") for e in log.entries if e.event == "run_started"]
            if sessions and sessions[-1] != receipt.session:
                problem(f"the receipt is of session {receipt.session}, the log of {party!r} last ran session "
                        f"{sessions[-1]}: a receipt of another run", log.path)
    return problems


def _against_head(log: LogReport, head: SignedTreeHead, *, signer: bool, receiver: str) -> str | None:
    """Why ``log`` does not extend the receipt's ``head`` (None: it does). Only the verified prefix of the log
    counts (``log.entries``: a log with a problem is reported by the verifier too). A party hands its last head
    to ``receiver`` (the signer) in its close reply, so its log goes on for a few entries the receipt cannot
    hold: that head's own ``tree_head`` entry, the exchange of the reply with ``receiver`` (whose log, pinned by
    the receipt, holds the other side: ``audit reconcile`` pairs them) and the final tree head. Nothing else
    may follow the head."""
    size = head.tree_size
    if len(log.entries) < size and log.problem is not None:
        return (f"verifies for {len(log.entries)} entries only, short of its tree head of size {size} in the receipt "
                f"({log.problem.reason})")
    if len(log.entries) < size:
        return (f"holds {len(log.entries)} verified entries, fewer than the {size} of its tree head in the receipt: "
                "it was truncated")
    latest = log.tree_heads[-1] if log.tree_heads else None
    if latest is not None and latest.tree_size >= size:
        path = merkle.consistency_path(log.leaves, size, latest.tree_size)
        consistent = merkle.verify_consistency(size, head.root, latest.tree_size, latest.root, path)
    else:
        consistent = merkle.root(log.leaves[:size]) == head.root
    if not consistent:
        return (f"does not match its tree head of size {size} in the receipt (no consistency with the log's own "
                f"tree head of size {latest.tree_size if latest else 0}): its history was rewritten")
    if not log.closed:
        return "has no final tree head: it was cut, or the run did not close it"
    if signer and (latest.tree_size, latest.root) != (size, head.root):
        return (f"ends with its final tree head of size {latest.tree_size}, the receipt signed by it holds size "
                f"{size}: its final tree head differs")
    return None if signer else closing_tail_problem(log, size, receiver)

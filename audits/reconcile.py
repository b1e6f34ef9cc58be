"""Reconciliation: every ``message_sent`` entry against the peer's ``message_received`` (or
``message_rejected``) entry for the same bytes, and the other way round.

An exchange is identified by (sender, recipient, SHA-256 digest, size); equal exchanges are paired
in log order. Reconciliation reads the logs' structure and hash chains but checks no signatures:
run :func:`audits.verify_path` for authenticity.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

from .entries import AuditError
from .verify import LOG_SUFFIX, Problem, check_log, find_logs

RECEIVING_EVENTS = ("message_received", "message_rejected")


@dataclass(frozen=True)
class Exchange:
    """One side's record of an exchange: which log, which line, what it says."""

    path: Path
    line: int
    seq: int
    event: str
    sender: str
    recipient: str
    digest: str
    size: int
    round: int | None
    stage: str | None

    def describe(self) -> str:
        where = ", ".join(x for x in (f"round {self.round}" if self.round is not None else "",
                                      f"stage {self.stage}" if self.stage else "", f"{self.size} bytes",
                                      f"sha256 {self.digest[:16]}...") if x)
        if self.event == "message_sent":
            what = f"{self.sender!r} sent to {self.recipient!r} ({where}); {self.recipient!r} has no record of it"
        else:
            verb = "received" if self.event == "message_received" else "received and rejected"
            what = (f"{self.recipient!r} {verb} from {self.sender!r} ({where}); {self.sender!r} has no record of "
                    "sending it")
        return f"{self.path}: line {self.line} (seq {self.seq}): {what}"


@dataclass
class ReconciliationReport:
    folder: Path
    logs: int = 0
    matched: int = 0
    sent_only: list[Exchange] = field(default_factory=list)
    received_only: list[Exchange] = field(default_factory=list)
    missing_logs: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def unmatched(self) -> list[Exchange]:
        return sorted(self.sent_only + self.received_only, key=lambda e: (str(e.path), e.line))

    @property
    def ok(self) -> bool:
        return not self.sent_only and not self.received_only and not self.problems

    def summary(self) -> str:
        """One line: ``reconciled: ...`` or ``UNMATCHED: ...`` naming the first one-sided exchange."""
        notes = []
        if self.missing_logs:
            notes.append(f"no log of {', '.join(map(repr, self.missing_logs))}")
        if self.problems:
            notes.append(f"{len(self.problems)} log(s) read only up to a problem, first: {self.problems[0]}")
        note = f" ({'; '.join(notes)})" if notes else ""
        unmatched = self.unmatched
        if unmatched:
            return (f"UNMATCHED: {len(unmatched)} exchange(s) recorded by one side only ({len(self.sent_only)} sent, "
                    f"{len(self.received_only)} received), {self.matched} matched; first: "
                    f"{unmatched[0].describe()}{note}")
        status = "reconciled" if self.ok else "NOT RECONCILED"
        return (f"{status}: {self.matched} exchanges in {self.logs} logs, each recorded by both sides{note}")


def reconcile(folder: Path | str) -> ReconciliationReport:
    """Match every exchange in the ``*.audit.jsonl`` logs under ``folder``. Raises :class:`FileNotFoundError`
    for a missing folder and :class:`AuditError` for a folder without logs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such run folder: {folder}")
    files = find_logs(folder)
    if not files:
        raise AuditError(f"no audit logs (*{LOG_SUFFIX}) under {folder}")
    report = ReconciliationReport(folder, logs=len(files))
    sent: dict[tuple, deque[Exchange]] = defaultdict(deque)
    received: dict[tuple, deque[Exchange]] = defaultdict(deque)
    parties: set[str] = set()
    peers: set[str] = set()
    for path in files:
        log = check_log(path, None)
        if log.problem is not None:
            report.problems.append(log.problem)
        if log.party is not None:
            parties.add(log.party)
        for number, entry in enumerate(log.entries, start=1):
            if entry.digest is None or entry.peer is None:
                continue
            if entry.event == "message_sent":
                sender, recipient, bucket = entry.party, entry.peer, sent
            elif entry.event in RECEIVING_EVENTS:
                sender, recipient, bucket = entry.peer, entry.party, received
            else:
                continue
            peers.add(entry.peer)
            bucket[(sender, recipient, entry.digest, entry.size)].append(
                Exchange(path, number, entry.seq, entry.event, sender, recipient, entry.digest, entry.size,
                         entry.round, entry.stage))
    for key in sent.keys() | received.keys():
        ours, theirs = sent.get(key, deque()), received.get(key, deque())
        pairs = min(len(ours), len(theirs))
        report.matched += pairs
        report.sent_only.extend(list(ours)[pairs:])
        report.received_only.extend(list(theirs)[pairs:])
    report.sent_only.sort(key=lambda e: (str(e.path), e.line))
    report.received_only.sort(key=lambda e: (str(e.path), e.line))
    report.missing_logs = sorted(peers - parties)
    return report

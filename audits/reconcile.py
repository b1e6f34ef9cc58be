"""Reconciliation: every ``message_sent`` entry against the recipient's outcome for the same bytes, its
``message_received`` (accepted) or ``message_rejected`` (refused) entry, and the other way round.

An exchange is identified by (sender, recipient, SHA-256 digest, size); equal exchanges are paired in log
order. Each received message has exactly one outcome entry, written after the recipient decided on it, so a
refused message pairs with its send like an accepted one and is reported as refused, not as one-sided. A
refusal recorded without a peer (bytes that were not a message any party signed: the recipient does not
attribute them to whoever delivered them) pairs with a send of the same bytes to that recipient, if some
party recorded one; else it is reported as refused bytes that no party of the run sent.

A log that does not verify, or a peer without a log, is the root cause of every one-sided exchange with
that party beyond what could be read: the summary leads with it and counts those exchanges as its
consequence rather than listing them as independent findings. Reconciliation reads the logs' structure and
hash chains but checks no signatures: run :func:`audits.verify_path` for authenticity.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

from .entries import AuditError
from .verify import LOG_SUFFIX, Problem, check_log, find_logs

OUTCOME_EVENTS = ("message_received", "message_rejected")


@dataclass(frozen=True)
class Exchange:
    """One side's record of an exchange: which log, which line (1-based) and seq, what it says. ``sender`` is
    None for refused bytes the recipient did not attribute to any party; ``reason`` is a refusal's."""

    path: Path
    line: int
    seq: int
    event: str
    sender: str | None
    recipient: str
    digest: str
    size: int
    round: int | None
    stage: str | None
    reason: str | None = None

    def _where(self) -> str:
        return ", ".join(x for x in (f"round {self.round}" if self.round is not None else "",
                                     f"stage {self.stage}" if self.stage else "", f"{self.size} bytes",
                                     f"sha256 {self.digest[:16]}...") if x)

    def describe(self) -> str:
        """This record as a one-sided exchange: who recorded what, and who has no record of it."""
        if self.event == "message_sent":
            what = (f"{self.sender!r} sent to {self.recipient!r} ({self._where()}); {self.recipient!r} has no "
                    "record of it")
        elif self.sender is None:
            what = (f"{self.recipient!r} refused bytes that no party signed ({self._where()}: {self.reason}); no "
                    f"party of the run recorded sending them to {self.recipient!r}")
        else:
            verb = "received" if self.event == "message_received" else "received and refused"
            what = (f"{self.recipient!r} {verb} from {self.sender!r} ({self._where()}); {self.sender!r} has no "
                    "record of sending it")
        return f"{self.path}: line {self.line} (seq {self.seq}): {what}"

    def describe_refusal(self) -> str:
        """This refusal, paired with its send: who refused what, from whom (by the sender's own record), and why."""
        return (f"{self.path}: line {self.line} (seq {self.seq}): {self.recipient!r} refused a message from "
                f"{self.sender!r} ({self._where()}): {self.reason}")


@dataclass
class ReconciliationReport:
    """Pairs found (``matched``, of which ``refused`` were refused by their recipient), one-sided records
    (``sent_only``, ``received_only``; those explained by a broken or missing log are also in
    ``consequences``), refusals no party sent (``unsent_refusals``), and the root causes: ``missing_logs`` and
    ``problems`` (the first problem of each log that could be read only up to it, with its party)."""

    folder: Path
    logs: int = 0
    matched: int = 0
    refused: list[Exchange] = field(default_factory=list)
    sent_only: list[Exchange] = field(default_factory=list)
    received_only: list[Exchange] = field(default_factory=list)
    unsent_refusals: list[Exchange] = field(default_factory=list)
    missing_logs: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    broken_parties: dict[str, Problem] = field(default_factory=dict)

    @property
    def unmatched(self) -> list[Exchange]:
        return sorted(self.sent_only + self.received_only, key=lambda e: (str(e.path), e.line))

    def _silent_side(self, exchange: Exchange) -> str | None:
        return exchange.recipient if exchange.event == "message_sent" else exchange.sender

    @property
    def consequences(self) -> list[Exchange]:
        """One-sided records whose other side is a party without a log, or whose log stops at a problem."""
        causes = set(self.missing_logs) | set(self.broken_parties)
        return [e for e in self.unmatched if self._silent_side(e) in causes]

    @property
    def independent(self) -> list[Exchange]:
        """One-sided records no broken or missing log explains."""
        causes = set(self.missing_logs) | set(self.broken_parties)
        return [e for e in self.unmatched if self._silent_side(e) not in causes]

    @property
    def ok(self) -> bool:
        return not self.unmatched and not self.problems and not self.missing_logs

    def _root_causes(self) -> list[str]:
        causes = [f"the log of {party!r} does not verify ({problem}), so it is read only up to that line"
                  for party, problem in self.broken_parties.items()]
        causes += [f"{problem} (a log of no known party)" for problem in self.problems
                   if problem not in self.broken_parties.values()]
        causes += [f"there is no log of {party!r}, a peer in the other logs" for party in self.missing_logs]
        return causes

    def summary(self) -> str:
        """One line, leading with the root cause: ``NOT RECONCILED: <broken or missing log>; N exchange(s) ...
        cannot be matched because of it``, else ``UNMATCHED: ...`` naming the first one-sided exchange, else
        ``reconciled: ...`` (with how many messages were refused)."""
        causes = self._root_causes()
        if causes:
            more = f" (and {len(causes) - 1} more such problem(s), listed below)" if len(causes) > 1 else ""
            follows = len(self.consequences)
            named = ", ".join(map(repr, [*self.broken_parties, *self.missing_logs]))
            tail = (f"; {follows} exchange(s) the other logs record with {named} cannot be matched because of "
                    "that" if follows else "")
            independent = len(self.independent)
            other = f"; {independent} other one-sided exchange(s), listed below" if independent else ""
            return f"NOT RECONCILED: {causes[0]}{more}{tail}{other}"
        unmatched = self.unmatched
        if unmatched:
            return (f"UNMATCHED: {len(unmatched)} exchange(s) recorded by one side only ({len(self.sent_only)} sent, "
                    f"{len(self.received_only)} received), {self.matched} matched; first: {unmatched[0].describe()}")
        notes = []
        if self.refused:
            notes.append(f"{len(self.refused)} of them refused by their recipient (listed below)")
        if self.unsent_refusals:
            notes.append(f"{len(self.unsent_refusals)} refused message(s) that no party sent (listed below)")
        note = f"; {'; '.join(notes)}" if notes else ""
        return f"reconciled: {self.matched} exchanges in {self.logs} logs, each recorded by both sides{note}"

    def details(self) -> list[str]:
        """The lines that follow the summary: further root causes, one-sided exchanges no root cause explains,
        refusals paired with their send, and refusals of bytes no party sent (the consequences of a root cause
        are counted in the summary, not listed)."""
        lines = [f"  {cause}" for cause in self._root_causes()[1:]]
        independent = self.independent
        if not self._root_causes():
            independent = independent[1:]  # the first is in the summary
        lines += [f"  {e.describe()}" for e in independent]
        lines += [f"  refused: {e.describe_refusal()}" for e in self.refused]
        lines += [f"  {e.describe()}" for e in self.unsent_refusals]
        return lines


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
    outcomes: dict[tuple, deque[Exchange]] = defaultdict(deque)
    unattributed: dict[tuple, deque[Exchange]] = defaultdict(deque)
    parties: set[str] = set()
    peers: set[str] = set()
    for path in files:
        log = check_log(path, None)
        if log.problem is not None:
            report.problems.append(log.problem)
            if log.party is not None:
                report.broken_parties.setdefault(log.party, log.problem)
        if log.party is not None:
            parties.add(log.party)
        for number, entry in enumerate(log.entries, start=1):
            if entry.digest is None or entry.event not in ("message_sent", *OUTCOME_EVENTS):
                continue
            reason = entry.meta.get("reason") if entry.event == "message_rejected" else None
            if entry.peer is None:  # a refusal the recipient did not attribute (only those can lack a peer)
                unattributed[(entry.party, entry.digest, entry.size)].append(
                    Exchange(path, number, entry.seq, entry.event, None, entry.party, entry.digest, entry.size,
                             entry.round, entry.stage, reason))
                continue
            if entry.event == "message_sent":
                sender, recipient, bucket = entry.party, entry.peer, sent
            else:
                sender, recipient, bucket = entry.peer, entry.party, outcomes
            peers.add(entry.peer)
            bucket[(sender, recipient, entry.digest, entry.size)].append(
                Exchange(path, number, entry.seq, entry.event, sender, recipient, entry.digest, entry.size,
                         entry.round, entry.stage, reason))
    for key in sent.keys() | outcomes.keys():
        ours, theirs = sent.get(key, deque()), outcomes.get(key, deque())
        while ours and theirs:
            ours.popleft()
            outcome = theirs.popleft()
            report.matched += 1
            if outcome.event == "message_rejected":
                report.refused.append(outcome)
        report.received_only.extend(theirs)
        for send in ours:  # a send whose bytes the recipient refused without naming a sender
            refusals = unattributed.get((send.recipient, send.digest, send.size))
            if refusals:
                refusal = refusals.popleft()
                report.matched += 1
                report.refused.append(Exchange(refusal.path, refusal.line, refusal.seq, refusal.event, send.sender,
                                               refusal.recipient, refusal.digest, refusal.size, refusal.round,
                                               refusal.stage, refusal.reason))
            else:
                report.sent_only.append(send)
    report.unsent_refusals = [e for refusals in unattributed.values() for e in refusals]
    for found in (report.sent_only, report.received_only, report.refused, report.unsent_refusals):
        found.sort(key=lambda e: (str(e.path), e.line))
    report.missing_logs = sorted(peers - parties)
    return report

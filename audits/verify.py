"""Verification of one log or of a whole run folder of logs, against the roster's public keys.

One log: every line parses against the schema and is canonical; sequence numbers run 0, 1, 2, ...;
each ``prev`` is the SHA-256 of the line before; time never goes backwards; every entry's signature
and every tree head's signature verify against the roster; each ``tree_head`` entry's root is the
Merkle root of the entries before it; nothing follows the final tree head; a torn last line, and the
``.torn`` side file, match what the log says about them.

A folder: each log as above, then every tree head a party recorded from a peer
(``peer_tree_head``) is checked against that peer's log: the peer's log must still hold at least
that many entries (else it was truncated), and the recorded root must be the Merkle root of the
log's first ``tree_size`` entries (else its history was rewritten). Those roots come from one pass
over the log's leaves for all recorded sizes, so the cost stays linear in entries however many
heads were exchanged.

A finished run: with its :class:`RunRecord` (written into the run's manifest when it ended) every party the
record names must have exactly one log, closed with exactly the final signed tree head the record holds
(same size, root and signature: a cut tail, a missing log and a log rewritten and re-sealed with its own key
all fail), and the roster used must be the one whose digest the record holds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import merkle
from .entries import (
    GENESIS,
    AuditError,
    Entry,
    SchemaError,
    SignedTreeHead,
    check_party,
    key_id,
    parse_entry,
    parse_time,
)

LOG_SUFFIX = ".audit.jsonl"
TORN_SUFFIX = ".torn"
Roster = Mapping[str, Ed25519PublicKey]


def log_path(folder: Path | str, party: str) -> Path:
    """Where ``party``'s log lives in ``folder`` (one file per party per run): ``<party>.audit.jsonl``."""
    return Path(folder) / (quote(party, safe="") + LOG_SUFFIX)


def torn_path(path: Path | str) -> Path:
    """The side file that holds torn last lines set aside by recovery: ``<log>.torn``."""
    path = Path(path)
    return path.with_name(path.name + TORN_SUFFIX)


def find_logs(folder: Path | str) -> list[Path]:
    """Every ``*.audit.jsonl`` under ``folder`` (recursively), sorted."""
    return sorted(p for p in Path(folder).rglob("*" + LOG_SUFFIX) if p.is_file())


@dataclass(frozen=True)
class PartyRecord:
    """One party's log as a finished run recorded it: where it is (relative to the run folder) and the final
    signed tree head its ``close()`` wrote; or, for a party that did not close its log (a site killed during the
    run, a deployment's dropout: ``closed`` False), the last tree head it signed, which its log must still hold."""

    log: str
    final_tree_head: SignedTreeHead | None  # None only when not closed and it signed no tree head before it left
    closed: bool = True


@dataclass(frozen=True)
class RunRecord:
    """What a run that finished recorded about its logs (the ``audit`` object of its manifest): the digest of
    the roster it ran under and every party's final signed tree head. Without it, a log cut after the last
    tree head a peer holds, or a whole log removed, cannot be told from a run that crashed (issue 13)."""

    roster_sha256: str
    parties: Mapping[str, PartyRecord]

    def to_dict(self) -> dict:
        return {"roster_sha256": self.roster_sha256,
                "parties": {party: {"log": record.log, "final_tree_head": None if record.final_tree_head is None
                                    else record.final_tree_head.to_dict(), "closed": record.closed}
                            for party, record in sorted(self.parties.items())}}

    @classmethod
    def from_dict(cls, value: object) -> RunRecord:
        """Strict inverse of :meth:`to_dict`; :class:`AuditError` naming what is malformed."""
        if not isinstance(value, Mapping) or set(value) != {"roster_sha256", "parties"}:
            raise AuditError("a run's audit record is an object with exactly the keys 'roster_sha256' and 'parties'")
        digest, parties = value["roster_sha256"], value["parties"]
        if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise AuditError("the audit record's roster_sha256 must be 64 lowercase hex digits")
        if not isinstance(parties, Mapping) or not parties:
            raise AuditError("the audit record's 'parties' must name every party of the run")
        records = {}
        for party, item in parties.items():
            check_party(party, "audit record party")
            if not isinstance(item, Mapping) or set(item) != {"log", "final_tree_head", "closed"} \
                    or not isinstance(item["log"], str) or not isinstance(item["closed"], bool):
                raise AuditError(f"the audit record of {party!r} needs exactly 'log' (a path), 'final_tree_head' and "
                                 "'closed' (true or false)")
            if item["final_tree_head"] is None and not item["closed"]:  # it left before it signed any head
                records[party] = PartyRecord(item["log"], None, False)
                continue
            head = SignedTreeHead.from_dict(item["final_tree_head"])
            if head.party != party:
                raise AuditError(f"the audit record of {party!r} holds a tree head of {head.party!r}")
            records[party] = PartyRecord(item["log"], head, item["closed"])
        return cls(digest, records)


@dataclass(frozen=True)
class Problem:
    """The first thing wrong in a log (``line`` is 1-based; ``seq`` when the entry has one)."""

    path: Path
    line: int | None
    seq: int | None
    reason: str

    def __str__(self) -> str:
        where = [str(self.path)]
        if self.line is not None:
            where.append(f"line {self.line}" + (f" (seq {self.seq})" if self.seq is not None else ""))
        return ": ".join(where) + ": " + self.reason


@dataclass
class LogReport:
    """What reading one log found: its verified entries (a prefix of the file) and the first problem."""

    path: Path
    party: str | None = None
    entries: list[Entry] = field(default_factory=list)
    leaves: list[bytes] = field(default_factory=list)
    tree_heads: list[SignedTreeHead] = field(default_factory=list)
    peer_tree_heads: list[tuple[int, SignedTreeHead]] = field(default_factory=list)  # (line, tree head)
    recovered: list[Entry] = field(default_factory=list)
    closed: bool = False
    torn: bytes = b""
    problem: Problem | None = None
    signatures_checked: bool = False

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        if self.problem is not None:
            return f"NOT INTACT: {self.problem}"
        state = "closed" if self.closed else "not closed (no final tree head: the run stopped early or crashed)"
        return (f"intact: {self.path} ({self.party!r}): {len(self.entries)} entries, "
                f"{len(self.tree_heads)} signed tree heads, {state}")


def check_log(path: Path | str, roster: Roster | None, *, party: str | None = None) -> LogReport:
    """Read and check one log. With ``roster=None`` signatures are not checked (structure, chain and
    Merkle roots still are): for reading, never for verifying."""
    path = Path(path)
    report = LogReport(path, party=party, signatures_checked=roster is not None)
    data = path.read_bytes()
    complete, newline, fragment = data.rpartition(b"\n")
    lines = complete.split(b"\n") if newline else []
    tree = merkle.CompactTree()
    prev, last_time, last_instant = GENESIS, "", None

    def fail(line: int | None, seq: int | None, reason: str) -> LogReport:
        report.problem = Problem(path, line, seq, reason)
        return report

    for index, line in enumerate(lines):
        number = index + 1
        try:
            entry = parse_entry(line)
        except SchemaError as error:
            return fail(number, _guess_seq(line), str(error))
        seq = entry.seq
        if report.party is None:
            report.party = entry.party
        if entry.party != report.party:
            return fail(number, seq, f"entry of party {entry.party!r} in the log of {report.party!r}")
        if report.closed:
            return fail(number, seq, "entry after the log's final tree head (the log was closed)")
        if seq != index:
            return fail(number, seq, f"sequence number {seq} where {index} was expected "
                                     "(an entry was deleted, inserted or moved)")
        if entry.prev != prev:
            return fail(number, seq, "prev is not the hash of the previous entry (the hash chain is broken: "
                                     "an entry was changed, deleted, inserted or moved)")
        instant = parse_time(entry.time)  # compared as instants, not as text
        if last_instant is not None and instant < last_instant:
            return fail(number, seq, f"time goes backwards ({entry.time} after {last_time})")
        if roster is not None:
            key = roster.get(entry.party)
            if key is None:
                return fail(number, seq, f"party {entry.party!r} is not on the roster")
            if not entry.signature_valid(key):
                hint = ""
                if entry.event == "log_opened" and entry.meta.get("key_id") not in (None, key_id(key)):
                    hint = (f"; the log names key id {entry.meta['key_id']}, the roster's key has id "
                            f"{key_id(key)}")
                return fail(number, seq, f"signature does not verify against the roster key of {entry.party!r} "
                                         f"(the entry was changed, or signed by a key not on the roster{hint})")
        sth = entry.sth
        if entry.event == "tree_head":
            if sth.tree_size != seq:
                return fail(number, seq, f"tree head covers {sth.tree_size} entries but stands after {seq}")
            if sth.time != entry.time:
                return fail(number, seq, "tree head time differs from the entry's time")
            if sth.root != tree.root():
                return fail(number, seq, f"tree head root is not the Merkle root of the {seq} entries before it "
                                         "(an earlier entry was changed, deleted, inserted or moved)")
            if roster is not None:
                try:
                    sth.verify(roster[entry.party])
                except AuditError as error:
                    return fail(number, seq, str(error))
            report.tree_heads.append(sth)
            report.closed = entry.meta.get("final") is True
        elif entry.event == "peer_tree_head":
            if roster is not None:
                key = roster.get(entry.peer)
                if key is None:
                    return fail(number, seq, f"peer {entry.peer!r} of this tree head is not on the roster")
                try:
                    sth.verify(key)
                except AuditError as error:
                    return fail(number, seq, f"recorded peer tree head: {error}")
            report.peer_tree_heads.append((number, sth))
        elif entry.event == "log_recovered":
            report.recovered.append(entry)
        report.entries.append(entry)
        report.leaves.append(entry.leaf)
        tree.append(report.leaves[-1])
        prev, last_time, last_instant = entry.hash, entry.time, instant

    if fragment:
        report.torn = fragment
        return fail(len(lines) + 1, _guess_seq(fragment),
                    f"incomplete last line of {len(fragment)} bytes (torn by a crash while writing, or cut): "
                    "AuditLog.open recovers the log and sets the fragment aside")
    if not lines:
        return fail(None, None, "the log is empty")
    side_problem = check_side_file(path, report.recovered)
    if side_problem:
        return fail(None, None, side_problem[1])
    return report


def check_side_file(path: Path, recovered: list[Entry]) -> tuple[str, str] | None:
    """Does ``<log>.torn`` hold exactly the fragments the log's ``log_recovered`` entries record, in order?
    None if so, else (``"mismatch"`` or ``"unrecorded"``, reason)."""
    side = torn_path(path)
    held = side.read_bytes() if side.exists() else b""
    offset = 0
    for entry in recovered:
        piece = held[offset:offset + entry.size]
        if len(piece) != entry.size or hashlib.sha256(piece).hexdigest() != entry.digest:
            return "mismatch", (f"side file {side.name} does not hold the {entry.size}-byte fragment that the "
                                f"log_recovered entry seq {entry.seq} records (it was changed, cut or removed)")
        offset += entry.size
    if len(held) > offset:
        return "unrecorded", (f"side file {side.name} holds {len(held) - offset} bytes that no log_recovered entry "
                              "records (recovery was interrupted: AuditLog.open completes it)")
    return None


def _guess_seq(line: bytes) -> int | None:
    try:
        seq = json.loads(line).get("seq")
    except (ValueError, AttributeError, RecursionError):
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


@dataclass
class VerificationReport:
    """The result of :func:`verify_path`: every log's report, and every problem (per log first, then across)."""

    path: Path
    logs: list[LogReport]
    problems: list[Problem]
    peer_checks: int = 0
    folder: bool = False
    record: RunRecord | None = None  # the finished run's record the logs were checked against, if any

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def summary(self) -> str:
        """One line: ``intact: ...`` or ``NOT INTACT: <file>: line N (seq S): <reason>``."""
        if self.problems:
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            return f"NOT INTACT: {self.problems[0]}{more}"
        if not self.folder:
            return self.logs[0].summary()
        entries = sum(len(log.entries) for log in self.logs)
        heads = sum(len(log.tree_heads) for log in self.logs)
        open_logs = [log.party for log in self.logs if not log.closed]
        state = "all closed" if not open_logs else f"not closed: {', '.join(map(repr, open_logs))}"
        if self.record is not None:
            state += f", every final tree head as the run's record holds it ({len(self.record.parties)} parties)"
        return (f"intact: {len(self.logs)} logs in {self.path}, {entries} entries, {heads} signed tree heads, "
                f"{self.peer_checks} exchanged tree heads matched against their party's log, {state}")


def verify_path(path: Path | str, roster: Roster, *, require_closed: bool = False, record: RunRecord | None = None,
                roster_sha256: str | None = None) -> VerificationReport:
    """Verify one log file, or every ``*.audit.jsonl`` in a folder together with the tree heads the parties
    exchanged. ``require_closed``: a log without its final tree head is a problem too (use it for runs that
    ended normally: a cut tail is then detected even after the last exchanged tree head). ``record``: the
    finished run's :class:`RunRecord`; every party it names needs its log (in a folder), closed with exactly
    the recorded final tree head, and ``roster_sha256`` (the digest of ``roster``) must be the recorded one.
    Raises :class:`FileNotFoundError` for a missing path and :class:`AuditError` for a folder without logs."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such log or folder: {path}")
    files = [path] if path.is_file() else find_logs(path)
    if not files:
        raise AuditError(f"no audit logs (*{LOG_SUFFIX}) under {path}")
    logs = [check_log(file, roster) for file in files]
    problems = []
    for log in logs:
        if log.problem is None and require_closed and not log.closed:
            log.problem = Problem(log.path, len(log.entries), len(log.entries) - 1,
                                  "the log ends without its final tree head (it was cut, or the run did not end "
                                  "normally)")
        if log.problem is not None:
            problems.append(log.problem)
    if path.is_file():
        report = VerificationReport(path, logs, problems, record=record)
        if record is not None:
            _check_run_record(report, {log.party: log for log in logs if log.party is not None}, roster_sha256,
                              every_party=False)
        return report
    report = VerificationReport(path, logs, problems, folder=True, record=record)
    by_party: dict[str, LogReport] = {}
    for log in logs:
        if log.party is None:
            continue
        if log.party in by_party:
            report.problems.append(Problem(log.path, None, None, f"a second log of party {log.party!r} "
                                           f"(the first is {by_party[log.party].path})"))
            continue
        by_party[log.party] = log
    _check_exchanged_tree_heads(report, by_party)
    if record is not None:
        _check_run_record(report, by_party, roster_sha256, every_party=True)
        for party in sorted(set(roster) - set(record.parties)):  # a party dropped from the record with its log
            report.problems.append(Problem(path, None, None, f"the roster names party {party!r}, but the run's record "
                                           "names no log of it: its log and its record were removed"))
        _check_closing_tails(report, by_party)
    return report


def _check_run_record(report: VerificationReport, by_party: dict[str, LogReport], roster_sha256: str | None, *,
                      every_party: bool) -> None:
    """The logs against the finished run's record: the roster it ran under, and for every party it names (all
    of them when ``every_party``, else those whose log is here) a log that ends with exactly the recorded final
    tree head. A log that does not is cut (not closed), or rewritten and re-sealed (another head)."""
    record = report.record
    where = report.path
    if roster_sha256 != record.roster_sha256:
        report.problems.append(Problem(where, None, None, f"the roster used (sha256 {roster_sha256}) is not the one "
                                       f"the run recorded (sha256 {record.roster_sha256})"))
    for party, expected in sorted(record.parties.items()):
        log = by_party.get(party)
        head = expected.final_tree_head
        if log is None:
            if every_party:
                size = "no tree head" if head is None else f"final tree head of size {head.tree_size}"
                report.problems.append(Problem(where, None, None, f"no log of party {party!r}: the run finished and "
                                               f"recorded its log ({expected.log}, {size}); it was removed"))
            continue
        if log.problem is not None:  # already reported at its first bad line
            continue
        if not expected.closed:  # it never closed (killed during the run): it must still hold its last signed head
            if head is not None and head not in log.tree_heads:
                report.problems.append(Problem(log.path, None, None, f"the log of {party!r} no longer holds the tree "
                                               f"head of size {head.tree_size} it last signed before the run "
                                               "finished without it: it was rewritten or cut"))
            continue
        if not log.closed:
            report.problems.append(Problem(log.path, len(log.entries), len(log.entries) - 1,
                                           f"the log of {party!r} ends without its final tree head, but the run "
                                           f"finished and recorded one of size {head.tree_size}: it was cut"))
        elif log.tree_heads[-1] != head:
            found = log.tree_heads[-1]
            report.problems.append(Problem(log.path, len(log.entries), len(log.entries) - 1,
                                           f"the log of {party!r} ends with a final tree head of size "
                                           f"{found.tree_size} (root {found.root.hex()[:16]}...), but the run "
                                           f"recorded size {head.tree_size} (root {head.root.hex()[:16]}...): it "
                                           "was rewritten or cut, and sealed again"))
    if every_party:
        for party, log in sorted(by_party.items()):
            if party not in record.parties:
                report.problems.append(Problem(log.path, None, None, f"a log of party {party!r}, which the run's "
                                               "record does not name"))


def closing_tail_problem(log: LogReport, size: int, receiver: str) -> str | None:
    """Why ``log`` holds more after the tree head of size ``size`` it handed ``receiver`` in its close reply than
    closing allows, or None. A party's log goes on past that head for the few entries the head cannot cover: the
    head's own ``tree_head`` entry, the close exchange with ``receiver`` (one ``message_received``, one
    ``message_sent``, outside any round; ``receiver``'s log holds the other side) and the final tree head.
    Anything else there was written after the party's last word to the run: a party that re-seals its own log
    could otherwise slip entries in unseen by any head a peer holds."""
    exchanged: set[str] = set()
    for entry in log.entries[size:]:
        if entry.event == "tree_head":
            continue
        if entry.event in ("message_received", "message_sent") and entry.peer == receiver and entry.round is None \
                and entry.event not in exchanged:
            exchanged.add(entry.event)
            continue
        return (f"holds a {entry.event} entry (seq {entry.seq}) after the tree head of size {size} it handed "
                f"{receiver!r} at close: only that close exchange and its tree heads may follow it")
    return None


def _check_closing_tails(report: VerificationReport, by_party: dict[str, LogReport]) -> None:
    """Each party's log after the last tree head the run's closer (the party that recorded a head of every other
    one: the server) recorded from it holds only the close exchange (:func:`closing_tail_problem`), so a log
    re-sealed with its own key, and the manifest edited to match, still cannot hide entries added at the end."""
    parties = set(by_party)
    closer = next((party for party, log in sorted(by_party.items())
                   if {sth.party for _, sth in log.peer_tree_heads} >= parties - {party}), None)
    if closer is None:
        return
    last: dict[str, int] = {}
    for _, sth in by_party[closer].peer_tree_heads:
        last[sth.party] = max(last.get(sth.party, 0), sth.tree_size)
    for party, log in sorted(by_party.items()):
        if party == closer or log.problem is not None or not log.closed or party not in last:
            continue  # a party that never closed (a dropout the run record names as such) had no close exchange
        reason = closing_tail_problem(log, last[party], closer)
        if reason is not None:
            report.problems.append(Problem(log.path, None, None, f"the log of {party!r} {reason}"))


def _prefix_roots(leaves: list[bytes], sizes: set[int]) -> dict[int, bytes]:
    """The Merkle root (RFC 9162 §2.1.1) of the first ``size`` leaves for every size in ``sizes``, in one pass:
    O(n + k log n) hashes for k sizes. Rebuilding a consistency proof from the leaves for each recorded head
    instead costs O(n) per head, O(n × heads) in all (issue 13, item 9)."""
    tree, roots = merkle.CompactTree(), {}
    if 0 in sizes:
        roots[0] = tree.root()
    for count, leaf in enumerate(leaves[:max(sizes, default=0)], 1):
        tree.append(leaf)
        if count in sizes:
            roots[count] = tree.root()
    return roots


def _check_exchanged_tree_heads(report: VerificationReport, by_party: dict[str, LogReport]) -> None:
    """Each tree head a party recorded from a peer against that peer's log: long enough (else truncated), and
    its root the Merkle root of the log's first ``tree_size`` entries. This proves what an RFC 9162 consistency
    proof to the peer's latest own signed tree head would (check_log already matched every own head's root to
    the entries before it), with one pass over the leaves for every recorded size."""
    sizes: dict[str, set[int]] = {}
    for recorder in by_party.values():
        for _, sth in recorder.peer_tree_heads:
            if sth.party in by_party and sth.tree_size <= len(by_party[sth.party].entries):
                sizes.setdefault(sth.party, set()).add(sth.tree_size)
    roots = {party: _prefix_roots(by_party[party].leaves, wanted) for party, wanted in sizes.items()}
    for recorder in by_party.values():
        for line, sth in recorder.peer_tree_heads:

            def problem(reason: str, recorder=recorder, line=line) -> None:
                report.problems.append(Problem(recorder.path, line, line - 1, reason))

            peer, size = by_party.get(sth.party), sth.tree_size
            if peer is None:
                problem(f"records a signed tree head of {sth.party!r} (size {size}), but the folder holds no log of "
                        f"{sth.party!r} (was it removed?)")
                continue
            if len(peer.entries) < size:
                problem(f"the log of {sth.party!r} ({peer.path.name}) holds {len(peer.entries)} verified entries, "
                        f"fewer than the {size} of its signed tree head recorded here: it was truncated")
                continue
            if roots[sth.party][size] != sth.root:
                problem(f"the log of {sth.party!r} ({peer.path.name}) does not match its signed tree head of size "
                        f"{size} recorded here: its history was rewritten")
                continue
            report.peer_checks += 1

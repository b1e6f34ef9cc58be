"""How parties talk: the server sends requests, every other party only replies, within a deadline.

This is the shape of a real federated engine (Flower's ``Grid``: the ServerApp pushes messages to
nodes and pulls their replies; nodes never call each other), so the same parties run in one process
(:mod:`.simulation`), in one OS process each (tests) or on separate machines. A party that has not
replied by the stage's deadline has dropped out for that stage. Messages a party addresses to another
party than the server (the HE key holder's per-round context for the sites) travel back to the server
inside its reply, and the server relays them: it sees only what it would see on a network.

Audit logging happens at each party's own end of the channel and in its own log only: :class:`Served`
records what a replying party sent and what became of each request, :class:`ServerLink` what the server
sent, and the server records each reply's outcome where it decides on it. Each received message gets one
entry, written once the party has decided: ``message_received`` (accepted) or ``message_rejected``
(refused, with the reason). Each entry names the peer the bytes physically came from or went to, so a
relayed message is recorded as two exchanges (key holder → server, server → site) that reconcile
pairwise; refused bytes that are not a message any roster party signed are recorded without a peer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audits import AuditLog, SignedTreeHead
from protocols import MessageRejected, Outgoing, ProtocolError
from protocols.wire import peek, signed_by

from . import envelopes as E

# The runner's session messages: they open, confirm and close a session and belong to no round (their envelope's
# round is the round the run is at, the next one to run), so their log entries carry none.
SESSION_STAGES = frozenset({E.OPEN, E.OPENED, E.CONFIRM, E.CONFIRMED, E.CLOSE, E.CLOSED})


@dataclass(frozen=True)
class Reply:
    """What one party answered to one request: its messages, or None when it did not answer in time."""

    party: str
    messages: tuple[Outgoing, ...] | None

    @property
    def dropped(self) -> bool:
        return self.messages is None


class Channel(Protocol):
    """The server's way to reach the other parties."""

    def exchange(self, requests: Sequence[Outgoing], *, deadline_s: float) -> list[Reply]:
        """Deliver every request (to ``request.recipient``) and return one :class:`Reply` per request, in
        order; a party that has not answered within ``deadline_s`` seconds gets ``messages=None``."""
        ...


class Endpoint(Protocol):
    """A replying party: consumes one message, returns the messages it answers with."""

    party_id: str

    def handle(self, data: bytes) -> list[Outgoing]: ...


def logged_round(round_index: int | None) -> int | None:
    """The round as the audit log numbers it: from 1, as the console, ``metrics.jsonl`` and the privacy report do.
    The code and the wire envelope count rounds from 0 (``round_index``); every round a party's log holds passes
    through here (docs/audit.md, "Rounds and resumes")."""
    return None if round_index is None else round_index + 1


def _where(data: bytes) -> dict[str, Any]:
    """Round and stage of a message for its log entry (from the unverified header: labels only)."""
    header = peek(data)
    if header is None:
        return {"round": None, "stage": None}
    session = header.protocol == E.PROTOCOL and header.stage in SESSION_STAGES
    return {"round": None if session else logged_round(header.round), "stage": f"{header.protocol}:{header.stage}"}


class PartyAudit:
    """One party's own audit log (``log`` None: auditing off, nothing is recorded). Callers pass the 0-based
    ``round`` index the code uses; the log holds it numbered from 1 (:func:`logged_round`)."""

    def __init__(self, log: AuditLog | None, public_keys: Mapping[str, Ed25519PublicKey]) -> None:
        self.log = log
        self._public_keys = dict(public_keys)
        self._closing = False

    @property
    def enabled(self) -> bool:
        return self.log is not None

    def sent(self, peer: str, data: bytes) -> None:
        if self.log is not None:
            self.log.record("message_sent", peer=peer, data=data, **_where(data))

    def received(self, peer: str, data: bytes) -> None:
        """``data`` from ``peer`` was accepted: call once the party has decided so, never before."""
        if self.log is not None:
            self.log.record("message_received", peer=peer, data=data, **_where(data))

    def rejected(self, via: str, data: bytes, reason: str) -> None:
        """``data``, delivered by ``via``, was refused. The entry names ``via`` as its peer only when the bytes
        are a message some roster party signed (relayed or not, ``via`` then delivered a peer's message);
        anything else (junk, a forged or unsigned message) could have been put on the channel by anyone, so it
        is recorded without a peer (``meta.via`` says which channel it came in on) and is never attributed to
        a party that did not send it. Reconciliation pairs it with a send of the same bytes, if any."""
        if self.log is None:
            return
        meta = {"reason": reason[:256]}
        if not self._signed_by_a_party(data):
            meta["via"] = via
        self.log.record("message_rejected", peer=via if "via" not in meta else None, data=data, meta=meta,
                        **_where(data))

    def _signed_by_a_party(self, data: bytes) -> bool:
        """Does ``data`` carry a valid signature of the party its header names (a roster party)?"""
        header = peek(data)
        key = self._public_keys.get(header.sender) if header is not None else None
        return key is not None and signed_by(data, key)

    def event(self, event: str, *, round: int | None = None, **fields: Any) -> None:
        if self.log is not None:
            self.log.record(event, round=logged_round(round), **fields)

    def run_resumed(self, round_index: int, resumes_session: str, checkpoint_sha256: str | None) -> None:
        """The explicit record that this party's new session continues ``resumes_session`` at ``round_index``
        (0-based; logged from 1) from the checkpoint file of that SHA-256 (None: the party keeps no checkpoint)."""
        self.event("run_resumed", round=round_index,
                   meta={"resumes_session": resumes_session, "checkpoint_sha256": checkpoint_sha256})

    def tree_head(self) -> str | None:
        """This party's signed tree head so far, as JSON for a peer (None when auditing is off)."""
        return self.log.signed_tree_head().to_json() if self.log is not None else None

    def record_peer_tree_head(self, peer: str, tree_head: str) -> None:
        """Record a peer's tree head after checking its signature with the peer's roster key."""
        if self.log is None:
            return
        try:
            head = SignedTreeHead.from_bytes(tree_head)
            self.log.record_peer_tree_head(peer, head, public_key=self._public_keys[peer])
        except Exception as error:  # the audits package raises its own error types for a bad head
            raise MessageRejected(f"the tree head from {peer!r} does not verify: {error}", peer) from None

    def close(self, reason: str) -> str | None:
        """``run_stopped`` and the final signed tree head; returns that head as JSON."""
        if self.log is None or self.log.closed:
            return None
        self.log.record("run_stopped", meta={"reason": reason[:256]})
        return self.log.close().to_json()

    def close_after_reply(self, reason: str) -> str | None:
        """For a replying party: record ``run_stopped`` now and close the log once the reply to the current
        request is logged (:class:`Served` does it), so the log covers its own last message. Returns the tree
        head so far (JSON), for the reply."""
        if self.log is None or self.log.closed:
            return None
        self.log.record("run_stopped", meta={"reason": reason[:256]})
        self._closing = True
        return self.log.signed_tree_head().to_json()

    def finish_reply(self) -> None:
        if self._closing and self.log is not None and not self.log.closed:
            self.log.close()


class Served:
    """A replying party's end of the channel: logs each request's outcome and each reply in the party's own
    log. A request the party handled is logged as received (after it was handled: the outcome is known only
    then), before the answers it produced are logged as sent; a request the party refuses (MessageRejected,
    or any other protocol error its protocol session raised on it) is logged as rejected and answered with
    nothing: no request a party refuses stops it. A request the party fails on is logged as rejected too,
    then the failure goes on to the caller."""

    def __init__(self, party: Endpoint, audit: PartyAudit, *, server_id: str) -> None:
        self.party = party
        self.party_id = party.party_id
        self.audit = audit
        self.server_id = server_id

    def handle(self, data: bytes) -> list[Outgoing]:
        try:
            answers = self.party.handle(data)
        except MessageRejected as rejection:
            self.audit.rejected(self.server_id, data, rejection.reason)
            return []
        except ProtocolError as error:
            self.audit.rejected(self.server_id, data, f"{type(error).__name__}: {error}")
            return []
        except Exception as error:
            self.audit.rejected(self.server_id, data, f"the party failed on it ({type(error).__name__}); not answered")
            raise
        self.audit.received(self.server_id, data)
        for answer in answers:
            self.audit.sent(self.server_id, answer.data)
        self.audit.finish_reply()
        return answers


@dataclass
class ServerLink:
    """The server's end: requests out and replies in through a :class:`Channel`, requests logged in the server's
    own log as sent, and both counted (bytes per direction, for the run's metrics). A reply's messages are
    logged by whoever decides on them (``audit.received`` / ``audit.rejected``), once, after the decision."""

    channel: Channel
    audit: PartyAudit
    deadlines: Mapping[str, float] = field(default_factory=dict)  # stage → seconds; missing: default_deadline_s
    default_deadline_s: float = 60.0
    bytes_sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_received: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def exchange(self, requests: Sequence[Outgoing], stage: str) -> list[Reply]:
        for request in requests:
            self.audit.sent(request.recipient, request.data)
            self.bytes_sent[request.recipient] += len(request.data)
        replies = self.channel.exchange(requests, deadline_s=self.deadlines.get(stage, self.default_deadline_s))
        for reply in replies:
            if reply.messages is None:
                self.audit.event("party_dropped", peer=reply.party, meta={"reason": f"no reply to {stage!r} in time"})
                continue
            for message in reply.messages:
                self.bytes_received[reply.party] += len(message.data)
        return replies

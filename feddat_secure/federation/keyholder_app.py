"""The HE key holder: its identity, its CKKS secret keys (a fresh key every round, inside its protocol
session) and its own audit log. It answers the server only; what it sends to the sites (each round's public
context) the server relays. It decrypts nothing but what its protocol session accepts as a sum."""

from __future__ import annotations

from typing import Any

from protocols import ConfigurationError, MessageRejected, Outgoing, Protocol, Roster
from protocols.identity import Identity
from protocols.wire import Envelope, check_session_id, peek

from . import envelopes as E
from .channel import PartyAudit
from .party_folder import PartyFolder


class KeyHolder:
    def __init__(self, identity: Identity, roster: Roster, folder: PartyFolder, *, config_digest: str,
                 protocol: Protocol, audit: PartyAudit) -> None:
        self.party_id = identity.party_id
        self.stamp = E.Stamp(identity, roster)
        self.roster = roster
        self.folder = folder
        self.config_digest = config_digest
        self.protocol = protocol
        self.audit = audit
        self.session = None
        self.opening = E.Opening()

    def handle(self, data: bytes) -> list[Outgoing]:
        header = peek(data)
        if header is None:
            raise MessageRejected("not a readable message")
        if header.protocol == self.protocol.name and self.session is not None:  # exists once confirmed
            return self.session.handle(data)
        if header.protocol != E.PROTOCOL:
            raise MessageRejected(f"the key holder takes no {header.protocol!r} messages now", header.sender)
        envelope = self.stamp.request(data, header, self.opening)
        extra: list[Outgoing] = []
        if envelope.stage == E.OPEN:
            fields = self._open(envelope)
        elif envelope.stage == E.CONFIRM:
            fields, extra = self._confirm(envelope)
        elif envelope.stage == E.TREE_HEAD:
            fields = self._tree_head(envelope)
        elif envelope.stage == E.CLOSE:
            reason = envelope.fields.get("reason")
            if not isinstance(reason, str):
                raise MessageRejected("'reason' must be a string", envelope.sender)
            fields = {"tree_head": self.audit.close_after_reply(reason[:256])}
        else:
            raise MessageRejected(f"the key holder takes no {envelope.stage!r} request", envelope.sender)
        reply = self.stamp.envelope(E.REPLY_TO[envelope.stage], envelope.round, envelope.sender, fields,
                                    session=envelope.session)
        return [Outgoing(envelope.sender, reply), *extra]

    def _open(self, envelope: Envelope) -> dict[str, Any]:
        if envelope.fields.get("config_sha256") != self.config_digest:
            raise MessageRejected("the server runs another configuration than the key holder agreed to",
                                  envelope.sender)
        next_round = envelope.fields.get("next_round")
        if not isinstance(next_round, int) or isinstance(next_round, bool) or next_round < 0:
            raise MessageRejected("'next_round' must be an integer >= 0", envelope.sender)
        clients = envelope.fields.get("clients")
        if not isinstance(clients, list) or not all(isinstance(client, str) for client in clients) \
                or len(set(clients)) != len(clients) or not set(clients) <= set(self.roster.client_ids):
            raise MessageRejected("'clients' must list distinct enrolled sites", envelope.sender)
        resumes = None  # the session a resumed run continues, as the server signed it
        if envelope.fields.get("resume"):
            try:
                resumes = check_session_id(envelope.fields.get("resumes_session"))
            except ConfigurationError:
                raise MessageRejected("a resumed run's 'resumes_session' must be a session id", envelope.sender) \
                    from None
        # refused once a session is confirmed
        nonce = self.opening.offer(envelope.session, (list(clients), next_round, resumes))
        return {"next_round": next_round, "nonce": nonce}

    def _confirm(self, envelope: Envelope) -> tuple[dict[str, Any], list[Outgoing]]:
        """The server echoed our nonce in this session: only now is the protocol session made. The key holder
        keeps nothing across sessions (a fresh key every round), so a resumed run simply starts a new one; its log
        still says which session it continues, and where (no checkpoint: ``checkpoint_sha256`` null)."""
        clients, next_round, resumes = self.opening.confirm(envelope)
        self.stamp.session = envelope.session
        self.session = self.protocol.keyholder(self.stamp.identity, self.roster, session=envelope.session)
        self.audit.event("run_started", meta={"session": envelope.session})
        if resumes is not None:
            self.audit.run_resumed(next_round, resumes, None)
        return {}, self.session.setup(clients)

    def _tree_head(self, envelope: Envelope) -> dict[str, Any]:
        head = envelope.fields.get("tree_head")
        if head is not None:
            self.audit.record_peer_tree_head(envelope.sender, head)
        return {"tree_head": self.audit.tree_head()}

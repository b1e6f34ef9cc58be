"""The HE key holder: its identity, its CKKS secret keys (a fresh key every round, inside its protocol
session) and its own audit log. It answers the server only; what it sends to the sites (each round's public
context) the server relays. It decrypts nothing but what its protocol session accepts as a sum."""

from __future__ import annotations

from typing import Any

from protocols import MessageRejected, Outgoing, Protocol, Roster
from protocols.identity import Identity
from protocols.wire import Envelope, peek

from ..errors import FederationError
from . import envelopes as E
from .channel import PartyAudit
from .checkpoint import load_checkpoint, save_checkpoint
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
        self._pending: tuple[dict[str, Any] | None, list[str]] = (None, [])

    def handle(self, data: bytes) -> list[Outgoing]:
        header = peek(data)
        if header is None:
            raise MessageRejected("not a readable message")
        if header.protocol == self.protocol.name and self.session is not None:  # exists once confirmed
            return self.session.handle(data)
        if header.protocol != E.PROTOCOL:
            raise MessageRejected(f"the key holder takes no {header.protocol!r} messages now", header.sender)
        opening = header.stage == E.OPEN and not self.opening.confirmed
        envelope = self.stamp.open(data, session=None if opening else self.stamp.session)
        if envelope.sender != self.roster.server_id:
            raise MessageRejected("only the server sends requests to the key holder", envelope.sender)
        if envelope.stage not in (E.OPEN, E.CONFIRM):
            self.opening.require(f"a {envelope.stage!r} request")
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
            self.folder.drop_checkpoints()
        else:
            raise MessageRejected(f"the key holder takes no {envelope.stage!r} request", envelope.sender)
        reply = self.stamp.envelope(E.REPLY_TO[envelope.stage], envelope.round, envelope.sender, fields)
        return [Outgoing(envelope.sender, reply), *extra]

    def _open(self, envelope: Envelope) -> dict[str, Any]:
        if envelope.fields.get("config_sha256") != self.config_digest:
            raise MessageRejected("the server runs another configuration than the key holder agreed to",
                                  envelope.sender)
        next_round = envelope.fields.get("next_round")
        if not isinstance(next_round, int) or isinstance(next_round, bool) or next_round < 0:
            raise MessageRejected("'next_round' must be an integer >= 0", envelope.sender)
        clients = envelope.fields.get("clients")
        if not isinstance(clients, list) or not set(clients) <= set(self.roster.client_ids):
            raise MessageRejected("'clients' must list enrolled sites", envelope.sender)
        state = None
        if envelope.fields.get("resume"):
            found = self.folder.checkpoints()
            if not found:
                raise FederationError(f"{self.party_id}: no checkpoint to resume from")
            state = load_checkpoint(found[max(found)])
            if state["session"] != envelope.session:
                raise MessageRejected("the key holder's checkpoint belongs to another session", envelope.sender)
        nonce = self.opening.offer()  # refuses once a session is confirmed
        self.stamp.session = envelope.session
        self._pending = (state, clients)
        return {"next_round": next_round, "nonce": nonce}

    def _confirm(self, envelope: Envelope) -> tuple[dict[str, Any], list[Outgoing]]:
        """The server echoed our nonce in this session: only now is the protocol session made."""
        self.opening.confirm(envelope)
        state, clients = self._pending
        self.session = self.protocol.keyholder(self.stamp.identity, self.roster, session=envelope.session,
                                               state=state["aggregation"] if state else None)
        if state is not None:
            return {}, []
        self.audit.event("run_started", meta={"session": envelope.session})
        return {}, self.session.setup(clients)

    def _tree_head(self, envelope: Envelope) -> dict[str, Any]:
        head = envelope.fields.get("tree_head")
        if head is not None:
            self.audit.record_peer_tree_head(envelope.sender, head)
        save_checkpoint(self.folder.checkpoint(envelope.round + 1),
                        {"session": self.stamp.session, "aggregation": self.session.state_dict()})
        self.folder.keep_checkpoints_from(envelope.round)
        return {"tree_head": self.audit.tree_head()}

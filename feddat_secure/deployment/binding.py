"""Binding network nodes to roster parties: which Flower node is which site (or the key holder).

A Flower node id says nothing about who runs the node, and with node authentication off anyone who reaches
the SuperLink can connect a node. So at the start of a run the server sends every connected node a signed
``bind`` request (the run's session id, the node id, a fresh nonce) and only a node whose reply is signed
by a roster party's Ed25519 identity, for this session, echoing that node id and nonce, is bound to that
party. The party's agent signs only the node id its own relay reports, so a node cannot pass off another
party's binding as its own. With node authentication on, the name the node's key was registered under must
also be that party's id. Everything else is refused, and every decision is in the server's audit log.
"""

from __future__ import annotations

import secrets

from protocols import Identity, MessageRejected, Roster
from protocols.wire import Envelope, decode, encode

BIND_PROTOCOL = "feddat-bind"
BIND, BOUND = "bind", "bound"
MAX_BIND_BYTES = 1 << 12


def bind_request(identity: Identity, roster: Roster, *, session: str, node_id: int) -> tuple[bytes, str]:
    """The server's signed bind request to the node ``node_id``, and the nonce the reply must echo."""
    nonce = secrets.token_hex(16)
    envelope = Envelope(BIND_PROTOCOL, 0, BIND, identity.party_id, f"node-{node_id}",
                        {"node_id": str(node_id), "nonce": nonce}, session=session, roster=roster.digest)
    return encode(envelope, identity), nonce


def answer_bind(data: bytes, identity: Identity, roster: Roster, *, relayed_node_id: int) -> bytes:
    """A party's signed answer to a bind request that reached it through its relay on node ``relayed_node_id``;
    MessageRejected for a request not signed by the roster's server or naming another node."""
    request = decode(data, roster, session=None, max_bytes=MAX_BIND_BYTES)
    if request.protocol != BIND_PROTOCOL or request.stage != BIND or request.sender != roster.server_id:
        raise MessageRejected("not a bind request of the roster's server", request.sender)
    if request.fields.get("node_id") != str(relayed_node_id) or request.recipient != f"node-{relayed_node_id}":
        raise MessageRejected(f"a bind request for node {request.fields.get('node_id')!r} reached node "
                              f"{relayed_node_id}", request.sender)
    nonce = request.fields.get("nonce")
    if not isinstance(nonce, str) or len(nonce) != 32:
        raise MessageRejected("a bind request needs a 32-character nonce", request.sender)
    reply = Envelope(BIND_PROTOCOL, 0, BOUND, identity.party_id, request.sender,
                     {"node_id": str(relayed_node_id), "nonce": nonce}, session=request.session, roster=roster.digest)
    return encode(reply, identity)


def check_bound(data: bytes, roster: Roster, *, server_id: str, session: str, node_id: int, nonce: str,
                registered_name: str | None) -> str:
    """The party a node's bind reply proves it runs; MessageRejected naming the problem otherwise.
    ``registered_name``: the name the node's key was registered under (node authentication on), else None."""
    reply = decode(data, roster, session=session, max_bytes=MAX_BIND_BYTES)
    if reply.protocol != BIND_PROTOCOL or reply.stage != BOUND or reply.recipient != server_id:
        raise MessageRejected("not a bind reply to this server", reply.sender)
    if reply.sender == server_id:
        raise MessageRejected("the server's own identity cannot run a node", reply.sender)
    if reply.fields != {"node_id": str(node_id), "nonce": nonce}:
        raise MessageRejected(f"the bind reply does not echo node {node_id} and the server's nonce", reply.sender)
    if registered_name is not None and registered_name != reply.sender:
        raise MessageRejected(f"node {node_id} is registered as {registered_name!r} but signs as {reply.sender!r}",
                              reply.sender)
    return reply.sender

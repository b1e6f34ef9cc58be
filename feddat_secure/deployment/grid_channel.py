"""The Flower wiring of the server's channel: requests pushed to network nodes through a Flower ``Grid``.

:class:`GridChannel` is the same :class:`~feddat_secure.federation.channel.Channel` the simulation wires in
memory, over Flower 1.42's ServerApp ``Grid``: every party's requests of one exchange travel in one Flower
message to the node bound to that party (:func:`bind_nodes`), whose relay ClientApp hands them to the party's
agent; the replies are pulled with a short poll until the stage's deadline. A party whose node is gone,
whose relay reports an error code, or that has not answered by the deadline has dropped out of the stage,
which is what the protocols' dropout handling expects. Message content is bytes only (signed envelopes and
an error code): nothing of a party's state crosses the network any other way.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict

from protocols import MessageRejected, Outgoing

from ..federation.channel import PartyAudit, Reply
from . import relay
from .binding import bind_request, check_bound
from .party_dir import DeploymentError

RECORD = "feddat"  # the one record of every message's content
MESSAGE_TYPE = "query.feddat"  # the relay ClientApp's handler
POLL_S = 0.2  # between pulls of replies (Flower's own send_and_receive sleeps 3 s; a pull is an HTTP request)
NODE_CHECK_S = 1.0  # between checks that the nodes waited for are still connected
BIND_RETRY_S = 5.0  # a node whose agent was not reachable yet is asked again after this long
TRANSIENT_BIND_FAILURES = ("no-answer", "agent-unreachable", "agent-timeout", "node-error")


def request_message(kind: bytes, payloads: Sequence[bytes], node_id: int, deadline_s: float) -> Message:
    content = RecordDict({RECORD: ConfigRecord({"kind": kind.decode(), "requests": list(payloads),
                                                "deadline_s": float(deadline_s)})})
    return Message(content, dst_node_id=node_id, message_type=MESSAGE_TYPE)


def reply_parts(message: Message) -> list[bytes] | str:
    """The agent's reply parts a relay's reply carries, or its error code (a string)."""
    if message.has_error():
        return "node-error"
    try:
        record = message.content[RECORD]
        if "error" in record:
            code = str(record["error"])
            return code if code in relay.ERROR_CODES else "bad-frame"
        parts = record.get("parts", [])
    except (KeyError, TypeError, ValueError):
        return "bad-frame"
    if not isinstance(parts, list) or not all(isinstance(part, bytes) for part in parts):
        return "bad-frame"  # never bytes(part) of a number a hostile node sends: bytes(1 << 62) is a MemoryError
    return parts


def push_and_pull(grid, messages: Mapping[str, Message], deadline_s: float,
                  enough: Callable[[Mapping[str, Message]], bool] = lambda replies: False) -> dict[str, Message]:
    """Push one message per key and pull the replies until all are in, ``deadline_s`` passed, the replies so far
    are ``enough``, or the nodes still waited for have left the federation (a node the SuperLink no longer lists
    cannot answer: waiting for it would only run out the deadline)."""
    if not messages:
        return {}
    online = set(grid.get_node_ids())
    keys = [key for key in messages if messages[key].metadata.dst_node_id in online]
    ids = list(grid.push_messages([messages[key] for key in keys]))
    by_id = {message_id: key for message_id, key in zip(ids, keys) if message_id}  # "": the SuperLink refused it
    replies: dict[str, Message] = {}
    stop = time.monotonic() + deadline_s
    next_check = time.monotonic() + NODE_CHECK_S
    while len(replies) < len(by_id) and time.monotonic() < stop:
        waiting = [message_id for message_id, key in by_id.items() if key not in replies]
        for reply in grid.pull_messages(waiting):
            key = by_id.get(reply.metadata.reply_to_message_id)
            if key is not None and key not in replies:
                replies[key] = reply
        if enough(replies):
            break
        if len(replies) < len(by_id):
            if time.monotonic() > next_check:
                online = set(grid.get_node_ids())
                by_id = {message_id: key for message_id, key in by_id.items()
                         if key in replies or messages[key].metadata.dst_node_id in online}
                next_check = time.monotonic() + NODE_CHECK_S
            time.sleep(POLL_S)
    return replies


@dataclass
class GridChannel:
    """The server's channel to the parties' nodes. ``nodes``: party id → the Flower node bound to it."""

    grid: object  # flwr.serverapp.Grid
    nodes: dict[str, int] = field(default_factory=dict)
    # the most messages a party may answer one request with; no party sends more than one per other party and
    # one to the server (the HE key holder's setup: a context per site), so the server sets the roster's size
    max_answers: int = 1024
    on_error: Callable[[str, str], None] = lambda party, code: None  # (party, error code) of a failed relay

    def exchange(self, requests: Sequence[Outgoing], *, deadline_s: float) -> list[Reply]:
        batches: dict[str, list[int]] = defaultdict(list)  # party → indices of its requests, in order
        for index, request in enumerate(requests):
            batches[request.recipient].append(index)
        # each request's bytes read once, in the order given: the HE server relays a spooled input to every member
        # in turn, read from its file when asked for, and consecutive reads of one file share one bytes object
        payloads = [request.data for request in requests]
        messages = {party: request_message(relay.KIND_MESSAGES, [payloads[i] for i in indices],
                                           self.nodes[party], deadline_s)
                    for party, indices in batches.items() if party in self.nodes}
        pulled = push_and_pull(self.grid, messages, deadline_s)
        answers: dict[int, tuple[Outgoing, ...] | None] = {}
        for party, indices in batches.items():
            message = pulled.get(party)
            parts = reply_parts(message) if message is not None else None
            if not isinstance(parts, list):
                if isinstance(parts, str):
                    self.on_error(party, parts)
                answers.update({index: None for index in indices})
                continue
            grouped = _grouped(parts, len(indices), self.max_answers)
            if grouped is None:
                self.on_error(party, "bad-frame")
                answers.update({index: None for index in indices})
                continue
            answers.update({index: tuple(grouped[position]) for position, index in enumerate(indices)})
        return [Reply(request.recipient, answers[index]) for index, request in enumerate(requests)]


def _grouped(parts: list[bytes], count: int, max_answers: int) -> list[list[Outgoing]] | None:
    """The agent's (index, recipient, data) triples as the messages answering each of ``count`` requests; None
    for anything else, or for more than ``max_answers`` messages answering one request (checked before any is
    read: a flood of messages must not cost the server a signature check and log entries each)."""
    if len(parts) % 3 or len(parts) > 3 * count * max_answers:
        return None
    grouped: list[list[Outgoing]] = [[] for _ in range(count)]
    for start in range(0, len(parts), 3):
        try:
            index = int(parts[start].decode("ascii"))
            recipient = parts[start + 1].decode("ascii")
        except (UnicodeDecodeError, ValueError):
            return None
        if not 0 <= index < count or len(grouped[index]) >= max_answers:
            return None
        grouped[index].append(Outgoing(recipient, parts[start + 2]))
    return grouped


def bind_nodes(grid, *, identity, roster, session: str, parties: Sequence[str], audit: PartyAudit,
               join_timeout_s: float, bind_deadline_s: float, node_auth: bool,
               echo: Callable[[str], None] = print) -> dict[str, int]:
    """Bind every party in ``parties`` to the node that proves it runs it (:mod:`.binding`), waiting up to
    ``join_timeout_s`` for their nodes to connect. A node that answers with a proof that does not bind it to a
    wanted party (unknown, a second node for a bound party, a registered name that differs, a bad signature,
    an agent that refuses) is refused for good; one whose agent could not be reached or did not answer (a
    SuperNode that started before its agent) is asked again every :data:`BIND_RETRY_S` seconds. Every refusal
    is recorded in ``audit`` (a transient one once per node). DeploymentError if a party has no node in time."""
    wanted = set(parties)
    bound: dict[str, int] = {}
    refused: set[int] = set()  # for good
    retry_at: dict[int, float] = {}  # node → when to ask it again
    stop = time.monotonic() + join_timeout_s
    while wanted - set(bound):
        if time.monotonic() > stop:
            missing = ", ".join(sorted(wanted - set(bound)))
            raise DeploymentError(f"no node proved to run {missing} within {join_timeout_s:g} s (the server's audit "
                                  "log lists every node it refused)")
        infos = {info.node_id: info for info in grid.get_nodes()}
        now = time.monotonic()
        due = [node_id for node_id in infos if node_id not in refused and node_id not in bound.values()
               and retry_at.get(node_id, 0.0) <= now]
        if not due:
            time.sleep(0.5)
            continue
        pulled, proofs = _ask_to_bind(grid, due, infos, identity=identity, roster=roster, session=session,
                                      node_auth=node_auth, bind_deadline_s=bind_deadline_s, enough=wanted - set(bound))
        for node_id in due:
            message = pulled.get(str(node_id))
            parts = reply_parts(message) if message is not None else "no-answer"
            if parts in TRANSIENT_BIND_FAILURES:
                if node_id not in retry_at:
                    reason = f"no bind reply ({parts}); asking again"
                    audit.event("node_refused", meta={"node_id": str(node_id), "reason": reason})
                    echo(f"feddat-secure: refused node {node_id}: {reason}")
                retry_at[node_id] = time.monotonic() + BIND_RETRY_S
                continue
            try:
                party = proofs[node_id]
                if isinstance(party, MessageRejected):
                    raise party
                if party not in wanted:
                    raise MessageRejected(f"{party!r} takes no part in this run", party)
                if party in bound:
                    raise MessageRejected(f"{party!r} is bound to node {bound[party]} already", party)
            except MessageRejected as rejection:
                refused.add(node_id)
                audit.event("node_refused", meta={"node_id": str(node_id), "reason": rejection.reason[:256]})
                echo(f"feddat-secure: refused node {node_id}: {rejection.reason}")
                continue
            bound[party] = node_id
            audit.event("node_bound", peer=party, meta={"node_id": str(node_id)})
            echo(f"feddat-secure: node {node_id} is {party}")
    return bound


def _ask_to_bind(grid, nodes: Sequence[int], infos: Mapping[int, object], *, identity, roster, session: str,
                 node_auth: bool, bind_deadline_s: float, enough: set[str]) -> tuple[dict[str, Message],
                                                                                    dict[int, str | MessageRejected]]:
    """Send each of ``nodes`` a bind request and collect the replies until every party in ``enough`` has proven
    its node (a silent node then holds up nobody) or the deadline passed. Returns the replies (by node id as a
    string) and, for each node that replied, the party it proved or why its proof was refused."""
    nonces, messages = {}, {}
    for node_id in nodes:
        data, nonces[node_id] = bind_request(identity, roster, session=session, node_id=node_id)
        messages[str(node_id)] = request_message(relay.KIND_BIND, [data], node_id, bind_deadline_s)
    proofs: dict[int, str | MessageRejected] = {}

    def prove(node_id: int, message: Message) -> str | MessageRejected:
        if node_id not in proofs:
            parts = reply_parts(message)
            try:
                if not isinstance(parts, list) or len(parts) != 1:
                    raise MessageRejected(f"no bind reply ({parts if isinstance(parts, str) else 'malformed'})")
                proofs[node_id] = check_bound(parts[0], roster, server_id=identity.party_id, session=session,
                                              node_id=node_id, nonce=nonces[node_id],
                                              registered_name=infos[node_id].name if node_auth else None)
            except MessageRejected as rejection:
                proofs[node_id] = rejection
        return proofs[node_id]

    def proven(replies: Mapping[str, Message]) -> bool:
        return enough <= {prove(int(key), message) for key, message in replies.items()}

    pulled = push_and_pull(grid, messages, bind_deadline_s, enough=proven)
    for key, message in pulled.items():
        prove(int(key), message)
    return pulled, proofs

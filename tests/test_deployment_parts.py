"""The deployment's parts, each on its own and without any Flower process: the relay's framing and call, binding
Flower nodes to roster parties (played by an attacker), the server's channel over a Flower Grid (an in-memory one
with Flower's real Message classes), a party folder's agreement and settings, and the agent's socket."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import stat
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from conftest import small_config
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity

from audits import AuditLog
from feddat_secure.deployment import grid_channel, relay
from feddat_secure.deployment.agent import _listen
from feddat_secure.deployment.binding import BIND_PROTOCOL, BOUND, answer_bind, bind_request, check_bound
from feddat_secure.deployment.grid_channel import RECORD, GridChannel, bind_nodes
from feddat_secure.deployment.party_dir import (
    FEDERATION_FILE,
    Agreement,
    DeploymentError,
    load_agreement,
    private_folder,
)
from feddat_secure.deployment.server_role import ServerRoleSettings, parse_deadlines
from feddat_secure.federation.channel import PartyAudit, Reply
from protocols import Identity, MessageRejected, Outgoing, Roster
from protocols.wire import Envelope, encode, new_session_id, peek

# --- 1. the relay: framing, one call, error codes ----------------------------------------------------------------

@pytest.mark.parametrize("parts", [[], [b""], [b"a", bytes(range(256)) * 3, b""]])
def test_a_frame_gives_back_exactly_the_parts_it_was_packed_from(parts):
    assert relay.unpack(relay.pack(parts)) == parts


def test_every_truncation_of_a_frame_is_a_bad_frame():
    frame = relay.pack([b"abc", b"", b"defg"])
    for cut in range(len(frame)):
        with pytest.raises(relay.RelayError, match="^bad-frame$"):
            relay.unpack(frame[:cut])


def test_bytes_after_the_last_part_are_a_bad_frame():
    with pytest.raises(relay.RelayError, match="^bad-frame$"):
        relay.unpack(relay.pack([b"abc"]) + b"\0")


def test_more_parts_than_allowed_are_refused_when_packing_and_when_unpacking():
    with pytest.raises(relay.RelayError, match="^bad-frame$"):
        relay.pack([b""] * (relay.MAX_PARTS + 1))
    # a frame that announces too many parts is refused from its count alone
    with pytest.raises(relay.RelayError, match="^bad-frame$"):
        relay.unpack(struct.pack(">I", relay.MAX_PARTS + 1) + struct.pack(">I", 0) * (relay.MAX_PARTS + 1))


def test_an_oversized_frame_is_refused_from_its_length_prefix_before_its_body_is_read():
    sender, receiver = socket.socketpair()
    with sender, receiver:
        receiver.settimeout(2)  # would block here (and fail with a timeout) if the body were awaited
        sender.sendall(struct.pack(">I", 1024))
        with pytest.raises(relay.RelayError, match="^bad-frame$"):
            relay.receive_frame(receiver, max_bytes=1023)


def test_a_frame_cut_short_by_the_peer_closing_is_a_bad_frame():
    sender, receiver = socket.socketpair()
    with receiver:
        with sender:
            sender.sendall(struct.pack(">I", 100) + b"only a few bytes")
        with pytest.raises(relay.RelayError, match="^bad-frame$"):
            relay.receive_frame(receiver)


def test_an_error_code_outside_the_list_becomes_internal_so_no_free_text_crosses_the_relay():
    error = relay.RelayError("Traceback (most recent call last): secret key 0x1234")
    assert error.code == "internal" and str(error) == "internal"
    assert relay.RelayError("refused").code == "refused"


@contextlib.contextmanager
def fake_agent(path: Path, answer: Callable[[list[bytes]], list[bytes] | None]) -> Iterator[list[list[bytes]]]:
    """An agent on ``path`` that takes one request and answers ``answer(parts)`` (None: never answers).
    Yields the request frames it received."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    received: list[list[bytes]] = []
    release = threading.Event()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            parts = relay.receive_frame(connection)
            received.append(parts)
            reply = answer(parts)
            if reply is None:
                release.wait(10)
            else:
                relay.send_frame(connection, reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield received
    finally:
        release.set()
        thread.join(10)
        listener.close()


def test_a_call_sends_magic_kind_node_id_and_payloads_and_returns_the_parts_of_an_ok_reply(short_dir):
    path = short_dir / "agent.sock"
    with fake_agent(path, lambda parts: [b"ok", b"answer", b""]) as received:
        parts = relay.call(str(path), relay.KIND_MESSAGES, 42, [b"first", b"second"], timeout_s=5)
    assert parts == [b"answer", b""]
    assert received == [[relay.MAGIC, b"messages", b"42", b"first", b"second"]]


@pytest.mark.parametrize(("reply", "code"), [
    ([b"error", b"refused"], "refused"),
    ([b"error", b"closed"], "closed"),
    ([b"error", b"ValueError: the key file /secret/identity.pem"], "internal"),
    ([], "bad-frame"),
    ([b"fine"], "bad-frame"),
    ([b"error"], "bad-frame"),
    ([b"error", b"refused", b"more"], "bad-frame"),
])
def test_an_agent_reply_other_than_ok_comes_back_as_one_error_code(short_dir, reply, code):
    path = short_dir / "agent.sock"
    with fake_agent(path, lambda parts: reply), pytest.raises(relay.RelayError) as raised:
        relay.call(str(path), relay.KIND_PING, 1, [], timeout_s=5)
    assert raised.value.code == code


def test_a_call_to_a_socket_nobody_serves_is_agent_unreachable(short_dir):
    with pytest.raises(relay.RelayError, match="^agent-unreachable$"):
        relay.call(str(short_dir / "missing.sock"), relay.KIND_PING, 1, [], timeout_s=1)


def test_an_agent_that_never_answers_is_agent_timeout_at_the_deadline(short_dir):
    path = short_dir / "agent.sock"
    with fake_agent(path, lambda parts: None):
        start = time.monotonic()
        with pytest.raises(relay.RelayError, match="^agent-timeout$"):
            relay.call(str(path), relay.KIND_MESSAGES, 1, [b"request"], timeout_s=0.3)
        assert 0.25 <= time.monotonic() - start < 1.5


# --- 2. binding Flower nodes to roster parties -------------------------------------------------------------------

@pytest.fixture(scope="module")
def parties() -> dict[str, Identity]:
    """Real Ed25519 identities: the roster's server and sites, and an outsider enrolled nowhere."""
    return {name: Identity.generate(name) for name in ("server", "site-a", "site-b", "site-c", "mallory")}


@pytest.fixture(scope="module")
def roster(parties: dict[str, Identity]) -> Roster:
    return Roster.from_identities(parties["server"], [parties[s] for s in ("site-a", "site-b", "site-c")])


def genuine_reply(parties: dict[str, Identity], roster: Roster, *, session: str, node_id: int,
                  party: str = "site-a") -> tuple[bytes, str]:
    """The server's bind request to ``node_id`` answered by ``party``'s agent through its own relay on that node;
    returns the reply and the nonce the server expects."""
    request, nonce = bind_request(parties["server"], roster, session=session, node_id=node_id)
    return answer_bind(request, parties[party], roster, relayed_node_id=node_id), nonce


def check(data: bytes, roster: Roster, *, session: str, node_id: int, nonce: str, registered: str | None = None) -> str:
    return check_bound(data, roster, server_id="server", session=session, node_id=node_id, nonce=nonce,
                       registered_name=registered)


def forged_reply(identity: Identity, roster: Roster, *, session: str, node_id: int, nonce: str,
                 sender: str | None = None) -> bytes:
    """A bind reply written by hand (every field the attacker's choice) and signed with ``identity``'s key, under
    ``sender``'s name when given (an impostor's claim)."""
    signer = Identity(sender or identity.party_id, identity.private_key)
    envelope = Envelope(BIND_PROTOCOL, 0, BOUND, signer.party_id, "server", {"node_id": str(node_id), "nonce": nonce},
                        session=session, roster=roster.digest)
    return encode(envelope, signer)


def test_a_genuine_bind_reply_proves_the_party_and_with_node_authentication_its_registered_name(parties, roster):
    session = new_session_id()
    reply, nonce = genuine_reply(parties, roster, session=session, node_id=7)
    assert check(reply, roster, session=session, node_id=7, nonce=nonce) == "site-a"
    assert check(reply, roster, session=session, node_id=7, nonce=nonce, registered="site-a") == "site-a"


def test_a_reply_signed_for_another_node_id_is_refused(parties, roster):
    session = new_session_id()
    _, nonce = bind_request(parties["server"], roster, session=session, node_id=7)
    forged = forged_reply(parties["site-a"], roster, session=session, node_id=8, nonce=nonce)
    with pytest.raises(MessageRejected, match="does not echo node 7"):
        check(forged, roster, session=session, node_id=7, nonce=nonce)


def test_a_node_relaying_another_nodes_genuine_bind_reply_is_refused(parties, roster):
    """Node 20 (the attacker's) hands in site-a's genuine answer to node 11's request as its own."""
    session = new_session_id()
    site_a_reply, _ = genuine_reply(parties, roster, session=session, node_id=11)
    _, nonce_20 = bind_request(parties["server"], roster, session=session, node_id=20)
    with pytest.raises(MessageRejected, match="does not echo node 20"):
        check(site_a_reply, roster, session=session, node_id=20, nonce=nonce_20)


def test_a_reply_echoing_another_nonce_is_refused(parties, roster):
    """A reply to an earlier request (an older nonce) cannot answer a later one for the same node."""
    session = new_session_id()
    old_reply, _ = genuine_reply(parties, roster, session=session, node_id=7)
    _, new_nonce = bind_request(parties["server"], roster, session=session, node_id=7)
    with pytest.raises(MessageRejected, match="does not echo node 7 and the server's nonce"):
        check(old_reply, roster, session=session, node_id=7, nonce=new_nonce)


def test_a_reply_of_another_session_is_refused(parties, roster):
    old_session, session = new_session_id(), new_session_id()
    old_reply, nonce = genuine_reply(parties, roster, session=old_session, node_id=7)
    with pytest.raises(MessageRejected, match="replayed from another run"):
        check(old_reply, roster, session=session, node_id=7, nonce=nonce)


def test_a_reply_signed_by_a_key_not_on_the_roster_is_refused(parties, roster):
    session = new_session_id()
    _, nonce = bind_request(parties["server"], roster, session=session, node_id=7)
    outsider = forged_reply(parties["mallory"], roster, session=session, node_id=7, nonce=nonce)
    with pytest.raises(MessageRejected, match="unknown sender 'mallory': not on the roster"):
        check(outsider, roster, session=session, node_id=7, nonce=nonce)
    impostor = forged_reply(parties["mallory"], roster, session=session, node_id=7, nonce=nonce, sender="site-a")
    with pytest.raises(MessageRejected, match="bad signature from 'site-a'"):
        check(impostor, roster, session=session, node_id=7, nonce=nonce)


def test_the_servers_own_identity_cannot_run_a_node(parties, roster):
    session = new_session_id()
    _, nonce = bind_request(parties["server"], roster, session=session, node_id=7)
    own = forged_reply(parties["server"], roster, session=session, node_id=7, nonce=nonce)
    with pytest.raises(MessageRejected, match="server's own identity cannot run a node"):
        check(own, roster, session=session, node_id=7, nonce=nonce)


def test_with_node_authentication_a_reply_from_another_party_than_the_registered_name_is_refused(parties, roster):
    session = new_session_id()
    reply, nonce = genuine_reply(parties, roster, session=session, node_id=7)
    with pytest.raises(MessageRejected, match="node 7 is registered as 'site-b' but signs as 'site-a'"):
        check(reply, roster, session=session, node_id=7, nonce=nonce, registered="site-b")


def test_an_agent_answers_only_bind_requests_signed_by_the_rosters_server(parties, roster):
    session = new_session_id()
    request, _ = bind_request(parties["site-b"], roster, session=session, node_id=7)  # a site posing as server
    with pytest.raises(MessageRejected, match="not a bind request of the roster's server"):
        answer_bind(request, parties["site-a"], roster, relayed_node_id=7)
    request, _ = bind_request(parties["mallory"], roster, session=session, node_id=7)  # not enrolled at all
    with pytest.raises(MessageRejected, match="unknown sender 'mallory'"):
        answer_bind(request, parties["site-a"], roster, relayed_node_id=7)


def test_an_agent_refuses_a_bind_request_for_another_node_than_the_one_its_relay_runs_on(parties, roster):
    """The attacker's node 20 forwards the server's request for node 20 to site-a's agent: site-a's relay runs on
    node 11, so the agent will not sign a binding of node 20."""
    request, _ = bind_request(parties["server"], roster, session=new_session_id(), node_id=20)
    with pytest.raises(MessageRejected, match="a bind request for node '20' reached node 11"):
        answer_bind(request, parties["site-a"], roster, relayed_node_id=11)


# --- 3. the server's channel over a Flower Grid ------------------------------------------------------------------

@pytest.fixture(autouse=True)
def serverapp_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ServerApp's process before its code runs; Flower's Message needs it."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 3)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


Node = Callable[[Message], "Message | None"]  # a node's answer to a pushed message (None: it never answers)


class FakeGrid:
    """Flower's ServerApp ``Grid`` in memory: nodes that connect and leave at given times and answer pushed
    messages with real Flower replies (``Message(content, reply_to=request)``)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.nodes: dict[int, tuple[Node, str, float, float]] = {}  # id → (answer, registered name, join, leave)
        self.pushed: list[Message] = []
        self._replies: dict[str, Message] = {}

    def add(self, node_id: int, answer: Node, *, name: str = "", join_after_s: float = 0.0,
            leave_after_s: float = float("inf")) -> None:
        self.nodes[node_id] = (answer, name, join_after_s, leave_after_s)

    def get_node_ids(self) -> list[int]:
        now = time.monotonic() - self.start
        return [node_id for node_id, (_, _, join, leave) in sorted(self.nodes.items()) if join <= now < leave]

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=node_id, name=self.nodes[node_id][1]) for node_id in self.get_node_ids()]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's own grids do on push
            self.pushed.append(message)
            reply = self.nodes[message.metadata.dst_node_id][0](message)
            if reply is not None:
                self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(message_id) for message_id in list(message_ids) if message_id in self._replies]

    def sent_to(self, node_id: int) -> list[Message]:
        return [message for message in self.pushed if message.metadata.dst_node_id == node_id]


def relay_reply(request: Message, **values: object) -> Message:
    """A relay ClientApp's reply: ``parts=[...]`` (the agent's) or ``error=code``."""
    return Message(RecordDict({RECORD: ConfigRecord(values)}), reply_to=request)


def echoing(request: Message) -> Message:
    """A party that answers request i with one message to the server: b"re:" + the request."""
    parts: list[bytes] = []
    for index, data in enumerate(request.content[RECORD]["requests"]):
        parts += [str(index).encode(), b"server", b"re:" + data]
    return relay_reply(request, parts=parts)


def silent(request: Message) -> None:
    """A node that never answers (its agent hangs, or the node is cut off without leaving)."""
    return None


def test_requests_to_one_party_travel_in_one_message_and_each_gets_its_own_reply_in_order():
    grid = FakeGrid()
    grid.add(11, echoing)
    grid.add(12, echoing)
    channel = GridChannel(grid, nodes={"site-a": 11, "site-b": 12})
    requests = [Outgoing("site-a", b"a1"), Outgoing("site-b", b"b1"), Outgoing("site-a", b"a2")]
    replies = channel.exchange(requests, deadline_s=5)
    assert [(m.metadata.dst_node_id, m.metadata.message_type, m.content[RECORD]["kind"],
             m.content[RECORD]["requests"]) for m in grid.pushed] == [
        (11, "query.feddat", "messages", [b"a1", b"a2"]), (12, "query.feddat", "messages", [b"b1"])]
    assert replies == [Reply("site-a", (Outgoing("server", b"re:a1"),)),
                       Reply("site-b", (Outgoing("server", b"re:b1"),)),
                       Reply("site-a", (Outgoing("server", b"re:a2"),))]


def test_a_request_answered_with_nothing_is_answered_not_dropped_and_one_may_get_several_messages():
    grid = FakeGrid()
    grid.add(11, lambda request: relay_reply(request, parts=[b"1", b"server", b"x", b"1", b"site-b", b"y"]))
    channel = GridChannel(grid, nodes={"site-a": 11})
    replies = channel.exchange([Outgoing("site-a", b"first"), Outgoing("site-a", b"second")], deadline_s=5)
    assert replies == [Reply("site-a", ()), Reply("site-a", (Outgoing("server", b"x"), Outgoing("site-b", b"y")))]
    assert not replies[0].dropped


def test_a_party_that_does_not_answer_by_the_deadline_has_dropped_out_and_the_call_returns_at_the_deadline():
    grid = FakeGrid()
    grid.add(11, echoing)
    grid.add(12, silent)
    channel = GridChannel(grid, nodes={"site-a": 11, "site-b": 12})
    start = time.monotonic()
    replies = channel.exchange([Outgoing("site-a", b"a"), Outgoing("site-b", b"b")], deadline_s=0.4)
    elapsed = time.monotonic() - start
    assert replies == [Reply("site-a", (Outgoing("server", b"re:a"),)), Reply("site-b", None)]
    assert 0.4 <= elapsed < 0.4 + 0.3


def test_a_node_that_leaves_the_federation_is_given_up_before_the_deadline(monkeypatch):
    monkeypatch.setattr(grid_channel, "NODE_CHECK_S", 0.05)  # how often the server asks which nodes are still there
    grid = FakeGrid()
    grid.add(11, echoing)
    grid.add(12, silent, leave_after_s=0.2)
    channel = GridChannel(grid, nodes={"site-a": 11, "site-b": 12})
    start = time.monotonic()
    replies = channel.exchange([Outgoing("site-a", b"a"), Outgoing("site-b", b"b")], deadline_s=10)
    assert time.monotonic() - start < 1.5
    assert [reply.dropped for reply in replies] == [False, True]


def test_a_node_already_gone_is_sent_nothing_and_not_waited_for():
    grid = FakeGrid()
    grid.add(12, silent, leave_after_s=0.0)
    channel = GridChannel(grid, nodes={"site-b": 12})
    start = time.monotonic()
    assert channel.exchange([Outgoing("site-b", b"b")], deadline_s=10) == [Reply("site-b", None)]
    assert time.monotonic() - start < 0.5 and grid.pushed == []


def test_a_party_without_a_bound_node_has_dropped_out():
    channel = GridChannel(FakeGrid(), nodes={})
    assert channel.exchange([Outgoing("site-a", b"a")], deadline_s=5) == [Reply("site-a", None)]


@pytest.mark.parametrize(("answer", "code"), [
    (lambda request: relay_reply(request, error="refused"), "refused"),
    (lambda request: relay_reply(request, error="agent-timeout"), "agent-timeout"),
    (lambda request: relay_reply(request, error="Traceback: secret"), "bad-frame"),  # not a code: never echoed
    (lambda request: Message(Error(0, "node unreachable"), reply_to=request), "node-error"),
])
def test_a_relay_error_or_a_flower_error_reply_drops_the_party_and_reports_the_code(answer, code):
    grid = FakeGrid()
    grid.add(11, answer)
    grid.add(12, echoing)
    errors: list[tuple[str, str]] = []
    channel = GridChannel(grid, nodes={"site-a": 11, "site-b": 12}, on_error=lambda *error: errors.append(error))
    replies = channel.exchange([Outgoing("site-a", b"a"), Outgoing("site-b", b"b")], deadline_s=5)
    assert replies == [Reply("site-a", None), Reply("site-b", (Outgoing("server", b"re:b"),))]
    assert errors == [("site-a", code)]


@pytest.mark.parametrize("parts", [
    [b"0", b"server"],  # not triples
    [b"1", b"server", b"x"],  # an index past the party's one request
    [b"-1", b"server", b"x"],
    [b"zero", b"server", b"x"],
    [b"0", b"\xff", b"x"],  # a recipient that is not ASCII
    [1 << 62],  # not bytes: a number a hostile relay may put in a ConfigRecord list
    "parts",  # not a list
])
def test_malformed_parts_drop_the_party_as_a_bad_frame(parts):
    grid = FakeGrid()
    grid.add(11, lambda request: relay_reply(request, parts=parts))
    grid.add(12, echoing)
    errors: list[tuple[str, str]] = []
    channel = GridChannel(grid, nodes={"site-a": 11, "site-b": 12}, on_error=lambda *error: errors.append(error))
    replies = channel.exchange([Outgoing("site-a", b"a"), Outgoing("site-b", b"b")], deadline_s=5)
    assert replies == [Reply("site-a", None), Reply("site-b", (Outgoing("server", b"re:b"),))]
    assert errors == [("site-a", "bad-frame")]


# --- bind_nodes: which node is which party, against the fake Grid ------------------------------------------------

def agent(identity: Identity, roster: Roster) -> Node:
    """A node whose relay reaches ``identity``'s agent: it answers a bind request as ``PartyAgent.handle`` does,
    signing only the node id its own relay runs on, and answers ``refused`` to a request it will not sign."""
    def answer(request: Message) -> Message:
        record = request.content[RECORD]
        assert record["kind"] == "bind"
        try:
            signed = answer_bind(record["requests"][0], identity, roster,
                                 relayed_node_id=request.metadata.dst_node_id)
        except MessageRejected:
            return relay_reply(request, error="refused")
        return relay_reply(request, parts=[signed])
    return answer


@pytest.fixture
def server_audit(tmp_path, parties, roster) -> Iterator[tuple[PartyAudit, Path]]:
    """The server's real audit log, and its path."""
    path = tmp_path / "server.audit.jsonl"
    log = AuditLog.create(path, "server", parties["server"].private_key)
    yield PartyAudit(log, {entry.party_id: entry.public_key for entry in roster.entries}), path
    if not log.closed:
        log.close()


def recorded(path: Path, event: str) -> list[dict]:
    return [entry for entry in map(json.loads, path.read_text().splitlines()) if entry["event"] == event]


def bind(grid: FakeGrid, parties: dict[str, Identity], roster: Roster, audit: PartyAudit,
         wanted: Iterable[str] = ("site-a", "site-b"), *, join_timeout_s: float = 3.0, node_auth: bool = False,
         echoed: list[str] | None = None) -> dict[str, int]:
    return bind_nodes(grid, identity=parties["server"], roster=roster, session=new_session_id(), parties=list(wanted),
                      audit=audit, join_timeout_s=join_timeout_s, bind_deadline_s=0.3, node_auth=node_auth,
                      echo=(echoed if echoed is not None else []).append)


def test_each_party_is_bound_to_the_node_that_proves_it_runs_it_and_the_binding_is_audited(parties, roster,
                                                                                          server_audit):
    audit, path = server_audit
    grid = FakeGrid()
    grid.add(11, agent(parties["site-b"], roster))
    grid.add(12, agent(parties["site-a"], roster))
    assert bind(grid, parties, roster, audit) == {"site-a": 12, "site-b": 11}
    assert sorted((entry["peer"], entry["meta"]["node_id"]) for entry in recorded(path, "node_bound")) == [
        ("site-a", "12"), ("site-b", "11")]
    assert recorded(path, "node_refused") == []


INTRUDERS = {
    "a roster party that takes no part in this run": (lambda p, r: agent(p["site-c"], r), "'site-c' takes no part"),
    "a party not on the roster": (lambda p, r: agent(p["mallory"], r), "unknown sender 'mallory'"),
    "a second node for a party already bound": (lambda p, r: agent(p["site-a"], r), "'site-a' is bound to node 11"),
    "a node that does not answer": (lambda p, r: silent, r"no bind reply \(no-answer\); asking again"),
    "a node whose agent refuses": (lambda p, r: lambda request: relay_reply(request, error="refused"),
                                   r"no bind reply \(refused\)"),
    "a node answering another node's genuine reply": (
        lambda p, r: lambda request: relay_reply(request, parts=[genuine_reply(
            p, r, session=session_of(request), node_id=11)[0]]), "does not echo node 13"),
}


def session_of(request: Message) -> str:
    """The session of the bind request in ``request`` (read from its header, as an attacker would)."""
    return peek(request.content[RECORD]["requests"][0]).session


@pytest.mark.parametrize("intruder", list(INTRUDERS))
def test_a_node_that_does_not_prove_a_wanted_unbound_party_is_refused_and_the_refusal_audited(
        parties, roster, server_audit, intruder):
    audit, path = server_audit
    make, reason = INTRUDERS[intruder]
    grid = FakeGrid()
    grid.add(11, agent(parties["site-a"], roster))
    grid.add(12, agent(parties["site-b"], roster))
    grid.add(13, make(parties, roster))
    echoed: list[str] = []
    assert bind(grid, parties, roster, audit, echoed=echoed) == {"site-a": 11, "site-b": 12}
    refused = recorded(path, "node_refused")
    assert [entry["meta"]["node_id"] for entry in refused] == ["13"]
    assert re.search(reason, refused[0]["meta"]["reason"])
    assert any(line.startswith("feddat-secure: refused node 13: ") for line in echoed)


def test_with_node_authentication_a_node_registered_under_another_name_is_refused(parties, roster, server_audit):
    audit, path = server_audit
    grid = FakeGrid()
    grid.add(11, agent(parties["site-a"], roster), name="site-b")  # site-a's agent behind site-b's node key
    grid.add(12, agent(parties["site-a"], roster), name="site-a")
    assert bind(grid, parties, roster, audit, wanted=["site-a"], node_auth=True) == {"site-a": 12}
    refused = recorded(path, "node_refused")
    assert [(e["meta"]["node_id"], e["meta"]["reason"]) for e in refused] == [
        ("11", "node 11 is registered as 'site-b' but signs as 'site-a'")]


def test_a_node_that_joins_later_is_bound_when_it_comes(parties, roster, server_audit):
    audit, _ = server_audit
    grid = FakeGrid()
    grid.add(11, agent(parties["site-a"], roster))
    grid.add(12, agent(parties["site-b"], roster), join_after_s=0.2)
    assert bind(grid, parties, roster, audit) == {"site-a": 11, "site-b": 12}


def test_a_party_without_a_proving_node_by_the_join_timeout_stops_the_run_naming_it(parties, roster, server_audit):
    audit, path = server_audit
    grid = FakeGrid()
    grid.add(11, agent(parties["site-a"], roster))
    grid.add(13, silent)
    start = time.monotonic()
    with pytest.raises(DeploymentError, match=r"^no node proved to run site-b within 0.5 s"):
        bind(grid, parties, roster, audit, join_timeout_s=0.5)
    assert time.monotonic() - start < 2.0
    assert len(grid.sent_to(13)) == 1  # a refused node is asked once, not again and again
    assert [entry["meta"]["node_id"] for entry in recorded(path, "node_refused")] == ["13"]


# --- 4. a party folder's agreement, and the ServerApp's settings -------------------------------------------------

@pytest.fixture
def party_folder(tmp_path) -> Path:
    folder = tmp_path / "site-a"
    folder.mkdir(mode=0o700)
    Agreement(small_config(tmp_path), {"site-0": 32, "site-1": 32}, ("yes", "no")).save(folder)
    return folder


def write_facts(folder: Path, facts: object) -> None:
    (folder / FEDERATION_FILE).write_text(facts if isinstance(facts, str) else json.dumps(facts))


def test_a_saved_agreement_loads_back_as_it_was(tmp_path, party_folder):
    agreement = load_agreement(party_folder)
    assert agreement.sites == {"site-0": 32, "site-1": 32} and agreement.answers == ("yes", "no")
    assert agreement.config == small_config(tmp_path)


GOOD_FACTS = {"format": "feddat-secure-federation/1", "sites": {"site-0": 32}, "answers": ["yes", "no"]}


@pytest.mark.parametrize(("facts", "problem"), [
    (None, "federation.json does not exist"),
    ("{\"format\": ", "federation.json is not valid JSON"),
    ('{"format": "a", "format": "b"}', "the key 'format' appears twice"),
    ([], "not a feddat-secure-federation/1 file"),
    (GOOD_FACTS | {"format": "feddat-secure-federation/2"}, "not a feddat-secure-federation/1 file"),
    (GOOD_FACTS | {"extra": 1}, "not a feddat-secure-federation/1 file"),
    (GOOD_FACTS | {"sites": {}}, "'sites' must map each site id to its positive number"),
    (GOOD_FACTS | {"sites": {"site-0": 0}}, "'sites' must map each site id to its positive number"),
    (GOOD_FACTS | {"sites": {"site-0": -4}}, "'sites' must map each site id to its positive number"),
    (GOOD_FACTS | {"sites": {"site-0": 2.5}}, "'sites' must map each site id to its positive number"),
    (GOOD_FACTS | {"sites": {"site-0": True}}, "'sites' must map each site id to its positive number"),
    (GOOD_FACTS | {"sites": ["site-0"]}, "'sites' must map each site id to its positive number"),
    (GOOD_FACTS | {"sites": {"-site": 3}}, "invalid party id '-site'"),
    (GOOD_FACTS | {"sites": {"site a": 3}}, "invalid party id 'site a'"),
    (GOOD_FACTS | {"answers": []}, "'answers' must be a non-empty list of strings"),
    (GOOD_FACTS | {"answers": "yes"}, "'answers' must be a non-empty list of strings"),
    (GOOD_FACTS | {"answers": ["yes", 2]}, "'answers' must be a non-empty list of strings"),
])
def test_a_federation_file_that_is_missing_garbled_or_wrong_is_one_line_naming_the_file(party_folder, facts,
                                                                                         problem):
    if facts is None:
        (party_folder / FEDERATION_FILE).unlink()
    else:
        write_facts(party_folder, facts)
    with pytest.raises(DeploymentError) as raised:
        load_agreement(party_folder)
    message = str(raised.value)
    assert str(party_folder / FEDERATION_FILE) in message and problem in message and "\n" not in message


def test_a_missing_configuration_is_one_line_naming_the_file(party_folder):
    (party_folder / "config.toml").unlink()
    with pytest.raises(DeploymentError, match="config.toml") as raised:
        load_agreement(party_folder)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o770, 0o701])
def test_a_party_folder_group_or_others_can_reach_is_refused(tmp_path, mode):
    folder = tmp_path / "site-a"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(DeploymentError, match=f"is open to other users \\(mode {oct(mode)}\\).*chmod 700"):
        private_folder(folder)
    folder.chmod(0o700)
    assert private_folder(folder) == folder.resolve()


def test_a_missing_party_folder_is_refused(tmp_path):
    with pytest.raises(DeploymentError, match="party folder .* does not exist"):
        private_folder(tmp_path / "nowhere")


def test_the_serverapps_settings_come_from_the_run_configuration_with_defaults():
    settings = ServerRoleSettings.from_run_config({"server-dir": "/srv/server", "stage-deadline-s": 30,
                                                   "deadlines": "masked:masked_input=20, feddat:train=600",
                                                   "node-auth": True})
    assert settings == ServerRoleSettings(Path("/srv/server"), stage_deadline_s=30.0, join_timeout_s=300.0,
                                          bind_deadline_s=60.0, node_auth=True,
                                          deadlines={"masked:masked_input": 20.0, "feddat:train": 600.0})


SERVER_DIR = {"server-dir": "/srv/server"}


@pytest.mark.parametrize(("values", "problem"), [
    ({}, "'server-dir' must name"),
    ({"server-dir": ""}, "'server-dir' must name"),
    ({"server-dir": 3}, "'server-dir' must name"),
    (SERVER_DIR | {"stage-deadline-s": 0}, "'stage-deadline-s' must be a number of seconds"),
    (SERVER_DIR | {"stage-deadline-s": -1.0}, "'stage-deadline-s' must be a number of seconds"),
    (SERVER_DIR | {"stage-deadline-s": float("nan")}, "'stage-deadline-s' must be a number of seconds"),
    (SERVER_DIR | {"join-timeout-s": 86401}, "'join-timeout-s' must be a number of seconds"),
    (SERVER_DIR | {"bind-deadline-s": "60"}, "'bind-deadline-s' must be a number of seconds"),
    (SERVER_DIR | {"bind-deadline-s": True}, "'bind-deadline-s' must be a number of seconds"),
    (SERVER_DIR | {"node-auth": "yes"}, "'node-auth' must be true or false"),
    (SERVER_DIR | {"deadlines": 5}, "'deadlines' must be a string"),
    (SERVER_DIR | {"deadlines": "train=600"}, "'train=600' is not '<protocol>:<stage>=<seconds>'"),
    (SERVER_DIR | {"deadlines": "feddat:train"}, "'feddat:train' is not"),
    (SERVER_DIR | {"deadlines": "feddat:train=soon"}, "'feddat:train=soon' is not"),
    (SERVER_DIR | {"deadlines": "feddat:train=0"}, "'feddat:train=0' is not"),
    (SERVER_DIR | {"deadlines": "feddat:train=inf"}, "'feddat:train=inf' is not"),
])
def test_a_bad_setting_is_refused_naming_the_key(values, problem):
    with pytest.raises(DeploymentError, match=re.escape(problem)) as raised:
        ServerRoleSettings.from_run_config(values)
    assert str(raised.value).startswith("run-config ")


def test_deadlines_ignore_blank_items_and_an_empty_text_sets_none():
    assert parse_deadlines("") == {}
    assert parse_deadlines(" masked:unmask = 15 ,, ") == {"masked:unmask": 15.0}


# --- 5. the agent's socket ---------------------------------------------------------------------------------------

def test_the_agent_listens_on_a_socket_only_its_own_user_can_open(short_dir):
    path = short_dir / "agent.sock"
    umask = os.umask(0o022)
    try:
        listener = _listen(path)
        assert os.umask(0o022) == 0o022  # the umask the agent set for the bind is put back
    finally:
        os.umask(umask)
    with listener:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))


def test_the_agent_refuses_to_take_over_a_live_agents_socket(short_dir):
    path = short_dir / "agent.sock"
    with _listen(path) as live:
        with pytest.raises(DeploymentError, match="another agent is serving on"):
            _listen(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # the live agent's socket is still there and still its
        connection, _ = live.accept()
        connection.close()


def test_the_agent_replaces_the_stale_socket_of_an_agent_that_is_gone(short_dir):
    path = short_dir / "agent.sock"
    _listen(path).close()  # the file stays behind, as after a crash
    assert path.exists()
    with _listen(path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))


def test_the_agent_never_deletes_a_file_that_is_not_a_socket(short_dir):
    """``site serve --socket`` names any path: a mistyped one (the party's key, its data) must not be removed."""
    path = short_dir / "identity.pem"
    path.write_text("a private key")
    with pytest.raises(DeploymentError, match="is not a socket"):
        _listen(path)
    assert path.read_text() == "a private key"


def test_a_socket_path_too_long_for_unix_sockets_is_one_clear_line(short_dir):
    with pytest.raises(DeploymentError, match="cannot listen on .*: AF_UNIX path too long$"):
        _listen(short_dir / ("x" * 200))


def test_a_node_whose_agent_was_not_up_yet_is_asked_again_and_bound(parties, roster, server_audit, monkeypatch):
    """A SuperNode may connect before its agent listens: its first bind gets ``agent-unreachable``, which is not
    a refusal for good; the node is asked again and bound once its agent answers."""
    import feddat_secure.deployment.grid_channel as grid_channel

    monkeypatch.setattr(grid_channel, "BIND_RETRY_S", 0.05)
    audit, path = server_audit
    late = agent(parties["site-a"], roster)
    calls = []

    def starting(request: Message) -> Message:
        calls.append(request)
        return relay_reply(request, error="agent-unreachable") if len(calls) == 1 else late(request)

    grid = FakeGrid()
    grid.add(11, starting)
    assert bind(grid, parties, roster, audit, wanted=["site-a"]) == {"site-a": 11}
    assert len(calls) == 2
    assert [entry["meta"]["reason"] for entry in recorded(path, "node_refused")] == [
        "no bind reply (agent-unreachable); asking again"]


# --- 6. the relay ClientApp and the command line ----------------------------------------------------------------

def client_app_forward():
    """The relay ClientApp's handler, loaded from the Flower app's folder as Flower loads it."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "deploy" / "flower" / "feddat_flower" / "client_app.py"
    spec = importlib.util.spec_from_file_location("feddat_flower_client_app", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.forward


def relayed(forward, content: dict, socket_path: str) -> dict:
    from flwr.app import Context

    request = Message(RecordDict({RECORD: ConfigRecord(content)}), dst_node_id=11, message_type="query.feddat")
    request.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    context = Context(run_id=3, node_id=11, node_config={"agent-socket": socket_path}, state=RecordDict(),
                      run_config={})
    return dict(forward(request, context).content[RECORD])


def test_the_relay_client_app_answers_failures_with_an_error_code_and_no_exception_text(tmp_path):
    forward = client_app_forward()
    request = {"kind": "messages", "requests": [b"signed bytes"], "deadline_s": 1.0}
    assert relayed(forward, request, str(tmp_path / "no-agent.sock")) == {"error": "agent-unreachable"}
    assert relayed(forward, {"kind": "messages"}, str(tmp_path / "no-agent.sock")) == {"error": "bad-request"}


def test_the_relay_client_app_passes_bytes_and_its_node_id_to_the_agent_and_back(tmp_path):
    forward = client_app_forward()
    path = tmp_path / "agent.sock"
    listener = _listen(path)
    seen = []

    def agent_once() -> None:
        connection, _ = listener.accept()
        with connection:
            seen.append(relay.receive_frame(connection))
            relay.send_frame(connection, [b"ok", b"0", b"server", b"signed reply"])

    thread = threading.Thread(target=agent_once)
    thread.start()
    try:
        answer = relayed(forward, {"kind": "messages", "requests": [b"signed bytes"], "deadline_s": 5.0}, str(path))
    finally:
        thread.join(timeout=5)
        listener.close()
    assert seen == [[relay.MAGIC, b"messages", b"11", b"signed bytes"]]
    assert answer == {"parts": [b"0", b"server", b"signed reply"]}


def test_deploy_local_refuses_node_authentication_without_tls_in_one_line(capsys):
    from feddat_secure.cli import main

    assert main(["deploy", "local", "no-such.toml", "--auth"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--auth needs --tls" in error

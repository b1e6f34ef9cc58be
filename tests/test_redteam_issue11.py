"""Red team of issue 11 (the Flower deployment): each test plays an attack and asserts the defence.

The attacker works through the package's own classes and wire messages: a real agent (:class:`PartyAgent`,
built from a party folder as ``deploy local`` makes them), the server's real signed bind requests, the
server's :class:`GridChannel` and :func:`bind_nodes` over an in-memory Flower ``Grid`` with Flower's real
``Message``. Every attack here succeeded against the first version of the deployment and fails since its fix.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from conftest import small_config
from flwr.supercore.task_identity import TaskIdentity
from test_deployment_parts import FakeGrid, agent, relay_reply, silent

from audits import AuditLog
from feddat_secure import cli
from feddat_secure.data import build_benchmark
from feddat_secure.deployment import relay
from feddat_secure.deployment.agent import MAX_CONNECTIONS, PartyAgent
from feddat_secure.deployment.binding import bind_request
from feddat_secure.deployment.grid_channel import GridChannel, bind_nodes
from feddat_secure.deployment.party_dir import Agreement
from feddat_secure.federation import runner
from feddat_secure.federation.channel import PartyAudit
from feddat_secure.federation.parties import plan_run
from feddat_secure.federation.runner import enrol_run
from feddat_secure.model.adapters import LoraSettings
from protocols import Identity, Outgoing, Roster, load_roster
from protocols.enrolment import load_party_identity
from protocols.wire import new_session_id

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "feddat_deploy_local.toml"


@pytest.fixture(autouse=True)
def serverapp_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ServerApp's process before its code runs; Flower's Message needs it."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 3)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)


# --- a real site agent, from party folders made as `deploy local` makes them --------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, foundation) -> Path:
    """A masked 3-site run's party folders (identities, roster, agreement), no process started: what
    ``deploy_local`` writes before it starts the agents."""
    root = tmp_path_factory.mktemp("redteam11")
    config = small_config(root, federation={"rounds": 1, "aggregation": "uniform"},
                          secure_aggregation={"protocol": "masked"})
    benchmark = build_benchmark(config.data.benchmark, path=config.data.path, num_clients=config.data.num_clients,
                                train_per_client=config.data.train_per_client,
                                test_per_client=config.data.test_per_client, image_size=foundation.image_size,
                                seed=config.seed)
    counts = {client.client_id: len(client.train) for client in benchmark.clients}
    plan = plan_run(config, foundation, LoraSettings.of(config.model), counts, len(benchmark.answers))
    folder = root / "run"
    folder.mkdir()
    enrol_run(plan, folder)
    agreement = Agreement(config, counts, tuple(benchmark.answers))
    for party, _ in plan.parties():
        agreement.save(folder / "parties" / party)
    return folder


class Said(io.StringIO):
    """The agent's log stream; ``serving`` is set once the agent says it serves."""

    def __init__(self) -> None:
        super().__init__()
        self.serving = threading.Event()

    def write(self, text: str) -> int:
        if "serving" in text:
            self.serving.set()
        return super().write(text)


@pytest.fixture
def site_folder(run_dir: Path, short_dir: Path) -> Path:
    """A fresh copy of client0's party folder (a folder serves one run)."""
    folder = short_dir / "client0"
    shutil.copytree(run_dir / "parties" / "client0", folder)
    return folder


@pytest.fixture
def site_agent(site_folder: Path) -> PartyAgent:
    """client0's real agent, built from its own folder."""
    return PartyAgent(site_folder, socket_path=site_folder.parent / "a.sock", log=Said())


@pytest.fixture(scope="module")
def server(run_dir: Path) -> tuple[Identity, Roster]:
    """The roster's server: its identity (the attacker of section 1 is the server, or runs code on the site's
    SuperNode with one of the server's genuine signed requests in hand) and the roster."""
    return load_party_identity(run_dir / "parties" / "server"), load_roster(run_dir / "roster.json")


def relayed(kind: bytes, node_id: int, *payloads: bytes) -> list[bytes]:
    """A request frame's parts as the relay ClientApp sends them: any code on the SuperNode can send these."""
    return [relay.MAGIC, kind, str(node_id).encode(), *payloads]


# --- 1. the agent: one binding per run ----------------------------------------------------------------------------

def test_an_agent_bound_to_its_node_does_not_re_bind_to_another_node_of_the_same_run(site_agent, server):
    """The node id reaches the agent from the relay, i.e. from whatever code the SuperNode runs. Node 20 (a rogue
    node; without node authentication anyone can connect one) received the server's genuine bind request for
    node 20; code on client0's SuperNode (a second run: the Control API is unauthenticated) hands it to client0's
    agent claiming node 20. The agent signs "client0 runs node 20" — which the server accepts — and from then on
    takes messages only through node 20: client0's traffic is the rogue node's to read, delay or drop."""
    identity, roster = server
    session = new_session_id()
    genuine, _ = bind_request(identity, roster, session=session, node_id=11)
    assert site_agent.handle(relayed(relay.KIND_BIND, 11, genuine))[0] == b"ok"
    rogue, _ = bind_request(identity, roster, session=session, node_id=20)
    with pytest.raises(relay.RelayError, match="^refused$"):
        site_agent.handle(relayed(relay.KIND_BIND, 20, rogue))
    with pytest.raises(relay.RelayError, match="^refused$"):
        site_agent.handle(relayed(relay.KIND_MESSAGES, 20, b"anything"))  # still reachable through node 11 only


def test_an_agent_bound_for_a_run_answers_no_bind_request_of_another_run(site_agent, server):
    """The agent serves one run. A bind request of another session (replayed from an earlier run, or a second
    run started on the same SuperLink) must not be signed, nor move the node the agent takes messages from."""
    identity, roster = server
    genuine, _ = bind_request(identity, roster, session=new_session_id(), node_id=11)
    assert site_agent.handle(relayed(relay.KIND_BIND, 11, genuine))[0] == b"ok"
    other_run, _ = bind_request(identity, roster, session=new_session_id(), node_id=12)
    with pytest.raises(relay.RelayError, match="^refused$"):
        site_agent.handle(relayed(relay.KIND_BIND, 12, other_run))


# --- 1b. the agent's socket: one stuck connection ------------------------------------------------------------------

def ping_past_stuck_connections(agent: PartyAgent, stuck: int) -> object:
    """Serve ``agent`` (in this, the main thread: it installs its SIGTERM handler) while another thread opens
    ``stuck`` connections that each announce a 1000-byte frame and send nothing more (anything that can open the
    socket can: the SuperNode's user, i.e. every run's ClientApp), then pings the agent as its relay does (2 s
    deadline). Returns the ping's answer or error code."""
    outcome: dict[str, object] = {}

    def attacker_then_relay() -> None:
        if not agent.log.serving.wait(30):
            return  # the agent never served: serve() has raised in the main thread
        connections = []
        try:
            for _ in range(stuck):
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                connections.append(connection)
                connection.connect(str(agent.socket_path))
                connection.sendall(struct.pack(">I", 1000))
            time.sleep(0.2)  # the agent has accepted them all
            try:
                outcome["ping"] = relay.call(str(agent.socket_path), relay.KIND_PING, 0, [], timeout_s=2)
            except relay.RelayError as error:
                outcome["ping"] = error.code
        finally:
            for connection in connections:
                connection.close()
            os.kill(os.getpid(), signal.SIGTERM)  # the agent's own way to stop (serve() turns it into a clean exit)

    thread = threading.Thread(target=attacker_then_relay)
    thread.start()
    agent.serve()
    thread.join(10)
    return outcome.get("ping")


def test_a_connection_that_never_finishes_its_frame_does_not_stop_the_agent_answering_its_relay(site_agent):
    assert ping_past_stuck_connections(site_agent, 1) == [b"client0"]


def test_as_many_stuck_connections_as_the_agent_reads_at_once_do_not_lock_its_relay_out(site_agent):
    """The same attack, with MAX_CONNECTIONS connections (trickling a byte now and then would keep each open
    indefinitely). The relay's fresh connection, which sends its whole frame at once, must still be answered:
    e.g. evict the oldest unfinished reader when all are taken, and bound a frame's reading time as a whole."""
    assert ping_past_stuck_connections(site_agent, MAX_CONNECTIONS) == [b"client0"]


class SignalledWhileSayingServing(io.StringIO):
    """A log whose write of "serving" is where SIGTERM lands: the first instant after serve() installed its
    handler (on a loaded 2-core CI machine a signal did land there, and its KeyboardInterrupt escaped serve())."""

    def write(self, text: str) -> int:
        if "serving" in text:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().write(text)


def test_a_sigterm_at_the_first_instant_of_serving_stops_the_agent_cleanly_and_removes_its_socket(site_folder):
    socket_path = site_folder.parent / "a.sock"
    log = SignalledWhileSayingServing()
    PartyAgent(site_folder, socket_path=socket_path, log=log).serve()  # returns; raises nothing
    assert "stopped by a signal" in log.getvalue()
    assert not socket_path.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler before serve() is back


# --- 2. a malicious site against the ServerApp ---------------------------------------------------------------------

def test_a_site_answering_one_request_with_a_flood_of_messages_drops_out_instead_of_stalling_the_server():
    """A site's own SuperNode can reply with any Flower content. 100 000 tiny messages to the server in answer to
    one request (≈ 3 MB) cost the server a signature check and two audit-log entries each (ServerLink.exchange,
    ServerApp._replies): minutes during which every other site waits. No party answers one request with more
    messages than there are parties (the key holder's setup reply: one context per site), so such a reply is
    malformed and the site drops out, as for any other malformed reply."""
    grid = FakeGrid()
    grid.add(11, lambda request: relay_reply(request, parts=[b"0", b"server", b"x"] * 100_000))
    errors: list[tuple[str, str]] = []
    channel = GridChannel(grid, nodes={"site-a": 11}, on_error=lambda *error: errors.append(error))
    replies = channel.exchange([Outgoing("site-a", b"request")], deadline_s=5)
    assert replies[0].dropped
    assert errors == [("site-a", "bad-frame")]


@pytest.fixture(scope="module")
def identities() -> dict[str, Identity]:
    return {name: Identity.generate(name) for name in ("server", "site-a", "site-b")}


def test_a_silent_node_does_not_hold_up_the_binding_of_the_parties_that_answered(tmp_path, identities):
    """Node 13 connects (no node authentication needed) and never answers its bind request. site-a's node answers
    at once; the binding must be done then, not when node 13's bind deadline runs out."""
    roster = Roster.from_identities(identities["server"], [identities["site-a"], identities["site-b"]])
    log = AuditLog.create(tmp_path / "server.audit.jsonl", "server", identities["server"].private_key)
    audit = PartyAudit(log, {entry.party_id: entry.public_key for entry in roster.entries})
    grid = FakeGrid()
    grid.add(11, agent(identities["site-a"], roster))
    grid.add(13, silent)
    start = time.monotonic()
    bound = bind_nodes(grid, identity=identities["server"], roster=roster, session=new_session_id(),
                       parties=["site-a"], audit=audit, join_timeout_s=10, bind_deadline_s=2.5, node_auth=False,
                       echo=lambda line: None)
    elapsed = time.monotonic() - start
    log.close()
    assert bound == {"site-a": 11}
    assert elapsed < 1.0, f"bound after {elapsed:.1f} s"


# --- 3. a new user: deploy local refuses bad options before it starts anything ------------------------------------

@pytest.mark.parametrize("option", [["--stage-deadline", "-1"], ["--stage-deadline", "nan"],
                                    ["--deadlines", "train 600"], ["--threads", "-2"]])
def test_deploy_local_refuses_a_bad_option_in_one_line_before_it_writes_or_starts_anything(option, tmp_path,
                                                                                             monkeypatch, capsys):
    def prepared(*args, **kwargs):
        raise AssertionError("deploy local went on to write the run folder")

    monkeypatch.setattr(runner, "prepare_run_dir", prepared)
    assert cli.main(["deploy", "local", str(EXAMPLE), "--output-dir", str(tmp_path), *option]) == 2
    error = capsys.readouterr().err
    assert error.startswith("feddat-secure: error: ") and option[0] in error and error.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_keyholder_serve_on_a_sites_folder_refuses_in_one_line_instead_of_serving_the_site(site_folder, monkeypatch,
                                                                                          capsys):
    def served(self) -> None:
        raise AssertionError(f"`keyholder serve` went on to serve {self.party_id}")

    monkeypatch.setattr(PartyAgent, "serve", served)
    assert cli.main(["keyholder", "serve", "--keyholder-dir", str(site_folder)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("feddat-secure: error: ") and "client0" in error and error.count("\n") == 1

"""A party's long-lived agent (``feddat-secure site serve`` / ``keyholder serve``): the party, on its own machine.

Flower starts a fresh ClientApp process for every message, from code the run's submitter ships. So the party
does not live there: the agent builds it once from the party's own folder (:mod:`.party_dir`) — identity,
data, model, privacy ledger, audit log, protocol sessions — and serves it on a Unix socket that only the
party's own user can open (0600). The ClientApp only relays bytes to it (:mod:`.relay`). Nothing the agent
holds leaves it except the signed messages the party answers with; a failure is answered with an error
code, and its details go to the agent's own standard error.

The agent serves one run: it exits once it has answered the server's ``close`` (its audit log is then
closed), or on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import grp
import os
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from pathlib import Path

from protocols import MessageRejected
from protocols.wire import peek

from ..federation import envelopes as E
from . import relay
from .binding import answer_bind
from .party_dir import (
    DeploymentError,
    check_unused,
    load_plan,
    party_of,
    private_folder,
    site_data,
)

SOCKET_FILE = "agent.sock"
MAX_CONNECTIONS = 16  # connections read at once (the relay needs one per message in flight)
FRAME_TIMEOUT_S = 60.0  # for reading a request frame and sending its reply


class PartyAgent:
    """One party (a site or the key holder) built from its own folder, served over a Unix socket."""

    def __init__(self, folder: Path, *, role: str | None = None, socket_path: Path | None = None,
                 socket_group: str | None = None, dataset_ledger_dir: Path | str | None = None,
                 log=sys.stderr) -> None:
        from ..federation.channel import Served
        from ..federation.parties import build_keyholder, build_site
        from ..federation.party_folder import PartyFolder

        self.folder = private_folder(folder)
        self.party_id, own_role = party_of(self.folder)
        if own_role == "server":
            raise DeploymentError(f"{self.party_id} is the server: the server runs as the Flower ServerApp, not as "
                                  "an agent")
        if role is not None and own_role != role:
            raise DeploymentError(f"{self.folder} holds the identity of {self.party_id!r}, a {own_role}, not a "
                                  f"{role}'s")
        role = own_role
        self.socket_path = Path(socket_path) if socket_path else self.folder / SOCKET_FILE
        if socket_group is not None and self.socket_path.resolve().parent == self.folder:
            raise DeploymentError("--socket-group needs a --socket outside the party's folder: the SuperNode's user "
                                  "cannot enter that 0700 folder")
        self.socket_group = socket_group
        self.log = log
        check_unused(self.folder, self.party_id)
        planned = load_plan(self.folder)
        own = PartyFolder(self.folder, self.party_id)
        if role == "client":
            split, answers = site_data(self.folder, planned, self.party_id)
            party = build_site(planned.plan, own, planned.foundation, planned.lora, split, answers, resume=False,
                               opening_digest=planned.agreement.digest(), dataset_ledger_dir=dataset_ledger_dir)
        elif role == "keyholder":
            if not planned.plan.keyholder:
                raise DeploymentError(f"{self.party_id}: the agreed configuration needs no key holder")
            party = build_keyholder(planned.plan, own, resume=False, opening_digest=planned.agreement.digest())
        self.party = party
        self.served = Served(party, party.audit, server_id=party.roster.server_id)
        self.node_id: int | None = None
        self.bound_session: str | None = None
        self.closed = False
        self.lock = threading.Lock()  # the party handles one request at a time
        self.reading: dict[socket.socket, float] = {}  # connections still reading their frame → since when
        self.readers_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------ serving

    def serve(self) -> None:
        """Answer relayed requests until the run is closed (or a signal stops the agent). Each connection is read
        in a thread of its own, within :data:`FRAME_TIMEOUT_S` for its whole frame; with :data:`MAX_CONNECTIONS`
        still reading, a new connection takes the place of the one reading longest, so connections that never
        finish their frames cannot lock the relay out. The party itself handles one request at a time."""
        listener = _listen(self.socket_path, self.socket_group)
        listener.settimeout(0.5)  # to notice the run's close between connections
        readers: list[threading.Thread] = []
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:  # from the handler's first instant: a SIGTERM while saying "serving" must stop the agent cleanly too
            self._say(f"serving {self.party_id} on {self.socket_path}")
            while not self.closed:
                try:
                    connection, _ = listener.accept()
                except TimeoutError:
                    continue
                self._make_room()
                reader = threading.Thread(target=self._answer, args=(connection,), daemon=True)
                reader.start()
                readers = [thread for thread in readers if thread.is_alive()] + [reader]
            for reader in readers:  # the reply to the server's close is still being sent
                reader.join(timeout=10)
        except KeyboardInterrupt:
            self._say("stopped by a signal before the run was closed")
        finally:
            signal.signal(signal.SIGTERM, previous)
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self.closed:
            self._say("the run is closed; exiting")

    def _make_room(self) -> None:
        """Shut the connection that has been reading its frame longest when :data:`MAX_CONNECTIONS` are reading."""
        with self.readers_lock:
            if len(self.reading) >= MAX_CONNECTIONS:
                oldest = min(self.reading, key=self.reading.get)
                del self.reading[oldest]
                with contextlib.suppress(OSError):
                    oldest.shutdown(socket.SHUT_RDWR)

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            with self.readers_lock:
                self.reading[connection] = time.monotonic()
            try:
                parts = relay.receive_frame(connection, deadline_s=FRAME_TIMEOUT_S)
            except relay.RelayError as error:
                parts = error
            except OSError:
                return  # shut to make room, timed out, or the relay went away: nothing to answer
            finally:
                with self.readers_lock:
                    self.reading.pop(connection, None)
            self._answer_frame(connection, parts)

    def _answer_frame(self, connection: socket.socket, parts: list[bytes] | relay.RelayError) -> None:
        try:
            if isinstance(parts, relay.RelayError):
                raise parts
            reply = self.handle(parts)
        except relay.RelayError as error:
            reply = [b"error", error.code.encode()]
        except Exception:  # noqa: BLE001 - the agent outlives a bad request; the details stay in its own log
            self._say(f"failed on a request:\n{traceback.format_exc()}")
            reply = [b"error", b"internal"]
        connection.settimeout(FRAME_TIMEOUT_S)
        with contextlib.suppress(OSError, relay.RelayError):
            relay.send_frame(connection, reply)

    def handle(self, parts: list[bytes]) -> list[bytes]:
        """The reply frame's parts for one request frame (see :mod:`.relay`)."""
        if len(parts) < 3 or parts[0] != relay.MAGIC:
            raise relay.RelayError("bad-frame")
        kind, node, payloads = parts[1], parts[2], parts[3:]
        try:
            node_id = int(node.decode("ascii"))
        except ValueError:
            raise relay.RelayError("bad-request") from None
        if kind == relay.KIND_PING:
            return [b"ok", self.party_id.encode()]
        with self.lock:
            if self.closed:
                raise relay.RelayError("closed")
            if kind == relay.KIND_BIND and len(payloads) == 1:
                return [b"ok", self._bind(payloads[0], node_id)]
            if kind == relay.KIND_MESSAGES:
                if self.node_id is None or node_id != self.node_id:
                    raise relay.RelayError("refused")  # messages only through the node this party bound itself to
                return [b"ok", *self._messages(payloads)]
        raise relay.RelayError("bad-request")

    def _bind(self, data: bytes, node_id: int) -> bytes:
        """Sign this party's binding to ``node_id``. An agent serves one run through one node: once bound, it
        answers only a repeat of the same binding (a retry), never another node's or another session's."""
        try:
            answer = answer_bind(data, self.party.stamp.identity, self.party.roster, relayed_node_id=node_id)
            session = peek(data).session
            if self.node_id is not None and (node_id, session) != (self.node_id, self.bound_session):
                raise MessageRejected(f"already bound to node {self.node_id} in session {self.bound_session}")
        except MessageRejected as rejection:
            self._say(f"refused a bind request: {rejection.reason}")
            raise relay.RelayError("refused") from None
        if self.node_id is None:
            self.node_id, self.bound_session = node_id, session
            self.party.audit.event("node_bound", meta={"node_id": str(node_id), "session": session})
        return answer

    def _messages(self, requests: list[bytes]) -> list[bytes]:
        """Each request handled in order by the party; the reply lists (request index, recipient, bytes) of
        every message the party answered with. A request that fails inside the party gets no answer."""
        out: list[bytes] = []
        for index, data in enumerate(requests):
            try:
                answers = self.served.handle(data)
            except Exception:  # noqa: BLE001 - a failure is answered with nothing, its details stay here
                self._say(f"failed on a request:\n{traceback.format_exc()}")
                continue
            for answer in answers:
                out += [str(index).encode(), answer.recipient.encode(), answer.data]
            header = peek(data)
            if answers and header is not None and (header.protocol, header.stage) == (E.PROTOCOL, E.CLOSE):
                self.closed = True
        return out

    def _say(self, line: str) -> None:
        print(f"feddat-secure agent {self.party_id}: {line}", file=self.log, flush=True)


def _listen(path: Path, group: str | None = None) -> socket.socket:
    """A Unix socket at ``path`` that only this user can connect to (0600), or with ``group`` this user and that
    group's members (0660: the SuperNode may then run as another user, who cannot read the party's folder);
    refuses to take over a live agent's socket or to replace anything that is not a socket."""
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):  # a mistyped --socket must never delete a key or data file
            raise DeploymentError(f"{str(path)!r} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a stale socket of an agent that is gone
            else:
                raise DeploymentError(f"another agent is serving on {str(path)!r}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError as error:
        listener.close()
        raise DeploymentError(f"cannot listen on {str(path)!r}: {error.strerror or error}") from None
    finally:
        os.umask(previous)
    if group is not None:
        try:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        except (KeyError, OSError) as error:
            listener.close()
            path.unlink()
            raise DeploymentError(f"cannot give the socket to group {group!r}: {error}") from None
    os.chmod(path, 0o600 if group is None else 0o660)
    listener.listen(16)
    return listener


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt

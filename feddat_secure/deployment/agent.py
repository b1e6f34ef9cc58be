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


class PartyAgent:
    """One party (a site or the key holder) built from its own folder, served over a Unix socket."""

    def __init__(self, folder: Path, *, socket_path: Path | None = None, socket_group: str | None = None,
                 log=sys.stderr) -> None:
        from ..federation.channel import Served
        from ..federation.parties import build_keyholder, build_site
        from ..federation.party_folder import PartyFolder

        self.folder = private_folder(folder)
        self.party_id, role = party_of(self.folder)
        self.socket_path = Path(socket_path) if socket_path else self.folder / SOCKET_FILE
        self.socket_group = socket_group
        self.log = log
        check_unused(self.folder, self.party_id)
        planned = load_plan(self.folder)
        own = PartyFolder(self.folder, self.party_id)
        if role == "client":
            split, answers = site_data(self.folder, planned, self.party_id)
            party = build_site(planned.plan, own, planned.foundation, planned.lora, split, answers, resume=False,
                               opening_digest=planned.agreement.digest())
        elif role == "keyholder":
            if not planned.plan.keyholder:
                raise DeploymentError(f"{self.party_id}: the agreed configuration needs no key holder")
            party = build_keyholder(planned.plan, own, resume=False, opening_digest=planned.agreement.digest())
        else:
            raise DeploymentError(f"{self.party_id} is the {role}: the server runs as the Flower ServerApp, not as "
                                  "an agent")
        self.party = party
        self.served = Served(party, party.audit, server_id=party.roster.server_id)
        self.node_id: int | None = None
        self.closed = False

    # ------------------------------------------------------------------------------------------ serving

    def serve(self) -> None:
        """Answer relayed requests until the run is closed (or a signal stops the agent)."""
        listener = _listen(self.socket_path, self.socket_group)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        self._say(f"serving {self.party_id} on {self.socket_path}")
        try:
            while not self.closed:
                connection, _ = listener.accept()
                with connection:
                    self._answer(connection)
        except KeyboardInterrupt:
            self._say("stopped by a signal before the run was closed")
        finally:
            signal.signal(signal.SIGTERM, previous)
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self.closed:
            self._say("the run is closed; exiting")

    def _answer(self, connection: socket.socket) -> None:
        connection.settimeout(60)
        try:
            parts = relay.receive_frame(connection)
            reply = self.handle(parts)
        except relay.RelayError as error:
            reply = [b"error", error.code.encode()]
        except OSError:
            return  # the relay went away (its deadline passed): nothing to answer
        except Exception:  # noqa: BLE001 - the agent outlives a bad request; the details stay in its own log
            self._say(f"failed on a request:\n{traceback.format_exc()}")
            reply = [b"error", b"internal"]
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
        try:
            answer = answer_bind(data, self.party.stamp.identity, self.party.roster, relayed_node_id=node_id)
        except MessageRejected as rejection:
            self._say(f"refused a bind request: {rejection.reason}")
            raise relay.RelayError("refused") from None
        self.node_id = node_id
        self.party.audit.event("node_bound", meta={"node_id": str(node_id), "session": peek(data).session})
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

"""Test support: every party of a federation in an OS process of its own, joined by pipes.

This is issue 9's acceptance harness for the trust boundaries. The parent process (the test) plays only
the enrolment desk: each child makes its own Ed25519 identity in its own party folder and hands back the
path of its public enrolment file; the parent builds the roster from those public files alone and gives
every party a copy to pin. Then each child builds its one party from the shared configuration and its own
folder (``parties.plan_run`` and ``build_site`` / ``build_keyholder`` / ``build_server``), and the server
child runs the federation through a :class:`PipeChannel`: the only thing that crosses between parties is
the bytes of signed messages. (The parent's own control pipe to each child carries only the enrolment
file's path, the go-ahead once the roster is in place, and the child's final report.)

Every child records, with a ``sys.addaudithook`` hook installed before it builds anything, each ``open``
of a ``.pem`` file (``protocols.enrolment`` writes and reads ``identity.pem`` through ``os.open``, which is
audited like the built-in ``open``), so the test can show that no process ever touched another party's key.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import struct
import sys
import time
import traceback
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from feddat_secure.federation.channel import Reply
from protocols import MessageRejected, Outgoing
from protocols.enrolment import build_roster
from protocols.identity import ROSTER_FILE

# ------------------------------------------------------------------------------------------------ framing
#
# A request on a pipe is  u64 sequence | message bytes.
# A reply is              u64 sequence | u32 count | count × (u16 recipient length | recipient (UTF-8) |
#                                                           u32 data length | data)
# The sequence number ties a reply to its request, so a reply that arrives after its deadline is recognised
# and dropped instead of being taken for the answer to the next request. No pickle: a party's bytes are data.

_SEQUENCE = struct.Struct(">Q")
_COUNT = struct.Struct(">I")
_RECIPIENT = struct.Struct(">H")
_LENGTH = struct.Struct(">I")


def pack_request(sequence: int, data: bytes) -> bytes:
    return _SEQUENCE.pack(sequence) + data


def unpack_request(frame: bytes) -> tuple[int, bytes]:
    if len(frame) < _SEQUENCE.size:
        raise MessageRejected(f"a request frame of {len(frame)} bytes is shorter than its sequence number")
    return _SEQUENCE.unpack_from(frame)[0], frame[_SEQUENCE.size:]


def pack_reply(sequence: int, messages: Sequence[Outgoing]) -> bytes:
    parts = [_SEQUENCE.pack(sequence), _COUNT.pack(len(messages))]
    for message in messages:
        recipient = message.recipient.encode()
        parts += [_RECIPIENT.pack(len(recipient)), recipient, _LENGTH.pack(len(message.data)), message.data]
    return b"".join(parts)


def unpack_reply(frame: bytes, party: str) -> tuple[int, tuple[Outgoing, ...]]:
    """The sequence number and messages of ``party``'s reply frame; a truncated frame, a recipient that is not
    UTF-8 or bytes after the last message are refused (MessageRejected naming the party)."""
    view = memoryview(frame)
    offset = 0

    def take(size: int, what: str) -> memoryview:
        nonlocal offset
        if offset + size > len(view):
            raise MessageRejected(f"its reply frame ends inside its {what}", party)
        chunk = view[offset:offset + size]
        offset += size
        return chunk

    sequence = _SEQUENCE.unpack(take(_SEQUENCE.size, "sequence number"))[0]
    messages = []
    for _ in range(_COUNT.unpack(take(_COUNT.size, "message count"))[0]):
        raw_recipient = take(_RECIPIENT.unpack(take(_RECIPIENT.size, "recipient length"))[0], "recipient")
        try:
            recipient = bytes(raw_recipient).decode()
        except UnicodeDecodeError:
            raise MessageRejected("its reply frame names a recipient that is not UTF-8", party) from None
        data = bytes(take(_LENGTH.unpack(take(_LENGTH.size, "message length"))[0], "message"))
        messages.append(Outgoing(recipient, data))
    if offset != len(view):
        raise MessageRejected(f"its reply frame has {len(view) - offset} bytes after its last message", party)
    return sequence, tuple(messages)


# ------------------------------------------------------------------------------------------------ channel


class PipeChannel:
    """The server's :class:`~feddat_secure.federation.channel.Channel` over one duplex pipe per party.

    An exchange sends each party its first request at once (the parties work in parallel) and the next one
    only after the previous is answered, so two large messages never wait on each other in a full pipe.
    Each request has ``deadline_s`` from its sending; a party that misses it, or whose process has gone (end
    of file), has dropped out: its remaining requests of the exchange are answered with ``None``, and a late
    reply is recognised by its sequence number and dropped when it arrives. Sending is not bounded by the
    deadline: a party that stops reading its pipe altogether would block the server (no test does that).
    """

    def __init__(self, connections: Mapping[str, Connection]) -> None:
        self.connections = dict(connections)
        self.gone: set[str] = set()  # parties whose pipe reached end of file
        self._sequence = count(1)

    def exchange(self, requests: Sequence[Outgoing], *, deadline_s: float) -> list[Reply]:
        replies: list[Reply | None] = [None] * len(requests)
        queues: dict[str, deque[int]] = {}
        for index, request in enumerate(requests):
            if request.recipient in self.connections and request.recipient not in self.gone:
                queues.setdefault(request.recipient, deque()).append(index)
            else:
                replies[index] = Reply(request.recipient, None)
        pending: dict[Connection, tuple[str, int, int, float]] = {}  # pipe → (party, index, sequence, deadline)

        def send_next(party: str) -> None:
            if not queues[party]:
                return
            index = queues[party].popleft()
            sequence = next(self._sequence)
            try:
                self.connections[party].send_bytes(pack_request(sequence, requests[index].data))
            except OSError:  # the party's process has gone
                self.gone.add(party)
                drop(party, index)
                return
            pending[self.connections[party]] = (party, index, sequence, time.monotonic() + deadline_s)

        def drop(party: str, index: int) -> None:
            replies[index] = Reply(party, None)
            while queues[party]:
                replies[queues[party].popleft()] = Reply(party, None)

        for party in queues:
            send_next(party)
        while pending:
            now = time.monotonic()
            for connection, (party, index, _, deadline) in list(pending.items()):
                if deadline <= now:
                    del pending[connection]
                    drop(party, index)
            if not pending:
                break
            for connection in wait(list(pending), timeout=min(entry[3] for entry in pending.values()) - now):
                party, index, sequence, _ = pending[connection]
                try:
                    answered, messages = unpack_reply(connection.recv_bytes(), party)
                except (EOFError, OSError):  # the party's process has gone
                    self.gone.add(party)
                    del pending[connection]
                    drop(party, index)
                    continue
                if answered < sequence:
                    continue  # the late answer to an earlier request that missed its deadline
                if answered != sequence:
                    raise MessageRejected(f"it answered request {answered}, which was never sent to it", party)
                del pending[connection]
                replies[index] = Reply(party, messages)
                send_next(party)
        return [reply for reply in replies if reply is not None]


# ------------------------------------------------------------------------------------------ key-file watch


class PemOpens:
    """Every ``open`` of a ``.pem`` path in this process from now on, as (absolute path, "read" or "write").

    ``os.open`` and the built-in ``open`` both raise the ``open`` audit event (path, mode, flags); an
    audit hook cannot be removed, which is why only a child process installs one."""

    _WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or not isinstance(args[0], str | bytes | os.PathLike):
            return  # other events, and io.open of a file descriptor (os.fdopen)
        name = os.fsdecode(args[0])
        if name.endswith(".pem"):
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & self._WRITING)
            self.seen.append((os.path.abspath(name), "write" if writing else "read"))


# ------------------------------------------------------------------------------------------- one party


def party_main(party: str, role: str, raw_config: dict[str, Any], control: Connection,
               links: Connection | dict[str, Connection], deadline_s: float) -> None:
    """A child process's whole life as ``party``: enrol, wait for the roster, build the party, serve (or, as
    the server, run) until the run is closed, then report to the parent on ``control``. ``links``: the pipe
    to the server, or for the server every other party's pipe; ``deadline_s``: the server's deadline for each
    reply. Any failure is reported with its traceback."""
    pem_opens = PemOpens()
    try:
        report = _serve_as(party, role, raw_config, control, links, deadline_s)
        control.send(("report", {**report, "party": party, "pid": os.getpid(), "pem_opens": pem_opens.seen}))
    except BaseException:
        control.send(("error", f"{party} (pid {os.getpid()}):\n{traceback.format_exc()}"))
        raise


def _serve_as(party: str, role: str, raw_config: dict[str, Any], control: Connection,
              links: Connection | dict[str, Connection], deadline_s: float) -> dict[str, Any]:
    # The model's libraries and the rest of the package load after the audit hook is in place, so the record
    # covers loading them too.
    import torch

    from feddat_secure.config import config_from_dict
    from feddat_secure.data import build_benchmark
    from feddat_secure.federation import envelopes
    from feddat_secure.federation.channel import Served
    from feddat_secure.federation.parties import (
        build_keyholder,
        build_server,
        build_site,
        encode_site,
        party_folder,
        plan_run,
        site_answers,
    )
    from feddat_secure.federation.server_app import RoundLog
    from feddat_secure.model.adapters import LoraSettings
    from feddat_secure.model.backbone import load_foundation
    from protocols.enrolment import ENROLMENT_FILE, save_party_identity
    from protocols.wire import peek

    torch.set_num_threads(1)  # for the whole process: see one_torch_thread
    config = config_from_dict(raw_config)
    run_dir = Path(config.output_dir) / config.name
    folder = party_folder(run_dir, party).path
    save_party_identity(folder, party, role)
    control.send(("enrolled", str(folder / ENROLMENT_FILE)))
    if control.recv() != ("roster",):
        raise RuntimeError("expected the parent's word that the roster is in place")

    foundation = load_foundation(config.model.path, random_init=config.model.random_init, seed=config.seed)
    # The synthetic benchmark is a deterministic function of the configuration: every process rebuilds it,
    # and a site encodes only its own split (the others need only the sizes, for the run plan).
    benchmark = build_benchmark(config.data.benchmark, path=config.data.path, num_clients=config.data.num_clients,
                                train_per_client=config.data.train_per_client,
                                test_per_client=config.data.test_per_client, image_size=foundation.image_size,
                                seed=config.seed)
    lora = LoraSettings(config.model.lora_rank, config.model.lora_alpha, config.model.lora_dropout,
                        config.model.target_modules)
    plan = plan_run(config, foundation, lora, {c.client_id: len(c.train) for c in benchmark.clients},
                    len(benchmark.answers))

    if role == "server":
        server = build_server(plan, party_folder(run_dir, party), PipeChannel(links), resume=False)
        server.link.default_deadline_s = deadline_s
        server.open(resume=False)
        server.run(RoundLog(write=lambda record: record, echo=lambda line: None))
        server.close()
        return {"history": server.history, "stopped": server.stopped,
                "global_state": {name: (array.dtype.str, array.shape, array.tobytes())
                                 for name, array in server.global_state.items()}}

    if role == "client":
        client = next(c for c in benchmark.clients if c.client_id == party)
        answers = site_answers(config, benchmark, client)
        endpoint = build_site(plan, party_folder(run_dir, party), foundation, lora,
                              encode_site(foundation, answers, client), answers, resume=False)
    else:
        endpoint = build_keyholder(plan, party_folder(run_dir, party), resume=False)
    served = Served(endpoint, endpoint.audit, server_id=endpoint.roster.server_id)
    while True:
        try:
            sequence, data = unpack_request(links.recv_bytes())
        except EOFError:
            raise RuntimeError(f"{party}: the server's pipe closed before the run was closed") from None
        answers = served.handle(data)
        links.send_bytes(pack_reply(sequence, answers))
        header = peek(data)
        if answers and header is not None and (header.protocol, header.stage) == (envelopes.PROTOCOL,
                                                                                  envelopes.CLOSE):
            return {}


# ------------------------------------------------------------------------------------------- the parent


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Compute with one torch thread meanwhile. Every party process does (several share 2 cores, where
    threads that wait on each other slow a run down many times), and a run to compare with them must too:
    how many threads split a float sum decides its order, and so its last bits."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class ProcessRun:
    """What the parent learned from a run of one process per party."""

    run_dir: Path
    reports: dict[str, dict[str, Any]]  # party → its final report (pid, pem_opens; the server's history)

    @property
    def global_state(self) -> dict[str, np.ndarray]:
        """The server's final global state, rebuilt from the bytes, dtype and shape it reported."""
        return {name: np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
                for name, (dtype, shape, data) in self.reports["server"]["global_state"].items()}


def run_in_processes(raw_config: dict[str, Any], parties: Sequence[tuple[str, str]], *, deadline_s: float,
                     timeout_s: float) -> ProcessRun:
    """Run the federation of ``raw_config`` with each ``(party, role)`` in a spawned process of its own (the
    server's pipes go to every other party) and return what each reported. ``deadline_s``: how long the
    server waits for each reply (a party that misses it drops out); ``timeout_s``: for the whole run. A
    child's failure, or no word from one in time, fails with the child's traceback; every child still alive
    at the end is terminated."""
    from feddat_secure.config import config_from_dict  # as in the children: the run folder the config names

    config = config_from_dict(raw_config)
    run_dir = Path(config.output_dir) / config.name
    context = multiprocessing.get_context("spawn")
    deadline = time.monotonic() + timeout_s
    server_ends, party_ends = {}, {}
    for party, role in parties:
        if role != "server":
            server_ends[party], party_ends[party] = context.Pipe()
    controls, processes = {}, {}
    try:
        for party, role in parties:
            controls[party], child_control = context.Pipe()
            links = server_ends if role == "server" else party_ends[party]
            processes[party] = context.Process(target=party_main, name=f"party-{party}", daemon=True,
                                               args=(party, role, raw_config, child_control, links, deadline_s))
            processes[party].start()
            child_control.close()
        for connection in [*server_ends.values(), *party_ends.values()]:
            connection.close()  # the children hold the pipes now; a party's end of file means its peer is gone

        enrolments = _gather(controls, "enrolled", deadline)
        roster = build_roster(enrolments[party] for party, _ in parties)
        roster.save(run_dir / ROSTER_FILE)
        for party, _ in parties:
            shutil.copyfile(run_dir / ROSTER_FILE, run_dir / "parties" / party / ROSTER_FILE)
            controls[party].send(("roster",))
        reports = _gather(controls, "report", deadline)
        for process in processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        unclean = {party: process.exitcode for party, process in processes.items() if process.exitcode != 0}
        if unclean:
            raise RuntimeError(f"party processes did not exit cleanly after reporting (exit codes): {unclean}")
        return ProcessRun(run_dir, reports)
    finally:
        for process in processes.values():
            if process.is_alive():
                process.terminate()
                process.join()


def _gather(controls: Mapping[str, Connection], kind: str, deadline: float) -> dict[str, Any]:
    """The ``kind`` message of every party's process. Waits for all of them, so that when one fails the error
    names every failure (the first to fail, not just a peer that lost it), or who was still silent at
    ``deadline``."""
    received: dict[str, Any] = {}
    failures: list[str] = []
    waiting = {connection: party for party, connection in controls.items()}
    while waiting:
        ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            failures.append(f"no {kind!r} in time from {', '.join(sorted(waiting.values()))}")
            break
        for connection in ready:
            party = waiting.pop(connection)
            try:
                what, payload = connection.recv()
            except EOFError:
                failures.append(f"{party}: its process ended without a {kind!r}")
                continue
            if what == kind:
                received[party] = payload
            elif what == "error":
                failures.append(payload)
            else:
                failures.append(f"{party}: expected {kind!r} from its process, got {what!r}")
    if failures:
        raise RuntimeError("party processes failed:\n" + "\n".join(failures))
    return received

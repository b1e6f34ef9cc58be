"""The local hop between a site's Flower ClientApp and its long-lived agent: framing, one call, error codes.

Standard library only. The ClientApp that Flower starts for every message (a fresh process each time, from
code the run's submitter ships) imports this module and nothing of the model or of a party: it passes the
message's bytes to the party's agent over a Unix socket (created 0600 by the agent, inside the party's own
folder or another private one) and hands back the bytes the agent answers. The agent holds the party's keys,
data, model, ledger and audit log; the ClientApp holds nothing and can leak nothing but the bytes it relays.

A frame is ``u32 count`` then ``count × (u32 length, bytes)``. A request frame is
``[MAGIC, kind, node_id, payload...]``; a reply frame ``[b"ok", part...]`` or ``[b"error", code]``.
Failures cross the socket, and then the network, only as one of :data:`ERROR_CODES`: no exception text,
no traceback (the agent writes those to its own log).
"""

from __future__ import annotations

import socket
import struct
import time

MAGIC = b"feddat-relay-1"
KIND_PING, KIND_BIND, KIND_MESSAGES = b"ping", b"bind", b"messages"
MAX_FRAME_BYTES = 1 << 31  # a model (float32) and its signature fit many times over
MAX_PARTS = 1 << 16
ERROR_CODES = {
    "agent-unreachable": "the party's agent did not accept the connection (not running, or another socket)",
    "agent-timeout": "the agent did not answer before the stage's deadline",
    "bad-frame": "a frame that does not parse (truncated, too large, wrong magic)",
    "bad-request": "a request the agent does not take (unknown kind, malformed content)",
    "refused": "the agent refused the request (its own log says why)",
    "internal": "the agent failed while handling the request (its own log has the traceback)",
    "closed": "the agent's run is closed; it takes no more messages",
}
_U32 = struct.Struct(">I")


class RelayError(Exception):
    """A relay failure, by code (one of :data:`ERROR_CODES`); the only thing a relay failure ever reports."""

    def __init__(self, code: str) -> None:
        if code not in ERROR_CODES:
            code = "internal"
        super().__init__(code)
        self.code = code


def pack(parts: list[bytes]) -> bytes:
    """One frame of ``parts`` (each bytes)."""
    if len(parts) > MAX_PARTS:
        raise RelayError("bad-frame")
    chunks = [_U32.pack(len(parts))]
    for part in parts:
        chunks += [_U32.pack(len(part)), bytes(part)]
    return b"".join(chunks)


def unpack(frame: bytes) -> list[bytes]:
    """The parts of one frame; RelayError('bad-frame') for anything that is not exactly one frame."""
    view = memoryview(frame)
    if len(view) < 4:
        raise RelayError("bad-frame")
    (count,) = _U32.unpack_from(view, 0)
    if count > MAX_PARTS:
        raise RelayError("bad-frame")
    parts, offset = [], 4
    for _ in range(count):
        if offset + 4 > len(view):
            raise RelayError("bad-frame")
        (length,) = _U32.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise RelayError("bad-frame")
        parts.append(bytes(view[offset:offset + length]))
        offset += length
    if offset != len(view):
        raise RelayError("bad-frame")
    return parts


def send_frame(connection: socket.socket, parts: list[bytes]) -> None:
    frame = pack(parts)
    connection.sendall(_U32.pack(len(frame)) + frame)


def receive_frame(connection: socket.socket, *, max_bytes: int = MAX_FRAME_BYTES,
                  deadline_s: float | None = None) -> list[bytes]:
    """One length-prefixed frame from ``connection``; RelayError('bad-frame') on a short or oversized one, and
    TimeoutError when the whole frame has not arrived within ``deadline_s`` (a sender that trickles bytes
    cannot hold a reader longer than that)."""
    stop = None if deadline_s is None else time.monotonic() + deadline_s
    (length,) = _U32.unpack(_receive_exactly(connection, 4, stop))
    if length > max_bytes:
        raise RelayError("bad-frame")
    return unpack(_receive_exactly(connection, length, stop))


def _receive_exactly(connection: socket.socket, size: int, stop: float | None = None) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        if stop is not None:
            left = stop - time.monotonic()
            if left <= 0:
                raise TimeoutError("the frame did not arrive in time")
            connection.settimeout(left)
        chunk = connection.recv(min(size - len(buffer), 1 << 20))
        if not chunk:
            raise RelayError("bad-frame")
        buffer += chunk
    return bytes(buffer)


def call(socket_path: str, kind: bytes, node_id: int, payloads: list[bytes], *, timeout_s: float) -> list[bytes]:
    """Send one request to the agent at ``socket_path`` and return the parts of its ``ok`` reply.

    ``node_id`` is the Flower node id the relay runs under (the agent binds itself to it). Raises
    RelayError with the agent's error code, or ``agent-unreachable`` / ``agent-timeout`` / ``bad-frame``."""
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        raise RelayError("agent-unreachable") from None
    with connection:
        connection.settimeout(timeout_s)
        try:
            connection.connect(socket_path)
        except OSError:
            raise RelayError("agent-unreachable") from None
        try:
            send_frame(connection, [MAGIC, kind, str(int(node_id)).encode(), *payloads])
            reply = receive_frame(connection)
        except TimeoutError:
            raise RelayError("agent-timeout") from None
        except OSError:
            raise RelayError("agent-unreachable") from None
    if not reply:
        raise RelayError("bad-frame")
    if reply[0] == b"ok":
        return reply[1:]
    if reply[0] == b"error" and len(reply) == 2:
        raise RelayError(reply[1].decode("ascii", "replace"))
    raise RelayError("bad-frame")

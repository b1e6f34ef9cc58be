"""Versioned, canonical binary messages between server and clients, with strict decoding.

Layout: ``MAGIC | version (u16) | header length (u32) | header | payload``, little-endian.
The header is canonical JSON (sorted keys, no spaces) naming kind, round, sender,
recipient, small metadata and the tensor table; the payload is the tensors' float32 bytes
in the table's (sorted) order. The same content always gives the same bytes, so audit
logs can hash a message, and :func:`decode` rejects anything that is not exactly such a
message before any of it is used.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"FDSM"
VERSION = 1
KINDS = ("train", "update", "evaluate", "metrics", "tree_head")
MAX_MESSAGE_BYTES = 1 << 31
MAX_HEADER_BYTES = 1 << 24
MAX_PARTY_ID = 64
_PREFIX = struct.Struct("<4sHI")
_HEADER_KEYS = {"kind", "round", "sender", "recipient", "meta", "tensors"}
_DTYPE = "<f4"


class MessageError(ValueError):
    """A message is malformed, unexpected or from the wrong party or round."""


@dataclass(frozen=True)
class Message:
    kind: str
    round: int
    sender: str
    recipient: str
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


def encode(message: Message) -> bytes:
    _check_envelope(message.kind, message.round, message.sender, message.recipient)
    names = sorted(message.tensors)
    arrays = [np.ascontiguousarray(message.tensors[n], dtype=_DTYPE) for n in names]
    for name, array in zip(names, arrays):
        if not np.all(np.isfinite(array)):
            raise MessageError(f"tensor {name!r} holds NaN or inf; refusing to send it")
    header = {
        "kind": message.kind,
        "round": message.round,
        "sender": message.sender,
        "recipient": message.recipient,
        "meta": dict(message.meta),
        "tensors": [[n, _DTYPE, list(a.shape)] for n, a in zip(names, arrays)],
    }
    header_bytes = _canonical_json(header)
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(header_bytes)), header_bytes, *(a.tobytes() for a in arrays)])


def decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"a message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise MessageError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < _PREFIX.size:
        raise MessageError(f"message of {len(data)} bytes is shorter than its {_PREFIX.size}-byte prefix")
    magic, version, header_length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MessageError("not a feddat-secure message (bad magic bytes)")
    if version != VERSION:
        raise MessageError(f"message version {version} is not supported (this build reads {VERSION})")
    if header_length > min(MAX_HEADER_BYTES, len(data) - _PREFIX.size):
        raise MessageError(f"header length {header_length} runs past the end of the message")
    raw_header = data[_PREFIX.size:_PREFIX.size + header_length]
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MessageError(f"message header is not valid JSON: {error}") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise MessageError(f"message header must have exactly the keys {sorted(_HEADER_KEYS)}")
    if _canonical_json(header) != raw_header:
        raise MessageError("message header is not in canonical form")
    _check_envelope(header["kind"], header["round"], header["sender"], header["recipient"])
    if not isinstance(header["meta"], dict):
        raise MessageError("message meta must be an object")
    tensors = _decode_tensors(header["tensors"], memoryview(data)[_PREFIX.size + header_length:])
    return Message(header["kind"], header["round"], header["sender"], header["recipient"], tensors, header["meta"])


def _decode_tensors(table: Any, payload: memoryview) -> dict[str, np.ndarray]:
    if not isinstance(table, list):
        raise MessageError("message tensor table must be a list")
    tensors, offset, previous = {}, 0, None
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and entry[0]
                and entry[1] == _DTYPE and isinstance(entry[2], list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[2])):
            raise MessageError(f"malformed tensor entry {str(entry)[:80]}")
        name, _, shape = entry
        if previous is not None and name <= previous:
            raise MessageError(f"tensor names must be unique and sorted; {name!r} is out of order")
        previous = name
        size = math.prod(shape) * 4
        if offset + size > len(payload):
            raise MessageError(f"tensor {name!r} runs past the end of the message (truncated?)")
        array = np.frombuffer(payload[offset:offset + size], dtype=_DTYPE).reshape(shape).copy()
        if not np.all(np.isfinite(array)):
            raise MessageError(f"tensor {name!r} holds NaN or inf")
        tensors[name] = array
        offset += size
    if offset != len(payload):
        raise MessageError(f"{len(payload) - offset} unexpected bytes after the last tensor")
    return tensors


def _check_envelope(kind: Any, round_index: Any, sender: Any, recipient: Any) -> None:
    if kind not in KINDS:
        raise MessageError(f"unknown message kind {kind!r}; known: {', '.join(KINDS)}")
    if not isinstance(round_index, int) or isinstance(round_index, bool) or round_index < 0:
        raise MessageError(f"message round must be a non-negative integer, got {round_index!r}")
    for role, party in (("sender", sender), ("recipient", recipient)):
        if not isinstance(party, str) or not party or len(party) > MAX_PARTY_ID:
            raise MessageError(f"message {role} must be a non-empty id of at most {MAX_PARTY_ID} characters")


def _canonical_json(value: Any) -> bytes:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as error:
        raise MessageError(f"message header cannot be encoded canonically: {error}") from None


def expect(message: Message, *, kind: str, round_index: int, sender: str | None = None, recipient: str) -> None:
    """Reject a decoded message that is not the one this party is waiting for (replays included)."""
    if message.kind != kind:
        raise MessageError(f"expected a {kind!r} message, got {message.kind!r} from {message.sender!r}")
    if message.round != round_index:
        raise MessageError(f"{kind!r} message from {message.sender!r} is for round {message.round}, "
                           f"this is round {round_index}")
    if sender is not None and message.sender != sender:
        raise MessageError(f"{kind!r} message from {message.sender!r}, expected {sender!r}")
    if message.recipient != recipient:
        raise MessageError(f"{kind!r} message addressed to {message.recipient!r}, not {recipient!r}")

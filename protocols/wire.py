"""The one message format: signed, canonical, versioned, strictly validated.

Layout (all integers little-endian)::

    b"FDSP" | u16 version | u32 header length | header | payload | 64-byte Ed25519 signature

The header is canonical JSON (sorted keys, no spaces, ASCII) with exactly the keys ``protocol``,
``round``, ``stage``, ``sender``, ``recipient``, ``session``, ``roster``, ``fields``, ``arrays``,
``blobs`` and ``payload``; the payload is the arrays' bytes then the blobs' bytes, each list sorted by
name. ``payload`` is the payload's BLAKE3 digest (``payload_digest``) and the signature covers
everything before the payload (prefix and header): Ed25519 hashes its whole message with SHA-512, twice
when signing, so signing a fixed-size digest instead of a multi-megabyte vector replaces three serial
passes by one BLAKE3 pass (issue 16). Binding is unchanged: forging a payload for a signed header needs a
BLAKE3 collision. Because the header is canonical, the lists are
sorted and Ed25519 is deterministic, the same content always encodes to the same bytes (audit logs hash
them), and ``decode`` refuses any other spelling of it.

``session`` (the run's random 128-bit id) and ``roster`` (the SHA-256 of the roster the sender
pinned) are signed with everything else, so a message cannot be replayed into another run, nor be
accepted by a party that enrolled its peers differently: round and stage numbers repeat across
runs, session ids do not.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import secrets
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import blake3
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import parallel
from .errors import ConfigurationError, MessageRejected, ProtocolError
from .identity import Identity, Roster, check_party_id

MAGIC = b"FDSP"
VERSION = 4  # 2: the signed header carries the session id and the roster digest; 3: Ed25519 signs the header,
# which carries the payload's SHA-256 hash-list digest; 4: the payload digest is BLAKE3
MAX_MESSAGE_BYTES = 1 << 31
MAX_HEADER_BYTES = 1 << 20
MAX_NAME_CHARS = 128
MAX_DIMENSIONS = 8
SIGNATURE_BYTES = 64
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in
          ("uint8", "uint16", "uint32", "uint64", "int64", "float32", "float64")}
HEADER_KEYS = frozenset({"protocol", "round", "stage", "sender", "recipient", "session", "roster", "fields",
                         "arrays", "blobs", "payload"})
PARALLEL_HASH_BYTES = 16 << 20  # payloads this long are hashed on several threads (an HE input; not a 4 MB vector)
PARALLEL_DECODE_COUNT = 8  # decode_each splits this many messages or more over the worker threads
_PAYLOAD_DOMAIN = b"FDSP payload v4\0"
_JOIN_BELOW_BYTES = 1 << 20  # payloads of many parts up to this size are joined, then hashed in one call
_DIGEST = re.compile("[0-9a-f]{64}")
SESSION_BYTES = 16  # 128 random bits: collisions between runs are out of reach
_SESSION = re.compile(f"[0-9a-f]{{{2 * SESSION_BYTES}}}")
_ROSTER_DIGEST = re.compile("[0-9a-f]{64}")
_PREFIX = struct.Struct("<4sHI")
_MAX_ROUND = (1 << 63) - 1


@dataclass(frozen=True, eq=False)
class Envelope:
    """One protocol message. ``fields`` holds JSON values (tuples come back as lists).

    ``session`` and ``roster`` default to "" only so that the content fields can be given by position;
    ``encode`` refuses an envelope without a valid session id and roster digest.

    ``payload`` is the payload digest ``decode`` verified (``payload_digest`` of the arrays' then the blobs'
    bytes): a receiver that commits to a message's payload compares against it instead of hashing the payload
    a second time (issue 16). ``encode`` always computes its own and ignores this one.
    """

    protocol: str
    round: int
    stage: str
    sender: str
    recipient: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    blobs: Mapping[str, bytes] = field(default_factory=dict)
    session: str = ""
    roster: str = ""
    payload: str = ""


def new_session_id() -> str:
    """A fresh session id: 128 bits from the OS generator, as 32 lowercase hex characters."""
    return secrets.token_hex(SESSION_BYTES)


def check_session_id(value: object) -> str:
    """Return ``value`` if it is a session id (32 lowercase hex characters); otherwise raise ConfigurationError."""
    if not isinstance(value, str) or not _SESSION.fullmatch(value):
        raise ConfigurationError(f"invalid session id {value!r}: a session id is {2 * SESSION_BYTES} lowercase "
                                 "hex characters (new_session_id() makes one)")
    return value


# one encoder for every header: json.dumps(value, **options) builds a new one per call
_CANONICAL_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _canonical_json(value: Any) -> bytes:
    return _CANONICAL_ENCODER.encode(value).encode()


def encode(envelope: Envelope, identity: Identity) -> bytes:
    """Serialize and sign ``envelope`` as ``identity`` (which must be its sender)."""
    return encode_to_each(envelope, [envelope.recipient], identity)[0]


def encode_to_each(envelope: Envelope, recipients: Sequence[str], identity: Identity) -> list[bytes]:
    """``[encode(dataclasses.replace(envelope, recipient=r), identity) for r in recipients]``, byte for byte, with
    the payload, its digest, the header's checks and its JSON made once: a server relaying the same n signed
    messages to each of n clients (the masked protocol's advertise and share-keys requests) pays per recipient
    only a substitution in the header and one signature (issue 16)."""
    if envelope.sender != identity.party_id:
        raise ProtocolError(f"envelope sender {envelope.sender!r} is not the signing identity {identity.party_id!r}")
    parts, array_specs = [], []
    for name in sorted(envelope.arrays):
        array = envelope.arrays[name]
        if not isinstance(array, np.ndarray) or array.dtype.name not in DTYPES:
            raise ProtocolError(f"array {name!r} must be a numpy array of one of {', '.join(DTYPES)}")
        array_specs.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape)})
        contiguous = np.ascontiguousarray(array, dtype=DTYPES[array.dtype.name])
        parts.append(_byte_view(contiguous) if contiguous.size else b"")
    blobs = [envelope.blobs[name] for name in sorted(envelope.blobs)]
    if not all(isinstance(blob, bytes | bytearray | memoryview) for blob in blobs):
        raise ProtocolError("blobs must be bytes")
    blobs = [blob if isinstance(blob, bytes) else _byte_view(blob) for blob in blobs]
    parts.extend(blobs)
    placeholder = f"recipient-{secrets.token_hex(16)}"  # a party id no field can hold by chance
    header = {
        "protocol": envelope.protocol, "round": envelope.round, "stage": envelope.stage,
        "sender": envelope.sender, "recipient": placeholder, "session": envelope.session,
        "roster": envelope.roster, "fields": dict(envelope.fields), "arrays": array_specs,
        "blobs": [{"name": name, "size": len(blob)} for name, blob in zip(sorted(envelope.blobs), blobs)],
        "payload": payload_digest(parts),
    }
    try:
        template = _canonical_json(header)
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"envelope fields are not finite JSON values: {error}") from None
    try:
        _check_header(header)
    except MessageRejected as error:  # the same rules as decode: we never send what we would refuse
        raise ProtocolError(f"cannot encode message: {error.reason}") from None
    before, found, after = template.partition(_canonical_json(placeholder))
    if not found or found in after:
        raise ProtocolError("cannot encode message: the recipient placeholder is not unique in the header")
    payload_bytes = sum(len(part) for part in parts)
    messages = []
    for recipient in recipients:
        try:
            check_party_id(recipient)
        except ProtocolError:
            raise ProtocolError(f"cannot encode message: header field 'recipient' must be a party id, not "
                                f"{recipient!r}") from None
        header_bytes = before + _canonical_json(recipient) + after
        try:
            _check_header_size(len(header_bytes))
        except MessageRejected as error:
            raise ProtocolError(f"cannot encode message: {error.reason}") from None
        signed = _PREFIX.pack(MAGIC, VERSION, len(header_bytes)) + header_bytes
        size = len(signed) + payload_bytes + SIGNATURE_BYTES
        if size > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message of {size} bytes exceeds {MAX_MESSAGE_BYTES}")
        messages.append(b"".join([signed, *parts, identity.sign(signed)]))
    return messages


def payload_digest(parts: list) -> str:
    """The digest of the concatenation of ``parts`` (bytes-like), as 64 hex characters: BLAKE3 of
    ``b"FDSP payload v4\\0"`` then the payload (BLAKE3: O'Connor, Aumasson, Neves & Wilcox-O'Hearn, 2020; 256-bit
    output, 128-bit collision resistance, as SHA-256). One pass at 5.6 GB/s on one core here, against SHA-256's
    1.7 (``benchmarks/keystream.py``); from ``PARALLEL_HASH_BYTES`` on, BLAKE3's tree mode also spreads the pass
    over ``parallel.worker_count()`` threads (below it, one thread is faster, measured). The GIL is released
    while hashing."""
    views = [_byte_view(part) for part in parts]
    total = sum(len(view) for view in views)
    if len(views) > 1 and total <= _JOIN_BELOW_BYTES:  # e.g. a relay of 100 signed messages: one call, not 100
        views = [memoryview(b"".join(views))]
    hasher = blake3.blake3(_PAYLOAD_DOMAIN,
                           max_threads=parallel.worker_count() if total >= PARALLEL_HASH_BYTES else 1)
    for view in views:
        hasher.update(view)
    return hasher.hexdigest()


def _byte_view(part: bytes | bytearray | memoryview) -> memoryview:
    """``part`` as a flat view of its bytes (len() counts bytes whatever the exporter's item format)."""
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def decode(data: bytes, roster: Roster, *, session: str | None, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    """Parse and verify ``data``; any problem raises MessageRejected naming it.

    ``session`` is required so that every receiver decides: the session id the message must carry, or
    None for "any session" (only a party's first contact, which learns the session from it, passes None).

    Checks, in order: size limit, framing, header schema, exact payload length, the roster digest
    (before the expensive signature: a message signed under another roster is refused outright),
    the session, sender on the roster, the header's signature, then the payload against the signed digest (the
    one pass over the payload). Arrays come back as read-only views into ``data`` (no copy;
    native-endian copies on a big-endian host); blobs as bytes.
    """
    envelope, check_payload = decode_checking_payload_later(data, roster, session=session, max_bytes=max_bytes)
    check_payload()
    return envelope


def decode_each(messages: Sequence[bytes], roster: Roster, *, session: str | None,
                max_bytes: int = MAX_MESSAGE_BYTES) -> list[Envelope | MessageRejected]:
    """``decode`` of every message in ``messages``, each item the envelope or the MessageRejected that ``decode``
    raised for it, in the order given (the caller decides which refusal it reports, the same one whatever the
    threads).

    From ``PARALLEL_DECODE_COUNT`` messages on, the signatures are checked on ``parallel.worker_count()`` threads:
    libsodium releases the GIL while it checks one (about 55 µs here, two thirds of a small message's decode), so
    a masked client checking a relay of 100 signed messages uses both of its cores (issue 16). Framing and header
    checks run before, payload checks after, in the calling thread: interleaved with the signature checks, their
    Python and BLAKE3's binding (which releases the GIL on every call, however short) would make the threads hand
    the GIL back and forth for every message, which costs more than it saves."""
    if session is not None:
        check_session_id(session)  # the receiver's own argument: a ConfigurationError, raised, not a refusal
    framed: list[_Framed | MessageRejected] = []
    for data in messages:
        try:
            with _unforeseen_refused():
                framed.append(_checked_frame(data, roster, session, max_bytes))
        except MessageRejected as error:  # refused in its place, as decode refuses it
            framed.append(error)
    signed = [index for index, item in enumerate(framed) if not isinstance(item, MessageRejected)]

    def verify_span(start: int, stop: int) -> None:
        for index in signed[start:stop]:
            try:
                with _unforeseen_refused():
                    framed[index].verify(roster)  # type: ignore[union-attr]
            except MessageRejected as error:
                framed[index] = error  # each thread writes only its own indices

    threads = parallel.worker_count() if len(signed) >= PARALLEL_DECODE_COUNT else 1
    parallel.run_each(verify_span, parallel.spans(len(signed), threads))
    results: list[Envelope | MessageRejected] = []
    for item in framed:
        try:
            if isinstance(item, MessageRejected):
                raise item
            with _unforeseen_refused():
                envelope, check_payload = item.opened()
                check_payload()
        except MessageRejected as error:
            results.append(detached(error))
        else:
            results.append(envelope)
    return results


def detached(error: MessageRejected) -> MessageRejected:
    """``error`` without its traceback and the exception it was raised while handling: their frames would keep
    every message decoded beside it alive for as long as a caller keeps the refusal (``decode_each``)."""
    error.__context__ = error.__cause__ = None
    return error.with_traceback(None)


@contextmanager
def _unforeseen_refused() -> Iterator[None]:
    """Reading one message raises MessageRejected and nothing else: whatever no check foresaw becomes that
    message's refusal, in the same words from ``decode`` and ``decode_each`` (a receiver is never crashed by a
    message)."""
    try:
        yield
    except MessageRejected:
        raise
    except Exception as error:  # noqa: BLE001
        raise MessageRejected(f"malformed message ({type(error).__name__}: {error})") from None


def decode_checking_payload_later(data: bytes, roster: Roster, *, session: str | None,
                                  max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[Envelope, Callable[[], None]]:
    """``decode`` without its last check: returns the envelope and ``check_payload``, which compares the payload
    with the header's signed digest and raises MessageRejected (``decode``'s error) when they differ.

    Everything else is checked, the header's signature included, so the header can be trusted at once; the arrays
    and blobs cannot until ``check_payload()`` has returned. This is for a receiver that overlaps the payload's one
    pass (about 0.7 ms for a 4 MB masked vector on one core here) with work it can undo exactly when the check
    fails: the masked server adds a masked vector modulo 2^m while another thread hashes it, and subtracts it again
    on a mismatch (issue 16). Nothing read from the payload may be kept, sent or acted on before the check.
    """
    if session is not None:
        check_session_id(session)  # the receiver's own argument: a ConfigurationError, raised, not a refusal
    with _unforeseen_refused():
        framed = _checked_frame(data, roster, session, max_bytes)
        framed.verify(roster)
        envelope, check_payload = framed.opened()

    def checked_payload() -> None:
        with _unforeseen_refused():
            check_payload()

    return envelope, checked_payload


@dataclass(frozen=True)
class _Framed:
    """A message whose framing, header, payload length, roster digest and session were checked; not yet its
    signature (``verify``) nor its payload (``opened``'s ``check_payload``). Nothing may act on it before both."""

    data: bytes
    payload_start: int
    header: dict[str, Any]
    sizes: list[int]

    def verify(self, roster: Roster) -> None:
        """Raise MessageRejected unless the sender's signature covers the prefix and the header."""
        roster.verify(self.header["sender"], self.data[-SIGNATURE_BYTES:], memoryview(self.data)[:self.payload_start])

    def opened(self) -> tuple[Envelope, Callable[[], None]]:
        """The envelope (arrays as read-only views into the message, blobs as bytes) and ``check_payload``."""
        data, header = self.data, self.header
        sender = header["sender"]

        def check_payload() -> None:
            calculated = _received_payload_digest(data, self.payload_start)
            if not hmac.compare_digest(calculated, header["payload"]):
                raise MessageRejected(f"the payload does not match its signed digest: expected {header['payload']}, "
                                      f"calculated {calculated}", sender)

        offset, arrays, blobs = self.payload_start, {}, {}
        for spec, size in zip(header["arrays"], self.sizes):
            dtype = DTYPES[spec["dtype"]]
            flat = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            if not dtype.isnative:
                flat = flat.astype(dtype.newbyteorder("="))
            arrays[spec["name"]] = flat.reshape(spec["shape"])
            offset += size
        for spec in header["blobs"]:
            blobs[spec["name"]] = data[offset:offset + spec["size"]]
            offset += spec["size"]
        envelope = Envelope(header["protocol"], header["round"], header["stage"], sender, header["recipient"],
                            header["fields"], arrays, blobs, header["session"], header["roster"], header["payload"])
        return envelope, check_payload


def _checked_frame(data: object, roster: Roster, session: str | None, max_bytes: int) -> _Framed:
    """``decode``'s checks in its order up to the signature: size limit, framing, header schema, exact payload
    length, the roster digest (before the expensive signature) and the session (``session`` itself checked by the
    caller)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageRejected(f"a message must be bytes, not {type(data).__name__}")
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > max_bytes:
        raise MessageRejected(f"oversized message: {len(data)} bytes, the limit is {max_bytes}")
    payload_start, header = _frame(data)
    sender = header["sender"]
    sizes = [_array_bytes(spec) for spec in header["arrays"]] + [spec["size"] for spec in header["blobs"]]
    payload_length = len(data) - payload_start - SIGNATURE_BYTES
    if sum(sizes) > payload_length:
        raise MessageRejected(f"truncated message: the header announces {sum(sizes)} payload bytes, "
                              f"{payload_length} are there", sender)
    if sum(sizes) < payload_length:
        raise MessageRejected(f"{payload_length - sum(sizes)} unexpected bytes after the payload", sender)
    pinned = roster.digest
    if header["roster"] != pinned:
        raise MessageRejected(f"signed under roster {header['roster']}, this party pins {pinned}", sender)
    if session is not None and header["session"] != session:
        raise MessageRejected(f"message of session {header['session']}, this party is in session {session} "
                              "(replayed from another run, or misdirected)", sender)
    return _Framed(data, payload_start, header, sizes)


def signed_by(data: object, public_key: Ed25519PublicKey) -> bool:
    """Whether ``data`` is a well-framed message that ``public_key`` signed, payload included (the header's
    signature verifies and the payload matches the signed digest); nothing else is checked (session, roster,
    round). For attributing a refused message to a peer in an audit log, never for accepting one."""
    if not isinstance(data, bytes | bytearray | memoryview):
        return False
    data = bytes(data)
    try:
        payload_start, header = _frame(data)
        public_key.verify(data[-SIGNATURE_BYTES:], memoryview(data)[:payload_start])
    except (MessageRejected, InvalidSignature):
        return False
    return hmac.compare_digest(_received_payload_digest(data, payload_start), header["payload"])


def _received_payload_digest(data: bytes, payload_start: int) -> str:
    """The digest of a framed message's payload: the bytes between its header and its signature."""
    return payload_digest([memoryview(data)[payload_start:-SIGNATURE_BYTES]])


def peek(data: object) -> Envelope | None:
    """The header values of ``data`` (protocol, round, stage, sender, recipient, session, roster, fields),
    parsed WITHOUT checking the signature, the payload or the roster; None when framing or header do not parse.

    For audit-log metadata only: anyone can write any header, so nothing may act on what this returns
    (``decode`` is the only way to a message a party may act on). Arrays and blobs are left out.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        return None
    try:
        _, header = _frame(bytes(data))
    except MessageRejected:
        return None
    return Envelope(header["protocol"], header["round"], header["stage"], header["sender"], header["recipient"],
                    header["fields"], session=header["session"], roster=header["roster"])


def _frame(data: bytes) -> tuple[int, dict[str, Any]]:
    """Check the prefix and parse the header; returns (where the payload starts, the header)."""
    if len(data) < _PREFIX.size + SIGNATURE_BYTES:
        raise MessageRejected(f"truncated message: {len(data)} bytes is shorter than the smallest message")
    magic, version, header_length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MessageRejected(f"not a protocol message: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise MessageRejected(f"unsupported message version {version}; this code reads version {VERSION}")
    _check_header_size(header_length)
    payload_start = _PREFIX.size + header_length
    if payload_start + SIGNATURE_BYTES > len(data):
        raise MessageRejected(f"truncated message: the header claims {header_length} bytes, "
                              f"{len(data) - _PREFIX.size - SIGNATURE_BYTES} are there")
    return payload_start, _parse_header(data[_PREFIX.size:payload_start])


def expect(envelope: Envelope, *, protocol: str | None = None, round: int | None = None, stage: str | None = None,
           recipient: str | None = None, sender: str | None = None) -> Envelope:
    """Return ``envelope`` if it matches every given value; otherwise reject it naming the mismatch.

    This is what refuses replays: a validly signed message from another round, stage or
    protocol, or one addressed to someone else, fails here.
    """
    for name, wanted in (("protocol", protocol), ("round", round), ("stage", stage), ("recipient", recipient),
                         ("sender", sender)):
        actual = getattr(envelope, name)
        if wanted is not None and actual != wanted:
            raise MessageRejected(f"unexpected {name} {actual!r}, expected {wanted!r} (replayed, stale or "
                                  "misdirected message)", envelope.sender)
    return envelope


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a finite number")


def _finite_float(text: str) -> float:
    """A JSON number with a fraction or exponent, refused where it overflows to ±inf (1e999 is valid JSON): checked
    as it is parsed, so no header field is walked again afterwards."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


# one decoder for every header: json.loads(text, parse_constant=...) would build a new one per call. Every float of
# a decoded header is finite (the two hooks); an encoded one is checked by the encoder (allow_nan=False).
_HEADER_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _parse_header(header_bytes: bytes) -> dict[str, Any]:
    try:
        header = _HEADER_DECODER.decode(header_bytes.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise MessageRejected(f"header is not ASCII JSON: {error}") from None
    try:
        _check_header(header)
    except MessageRejected:
        raise
    except Exception as error:  # noqa: BLE001 - a header shape no check foresaw: refused by name, never a crash
        raise MessageRejected(f"malformed header ({type(error).__name__}: {error})") from None
    try:
        canonical = _canonical_json(header)
    except (ValueError, RecursionError):
        canonical = b""
    if canonical != header_bytes:
        raise MessageRejected("header is not in canonical form (sorted keys, no spaces, no duplicates)",
                              header.get("sender") if isinstance(header.get("sender"), str) else None)
    return header


def _check_header_size(length: int) -> None:
    if length > MAX_HEADER_BYTES:
        raise MessageRejected(f"oversized header: {length} bytes, the limit is {MAX_HEADER_BYTES}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(header: Any) -> None:
    if not isinstance(header, dict):
        raise MessageRejected("header must be a JSON object")
    sender = header.get("sender") if isinstance(header.get("sender"), str) else None
    if set(header) != HEADER_KEYS:
        missing, extra = sorted(HEADER_KEYS - set(header)), sorted(set(header) - HEADER_KEYS)
        raise MessageRejected(f"header keys wrong: missing {missing}, unexpected {extra}", sender)
    for key in ("protocol", "stage"):
        if not isinstance(header[key], str) or not 0 < len(header[key]) <= MAX_NAME_CHARS:
            raise MessageRejected(f"header field {key!r} must be a string of 1-{MAX_NAME_CHARS} characters", sender)
    for key in ("sender", "recipient"):
        try:
            check_party_id(header[key])
        except ProtocolError:
            raise MessageRejected(f"header field {key!r} must be a party id, not {header[key]!r}", sender) from None
    if not _is_int(header["round"]) or not 0 <= header["round"] <= _MAX_ROUND:
        raise MessageRejected("header field 'round' must be an integer >= 0", sender)
    if not isinstance(header["session"], str) or not _SESSION.fullmatch(header["session"]):
        raise MessageRejected(f"header field 'session' must be a session id ({2 * SESSION_BYTES} lowercase hex "
                              "characters)", sender)
    if not isinstance(header["roster"], str) or not _ROSTER_DIGEST.fullmatch(header["roster"]):
        raise MessageRejected("header field 'roster' must be a roster digest (64 lowercase hex characters)", sender)
    if not isinstance(header["payload"], str) or not _DIGEST.fullmatch(header["payload"]):
        raise MessageRejected("header field 'payload' must be the payload's digest (64 lowercase hex characters)",
                              sender)
    if not isinstance(header["fields"], dict):  # its numbers are finite: see _HEADER_DECODER and _canonical_json
        raise MessageRejected("header field 'fields' must be an object", sender)
    _check_items(header["arrays"], "arrays", {"name", "dtype", "shape"}, sender)
    for spec in header["arrays"]:
        if not isinstance(spec["dtype"], str) or spec["dtype"] not in DTYPES:
            raise MessageRejected(f"array {spec['name']!r}: dtype must be one of {', '.join(DTYPES)}", sender)
        shape = spec["shape"]
        if (not isinstance(shape, list) or len(shape) > MAX_DIMENSIONS
                or not all(_is_int(n) and 0 <= n < MAX_MESSAGE_BYTES for n in shape)):
            raise MessageRejected(f"array {spec['name']!r}: shape must be a list of at most {MAX_DIMENSIONS} "
                                  "non-negative integers", sender)
        # an empty array's other dimensions count too: numpy refuses to shape one whose extent would overflow
        if math.prod(max(n, 1) for n in shape) * DTYPES[spec["dtype"]].itemsize > MAX_MESSAGE_BYTES:
            raise MessageRejected(f"array {spec['name']!r}: shape {shape} spans more than {MAX_MESSAGE_BYTES} "
                                  "bytes, even where it is empty", sender)
    _check_items(header["blobs"], "blobs", {"name", "size"}, sender)
    for spec in header["blobs"]:
        if not _is_int(spec["size"]) or not 0 <= spec["size"] < MAX_MESSAGE_BYTES:
            raise MessageRejected(f"blob {spec['name']!r}: size must be a non-negative integer", sender)


def _check_items(items: Any, kind: str, keys: set[str], sender: str | None) -> None:
    if not isinstance(items, list):
        raise MessageRejected(f"header field {kind!r} must be a list", sender)
    previous = None
    for spec in items:
        if not isinstance(spec, dict) or spec.keys() != keys:
            raise MessageRejected(f"each entry of {kind!r} must be an object with exactly {sorted(keys)}", sender)
        name = spec["name"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise MessageRejected(f"{kind} names must be strings of 1-{MAX_NAME_CHARS} characters", sender)
        if previous is not None and name <= previous:
            raise MessageRejected(f"{kind} names must be unique and sorted; {name!r} follows {previous!r}", sender)
        previous = name


def _array_bytes(spec: dict[str, Any]) -> int:
    return math.prod(spec["shape"]) * DTYPES[spec["dtype"]].itemsize

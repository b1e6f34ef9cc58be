"""The entry schema (``docs/audit.md``), signed tree heads, and their strict parsing.

An entry is one line of canonical JSON (sorted keys, no spaces, ASCII only) with exactly the
keys in :data:`ENTRY_KEYS`. Its signature covers the same object without ``sig``; its hash (the
next entry's ``prev``) and its Merkle leaf are taken over the line's bytes without the newline.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import merkle

FORMAT = "feddat-secure-audit/1"
SCHEMA_VERSION = 1
GENESIS = "0" * 64
ENTRY_CONTEXT = b"feddat-secure audit entry v1\x00"
TREE_HEAD_CONTEXT = b"feddat-secure audit tree head v1\x00"
MAX_LINE_BYTES = 8192
MAX_PARTY_ID = 64
MAX_STAGE = 64
MAX_META_KEYS = 16
MAX_META_STRING = 256
MAX_META_LIST = 16
MAX_META_LIST_STRING = 64
MAX_INT = 2**63 - 1

EVENTS: dict[str, str] = {
    "log_opened": "first entry of every log (written by the log itself)",
    "run_started": "the party starts a run",
    "run_resumed": "the party's session continues an earlier one (round: where; meta: resumes_session, "
                   "checkpoint_sha256)",
    "round_started": "a round (or a stage of one) begins",
    "message_sent": "exact bytes sent to peer (digest, size)",
    "message_received": "exact bytes received from peer and accepted (digest, size)",
    "message_rejected": "bytes received from peer and refused; meta.reason says why",
    "aggregate_computed": "the server computed an aggregate (digest of its encoding)",
    "adapter_applied": "a party replaced its state with received parameters",
    "privacy_spent": "differential-privacy budget spent (meta: epsilon, delta, ...)",
    "budget_exceeded": "a privacy budget would be exceeded; the party stops",
    "privacy_budget": "a dataset ledger's budget of one level (meta: level, budget_epsilon, delta, accountant)",
    "privacy_charged": "a dataset ledger's charge of one round before it ran (meta: level, run, events)",
    "party_dropped": "a peer was dropped from a round (timeout, rejection)",
    "node_bound": "a network node was bound to a roster party (meta.node_id; the party's signed proof checked)",
    "node_refused": "a network node was refused as a party (meta.node_id, meta.reason)",
    "round_finished": "a round (or a stage of one) ends",
    "run_stopped": "the party ends a run (normally or not; meta.reason)",
    "tree_head": "the party's own signed tree head over every earlier entry (written by the log)",
    "peer_tree_head": "a signed tree head received from peer (written by the log)",
    "log_recovered": "a torn last line was set aside after a crash (written by the log)",
}
RESERVED_EVENTS = frozenset({"log_opened", "tree_head", "peer_tree_head", "log_recovered"})
RECORDABLE_EVENTS = tuple(e for e in EVENTS if e not in RESERVED_EVENTS)
ENTRY_KEYS = frozenset({"v", "seq", "time", "party", "event", "round", "stage", "peer", "digest", "size",
                        "meta", "sth", "prev", "sig"})
TREE_HEAD_KEYS = frozenset({"party", "tree_size", "root", "time", "sig"})

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")  # ASCII digits only
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_META_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")
_STAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


class AuditError(Exception):
    """An audit log, tree head or proof is malformed, inconsistent or not authentic."""


class SchemaError(AuditError):
    """A value breaks the documented schema."""


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key: the first 16 bytes of SHA-256 of its raw form, hex."""
    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:32]


def format_time(seconds: float) -> str:
    """Seconds since the epoch as the log's fixed-width UTC time, e.g. ``2025-01-02T03:04:05.000006Z``."""
    return datetime.fromtimestamp(seconds, UTC).strftime(_TIME_FORMAT)


def parse_time(value: Any, what: str = "time") -> datetime:
    """The instant a log time names (UTC). ASCII digits only: ``\\d`` and ``strptime`` also take other scripts'
    digits (the full-width U+FF10..U+FF19), which would let one instant be written in several ways and, compared
    as text, sort after every ASCII time."""
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        raise SchemaError(f"{what} must be a UTC time like 2025-01-02T03:04:05.000006Z in ASCII digits, "
                          f"got {_short(value)}")
    try:
        return datetime.fromisoformat(value)  # the pattern above admits only this one form; Z is UTC
    except ValueError:
        raise SchemaError(f"{what} {value!r} is not a valid date and time") from None


def _check_time(value: Any, what: str) -> str:
    parse_time(value, what)
    return value


def check_party(value: Any, what: str = "party") -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PARTY_ID or not value.isprintable():
        raise SchemaError(f"{what} must be a printable id of 1 to {MAX_PARTY_ID} characters, got {_short(value)}")
    return value


def _check_int(value: Any, what: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise SchemaError(f"{what} must be a non-negative integer, got {_short(value)}")
    return value


def check_stage(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_STAGE or not _STAGE.fullmatch(value):
        raise SchemaError(f"stage must be a short name (letters, digits, '._:-', at most {MAX_STAGE}), "
                          f"got {_short(value)}")
    return value


def _check_hex(value: Any, pattern: re.Pattern, what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        digits = 64 if pattern is _HEX64 else 128
        raise SchemaError(f"{what} must be {digits} lowercase hex digits, got {_short(value)}")
    return value


def check_meta(meta: Any) -> dict[str, Any]:
    """Small metadata only: at most 16 keys; values are null, booleans, integers, finite numbers, strings of
    at most 256 characters, or lists of at most 16 strings of at most 64 characters (e.g. party ids)."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise SchemaError(f"meta must be a JSON object, got {type(meta).__name__}")
    if len(meta) > MAX_META_KEYS:
        raise SchemaError(f"meta holds {len(meta)} keys; at most {MAX_META_KEYS} are allowed")
    for key, value in meta.items():
        if not isinstance(key, str) or not _META_KEY.fullmatch(key):
            raise SchemaError(f"meta key {_short(key)} must be a lowercase name of at most 32 characters")
        _check_meta_value(key, value)
    return dict(meta)


def _check_meta_value(key: str, value: Any) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise SchemaError(f"meta {key!r} is an integer out of range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SchemaError(f"meta {key!r} is not a finite number")
        return
    if isinstance(value, str):
        if len(value) > MAX_META_STRING:
            raise SchemaError(f"meta {key!r} is a string of {len(value)} characters; at most {MAX_META_STRING} "
                              "(the log keeps small metadata, never raw data)")
        return
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_META_LIST or not all(isinstance(v, str) and len(v) <= MAX_META_LIST_STRING
                                                 for v in value):
            raise SchemaError(f"meta {key!r} must be a list of at most {MAX_META_LIST} short strings "
                              "(the log keeps small metadata, never raw data or values)")
        return
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise SchemaError(f"meta {key!r} holds bytes; the log never stores raw data (pass them as data=, "
                          "which is hashed and not kept)")
    raise SchemaError(f"meta {key!r} has type {type(value).__name__}; only JSON scalars and short string lists "
                      "are allowed")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class SignedTreeHead:
    """A party's Ed25519 signature over the Merkle root of the first ``tree_size`` entries of its log."""

    party: str
    tree_size: int
    root: bytes
    time: str
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        # RFC 9162 section 2.1.1: the empty tree's root is SHA-256 of the empty string, and nothing else.
        if self.tree_size == 0 and self.root != merkle.EMPTY_ROOT:
            raise SchemaError(f"a tree head of size 0 must carry the empty tree's root {merkle.EMPTY_ROOT.hex()} "
                              f"(SHA-256 of nothing), not {self.root.hex()}")

    @classmethod
    def sign(cls, key: Ed25519PrivateKey, party: str, tree_size: int, root: bytes, time: str) -> SignedTreeHead:
        unsigned = cls(party, tree_size, root, time, b"")
        return cls(party, tree_size, root, time, key.sign(unsigned.signed_bytes()))

    def signed_bytes(self) -> bytes:
        body = {"party": self.party, "root": self.root.hex(), "time": self.time, "tree_size": self.tree_size}
        return TREE_HEAD_CONTEXT + canonical_json(body)

    def verify(self, public_key: Ed25519PublicKey) -> None:
        """Raise :class:`AuditError` unless ``public_key`` signed this tree head."""
        try:
            public_key.verify(self.signature, self.signed_bytes())
        except InvalidSignature:
            raise AuditError(f"the signed tree head of {self.party!r} (size {self.tree_size}) does not verify "
                             f"against the roster key of {self.party!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"party": self.party, "root": self.root.hex(), "sig": self.signature.hex(), "time": self.time,
                "tree_size": self.tree_size}

    def to_bytes(self) -> bytes:
        """Canonical JSON: the payload to send to a peer."""
        return canonical_json(self.to_dict())

    def to_json(self) -> str:
        return self.to_bytes().decode()

    @classmethod
    def from_dict(cls, value: Any) -> SignedTreeHead:
        if not isinstance(value, Mapping) or set(value) != TREE_HEAD_KEYS:
            raise SchemaError(f"a signed tree head is an object with exactly the keys {sorted(TREE_HEAD_KEYS)}")
        return cls(check_party(value["party"], "tree head party"),
                   _check_int(value["tree_size"], "tree head tree_size"),
                   bytes.fromhex(_check_hex(value["root"], _HEX64, "tree head root")),
                   _check_time(value["time"], "tree head time"),
                   bytes.fromhex(_check_hex(value["sig"], _HEX128, "tree head sig")))

    @classmethod
    def from_bytes(cls, data: bytes | str) -> SignedTreeHead:
        """Strict inverse of :meth:`to_bytes` (anything but its canonical form is refused)."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SchemaError("a signed tree head must be JSON") from None
        sth = cls.from_dict(value)
        if sth.to_bytes() != raw:
            raise SchemaError("a signed tree head must be in canonical JSON form")
        return sth

    from_json = from_bytes


@dataclass(frozen=True)
class Entry:
    """One parsed line of a log (the exact bytes are kept in ``line``)."""

    seq: int
    time: str
    party: str
    event: str
    round: int | None
    stage: str | None
    peer: str | None
    digest: str | None
    size: int | None
    meta: Mapping[str, Any]
    sth: SignedTreeHead | None
    prev: str
    sig: str
    line: bytes = field(repr=False)
    signed: bytes = field(repr=False)  # what the signature covers: the context string and the entry without sig

    @property
    def hash(self) -> str:
        """SHA-256 of the line (without newline), hex: what the next entry's ``prev`` holds."""
        return hashlib.sha256(self.line).hexdigest()

    @property
    def leaf(self) -> bytes:
        return merkle.leaf_hash(self.line)

    def signature_valid(self, public_key: Ed25519PublicKey) -> bool:
        try:
            public_key.verify(bytes.fromhex(self.sig), self.signed)
        except InvalidSignature:
            return False
        return True


def parse_entry(line: bytes) -> Entry:
    """Parse one line (without its newline) against the schema; :class:`SchemaError` names what is wrong."""
    if len(line) > MAX_LINE_BYTES:
        raise SchemaError(f"line of {len(line)} bytes is longer than the limit of {MAX_LINE_BYTES}")
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SchemaError("not valid JSON") from None
    if not isinstance(value, dict):
        raise SchemaError("an entry must be a JSON object")
    if set(value) != ENTRY_KEYS:
        missing, extra = sorted(ENTRY_KEYS - set(value)), sorted(set(value) - ENTRY_KEYS)
        raise SchemaError(f"entry keys differ from the schema (missing {missing}, unexpected {extra})")
    if value["v"] != SCHEMA_VERSION or isinstance(value["v"], bool):
        raise SchemaError(f"schema version {_short(value['v'])} is not supported (this build reads {SCHEMA_VERSION})")
    seq = _check_int(value["seq"], "seq")
    time = _check_time(value["time"], "time")
    party = check_party(value["party"])
    event = value["event"]
    if event not in EVENTS:
        raise SchemaError(f"unknown event {_short(event)}")
    round_ = _check_int(value["round"], "round", optional=True)
    stage = check_stage(value["stage"])
    peer = None if value["peer"] is None else check_party(value["peer"], "peer")
    digest, size = value["digest"], value["size"]
    if (digest is None) != (size is None):
        raise SchemaError("digest and size are given together or not at all")
    if digest is not None:
        _check_hex(digest, _HEX64, "digest")
        _check_int(size, "size")
    meta = check_meta(value["meta"])
    sth = None if value["sth"] is None else SignedTreeHead.from_dict(value["sth"])
    prev = _check_hex(value["prev"], _HEX64, "prev")
    sig = _check_hex(value["sig"], _HEX128, "sig")
    if canonical_json(value) != line:
        raise SchemaError("entry is not in canonical JSON form (sorted keys, no spaces, ASCII)")
    body = dict(value)
    del body["sig"]
    entry = Entry(seq, time, party, event, round_, stage, peer, digest, size, meta, sth, prev, sig, line,
                  ENTRY_CONTEXT + canonical_json(body))
    _check_event(entry)
    return entry


def _check_event(entry: Entry) -> None:
    event = entry.event
    if (event in ("tree_head", "peer_tree_head")) != (entry.sth is not None):
        raise SchemaError(f"only tree_head and peer_tree_head entries carry a tree head (event {event!r})")
    if (event == "log_opened") != (entry.seq == 0):
        raise SchemaError("a log starts with exactly one log_opened entry, at seq 0")
    if event in ("message_sent", "message_received", "log_recovered") and entry.digest is None:
        raise SchemaError(f"a {event} entry needs the digest and size of its bytes")
    if event in ("message_sent", "message_received", "peer_tree_head") and entry.peer is None:
        raise SchemaError(f"a {event} entry needs its peer")
    if event == "message_rejected" and not isinstance(entry.meta.get("reason"), str):
        raise SchemaError("a message_rejected entry needs meta.reason")
    if event == "run_resumed" and (entry.round is None or not isinstance(entry.meta.get("resumes_session"), str)):
        raise SchemaError("a run_resumed entry needs the round it continues at and meta.resumes_session")
    if event == "tree_head" and (entry.sth.party != entry.party or entry.peer is not None):
        raise SchemaError("a tree_head entry holds its own party's tree head and no peer")
    if event == "peer_tree_head" and entry.sth.party != entry.peer:
        raise SchemaError(f"the tree head is of {entry.sth.party!r} but the entry's peer is {entry.peer!r}")
    if "final" in entry.meta and (event != "tree_head" or entry.meta["final"] is not True):
        raise SchemaError("meta.final is only ever true, on a tree_head entry")

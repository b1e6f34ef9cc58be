"""Long-term Ed25519 identities and the roster of enrolled parties.

Every message a party sends is signed with its identity key; receivers accept only senders on
the roster, under the public key the roster lists. The roster is a JSON file of public keys that
every party holds a copy of; it records its own SHA-256 (``Roster.digest``), which every party
pins, so two parties holding different rosters find out at the first message. How a party's
private key is kept on disk, and how a roster is assembled from public enrolment files without
anyone ever holding another party's key, is ``protocols.enrolment``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from .errors import ConfigurationError, MessageRejected

ROLES = ("server", "client", "keyholder")
ROSTER_VERSION = 1
ROSTER_FILE = "roster.json"
SERVER_ID = "server"
KEYHOLDER_ID = "keyholder"
# Ids become folder names and appear in messages and logs: keep them short and unambiguous.
_PARTY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_party_id(party_id: object) -> str:
    """Return ``party_id`` if it is a valid id (1-64 of ``A-Za-z0-9._-``, not starting with . - _)."""
    if not isinstance(party_id, str) or not _PARTY_ID.fullmatch(party_id):
        raise ConfigurationError(f"invalid party id {party_id!r}: use 1-64 characters A-Z a-z 0-9 . _ -, "
                                 "starting with a letter or digit")
    return party_id


def check_role(role: object, party_id: str) -> str:
    """Return ``role`` if it is one of :data:`ROLES`."""
    if role not in ROLES:
        raise ConfigurationError(f"party {party_id!r}: role must be one of {', '.join(ROLES)}, not {role!r}")
    return role  # type: ignore[return-value]


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def parse_strict_json(text: str, source: str) -> Any:
    """Parse ``text``, refusing a key repeated in any object.

    Python's ``json`` keeps the last of two equal keys without a word; in a roster or an enrolment
    file that would let a second entry for a party silently replace the first one.
    """
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as duplicate:
        raise ConfigurationError(f"{source}: the key {duplicate.key!r} appears twice in one JSON object") from None
    except ValueError as error:
        raise ConfigurationError(f"{source} is not valid JSON: {error}") from None


def read_text_file(path: Path, source: str) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or non-UTF-8 file is one ConfigurationError (``source``)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"{source} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{source} is not UTF-8 text") from None
    except OSError as error:
        raise ConfigurationError(f"cannot read {source}: {error.strerror}") from None


def raw_public(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of ``key``: what two enrolments are compared by."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_pem(key: Ed25519PublicKey) -> str:
    """``key`` as SubjectPublicKeyInfo PEM text, the spelling of public keys in JSON files."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def parse_public_pem(text: object, source: str) -> Ed25519PublicKey:
    """The Ed25519 public key spelled as PEM ``text``; ``source`` names where it came from in errors."""
    if not isinstance(text, str):
        raise ConfigurationError(f"{source}: 'public_key' must be PEM text")
    try:
        key = serialization.load_pem_public_key(text.encode())
    except (ValueError, TypeError, UnicodeEncodeError) as error:
        raise ConfigurationError(f"{source}: unreadable public key: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError(f"{source}: the public key is a {type(key).__name__}, not an Ed25519 key")
    return key


# Ed25519 (RFC 8032 §5.1): the curve -x² + y² = 1 + d·x²·y² over GF(p), with a base point of prime order L.
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, -1, _P) % _P
_SQRT_MINUS_1 = pow(2, (_P - 1) // 4, _P)
_Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, x·y = T/Z
_NEUTRAL: _Point = (0, 1, 1, 0)


def _add(a: _Point, b: _Point) -> _Point:
    """RFC 8032 §5.1.4's unified addition (it doubles too)."""
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    e, h = (y1 - x1) * (y2 - x2) % _P, (y1 + x1) * (y2 + x2) % _P
    c, d = 2 * _D * t1 * t2 % _P, 2 * z1 * z2 % _P
    e, f, g, h = h - e, d - c, d + c, h + e
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def _times(point: _Point, scalar: int) -> _Point:
    result = _NEUTRAL
    for bit in bin(scalar)[2:]:
        result = _add(result, result)
        if bit == "1":
            result = _add(result, point)
    return result


def _is_neutral(point: _Point) -> bool:
    x, y, z, _ = point
    return x % _P == 0 and (y - z) % _P == 0


@functools.lru_cache(maxsize=4096)
def _ed25519_key_fault(raw: bytes) -> str | None:
    """Why the encoded point ``raw`` is no honest public key, or None if it is one.

    Decodes as RFC 8032 §5.1.3 does, refusing what step 1 (y ≥ p), step 3 (no square root: not on
    the curve) and step 4 (x = 0 with the sign bit set) refuse, then checks the point's order: an
    honest key is [a]B for the prime-order base point B, so its order is L. Public values only, so a
    plain (not constant-time) computation is fine; cached because rosters are rebuilt from the same keys.
    """
    encoded = int.from_bytes(raw, "little")
    y, sign = encoded & ((1 << 255) - 1), encoded >> 255
    if y >= _P:
        return "is not canonically encoded (y at or above 2^255 - 19; RFC 8032 §5.1.3)"
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if (v * x * x - u) % _P != 0:
        x = x * _SQRT_MINUS_1 % _P
        if (v * x * x - u) % _P != 0:
            return "is not a point of Ed25519"
    if x == 0 and sign:
        return "is not canonically encoded (x = 0 with the sign bit set; RFC 8032 §5.1.3)"
    if x & 1 != sign:
        x = _P - x
    point = (x, y, 1, x * y % _P)
    if _is_neutral(_times(point, 8)):
        return "is a point of small order: anyone can forge signatures that verify under it"
    if not _is_neutral(_times(point, _L)):
        return "has a small-order component: it is not [a]B for any private key a"
    return None


def check_ed25519_public_key(raw: bytes, owner: str) -> bytes:
    """Return ``raw`` if it encodes an Ed25519 public key an honest key pair can have; else raise ConfigurationError.

    Refuses non-canonical encodings (RFC 8032 §5.1.3), points off the curve, the eight points of small
    order and points with a small-order component ("Taming the many EdDSAs", Chalkias et al. 2020,
    lists the small-order encodings). ``cryptography`` loads all of them, and under a
    small-order key a signature with s = 0 and a small-order R verifies for one message in about
    eight (for every message under the neutral element), so whoever writes such a key into a roster
    can speak as its party after a few tries, without any private key. Keys with a small-order component, or
    two spellings of one point, would let one key pass as two in a comparison of bytes.
    """
    if len(raw) != 32:
        raise ConfigurationError(f"{owner}: an Ed25519 public key is 32 bytes, not {len(raw)}")
    fault = _ed25519_key_fault(bytes(raw))
    if fault is not None:
        raise ConfigurationError(f"{owner}: the Ed25519 public key {fault}")
    return raw


@dataclass(frozen=True)
class Identity:
    """A party's id and long-term signing key."""

    party_id: str
    private_key: Ed25519PrivateKey = field(repr=False, compare=False)

    def __post_init__(self):
        check_party_id(self.party_id)
        if not isinstance(self.private_key, Ed25519PrivateKey):
            raise ConfigurationError(f"identity {self.party_id!r}: the key must be an Ed25519 private key")

    @classmethod
    def generate(cls, party_id: str) -> Identity:
        return cls(party_id, Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of ``data`` (RFC 8032: deterministic, so the same bytes whichever library makes
        it), made by libsodium (PyNaCl), which signs in about 60 % of OpenSSL's time here (17 vs 28 µs; a server
        signs about 600 messages a round)."""
        return self._signing_key.sign(bytes(data)).signature

    @functools.cached_property
    def _signing_key(self) -> SigningKey:
        return SigningKey(self.private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                         serialization.NoEncryption()))

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM: the folder that holds it is the trust boundary."""
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())


@dataclass(frozen=True)
class RosterEntry:
    """One enrolled party: what its enrolment file declares and the roster lists."""

    party_id: str
    role: str
    public_key: Ed25519PublicKey = field(repr=False, compare=False)

    def __post_init__(self):
        check_party_id(self.party_id)
        check_role(self.role, self.party_id)
        if not isinstance(self.public_key, Ed25519PublicKey):
            raise ConfigurationError(f"party {self.party_id!r}: the key must be an Ed25519 public key")
        check_ed25519_public_key(raw_public(self.public_key), f"party {self.party_id!r}")

    @functools.cached_property
    def verify_key(self) -> VerifyKey:
        """``public_key`` as libsodium's Ed25519 verifier (PyNaCl), which checks a signature in about half the
        time OpenSSL takes here (51 vs 102 µs; a client checks ~200 relayed signatures a round). It accepts no
        signature that OpenSSL refuses: it also refuses non-canonical and small-order points (RFC 8032 §5.1.7
        and libsodium's stricter checks), which an honest signer never produces."""
        return VerifyKey(raw_public(self.public_key))


class Roster:
    """The enrolled parties: id -> (role, Ed25519 public key). Immutable once built.

    A party id appears once, a public key belongs to one party only (otherwise one key holder could
    speak as two parties, and a site's own messages could be replayed as another's), and there is at
    most one server and one key holder. Every key is checked by :func:`check_ed25519_public_key` on
    its way in (``RosterEntry``), so each point has one spelling and comparing keys as bytes is sound.
    """

    def __init__(self, entries: Iterable[RosterEntry]):
        parties: dict[str, RosterEntry] = {}
        owners: dict[bytes, str] = {}
        for entry in entries:
            if entry.party_id in parties:
                raise ConfigurationError(f"party {entry.party_id!r} is listed twice in the roster")
            key = raw_public(entry.public_key)
            if key in owners:
                raise ConfigurationError(f"parties {owners[key]!r} and {entry.party_id!r} are enrolled with the "
                                         "same public key")
            parties[entry.party_id] = entry
            owners[key] = entry.party_id
        for role in ("server", "keyholder"):
            holders = [entry.party_id for entry in parties.values() if entry.role == role]
            if len(holders) > 1:
                raise ConfigurationError(f"the roster lists more than one {role}: {', '.join(holders)}")
        self._parties = dict(sorted(parties.items()))

    @classmethod
    def from_identities(cls, server: Identity, clients: Sequence[Identity],
                        keyholder: Identity | None = None) -> Roster:
        entries = [RosterEntry(server.party_id, "server", server.public_key)]
        entries += [RosterEntry(client.party_id, "client", client.public_key) for client in clients]
        if keyholder is not None:
            entries.append(RosterEntry(keyholder.party_id, "keyholder", keyholder.public_key))
        return cls(entries)

    def __contains__(self, party_id: object) -> bool:
        return party_id in self._parties

    def __len__(self) -> int:
        return len(self._parties)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Roster):
            return NotImplemented
        return self._canonical() == other._canonical()

    __hash__ = None  # type: ignore[assignment]

    def _canonical(self) -> list[tuple[str, str, bytes]]:
        return [(e.party_id, e.role, raw_public(e.public_key)) for e in self._parties.values()]

    @property
    def entries(self) -> tuple[RosterEntry, ...]:
        return tuple(self._parties.values())

    def ids(self, role: str) -> tuple[str, ...]:
        return tuple(pid for pid, entry in self._parties.items() if entry.role == role)

    @property
    def client_ids(self) -> tuple[str, ...]:
        return self.ids("client")

    @property
    def server_id(self) -> str | None:
        return next(iter(self.ids("server")), None)

    @property
    def keyholder_id(self) -> str | None:
        return next(iter(self.ids("keyholder")), None)

    def role(self, party_id: str) -> str:
        return self._entry(party_id).role

    def public_key(self, party_id: str) -> Ed25519PublicKey:
        return self._entry(party_id).public_key

    def _entry(self, party_id: str) -> RosterEntry:
        try:
            return self._parties[party_id]
        except (KeyError, TypeError):
            raise MessageRejected(f"unknown sender {party_id!r}: not on the roster", None) from None

    def verify(self, party_id: str, signature: bytes, data: bytes) -> None:
        """Raise MessageRejected unless ``signature`` is ``party_id``'s signature of ``data``."""
        verifier = self._entry(party_id).verify_key
        try:
            verifier.verify(data, bytes(signature))
        except (CryptoError, ValueError, TypeError):  # a forged or malformed signature (not 64 bytes)
            raise MessageRejected(f"bad signature from {party_id!r}", party_id) from None

    def check_identity(self, identity: Identity, role: str | None = None) -> None:
        """Raise ConfigurationError unless the roster enrols ``identity`` (as ``role``, when given) under its key.

        A party runs this on its own key before it sends anything, so a key that does not belong to the
        roster it pinned fails at start-up with a clear reason rather than as rejections at its peers.
        """
        entry = self._parties.get(identity.party_id)
        if entry is None:
            raise ConfigurationError(f"party {identity.party_id!r} is not on the roster")
        if role is not None and entry.role != role:
            raise ConfigurationError(f"the roster enrols {identity.party_id!r} as a {entry.role}, not a {role}")
        if raw_public(entry.public_key) != raw_public(identity.public_key):
            raise ConfigurationError(f"the private key of {identity.party_id!r} does not match its public key on "
                                     "the roster")

    def _content(self) -> dict:
        parties = {pid: {"role": e.role, "public_key": public_pem(e.public_key)} for pid, e in self._parties.items()}
        return {"version": ROSTER_VERSION, "parties": parties}

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 (hex) of the roster's canonical JSON (sorted keys, no spaces): what every party pins and
        every signed message carries, so a message signed under another roster is refused. Computed once (a
        roster is immutable): every message a party encodes or decodes reads it."""
        canonical = json.dumps(self._content(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> str:
        """The roster file: its content plus its own ``sha256``, so a reader can tell an altered copy."""
        return json.dumps({**self._content(), "sha256": self.digest}, sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "roster") -> Roster:
        """Parse a roster file, refusing repeated keys, malformed entries and a ``sha256`` its content does not have."""
        raw = parse_strict_json(text, source)
        if not isinstance(raw, dict):
            raise ConfigurationError(f"{source} must be a JSON object")
        if "version" in raw and raw["version"] != ROSTER_VERSION:
            raise ConfigurationError(f"{source} has version {raw['version']!r}; this code reads version "
                                     f"{ROSTER_VERSION}")
        if set(raw) != {"version", "parties", "sha256"}:
            raise ConfigurationError(f"{source} must be an object with exactly the keys 'version', 'parties' and "
                                     "'sha256'")
        if not isinstance(raw["parties"], dict):
            raise ConfigurationError(f"{source}: 'parties' must be an object")
        recorded = raw["sha256"]
        if not isinstance(recorded, str) or not _SHA256_HEX.fullmatch(recorded):
            raise ConfigurationError(f"{source}: 'sha256' must be 64 lower-case hexadecimal digits")
        entries = []
        for party_id, item in raw["parties"].items():
            if not isinstance(item, dict) or set(item) != {"role", "public_key"}:
                raise ConfigurationError(f"{source}: party {party_id!r} needs exactly 'role' and 'public_key'")
            key = parse_public_pem(item["public_key"], f"{source}: party {party_id!r}")
            try:
                entries.append(RosterEntry(party_id, item["role"], key))
            except ConfigurationError as error:
                raise ConfigurationError(f"{source}: {error}") from None
        try:
            roster = cls(entries)
        except ConfigurationError as error:
            raise ConfigurationError(f"{source}: {error}") from None
        if roster.digest != recorded:
            raise ConfigurationError(f"{source} records sha256 {recorded} but its content has sha256 "
                                     f"{roster.digest}: the file was altered")
        return roster

    def save(self, path: str | Path) -> None:
        """Write the roster file; never overwrites (a pinned roster is replaced only on purpose)."""
        path = Path(path)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise ConfigurationError(f"roster file {str(path)!r} already exists; refusing to overwrite it") from None
        except OSError as error:
            raise ConfigurationError(f"cannot write roster file {str(path)!r}: {error.strerror}") from None
        try:
            with os.fdopen(descriptor, "w") as stream:
                stream.write(self.to_json())
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        source = f"roster file {str(path)!r}"
        return cls.from_json(read_text_file(Path(path), source), source=source)


def load_roster(folder_or_file: str | Path) -> Roster:
    """A roster from its JSON file, or from the folder holding ``roster.json``."""
    path = Path(folder_or_file)
    return Roster.load(path / ROSTER_FILE if path.is_dir() else path)

"""Long-term Ed25519 identities and the roster of enrolled parties.

Every message a party sends is signed with its identity key; receivers accept only senders on
the roster, under the public key the roster lists. Private keys live in ``<party_id>.pem``
(PKCS#8, unencrypted, file mode 0600: the folder is the trust boundary); the roster is a JSON
file of public keys that every party holds a copy of.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigurationError, MessageRejected

ROLES = ("server", "client", "keyholder")
ROSTER_VERSION = 1
ROSTER_FILE = "roster.json"
SERVER_ID = "server"
KEYHOLDER_ID = "keyholder"
# Ids become file names and appear in messages and logs: keep them short and unambiguous.
_PARTY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_party_id(party_id: object) -> str:
    """Return ``party_id`` if it is a valid id (1-64 of ``A-Za-z0-9._-``, not starting with . - _)."""
    if not isinstance(party_id, str) or not _PARTY_ID.fullmatch(party_id):
        raise ConfigurationError(f"invalid party id {party_id!r}: use 1-64 characters A-Z a-z 0-9 . _ -, "
                                 "starting with a letter or digit")
    return party_id


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


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
        return self.private_key.sign(data)

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    def save(self, path: str | Path) -> None:
        """Write the private key to a new file readable by its owner only; never overwrites."""
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigurationError(f"key file {str(path)!r} already exists; refusing to overwrite it") from None
        with os.fdopen(descriptor, "wb") as stream:
            os.fchmod(stream.fileno(), 0o600)
            stream.write(self.private_pem())

    @classmethod
    def load(cls, path: str | Path, party_id: str | None = None) -> Identity:
        """Read ``path`` (PKCS#8 PEM); the id defaults to the file name without ``.pem``."""
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise ConfigurationError(f"key file {str(path)!r} does not exist") from None
        except (ValueError, TypeError) as error:
            raise ConfigurationError(f"key file {str(path)!r} is not an unencrypted PEM private key: {error}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigurationError(f"key file {str(path)!r} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(party_id if party_id is not None else path.stem, key)


@dataclass(frozen=True)
class RosterEntry:
    party_id: str
    role: str
    public_key: Ed25519PublicKey = field(repr=False, compare=False)

    def __post_init__(self):
        check_party_id(self.party_id)
        if self.role not in ROLES:
            raise ConfigurationError(f"party {self.party_id!r}: role must be one of {', '.join(ROLES)}, "
                                     f"not {self.role!r}")
        if not isinstance(self.public_key, Ed25519PublicKey):
            raise ConfigurationError(f"party {self.party_id!r}: the key must be an Ed25519 public key")


class Roster:
    """The enrolled parties: id -> (role, Ed25519 public key). Immutable once built."""

    def __init__(self, entries: Iterable[RosterEntry]):
        parties: dict[str, RosterEntry] = {}
        for entry in entries:
            if entry.party_id in parties:
                raise ConfigurationError(f"party {entry.party_id!r} is listed twice in the roster")
            parties[entry.party_id] = entry
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
        return [(e.party_id, e.role, _raw_public(e.public_key)) for e in self._parties.values()]

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
        key = self._entry(party_id).public_key
        try:
            key.verify(signature, data)
        except InvalidSignature:
            raise MessageRejected(f"bad signature from {party_id!r}", party_id) from None

    def to_json(self) -> str:
        parties = {pid: {"role": e.role, "public_key": _public_pem(e.public_key)} for pid, e in self._parties.items()}
        return json.dumps({"version": ROSTER_VERSION, "parties": parties}, sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "roster") -> Roster:
        try:
            raw = json.loads(text)
        except ValueError as error:
            raise ConfigurationError(f"{source} is not valid JSON: {error}") from None
        if not isinstance(raw, dict) or set(raw) != {"version", "parties"}:
            raise ConfigurationError(f"{source} must be an object with exactly the keys 'version' and 'parties'")
        if raw["version"] != ROSTER_VERSION:
            raise ConfigurationError(f"{source} has version {raw['version']!r}; this code reads version "
                                     f"{ROSTER_VERSION}")
        if not isinstance(raw["parties"], dict):
            raise ConfigurationError(f"{source}: 'parties' must be an object")
        entries = []
        for party_id, item in raw["parties"].items():
            if not isinstance(item, dict) or set(item) != {"role", "public_key"}:
                raise ConfigurationError(f"{source}: party {party_id!r} needs exactly 'role' and 'public_key'")
            if not isinstance(item["public_key"], str):
                raise ConfigurationError(f"{source}: party {party_id!r}: 'public_key' must be PEM text")
            try:
                key = serialization.load_pem_public_key(item["public_key"].encode())
            except (ValueError, TypeError, UnicodeEncodeError) as error:
                raise ConfigurationError(f"{source}: party {party_id!r}: unreadable public key: {error}") from None
            entries.append(RosterEntry(party_id, item["role"], key))
        return cls(entries)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigurationError(f"roster file {str(path)!r} does not exist") from None
        except UnicodeDecodeError:
            raise ConfigurationError(f"roster file {str(path)!r} is not UTF-8 text") from None
        return cls.from_json(text, source=f"roster file {str(path)!r}")


def create_identities(folder: str | Path, server_id: str, client_ids: Sequence[str],
                      keyholder_id: str | None = None) -> Roster:
    """Generate a key pair per party: ``<folder>/<id>.pem`` (0600) and ``<folder>/roster.json``.

    Refuses (before writing anything) to overwrite existing files or to reuse an id.
    """
    folder = Path(folder)
    parties = [(server_id, "server")] + [(client_id, "client") for client_id in client_ids]
    if keyholder_id is not None:
        parties.append((keyholder_id, "keyholder"))
    ids = [check_party_id(party_id) for party_id, _ in parties]
    duplicates = sorted({party_id for party_id in ids if ids.count(party_id) > 1})
    if duplicates:
        raise ConfigurationError(f"party ids must be unique; repeated: {', '.join(duplicates)}")
    targets = [folder / f"{party_id}.pem" for party_id in ids] + [folder / ROSTER_FILE]
    existing = [str(path) for path in targets if path.exists()]
    if existing:
        raise ConfigurationError(f"refusing to overwrite existing files: {', '.join(existing)}")
    folder.mkdir(parents=True, exist_ok=True)
    identities = {party_id: Identity.generate(party_id) for party_id in ids}
    roster = Roster(RosterEntry(party_id, role, identities[party_id].public_key) for party_id, role in parties)
    for party_id, identity in identities.items():
        identity.save(folder / f"{party_id}.pem")
    roster.save(folder / ROSTER_FILE)
    return roster


def load_identity(folder: str | Path, party_id: str) -> Identity:
    """The identity ``party_id`` from a folder written by :func:`create_identities`."""
    return Identity.load(Path(folder) / f"{check_party_id(party_id)}.pem", party_id)


def load_roster(folder_or_file: str | Path) -> Roster:
    """A roster from its JSON file, or from the folder holding ``roster.json``."""
    path = Path(folder_or_file)
    return Roster.load(path / ROSTER_FILE if path.is_dir() else path)

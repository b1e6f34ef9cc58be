"""Enrolment without a key dealer: each party makes its own key; the roster is built from public files only.

A party creates its identity in a folder of its own (``save_party_identity``): the private key
``identity.pem`` (PKCS#8 PEM, unencrypted, mode 0600, in a folder of mode 0700: the folder is the
trust boundary) and the public ``enrolment.json``. Whoever assembles the federation collects the
enrolment files, never a private key, and builds the roster from them (``build_roster``); every
party then pins the roster's SHA-256. Loading refuses a key file others could read or replace, so
a key that may have leaked is not silently used.

``enrol_parties`` does the same for every party of an in-process simulation, each into its own
folder, so a simulated run has the layout of a real deployment.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import ConfigurationError
from .identity import (
    ROSTER_FILE,
    Identity,
    Roster,
    RosterEntry,
    check_party_id,
    check_role,
    parse_public_pem,
    parse_strict_json,
    public_pem,
    raw_public,
    read_text_file,
)

IDENTITY_FILE = "identity.pem"
ENROLMENT_FILE = "enrolment.json"
ENROLMENT_FORMAT = "feddat-secure-enrolment/1"
ENROLMENT_KEYS = frozenset({"format", "party", "role", "public_key"})


def save_party_identity(folder: str | Path, party_id: str, role: str) -> Identity:
    """Create ``party_id``'s identity in ``folder``: ``identity.pem`` (0600) and the public ``enrolment.json``.

    ``folder`` is created with mode 0700 (its parents as needed); an existing folder is accepted only
    if group and others have no access to it. Every check runs before anything is written, existing
    files are never overwritten, and a failure while writing removes what this call made.
    """
    folder = Path(folder)
    check_role(role, check_party_id(party_id))
    _check_party_folder(folder)
    identity = Identity.generate(party_id)
    _write_parties([(folder, identity, role)])
    return identity


def load_party_identity(folder: str | Path, party_id: str | None = None) -> Identity:
    """The identity kept in ``folder`` by :func:`save_party_identity`.

    Refuses a folder group or others can write to (they could replace the key) and a key file group
    or others can read or write. When ``enrolment.json`` is present, the key must be the one it
    enrols and its party id the one asked for (``party_id`` defaults to it); without it, ``party_id``
    must be given.
    """
    folder = Path(folder)
    try:
        folder_status = folder.stat()
    except FileNotFoundError:
        raise ConfigurationError(f"identity folder {str(folder)!r} does not exist") from None
    if not stat.S_ISDIR(folder_status.st_mode):
        raise ConfigurationError(f"identity folder {str(folder)!r} is not a folder")
    mode = stat.S_IMODE(folder_status.st_mode)
    if mode & 0o022:
        raise ConfigurationError(f"identity folder {str(folder)!r} has mode {mode:04o}: group or others can write "
                                 "to it and replace its key; chmod 700 it")
    key = _read_private_key(folder / IDENTITY_FILE)
    enrolment_path = folder / ENROLMENT_FILE
    if os.path.lexists(enrolment_path):
        entry = read_enrolment(enrolment_path)
        if party_id is not None and party_id != entry.party_id:
            raise ConfigurationError(f"enrolment file {str(enrolment_path)!r} enrols {entry.party_id!r}, "
                                     f"not {party_id!r}")
        if raw_public(entry.public_key) != raw_public(key.public_key()):
            raise ConfigurationError(f"the key in {str(folder / IDENTITY_FILE)!r} does not match the public key in "
                                     f"{str(enrolment_path)!r}")
        party_id = entry.party_id
    elif party_id is None:
        raise ConfigurationError(f"identity folder {str(folder)!r} has no {ENROLMENT_FILE} naming its party; "
                                 "give the party id")
    return Identity(party_id, key)


def read_enrolment(path: str | Path) -> RosterEntry:
    """A party's public enrolment file, validated: format, party id, role and Ed25519 public key."""
    path = Path(path)
    source = f"enrolment file {str(path)!r}"
    raw = parse_strict_json(read_text_file(path, source), source)
    if not isinstance(raw, dict) or set(raw) != ENROLMENT_KEYS:
        raise ConfigurationError(f"{source} must be an object with exactly the keys "
                                 f"{', '.join(repr(key) for key in sorted(ENROLMENT_KEYS))}")
    if raw["format"] != ENROLMENT_FORMAT:
        raise ConfigurationError(f"{source} has format {raw['format']!r}; this code reads {ENROLMENT_FORMAT!r}")
    key = parse_public_pem(raw["public_key"], source)
    try:
        return RosterEntry(raw["party"], raw["role"], key)
    except ConfigurationError as error:
        raise ConfigurationError(f"{source}: {error}") from None


def build_roster(enrolment_paths: Iterable[str | Path]) -> Roster:
    """The roster of the parties enrolled by ``enrolment_paths`` (public files only).

    Refuses a party id enrolled twice, a public key enrolled for two parties (naming both files),
    and more than one server or key holder.
    """
    entries: list[RosterEntry] = []
    by_id: dict[str, Path] = {}
    by_key: dict[bytes, tuple[str, Path]] = {}
    for path in map(Path, enrolment_paths):
        entry = read_enrolment(path)
        if entry.party_id in by_id:
            raise ConfigurationError(f"party {entry.party_id!r} is enrolled twice: {str(by_id[entry.party_id])!r} "
                                     f"and {str(path)!r}")
        key = raw_public(entry.public_key)
        if key in by_key:
            other, other_path = by_key[key]
            raise ConfigurationError(f"{str(other_path)!r} and {str(path)!r} enrol the same public key (parties "
                                     f"{other!r} and {entry.party_id!r})")
        by_id[entry.party_id], by_key[key] = path, (entry.party_id, path)
        entries.append(entry)
    if not entries:
        raise ConfigurationError("no enrolment files given")
    return Roster(entries)


def enrol_parties(root: str | Path, parties: Sequence[tuple[str, str]]) -> Roster:
    """Simulation helper: each ``(party_id, role)`` gets its identity in ``root/<party_id>/``; the roster goes
    to ``root/roster.json``.

    The same files a deployment makes party by party with ``feddat-secure keys create`` and
    ``roster build``, so a simulated run never keeps two parties' keys in one folder. Everything is
    checked (ids, roles, the roster's rules, existing files) before anything is written.
    """
    if not parties:
        raise ConfigurationError("no parties to enrol")
    root = Path(root)
    identities = [Identity.generate(check_party_id(party_id)) for party_id, _ in parties]
    roster = Roster(RosterEntry(identity.party_id, role, identity.public_key)
                    for identity, (_, role) in zip(identities, parties))
    roster_path = root / ROSTER_FILE
    if ROSTER_FILE in roster:
        raise ConfigurationError(f"party id {ROSTER_FILE!r} would be the roster file's name")
    if os.path.lexists(roster_path):
        raise ConfigurationError(f"roster file {str(roster_path)!r} already exists; refusing to overwrite it")
    _check_creatable(roster_path, f"roster file {str(roster_path)!r}")
    for identity in identities:
        _check_party_folder(root / identity.party_id)
    created = _write_parties([(root / identity.party_id, identity, role)
                              for identity, (_, role) in zip(identities, parties)])
    try:
        roster.save(roster_path)
    except BaseException:
        _remove(created)
        raise
    return roster


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    """The key in ``path``, read through one descriptor whose mode is checked first (no symbolic links)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ConfigurationError(f"key file {str(path)!r} does not exist") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ConfigurationError(f"key file {str(path)!r} is a symbolic link; keep the key itself in the "
                                     "identity folder") from None
        raise ConfigurationError(f"cannot read key file {str(path)!r}: {error.strerror}") from None
    with os.fdopen(descriptor, "rb") as stream:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise ConfigurationError(f"key file {str(path)!r} is not a regular file")
        mode = stat.S_IMODE(status.st_mode)
        if mode & 0o077:
            raise ConfigurationError(f"key file {str(path)!r} has mode {mode:04o}: group or others have access to "
                                     "it; the key may have leaked (chmod 600 only if you are sure it has not)")
        data = stream.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise ConfigurationError(f"key file {str(path)!r} is not an unencrypted PEM private key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"key file {str(path)!r} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def _check_party_folder(folder: Path) -> None:
    """Refuse, before anything is written, a party folder that cannot hold a new identity safely."""
    if not os.path.lexists(folder):
        _check_creatable(folder, f"identity folder {str(folder)!r}")
        return
    if not folder.is_dir():
        raise ConfigurationError(f"identity folder {str(folder)!r} exists and is not a folder")
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & 0o077:
        raise ConfigurationError(f"identity folder {str(folder)!r} has mode {mode:04o}: group or others can access "
                                 "it; use a new folder or chmod 700 it")
    for name in (IDENTITY_FILE, ENROLMENT_FILE):
        if os.path.lexists(folder / name):
            raise ConfigurationError(f"{str(folder / name)!r} already exists; refusing to overwrite it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigurationError(f"identity folder {str(folder)!r} is not writable")


def _check_creatable(path: Path, what: str) -> None:
    """Refuse ``what`` at ``path`` unless its nearest existing ancestor is a folder this process can write to."""
    ancestor = path.absolute().parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigurationError(f"cannot create {what}: {str(ancestor)!r} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigurationError(f"cannot create {what}: {str(ancestor)!r} is not writable")


def _write_parties(parties: Sequence[tuple[Path, Identity, str]]) -> list[Path]:
    """Write each party's folder and files; returns what was created, or removes it all and raises."""
    created: list[Path] = []
    try:
        for folder, identity, role in parties:
            for path in reversed([p for p in (folder, *folder.parents) if not os.path.lexists(p)]):
                try:
                    path.mkdir(mode=0o700 if path == folder else 0o777)
                except FileExistsError:
                    if path == folder or not path.is_dir():  # a shared parent another party just made is fine
                        raise
                    continue
                created.append(path)
            if folder in created:
                folder.chmod(0o700)  # whatever the umask allowed
            _write_new(folder / IDENTITY_FILE, identity.private_pem(), 0o600, created)
            enrolment = {"format": ENROLMENT_FORMAT, "party": identity.party_id, "role": role,
                         "public_key": public_pem(identity.public_key)}
            _write_new(folder / ENROLMENT_FILE, (json.dumps(enrolment, indent=2, sort_keys=True) + "\n").encode(),
                       0o644, created)
    except BaseException as error:
        _remove(created)
        if isinstance(error, OSError):
            raise ConfigurationError(f"cannot write {str(error.filename)!r}: {error.strerror}") from None
        raise
    return created


def _write_new(path: Path, data: bytes, mode: int, created: list[Path]) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    created.append(path)
    with os.fdopen(descriptor, "wb") as stream:
        os.fchmod(descriptor, mode)
        stream.write(data)


def _remove(created: Sequence[Path]) -> None:
    """Undo a failed write, newest first; a path that will not go stays rather than hide the original error."""
    for path in reversed(created):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)

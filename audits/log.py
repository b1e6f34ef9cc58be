"""The append-only, signed, fsynced audit log that each party writes.

Every entry is signed with the party's Ed25519 identity key and chained to the one before
(``prev``); every ``tree_head_every`` entries, whenever :meth:`AuditLog.signed_tree_head` hands a
tree head to a peer, and at :meth:`AuditLog.close`, the log writes a signed tree head over the
Merkle root of all earlier entries. Each entry is written with one ``write`` call straight to the
file (no user-space buffer, so a crash of the process loses nothing already recorded) and, by
default, fsynced before :meth:`AuditLog.record` returns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time as _time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import merkle
from .entries import (
    _HEX64,
    ENTRY_CONTEXT,
    FORMAT,
    GENESIS,
    RECORDABLE_EVENTS,
    SCHEMA_VERSION,
    AuditError,
    Entry,
    SchemaError,
    SignedTreeHead,
    canonical_json,
    check_meta,
    check_party,
    check_stage,
    format_time,
    key_id,
)
from .verify import check_log, check_side_file, torn_path

logger = logging.getLogger("audits")


@dataclass(frozen=True)
class Recovery:
    """What :meth:`AuditLog.open` set aside: an incomplete last line, moved to ``side_file`` at ``offset``."""

    size: int
    digest: str
    side_file: Path
    offset: int


class AuditLog:
    """One party's log of one run. Create with :meth:`create`, continue after a crash with :meth:`open`.

    Thread-safe: entries from several threads are serialised."""

    def __init__(self, path: Path, fd: int, party_id: str, signing_key: Ed25519PrivateKey, *, tree_head_every: int,
                 fsync_every: int, clock: Callable[[], float] | None) -> None:
        _check_intervals(tree_head_every, fsync_every)
        self.path = path
        self.party_id = party_id
        self.tree_head_every = tree_head_every
        self.fsync_every = fsync_every
        self.recovery: Recovery | None = None
        self._fd: int | None = fd
        self._key = signing_key
        self._clock = clock or _time.time
        self._lock = threading.Lock()
        self._tree = merkle.CompactTree()
        self._prev = GENESIS
        self._last_time = ""
        self._since_tree_head = 0
        self._unsynced = 0
        self._last_tree_head: SignedTreeHead | None = None
        self._final_tree_head: SignedTreeHead | None = None
        self._closed = False

    # ----------------------------------------------------------------------------------------- opening

    @classmethod
    def create(cls, path: Path | str, party_id: str, signing_key: Ed25519PrivateKey, *, tree_head_every: int = 64,
               fsync_every: int = 1, clock: Callable[[], float] | None = None,
               run_id: str | None = None) -> AuditLog:
        """Start a new log at ``path`` (which must not exist) and write its ``log_opened`` entry.

        ``fsync_every=1`` (the default) fsyncs every entry; a larger value fsyncs every that many entries
        and always before a tree head is written or handed out (see docs/audit.md for when that is safe).
        ``clock`` returns seconds since the epoch (default :func:`time.time`)."""
        check_party(party_id, "party_id")
        check_meta({"run_id": run_id})
        _check_intervals(tree_head_every, fsync_every)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        log = cls(path, fd, party_id, signing_key, tree_head_every=tree_head_every, fsync_every=fsync_every,
                  clock=clock)
        _fsync_folder(path.parent)
        log._open_entry(run_id)
        return log

    @classmethod
    def open(cls, path: Path | str, party_id: str, signing_key: Ed25519PrivateKey, *, tree_head_every: int = 64,
             fsync_every: int = 1, clock: Callable[[], float] | None = None,
             peers: Mapping[str, Ed25519PublicKey] | None = None) -> AuditLog:
        """Continue an existing log after a crash. The log is verified first (with this party's public key, and
        ``peers``' keys for the tree heads it recorded from them) and
        refused with :class:`AuditError` if anything but its last line is wrong, or if it was closed. An
        incomplete last line is moved to the side file ``<log>.torn``, recorded by a ``log_recovered``
        entry (digest and size), logged as a warning and described in :attr:`recovery`; it is never
        silently dropped."""
        check_party(party_id, "party_id")
        _check_intervals(tree_head_every, fsync_every)
        path = Path(path)
        report = check_log(path, {**(peers or {}), party_id: signing_key.public_key()}, party=party_id)
        # An incomplete last line, an empty file (a crash right after creating it) and an interrupted recovery
        # are what open() repairs; nothing else.
        side_problem = check_side_file(path, report.recovered)
        repairable = (report.torn or path.stat().st_size == 0
                      or (side_problem is not None and side_problem[0] == "unrecorded"))
        if report.problem is not None and not repairable:
            raise AuditError(f"refusing to continue a log that does not verify: {report.problem}")
        if side_problem and side_problem[0] == "mismatch":
            raise AuditError(f"refusing to continue {path}: {side_problem[1]}")
        if report.closed:
            raise AuditError(f"{path} was closed (it ends with a final tree head); a closed log is never reopened")
        side = torn_path(path)
        held = side.read_bytes() if side.exists() else b""
        accounted = sum(entry.size for entry in report.recovered)
        unaccounted = held[accounted:]
        if report.torn and unaccounted != report.torn:  # (equal: an earlier recovery stopped after this step)
            _append_durably(side, report.torn)
            unaccounted += report.torn
        keep = sum(len(entry.line) + 1 for entry in report.entries)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        log = cls(path, fd, party_id, signing_key, tree_head_every=tree_head_every, fsync_every=fsync_every,
                  clock=clock)
        try:
            if report.torn:
                os.ftruncate(fd, keep)
                os.fsync(fd)
            for entry in report.entries:
                log._tree.append(entry.leaf)
                log._since_tree_head = 0 if entry.event == "tree_head" else log._since_tree_head + 1
            if report.entries:
                log._prev, log._last_time = report.entries[-1].hash, report.entries[-1].time
                log._last_tree_head = report.tree_heads[-1] if report.entries[-1].event == "tree_head" else None
            else:
                log._open_entry(None)
            if unaccounted:
                digest = hashlib.sha256(unaccounted).hexdigest()
                log.recovery = Recovery(len(unaccounted), digest, side, accounted)
                logger.warning("audit log %s: set aside an incomplete last entry of %d bytes (sha256 %s) in %s",
                               path, len(unaccounted), digest, side)
                log._write("log_recovered", digest=digest, size=len(unaccounted),
                           meta={"side_file": side.name, "offset": accounted})
                log._sync()
        except BaseException:
            os.close(fd)
            raise
        return log

    def _open_entry(self, run_id: str | None) -> None:
        meta = {"format": FORMAT, "key_id": key_id(self._key.public_key()), "tree_head_every": self.tree_head_every,
                "fsync_every": self.fsync_every}
        if run_id is not None:
            meta["run_id"] = run_id
        self._write("log_opened", meta=check_meta(meta))
        self._sync()

    # ---------------------------------------------------------------------------------------- recording

    def record(self, event: str, *, round: int | None = None, stage: str | None = None, peer: str | None = None,
               data: bytes | bytearray | memoryview | None = None, meta: Mapping[str, Any] | None = None,
               digest: str | None = None, size: int | None = None) -> Entry:
        """Record one exchange or decision and return its entry. ``data`` (the exact bytes sent or received)
        is hashed (SHA-256) and measured, never stored; pass ``digest`` (hex) and ``size`` instead when the
        hash is already known. Unknown events, malformed fields and meta that could hold raw data
        (bytes, long strings, lists of numbers) are refused with :class:`SchemaError`."""
        if event not in RECORDABLE_EVENTS:
            raise SchemaError(f"event {event!r} cannot be recorded; the vocabulary is {', '.join(RECORDABLE_EVENTS)}")
        if round is not None and (not isinstance(round, int) or isinstance(round, bool) or round < 0):
            raise SchemaError(f"round must be a non-negative integer, got {round!r}")
        check_stage(stage)
        if peer is not None:
            check_party(peer, "peer")
        if data is not None:
            if digest is not None or size is not None:
                raise ValueError("pass either data or digest and size, not both")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"data must be bytes, got {type(data).__name__}")
            digest, size = hashlib.sha256(data).hexdigest(), memoryview(data).nbytes
        elif (digest is None) != (size is None):
            raise ValueError("digest and size are given together")
        elif digest is not None:
            if not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
                raise SchemaError("digest must be 64 lowercase hex digits (SHA-256)")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise SchemaError("size must be a non-negative integer")
        if event in ("message_sent", "message_received") and (peer is None or digest is None):
            raise SchemaError(f"{event} needs peer and the exact bytes (data=, or digest= and size=)")
        meta = check_meta(meta)
        if event == "message_rejected" and not isinstance(meta.get("reason"), str):
            raise SchemaError("message_rejected needs meta={'reason': ...}")
        if event == "run_resumed" and (round is None or not isinstance(meta.get("resumes_session"), str)):
            raise SchemaError("run_resumed needs round= (where the run continues) and meta={'resumes_session': ...}")
        with self._lock:
            entry = self._write(event, round=round, stage=stage, peer=peer, digest=digest, size=size, meta=meta)
            if self._since_tree_head >= self.tree_head_every:
                self._write_tree_head()
        return entry

    def signed_tree_head(self) -> SignedTreeHead:
        """A signed tree head over every entry so far, to send to a peer. Writes a ``tree_head`` entry (unless
        the last entry already is one) and fsyncs, so a peer never holds a tree head the log could lose."""
        with self._lock:
            if self._last_tree_head is not None:
                return self._last_tree_head
            return self._write_tree_head()

    def record_peer_tree_head(self, peer: str, tree_head: SignedTreeHead | bytes | str,
                              *, public_key: Ed25519PublicKey | None = None) -> Entry:
        """Record a signed tree head received from ``peer`` (an object, or its bytes as sent). With
        ``public_key``, its signature is checked first (:class:`AuditError` if it does not verify)."""
        check_party(peer, "peer")
        if peer == self.party_id:
            raise AuditError("a party's own tree heads are written by the log itself, not recorded as a peer's")
        sth = tree_head if isinstance(tree_head, SignedTreeHead) else SignedTreeHead.from_bytes(tree_head)
        if sth.party != peer:
            raise AuditError(f"the tree head is of {sth.party!r}, not of {peer!r}")
        if public_key is not None:
            sth.verify(public_key)
        with self._lock:
            entry = self._write("peer_tree_head", peer=peer, sth=sth)
            if self._since_tree_head >= self.tree_head_every:
                self._write_tree_head()
        return entry

    def sync(self) -> None:
        """fsync now (with ``fsync_every > 1``: before an exchange that must not continue unrecorded)."""
        with self._lock:
            self._sync()

    def close(self) -> SignedTreeHead:
        """Write the final signed tree head, fsync and close; returns that tree head. Idempotent."""
        with self._lock:
            if self._closed:
                return self._last_tree_head
            try:
                sth = self._final_tree_head = self._write_tree_head(final=True)
            finally:
                self._closed = True
                os.close(self._fd)
                self._fd = None
            return sth

    def release(self) -> None:
        """fsync and close the file WITHOUT a final tree head, so that a later :meth:`open` continues the log (a
        log kept across runs, such as a dataset's privacy ledger, is released after each use, never closed)."""
        with self._lock:
            if self._fd is not None:
                self._sync()
                os.close(self._fd)
                self._fd = None
                self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def final_tree_head(self) -> SignedTreeHead | None:
        """The final signed tree head :meth:`close` wrote (None until then, and for a released log): what a
        finished run records, so that a log cut or re-sealed afterwards is told from the one it closed."""
        return self._final_tree_head

    @property
    def size(self) -> int:
        """Entries written so far."""
        return self._tree.size

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- internals

    def _write_tree_head(self, *, final: bool = False) -> SignedTreeHead:
        now = self._now()
        sth = SignedTreeHead.sign(self._key, self.party_id, self._tree.size, self._tree.root(), now)
        self._write("tree_head", sth=sth, meta={"final": True} if final else {}, now=now)
        self._sync()
        self._since_tree_head = 0
        self._last_tree_head = sth
        return sth

    def _now(self) -> str:
        now = format_time(self._clock())
        return now if now > self._last_time else self._last_time  # never backwards, even if the clock is

    def _write(self, event: str, *, round: int | None = None, stage: str | None = None, peer: str | None = None,
               digest: str | None = None, size: int | None = None, meta: dict | None = None,
               sth: SignedTreeHead | None = None, now: str | None = None) -> Entry:
        if self._closed:
            raise AuditError(f"audit log {self.path} is closed")
        seq, now = self._tree.size, now or self._now()
        body = {"v": SCHEMA_VERSION, "seq": seq, "time": now, "party": self.party_id, "event": event, "round": round,
                "stage": stage, "peer": peer, "digest": digest, "size": size, "meta": meta or {},
                "sth": None if sth is None else sth.to_dict(), "prev": self._prev}
        signed = ENTRY_CONTEXT + canonical_json(body)
        sig = self._key.sign(signed).hex()
        body["sig"] = sig
        line = canonical_json(body)
        _write_all(self._fd, line + b"\n")
        self._unsynced += 1
        if self._unsynced >= self.fsync_every:
            self._sync()
        entry = Entry(seq, now, self.party_id, event, round, stage, peer, digest, size, body["meta"], sth, self._prev,
                      sig, line, signed)
        self._tree.append(merkle.leaf_hash(line))
        self._prev, self._last_time = hashlib.sha256(line).hexdigest(), now
        self._since_tree_head += 1
        self._last_tree_head = None
        return entry

    def _sync(self) -> None:
        if self._unsynced and self._fd is not None:
            os.fsync(self._fd)
            self._unsynced = 0


def _check_intervals(tree_head_every: int, fsync_every: int) -> None:
    if not isinstance(tree_head_every, int) or isinstance(tree_head_every, bool) or tree_head_every < 1:
        raise ValueError("tree_head_every must be a positive integer")
    if not isinstance(fsync_every, int) or isinstance(fsync_every, bool) or fsync_every < 1:
        raise ValueError("fsync_every must be a positive integer (1: fsync every entry)")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _append_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_folder(path.parent)


def owner_data_dir(env_var: str, name: str) -> Path:
    """Where a party keeps files that outlive its run folders (dataset privacy ledgers, audit receipts):
    ``$<env_var>`` when set, else ``$XDG_DATA_HOME/feddat-secure/<name>`` (XDG Base Directory spec:
    ``~/.local/share`` when unset)."""
    configured = os.environ.get(env_var)
    if configured:
        return Path(configured).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home).expanduser() / "feddat-secure" / name


def replace_durably(path: Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one, never a mix, and the
    new one survives a power loss once this returns: written to a temporary file beside it, fsynced, renamed
    over ``path``, and the folder fsynced (the rename itself is a change of the folder)."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the file's own fsync is what matters most
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

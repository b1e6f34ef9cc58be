"""The HE server's counted inputs, kept in files from the input stage until it relays them to the committee.

Why: the committee recomputes the sum from every counted input, verbatim, and it is drawn only once the input
stage has closed (messages.py: counted before drawn), so the server must keep each counted input until then.
In memory that is n × 32 MB at P = 1M (issue 16); in files, the server's memory is one running sum, the input
in flight and one staging buffer, whatever the number of clients. Each file is written by a worker thread while the
server hashes, parses and adds that input (a file write releases the GIL; TenSEAL does not), and a relayed input is
read back only when its message is sent (``SpooledOutgoing``), the last one read kept for the next reader (the
server relays each input to every member in turn, and a transport may read a message more than once).

Direct I/O: where the folder's file system supports it (``O_DIRECT``: ext4, xfs, tmpfs from Linux 6.6), a file
is written from a page-aligned staging buffer, reused for every file of the folder, straight to the device,
bypassing the page cache. A buffered write must first get a fresh page-cache page for every 4 KiB it writes, and
on the 2-core VM of docs/performance.md that ran at 0.34-0.45 GB/s, slower than the server parses and adds an
input (a 32 MB write, about 90 ms, against about 50-60 ms), so the writer was the input stage's critical path;
copying into the reused buffer and writing it directly ran at 1.3-1.7 GB/s there (``benchmarks/spool_write.py``).
The file is padded to a 4 KiB block and cut back to the message's length; where ``O_DIRECT`` is refused (EINVAL)
the files are written buffered, as before. Nor does the page cache hold a spooled input until it is read back to
be relayed.

The files need no protection beyond their folder's (``tempfile.mkdtemp``: 0700, under the system's temporary
folder, never in a run folder an audit covers): each is a message its client signed, and every committee member
verifies that signature, so a file changed on disk is refused by the committee (the round then aborts) rather
than believed. The folder is deleted when the server drops its inputs (the aggregate is sent, the round aborts,
the next round begins) and, failing that, once neither the server nor a message it made refers to it any more
(garbage collection, or the interpreter exiting normally: a process killed by a signal it does not handle leaves the
folder behind, ``feddat-he-server-*`` in the temporary folder).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ..base import Outgoing

_PREFIX = "feddat-he-server-"
_DIRECT_FLAG = getattr(os, "O_DIRECT", 0)  # 0 where the platform has none (macOS): every write is buffered
_DIRECT_ALIGN = 4096  # buffer address, file offset and length multiples of this suit every logical block size <= 4 KiB


class _Folder:
    """A temporary folder of this process's own, deleted by ``remove`` or, failing that, once nothing refers to it
    any more (garbage collection, or the process exiting)."""

    def __init__(self, parent: Path | None = None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))
        self.remove = weakref.finalize(self, _remove, self.path, os.getpid())  # runs once at most
        self._last: tuple[Path, bytes] | None = None
        self._staging: mmap.mmap | None = None  # the direct writes' buffer: one file is written at a time
        self.direct = bool(_DIRECT_FLAG)  # until the file system refuses O_DIRECT
        self._writing = threading.Lock()  # one direct write at a time: they share the staging buffer

    def write(self, path: Path, data: bytes) -> None:
        """A new file ``path`` holding ``data`` (refuses an existing one): written directly where the file system
        allows it, else buffered."""
        with self._writing:
            if self.direct:
                try:
                    self._write_direct(path, data)
                    return
                except OSError as error:
                    if error.errno != errno.EINVAL:  # a full disk or a missing folder is an error, not a fallback
                        raise
                    self.direct = False  # the file system takes no O_DIRECT (tmpfs): buffered from now on
            with open(path, "xb") as file:
                file.write(data)

    def _write_direct(self, path: Path, data: bytes) -> None:
        size = len(data)
        padded = -(-size // _DIRECT_ALIGN) * _DIRECT_ALIGN
        if self._staging is None or len(self._staging) < padded:
            self._staging = mmap.mmap(-1, padded)  # anonymous: page-aligned, zero-filled
        staging = np.frombuffer(self._staging, np.uint8, count=padded)
        np.copyto(staging[:size], np.frombuffer(data, np.uint8))  # numpy copies without the GIL
        staging[size:] = 0
        view = memoryview(self._staging)[:padded]
        with open(path, "xb", buffering=0, opener=_direct_opener) as file:
            try:
                written = 0
                while written < padded:
                    written += file.write(view[written:])
                os.ftruncate(file.fileno(), size)
            except BaseException:
                path.unlink(missing_ok=True)  # ours: "xb" created it
                raise

    def read(self, path: Path) -> bytes:
        """The bytes of ``path``, one of this folder's files; the last file read is kept for the next call."""
        last = self._last  # one tuple, replaced whole: threads may read it without a lock
        if last is not None and last[0] == path:
            return last[1]
        data = path.read_bytes()
        self._last = (path, data)
        return data

    def forget(self) -> None:
        self._last = None


def _direct_opener(path: str, flags: int) -> int:
    return os.open(path, flags | _DIRECT_FLAG, 0o600)


def _remove(path: Path, owner: int) -> None:
    """Delete ``path`` in the process that made it only: a forked child inherits the finalizer, and one that exits
    normally runs it at exit (``atexit``), which deleted its parent's inputs under the running round."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)


class Spool(Mapping[str, bytes]):
    """Inputs by client, each in a file of a folder of this server's own (created on the first ``put``, deleted
    by ``clear``): reading an entry reads its file, so holding the mapping holds no input bytes."""

    def __init__(self, parent: str | Path | None = None) -> None:
        """``parent``: where the spool's folder is made (default: the system's temporary folder)."""
        self._parent = None if parent is None else Path(parent)
        self._folder: _Folder | None = None
        self._paths: dict[str, Path] = {}

    @property
    def folder(self) -> Path | None:
        """Where the files are, while there are any."""
        return None if self._folder is None else self._folder.path

    @property
    def writes_directly(self) -> bool | None:
        """Whether the files are written with direct I/O (None before the first file: not tried yet)."""
        return None if self._folder is None else self._folder.direct

    @contextlib.contextmanager
    def writing(self, key: str, data: bytes) -> Iterator[None]:
        """Write ``data`` to a new file for ``key`` in a worker thread while the block runs; the entry is there once
        both have succeeded. When the block or the write fails, the file is deleted and the error goes on (the
        block's first): all or nothing. A key is written once (a file never replaces another)."""
        if key in self._paths:
            raise KeyError(f"{key!r} is already spooled")
        if self._folder is None:
            self._folder = _Folder(self._parent)
        path = self._folder.path / f"{len(self._paths):06d}.msg"
        failures: list[BaseException] = []

        folder = self._folder

        def write() -> None:
            try:
                folder.write(path, data)
            except BaseException as error:  # noqa: BLE001 (handed to the caller's thread below)
                failures.append(error)

        writer = threading.Thread(target=write, name="he-spool-writer", daemon=True)
        writer.start()
        try:
            yield
            writer.join()
            if failures:
                raise failures[0]
        except BaseException:
            writer.join()
            path.unlink(missing_ok=True)
            raise
        self._paths[key] = path

    def put(self, key: str, data: bytes) -> None:
        """``writing`` with nothing to do meanwhile."""
        with self.writing(key, data):
            pass

    def outgoing(self, recipient: str, key: str) -> SpooledOutgoing:
        """Entry ``key`` as a message to ``recipient``, read from its file only when it is sent. The message keeps
        the folder alive, so that it can still be sent after this spool is gone (a deployment may rebuild the
        server from its saved state for every message), until ``clear``."""
        path = self._paths[key]  # a KeyError when it is not there; when it is, so is its folder
        return SpooledOutgoing(recipient, self._folder, path)

    def clear(self) -> None:
        """Delete the folder and every file in it (messages made by ``outgoing`` then have nothing to send)."""
        if self._folder is not None:
            self._folder.forget()  # a message made by ``outgoing`` may keep the folder object alive
            self._folder.remove()
        self._folder, self._paths = None, {}

    def __getitem__(self, key: str) -> bytes:
        path = self._paths[key]  # a KeyError when it is not there; when it is, so is its folder
        return self._folder.read(path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __contains__(self, key: object) -> bool:
        return key in self._paths  # without reading the file (Mapping's default would)


class SpooledOutgoing(Outgoing):
    """An outgoing message whose bytes stay in a spool file: ``data`` reads the file each time it is asked for,
    so a stage that relays n inputs to each committee member holds none of them until the transport sends it."""

    def __init__(self, recipient: str, folder: _Folder, path: Path) -> None:
        object.__setattr__(self, "recipient", recipient)  # Outgoing is a frozen dataclass
        object.__setattr__(self, "_folder", folder)
        object.__setattr__(self, "path", path)

    @property
    def data(self) -> bytes:  # type: ignore[override]  (a field of Outgoing, computed here)
        return self._folder.read(self.path)

"""One pool of worker threads for the bulk byte work of a round: mask expansion and adding masked inputs
(``worker_count`` also sizes BLAKE3's own threads for a large payload digest, ``wire.payload_digest``).

Both release the GIL (OpenSSL's AES-CTR in ``cryptography``; numpy's element-wise ufuncs), so threads use
every core a party is given without a second process or a copy of the data. Work is split into contiguous
spans, one per worker: a party's result never depends on how many workers it has (tests/test_protocols_parallel.py,
and the payload-digest and mask tests, pin that).

``FEDDAT_SECURE_THREADS`` sets how many workers (default: the CPUs this process may run on; a larger value is
not capped by them, it only adds threads); 1 runs everything in the calling thread.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from .errors import ConfigurationError

T = TypeVar("T")
THREADS_VARIABLE = "FEDDAT_SECURE_THREADS"
_THREAD_PREFIX = "feddat-bytes"

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def worker_count() -> int:
    """How many threads bulk work is split over: ``$FEDDAT_SECURE_THREADS`` or the CPUs this process may use."""
    value = os.environ.get(THREADS_VARIABLE, "").strip()
    if not value:
        return _usable_cpus()
    if not (value.isascii() and value.isdigit()) or int(value) < 1:  # isdigit alone passes "²", which int() refuses
        raise ConfigurationError(f"{THREADS_VARIABLE} must be a positive integer, not {value!r}")
    return int(value)


def spans(length: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``0..length`` in at most ``parts`` contiguous pieces whose inner
    boundaries are multiples of ``align``; empty pieces are left out."""
    parts = max(1, min(parts, -(-length // align) if length else 1))
    step = -(-length // (parts * align)) * align if length else 0
    return [(start, min(start + step, length)) for start in range(0, length, step)] if length else [(0, 0)]


def run_each(function: Callable[..., T], arguments: Sequence[tuple]) -> list[T]:
    """``[function(*a) for a in arguments]``, run on the worker threads (the caller's thread takes the first
    item); the results in order. The first exception raised by any call is re-raised after all have finished,
    so no call is still writing when the caller sees the error. Called from a worker thread, it runs every item in
    that thread (a worker waiting on the pool it occupies could deadlock it)."""
    if len(arguments) <= 1 or threading.current_thread().name.startswith(_THREAD_PREFIX):
        return [function(*item) for item in arguments]
    pool = _shared_pool(len(arguments) - 1)
    futures = [pool.submit(function, *item) for item in arguments[1:]]
    results: list[T] = []
    error: BaseException | None = None
    try:
        results.append(function(*arguments[0]))
    except BaseException as raised:  # noqa: BLE001 - re-raised below, once every worker is done
        error = raised
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as raised:  # noqa: BLE001
            error = error or raised
    if error is not None:
        raise error
    return results


def start(function: Callable[..., T], *arguments) -> Future:
    """``function(*arguments)`` begun on a worker thread, for the caller to overlap with work of its own; its
    ``result()`` waits and returns (or raises) what the call did. Run at once in the calling thread, and returned
    finished, where there is one worker (``FEDDAT_SECURE_THREADS=1``) or the caller is a worker itself."""
    if worker_count() <= 1 or threading.current_thread().name.startswith(_THREAD_PREFIX):
        done: Future = Future()
        try:
            done.set_result(function(*arguments))
        except BaseException as raised:  # noqa: BLE001 - handed to the caller by result()
            done.set_exception(raised)
        return done
    return _shared_pool(1).submit(function, *arguments)


@functools.cache
def _usable_cpus() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _shared_pool(size: int) -> ThreadPoolExecutor:
    """The pool, replaced by a bigger one when ``size`` workers are wanted. A replaced pool is never shut down:
    another thread may have taken it and not yet submitted its work (several parties in one process); its workers
    exit by themselves once nothing refers to it any more (``concurrent.futures.thread``: a worker stops when its
    executor has been garbage collected)."""
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < size:
            _pool, _pool_size = ThreadPoolExecutor(size, thread_name_prefix=_THREAD_PREFIX), size
        return _pool


def _forget_pool_in_child() -> None:
    """After ``fork`` the child has the pool object but none of its threads, and the pool's idle count says those
    absent workers are free, so work submitted to it would never run: the child starts a pool of its own."""
    global _lock, _pool, _pool_size
    _lock, _pool, _pool_size = threading.Lock(), None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)

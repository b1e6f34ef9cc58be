"""Masked words on the wire in ⌈m/8⌉ bytes each, not in a whole machine word (issue 16).

A masked value lives modulo 2^m; the client computes it in the smallest unsigned word holding m bits
(uint32 for m = 17..32) and sends only its ⌈m/8⌉ low bytes, little-endian, as a ``(P, width)`` uint8
array: 3 bytes per parameter at m = 24 instead of 4. Bits above m in the top byte (m not a multiple of
8) must be zero; the server refuses a message where they are not.

The server adds packed values without unpacking them: it reads the packed bytes through a strided word
view (one word per value, ``width`` bytes apart), so each word holds the value in its low ``width``
bytes and the next values' bytes above them. Those high bits only touch bits >= 8·width >= m of the
running sum, which lives modulo 2^width-of-word and is reduced modulo 2^m when decoded, so they never
change the result. The view is bounded by numpy against the packed buffer; the last values, whose word
would reach past it, are added from a zero-padded copy.
"""

from __future__ import annotations

import numpy as np

from .. import parallel


def wire_width(modulus_bits: int) -> int:
    """Bytes per masked value on the wire: ⌈m/8⌉."""
    return -(-modulus_bits // 8)


def pack(words: np.ndarray, width: int) -> np.ndarray:
    """The low ``width`` bytes of each little-endian word: a ``(P, width)`` uint8 view (``wire.encode`` makes the
    one contiguous copy it sends)."""
    little = words.astype(words.dtype.newbyteorder("<"), copy=False)
    return little.view(np.uint8).reshape(len(words), words.dtype.itemsize)[:, :width]


def high_bits_clear(packed: np.ndarray, modulus_bits: int) -> bool:
    """Whether every packed value is below 2^m (only the top byte can hold bits above m)."""
    spare = 8 * packed.shape[1] - modulus_bits
    if spare == 0:
        return True
    return not np.any(packed[:, -1] >> np.uint8(8 - spare))


def accumulate(total: np.ndarray, packed: np.ndarray, *, subtract: bool = False, threads: int | None = None) -> None:
    """``total ← total + packed`` (``total − packed`` with ``subtract``: the exact undo of an addition) modulo
    2^(8·total.itemsize), exact modulo 2^(8·width); in place, split over ``threads`` worker threads (default
    ``parallel.worker_count()``; 1: in the calling thread only).

    ``total``: a contiguous 1-D unsigned word vector of length P; ``packed``: a C-contiguous ``(P, width)`` uint8
    array with ``width <= total.itemsize`` (e.g. a read-only view into a received message).
    """
    count, width = packed.shape
    itemsize = total.dtype.itemsize
    word = total.dtype.newbyteorder("<")
    flat = packed.reshape(-1)
    inside = max(0, count - (-(-itemsize // width)) + 1)  # values whose whole word lies inside the packed bytes
    operation = np.subtract if subtract else np.add

    def add_span(start: int, stop: int) -> None:
        if stop > start:
            words = np.ndarray((stop - start,), word, buffer=flat, offset=start * width, strides=(width,))
            operation(total[start:stop], words, out=total[start:stop])

    parallel.run_each(add_span, parallel.spans(inside, threads or parallel.worker_count()))
    if inside < count:
        tail = np.zeros((count - inside, itemsize), np.uint8)
        tail[:, :width] = packed[inside:]
        operation(total[inside:], tail.reshape(-1).view(word), out=total[inside:])

"""Mask expansion: AES-256-CTR keyed by a full 32-byte seed, read as little-endian words.

Every seed is used for exactly one mask (self-mask seeds are fresh per round; pairwise seeds
are derived per round and pair), so the all-zero counter block is safe. Keystream words are
uniform modulo 2^width, hence modulo any 2^m with m <= width once reduced.

``apply_masks`` adds and removes many masks in one pass over the accumulator: the vector is split
into one contiguous span per worker thread (``protocols.parallel``), each worker seeks every seed's
keystream to its span (CTR's counter block for byte offset o is o / 16) and walks its span in
cache-sized pieces, so each keystream piece is consumed while it is still in cache and no
vector-sized mask is ever materialized. The result is the same as expanding every mask whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .. import parallel

SEED_BYTES = 32
AES_BLOCK_BYTES = 16
PIECE_BYTES = 1 << 18  # keystream produced per call: stays in a core's L2 cache with its accumulator piece


def mask_words(seed: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """PRG(seed): ``length`` little-endian words of ``dtype`` (a new array)."""
    words = np.zeros(length, np.dtype(dtype).newbyteorder("<"))
    apply_masks(words, add=[seed])
    return words


def apply_masks(accumulator: np.ndarray, add: Sequence[bytes] = (), subtract: Sequence[bytes] = ()) -> None:
    """``accumulator ← accumulator + Σ PRG(a) − Σ PRG(s)`` modulo 2^width, in place.

    ``accumulator``: a contiguous 1-D array of an unsigned integer type (the masked protocol's words).
    Raises ValueError for a seed that is not ``SEED_BYTES`` long (never a folded shorter secret).
    """
    seeds = [(seed, np.add) for seed in add] + [(seed, np.subtract) for seed in subtract]
    for seed, _ in seeds:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"mask seeds are {SEED_BYTES} bytes, not {len(seed)}")
    if accumulator.ndim != 1 or accumulator.dtype.kind != "u" or not accumulator.flags.c_contiguous:
        raise ValueError("masks apply to a contiguous 1-D unsigned integer vector")
    if not seeds or not accumulator.size:
        return
    words_per_block = max(1, AES_BLOCK_BYTES // accumulator.dtype.itemsize)
    spans = parallel.spans(accumulator.size, parallel.worker_count(), align=words_per_block)
    parallel.run_each(_apply_span, [(accumulator, seeds, start, stop) for start, stop in spans])


def _apply_span(accumulator: np.ndarray, seeds: list, start: int, stop: int) -> None:
    dtype = accumulator.dtype.newbyteorder("<")
    itemsize = dtype.itemsize
    counter = (start * itemsize // AES_BLOCK_BYTES).to_bytes(AES_BLOCK_BYTES, "big")
    streams = [(Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor(), operation) for seed, operation in seeds]
    piece_words = max(1, PIECE_BYTES // itemsize)
    zeros = memoryview(bytes(piece_words * itemsize))
    keystream = bytearray(piece_words * itemsize + AES_BLOCK_BYTES - 1)  # update_into wants a block's slack
    for low in range(start, stop, piece_words):
        high = min(low + piece_words, stop)
        target = accumulator[low:high]
        for encryptor, operation in streams:
            encryptor.update_into(zeros[:(high - low) * itemsize], keystream)
            operation(target, np.frombuffer(keystream, dtype, count=high - low), out=target)

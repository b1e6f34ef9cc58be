"""Mask expansion: AES-256-CTR keyed by a full 32-byte seed, read as little-endian words.

Every seed is used for exactly one mask (self-mask seeds are fresh per round; pairwise seeds
are derived per round and pair), so the all-zero counter block is safe. Keystream words are
uniform modulo 2^width, hence modulo any 2^m with m <= width once reduced.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
_ZERO_COUNTER = bytes(16)


class MaskExpander:
    """Adds or removes PRG(seed) to a word vector in place; reuses its buffers across seeds."""

    def __init__(self, length: int, dtype: np.dtype):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.length = length
        size = length * self.dtype.itemsize
        self._zeros = bytes(size)
        self._buffer = bytearray(size + 15)  # update_into wants room for one more block

    def words(self, seed: bytes) -> np.ndarray:
        """The mask for ``seed`` as a read-only view (valid until the next call)."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"mask seeds are {SEED_BYTES} bytes, not {len(seed)}")
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_COUNTER)).encryptor()
        encryptor.update_into(self._zeros, self._buffer)
        return np.frombuffer(self._buffer, dtype=self.dtype, count=self.length)

    def add(self, accumulator: np.ndarray, seed: bytes) -> None:
        np.add(accumulator, self.words(seed), out=accumulator)

    def subtract(self, accumulator: np.ndarray, seed: bytes) -> None:
        np.subtract(accumulator, self.words(seed), out=accumulator)

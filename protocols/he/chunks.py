"""How a client's vector fills CKKS ciphertexts, and the canary slots that bind an aggregate to its inputs.

A client encrypts ``[w·x_0, ..., w·x_{L-1}, w]``: its weighted vector and then its weight, so the
aggregate carries Σw without the server learning any single weight. That sequence is cut into
chunks of ``slots - CANARIES`` values; every chunk is followed by ``CANARIES`` canary values and
encrypted as one ciphertext.

Canaries are pseudo-random values in [-1, 1) expanded from a 32-byte seed that the client seals to the
key holder alone. The key holder adds up the canaries of the clients an aggregate claims to contain
and compares them with the decrypted canary slots: a ciphertext that is not the plain sum of exactly
those clients' ciphertexts (one client's ciphertext, a sum over other clients, a repeated or a
multiplied contribution) misses by far more than the noise, except with probability about
``output_step`` per canary, because the server never sees a seed. Canaries alone do not stop a combination
crafted to be ≈ 1 on the canary slots (issue 10, item 1): that is the committee's job (keyholder.py); the
canaries still bind the sum to the counted receipts' seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..wire import payload_digest
from .config import CANARIES

SEED_BYTES = 32
_CANARY_DOMAIN = b"feddat-secure/he/canaries/v1"


@dataclass(frozen=True)
class Layout:
    """Chunking of a vector of ``vector_length`` entries (plus the weight) into ciphertexts of ``slots`` slots."""

    vector_length: int
    slots: int
    canaries: int = CANARIES

    @property
    def per_chunk(self) -> int:
        return self.slots - self.canaries

    @property
    def num_chunks(self) -> int:
        return -(-(self.vector_length + 1) // self.per_chunk)

    def chunk_sizes(self) -> list[int]:
        """The number of slots each ciphertext uses (data then canaries)."""
        total = self.vector_length + 1
        return [min(self.per_chunk, total - start) + self.canaries for start in range(0, total, self.per_chunk)]

    def split(self, weighted: np.ndarray, weight: float, canaries: np.ndarray) -> list[np.ndarray]:
        """The plaintext of each ciphertext: a chunk of ``[weighted, weight]`` followed by its canaries."""
        values = np.concatenate([weighted, [weight]])
        return [np.concatenate([values[start:start + self.per_chunk], canaries[index]])
                for index, start in enumerate(range(0, values.size, self.per_chunk))]

    def join(self, chunks: Sequence[np.ndarray]) -> tuple[np.ndarray, float, np.ndarray]:
        """Inverse of ``split`` on decrypted sums: (Σ w·x, Σ w, canaries of shape (num_chunks, canaries))."""
        values = np.concatenate([chunk[:-self.canaries] for chunk in chunks])
        canaries = np.stack([chunk[-self.canaries:] for chunk in chunks])
        return values[:-1], float(values[-1]), canaries

    def canaries_from(self, seed: bytes) -> np.ndarray:
        """The canaries a seed expands to: shape (num_chunks, canaries), uniform in [-1, 1)."""
        count = self.num_chunks * self.canaries
        words = np.frombuffer(hashlib.shake_256(_CANARY_DOMAIN + seed).digest(8 * count), dtype="<u8")
        return ((words >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0).reshape(self.num_chunks, self.canaries)


_CIPHERTEXTS_DOMAIN = b"feddat-secure/he/ciphertexts/v2\0"


def ciphertexts_digest(ciphertexts: Sequence[bytes]) -> str:
    """What a receipt commits to (and an attestation signs of a sum): ``ciphertexts_commitment`` of the
    serialized ciphertexts' sizes and their ``wire.payload_digest``, which is exactly the payload digest of a
    message carrying them as its blobs ``c000000``.. and nothing else, so a receiver checks an input against
    its receipt from the header it verified anyway (``ciphertexts_commitment``), without a second pass."""
    return ciphertexts_commitment([len(ciphertext) for ciphertext in ciphertexts], payload_digest(ciphertexts))


def ciphertexts_commitment(sizes: Sequence[int], payload: str) -> str:
    """SHA-256 (hex) of (domain ‖ u64 count ‖ for each ciphertext: its blob name, NUL, u64 size ‖ the payload
    digest): the payload digest fixes the ciphertexts' concatenation (BLAKE3, ``wire.payload_digest``),
    the names and sizes where it is cut, so the same bytes cut into other ciphertexts (issue 16: a re-split
    payload) commit to another value."""
    digest = hashlib.sha256(_CIPHERTEXTS_DOMAIN)
    digest.update(len(sizes).to_bytes(8, "little"))
    for index, size in enumerate(sizes):
        digest.update(chunk_name(index).encode() + b"\0" + size.to_bytes(8, "little"))
    digest.update(bytes.fromhex(payload))
    return digest.hexdigest()


def chunk_name(index: int) -> str:
    """The name of ciphertext ``index``'s blob in an input or an aggregate message."""
    return f"c{index:06d}"

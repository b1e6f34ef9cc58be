"""Per-client ciphertext masks: what makes a single site's ciphertext useless to whoever learns the round's key.

Why (issue 10, second red-team pass, break 1): a site may submit any two-part ciphertext, e.g. its own (c0, c1)
with c1 replaced by c1 + P. Every check passes (it is the exact sum of the receipted inputs, the committee
recomputes the same sum), and the released decryption is Σm + P·s: the colluder reads the secret key s off it
(the chosen-ciphertext counterpart of Li and Micciancio, "On the security of homomorphic encryption on
approximate numbers", EUROCRYPT 2021), and with s anyone holding the round's ciphertexts (the server, a
committee member) decrypted every counted input.

The defence: client i adds to the first part c0 of its chunk k a polynomial r_{i,k} that is uniform modulo
every data prime of the ciphertext's level, expanded from the 32-byte seed it already seals to the key holder
alone in its receipt (sealing.py; the canaries come from the same seed under another domain label, chunks.py).
A ciphertext then decrypts, under any key, to m_{i,k} + r_{i,k}: a one-time pad mod q on the plaintext
polynomial. The key holder, who opens every counted seed, subtracts Σ_i r_{i,k} from the summed chunk before it
decrypts (keyholder.py), so the released sum is unchanged. A recovered key therefore decrypts the released sum
(already public) and nothing else: any single ciphertext, or any sum over other than the exact counted set,
still carries a uniform mask that only the key holder can remove, and the key holder never sees a single
ciphertext (only the committee-attested sum). A site cannot cancel another site's mask: it commits to its
ciphertexts before any ciphertext is revealed (client.py). The key holder's trust is unchanged: colluding with
the server (which holds every ciphertext and forwards every sealed seed), it could already decrypt any single
input, and it can still unmask one.

The masks are drawn directly in SEAL's NTT (evaluation) representation: the NTT is a bijection of the
polynomials mod q_j, so a uniform vector there is a uniform polynomial. Each coefficient is rejection-sampled
(exactly uniform) from SHAKE-256 output (FIPS 202) keyed by the seed, the chunk and the prime's index.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_MASK_DOMAIN = b"feddat-secure/he/ciphertext-masks/v1"


def _uniform(seed: bytes, chunk: int, index: int, modulus: int, count: int) -> np.ndarray:
    """``count`` values uniform in [0, modulus): 64-bit words from the XOF, cut to the modulus's bit length,
    those ≥ modulus rejected (SEAL's primes lie just below a power of two: almost nothing is rejected)."""
    label = _MASK_DOMAIN + seed + chunk.to_bytes(4, "little") + index.to_bytes(1, "little")
    cut = np.uint64((1 << modulus.bit_length()) - 1)
    words = count + count // 8 + 64
    while True:  # a longer XOF output starts with the shorter one: the result does not depend on the loop
        values = np.frombuffer(hashlib.shake_256(label).digest(8 * words), dtype="<u8") & cut
        accepted = values[values < np.uint64(modulus)]
        if accepted.size >= count:
            return accepted[:count]
        words *= 2


def chunk_mask(seed: bytes, chunk: int, moduli: Sequence[int], degree: int) -> np.ndarray:
    """The mask r of chunk ``chunk``: shape (len(moduli), degree), row j uniform mod ``moduli[j]``, in SEAL's
    RNS layout (a plaintext's or a ciphertext part's coefficients, prime by prime)."""
    return np.stack([_uniform(seed, chunk, index, modulus, degree) for index, modulus in enumerate(moduli)])


def masks(seed: bytes, chunks: int, moduli: Sequence[int], degree: int) -> list[np.ndarray]:
    """Every chunk's mask for one client's seed."""
    return [chunk_mask(seed, chunk, moduli, degree) for chunk in range(chunks)]


def summed_masks(seeds: Sequence[bytes], chunks: int, moduli: Sequence[int], degree: int) -> list[np.ndarray]:
    """Σ_i r_{i,k} mod each prime, per chunk k: what the key holder subtracts from the attested sum."""
    column = np.array(moduli, dtype=np.uint64)[:, None]
    totals = [np.zeros((len(moduli), degree), dtype=np.uint64) for _ in range(chunks)]
    for seed in seeds:
        for chunk, total in enumerate(totals):
            total += chunk_mask(seed, chunk, moduli, degree)  # both < q < 2^61: no overflow
            np.subtract(total, column, out=total, where=total >= column)
    return totals

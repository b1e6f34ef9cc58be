"""The TenSEAL calls, in one place, with every check a party needs before trusting a context or ciphertext.

Performance note: never ``CKKSVector.copy()`` here; it copies the whole context each time (a 10-client
sum took a minute and 13 GB that way). Sums use ``+=`` on vectors that share one context.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np
import tenseal as ts
import tenseal.sealapi  # noqa: F401  (registers SEAL's types, so coefficient moduli can be inspected)

from ..errors import ConfigurationError, MessageRejected
from .config import HEOptions


def secret_context(config: HEOptions) -> ts.Context:
    """A fresh CKKS key pair: what only the key holder ever holds."""
    try:
        context = ts.context(ts.SCHEME_TYPE.CKKS, config.poly_modulus_degree,
                             coeff_mod_bit_sizes=list(config.coeff_mod_bit_sizes), n_threads=1)
    except ValueError as error:
        raise ConfigurationError(f"TenSEAL refuses the CKKS parameters {config}: {error}") from None
    context.global_scale = config.scale
    return context


def public_context_bytes(context: ts.Context) -> bytes:
    """The context without the secret key (and without relinearization or Galois keys: sums need neither)."""
    return context.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                             save_relin_keys=False)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_public_context(data: bytes, config: HEOptions, sender: str) -> ts.Context:
    """Parse a public context and check it is public and uses exactly ``config``'s parameters."""
    try:
        context = ts.context_from(data, n_threads=1)
    except (ValueError, RuntimeError, TypeError) as error:
        raise MessageRejected(f"the public context does not parse: {error}", sender) from None
    if context.is_private():
        raise MessageRejected("the context carries a secret key; it must be public (nobody but the key holder "
                              "may hold the secret key)", sender)
    if not context.has_public_key():
        raise MessageRejected("the context has no public key to encrypt with", sender)
    parameters = context.seal_context().data.key_context_data().parms()
    found = (parameters.poly_modulus_degree(), tuple(modulus.bit_count() for modulus in parameters.coeff_modulus()))
    wanted = (config.poly_modulus_degree, config.coeff_mod_bit_sizes)
    if found != wanted:
        raise MessageRejected(f"the context's parameters (N, moduli bits) = {found} are not the configured "
                              f"{wanted}", sender)
    context.global_scale = config.scale
    return context


def encrypt(context: ts.Context, plaintexts: Sequence[np.ndarray]) -> list[bytes]:
    """One serialized ciphertext per plaintext chunk (public-key encryption)."""
    return [ts.ckks_vector(context, chunk.tolist()).serialize() for chunk in plaintexts]


def load_ciphertext(context: ts.Context, data: bytes, size: int, config: HEOptions, sender: str,
                    name: str) -> ts.CKKSVector:
    """Parse one ciphertext and check it is a fresh-level, two-part ciphertext of ``size`` slots at the scale.

    SEAL's loader already refuses coefficients outside the modulus and unknown parameter ids; the
    checks here make sure ``+=`` can neither fail nor silently mix scales or levels later.
    """
    try:
        vector = ts.ckks_vector_from(context, data)
    except (ValueError, RuntimeError, TypeError) as error:
        raise MessageRejected(f"ciphertext {name!r} does not parse: {error}", sender) from None
    if vector.size() != size:
        raise MessageRejected(f"ciphertext {name!r} holds {vector.size()} slots, expected {size} (wrong vector "
                              "length)", sender)
    parts = vector.ciphertext()
    first_level = context.seal_context().data.first_parms_id()
    if (len(parts) != 1 or parts[0].size() != 2 or parts[0].scale != config.scale
            or parts[0].parms_id() != first_level or not parts[0].is_ntt_form()):
        raise MessageRejected(f"ciphertext {name!r} is not a fresh two-part ciphertext at scale "
                              f"2^{config.global_scale_bits}", sender)
    return vector


def decrypt(vector: ts.CKKSVector) -> np.ndarray:
    """The slots of a ciphertext loaded with the secret context."""
    return np.asarray(vector.decrypt(), dtype=np.float64)


def ciphertext_from_state(context: ts.Context, data: bytes) -> ts.CKKSVector:
    """A ciphertext from the party's own saved state (it was checked with ``load_ciphertext`` when it arrived)."""
    return ts.ckks_vector_from(context, data)


def secret_context_bytes(context: ts.Context) -> bytes:
    """The key holder's whole context, secret key included, for its own saved state only: never sent."""
    return context.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                             save_relin_keys=False)


def secret_context_from_state(data: bytes, config: HEOptions) -> ts.Context:
    """The inverse of ``secret_context_bytes``."""
    context = ts.context_from(data, n_threads=1)
    if not context.is_private():
        raise ValueError("the saved key holder context has no secret key")
    context.global_scale = config.scale
    return context


@functools.cache
def fresh_ciphertext_bytes(config: HEOptions) -> int:
    """The serialized size of one fresh full ciphertext, measured once per parameter set: what the per-stage
    size limits and ``bytes_per_parameter`` start from (a sum of ciphertexts is no larger)."""
    context = secret_context(config)
    return len(encrypt(context, [np.zeros(config.slots)])[0])


def add_into(totals: list[ts.CKKSVector], vectors: list[ts.CKKSVector]) -> list[ts.CKKSVector]:
    """``totals`` += ``vectors`` slot by slot, in place (sharing one context: never ``.copy()``); the first
    input becomes the running sum. Addition mod q is exact, so every party that adds the same ciphertexts, in
    any order, serializes the same sum byte for byte (SEAL's serialization is deterministic)."""
    if not totals:
        return vectors
    for total, vector in zip(totals, vectors):
        total += vector
    return totals

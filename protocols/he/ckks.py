"""The TenSEAL calls, in one place, with every check a party needs before trusting a context or ciphertext.

Masks (masks.py) are added to and removed from ciphertexts with SEAL's own evaluator (``tenseal.sealapi``):
TenSEAL can neither build a SEAL plaintext from raw coefficients nor wrap a SEAL ciphertext, so both cross
SEAL's serialization format (``_seal_object``) and TenSEAL's ``CKKSVectorProto`` (``tenseal_vector``) here.

Performance note: never ``CKKSVector.copy()`` here; it copies the whole context each time (a 10-client
sum took a minute and 13 GB that way). Sums are SEAL ciphertexts added with SEAL's evaluator: the parsed
ciphertext's one copy (``ciphertext()``: TenSEAL hands out no reference to its own) is what the checks read
and what is added, where TenSEAL's ``+=`` would copy its operand once more (``CKKSVector::add_inplace``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tenseal as ts
import tenseal.sealapi  # noqa: F401  (SEAL's evaluator, decryptor and encoder, for the masks)

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


def data_moduli(context: ts.Context) -> list[int]:
    """The data primes of a fresh ciphertext's level (the special prime excluded): what a mask is uniform modulo."""
    return [modulus.value() for modulus in context.seal_context().data.first_context_data().parms().coeff_modulus()]


def encrypt(context: ts.Context, plaintexts: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> list[bytes]:
    """One serialized ciphertext per plaintext chunk (public-key encryption), chunk k's mask added to its first
    part c0: it decrypts, under any key, to the chunk plus a uniform polynomial (masks.py)."""
    seal = context.seal_context().data
    evaluator = ts.sealapi.Evaluator(seal)
    out = []
    with _scratch_folder() as folder:
        scratch = Path(folder) / "seal.bin"
        for chunk, mask in zip(plaintexts, masks, strict=True):
            vector = ts.ckks_vector(context, chunk.tolist())
            [ciphertext] = vector.ciphertext()  # a copy: TenSEAL hands out no reference to its own
            evaluator.add_plain_inplace(ciphertext, rns_plaintext(seal, ciphertext, mask, scratch))
            out.append(tenseal_vector(ciphertext, vector.size(), scratch))
    return out


def _varint(value: int) -> bytes:
    out = b""
    while value >= 0x80:
        out, value = out + bytes([value & 0x7F | 0x80]), value >> 7
    return out + bytes([value])


def tenseal_vector(ciphertext: ts.sealapi.Ciphertext, size: int, scratch: Path) -> bytes:
    """A SEAL ciphertext of ``size`` slots in TenSEAL's wire format, the protobuf message CKKSVectorProto
    {repeated uint32 sizes = 1 (packed); repeated bytes ciphertexts = 2; double scale = 3}
    (tenseal/proto/tensors.proto): what ``ts.ckks_vector_from`` loads. ``scratch`` is a file SEAL saves
    through (sealapi saves only to a path)."""
    ciphertext.save(str(scratch))
    data = scratch.read_bytes()
    sizes = _varint(size)
    return (b"\x0a" + _varint(len(sizes)) + sizes + b"\x12" + _varint(len(data)) + data
            + b"\x19" + struct.pack("<d", ciphertext.scale))


_MEMORY = "/dev/shm"  # a scratch file there never touches a disk (sealapi loads and saves only through paths)


def _scratch_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(dir=_MEMORY if os.path.isdir(_MEMORY) else None)


_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = "<HBBBBHQ"  # magic, header size, version major, minor, compression (0: none), reserved, total size


@functools.cache
def _seal_version() -> tuple[int, int]:
    """The (major, minor) version SEAL writes in its headers, read off one of its own saves."""
    with _scratch_folder() as folder:
        path = Path(folder) / "seal.bin"
        ts.sealapi.Plaintext().save(str(path))
        return tuple(path.read_bytes()[3:5])


def _seal_object(body: bytes) -> bytes:
    """``body`` behind SEAL's serialization header, uncompressed (SEAL's ``Serialization::Save``)."""
    header = struct.calcsize(_SEAL_HEADER)
    return struct.pack(_SEAL_HEADER, _SEAL_MAGIC, header, *_seal_version(), 0, 0, header + len(body)) + body


def rns_plaintext(seal: ts.sealapi.SEALContext, like: ts.sealapi.Ciphertext, coefficients: np.ndarray,
                  scratch: Path) -> ts.sealapi.Plaintext:
    """The NTT-form plaintext with these RNS coefficients (shape (primes, N)) at ``like``'s level and scale,
    in SEAL's own format (``Plaintext::save_members``: parms_id, coefficient count, scale, then the coefficients
    as a DynArray). SEAL's loader checks the level exists and every coefficient is below its prime."""
    data = np.ascontiguousarray(coefficients, dtype="<u8").tobytes()
    array = _seal_object(struct.pack("<Q", coefficients.size) + data)
    body = struct.pack("<4QQd", *like.parms_id(), coefficients.size, like.scale) + array
    scratch.write_bytes(_seal_object(body))
    plain = ts.sealapi.Plaintext()
    plain.load(seal, str(scratch))
    return plain


def load_ciphertext(context: ts.Context, data: bytes, size: int, config: HEOptions, sender: str,
                    name: str) -> ts.sealapi.Ciphertext:
    """Parse one ciphertext and check it is a fresh-level, two-part ciphertext of ``size`` slots at the scale;
    returns its SEAL ciphertext (the one copy TenSEAL hands out, which the checks read anyway).

    SEAL's loader already refuses coefficients outside the modulus and unknown parameter ids; the
    checks here make sure an addition can neither fail nor silently mix scales or levels later.
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
    return parts[0]


def decrypt_unmasked(context: ts.Context, ciphertexts: Sequence[ts.sealapi.Ciphertext], sizes: Sequence[int],
                     masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The first ``sizes`` slots of each (summed) ciphertext, loaded with the secret context, once its summed mask
    is subtracted from its first part (in place): only then is it the sum of the counted chunks (masks.py)."""
    seal = context.seal_context().data
    evaluator, encoder = ts.sealapi.Evaluator(seal), ts.sealapi.CKKSEncoder(seal)
    decryptor = ts.sealapi.Decryptor(seal, context.secret_key().data)
    out = []
    with _scratch_folder() as folder:
        scratch = Path(folder) / "seal.bin"
        for ciphertext, size, mask in zip(ciphertexts, sizes, masks, strict=True):
            evaluator.sub_plain_inplace(ciphertext, rns_plaintext(seal, ciphertext, mask, scratch))
            plain = ts.sealapi.Plaintext()
            decryptor.decrypt(ciphertext, plain)
            out.append(np.asarray(encoder.decode_double(plain), dtype=np.float64)[:size])
    return out


def ciphertext_from_state(context: ts.Context, data: bytes) -> ts.sealapi.Ciphertext:
    """A ciphertext from the party's own saved state (``serialize``; it was checked with ``load_ciphertext``
    when it arrived)."""
    [ciphertext] = ts.ckks_vector_from(context, data).ciphertext()
    return ciphertext


def serialize(ciphertexts: Sequence[ts.sealapi.Ciphertext], sizes: Sequence[int]) -> list[bytes]:
    """Ciphertexts of ``sizes`` slots in TenSEAL's format (``tenseal_vector``), as ``CKKSVector.serialize`` writes
    them: SEAL's serialization is deterministic, so every party that adds the same ciphertexts serializes the
    same sum byte for byte."""
    with _scratch_folder() as folder:
        scratch = Path(folder) / "seal.bin"
        return [tenseal_vector(ciphertext, size, scratch) for ciphertext, size in zip(ciphertexts, sizes, strict=True)]


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
    size limits and ``bytes_per_parameter`` start from (a sum of ciphertexts is no larger; a masked one is as
    incompressible as a fresh one)."""
    context = secret_context(config)
    mask = np.zeros((len(data_moduli(context)), config.poly_modulus_degree), dtype=np.uint64)
    return len(encrypt(context, [np.zeros(config.slots)], [mask])[0])


def add_ciphertexts(totals: list[ts.sealapi.Ciphertext], context: ts.Context, blobs: Sequence[bytes],
                    sizes: Sequence[int], config: HEOptions, sender: str,
                    names: Sequence[str]) -> list[ts.sealapi.Ciphertext]:
    """``totals`` += the ciphertexts serialized in ``blobs``, streamed chunk by chunk: each is parsed and checked
    (``load_ciphertext``) and added in place with SEAL's evaluator before the next is parsed, so one ciphertext is
    in flight and is added while it is still in the cache (issue 16: parse once, one copy, no list of parsed
    vectors). With no ``totals`` yet, the parsed chunks become the running sum.

    All or nothing: when a chunk fails, the chunks already added are subtracted again before the error goes on.
    Addition mod q is exact, so ``totals`` come back byte for byte (a refused message changes nothing), and every
    party that adds the same ciphertexts, in any order, gets the same sum (``serialize``): the server's and each
    committee member's."""
    evaluator = ts.sealapi.Evaluator(context.seal_context().data)
    out = totals if totals else []
    added = 0
    try:
        for blob, size, name in zip(blobs, sizes, names, strict=True):
            ciphertext = load_ciphertext(context, blob, size, config, sender, name)
            if totals:
                evaluator.add_inplace(out[added], ciphertext)
            else:
                out.append(ciphertext)
            added += 1
    except BaseException:
        if totals:
            subtract_ciphertexts(out[:added], context, blobs)
        raise
    return out


def subtract_ciphertexts(totals: list[ts.sealapi.Ciphertext], context: ts.Context,
                         blobs: Sequence[bytes]) -> list[ts.sealapi.Ciphertext]:
    """``totals`` −= the ciphertexts serialized in ``blobs``, in place with SEAL's evaluator: undoes
    ``add_ciphertexts`` of the same blobs byte for byte (addition mod q is exact). The blobs were parsed and
    checked once already: they parse again."""
    evaluator = ts.sealapi.Evaluator(context.seal_context().data)
    for total, blob in zip(totals, blobs):
        evaluator.sub_inplace(total, ciphertext_from_state(context, blob))
    return totals

"""Sealing a client's canary seed to the key holder, past the server that relays it.

ECIES over X25519: a fresh ephemeral key per seal, HKDF-SHA256 to an AES-256-GCM key, the message
context (round, sender, context digest) as associated data, so a sealed seed opens only in the
receipt it was made for. The key holder's X25519 key is fresh every round, like its CKKS key.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import MessageRejected

PUBLIC_BYTES = 32
_INFO = b"feddat-secure/he/seed-seal/v1"
_NONCE = bytes(12)  # every seal derives a new key from a new ephemeral key pair, so a fixed nonce is safe


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw private key, for the key holder's own saved state."""
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=_INFO + ephemeral + recipient).derive(shared)


def seal(secret: bytes, recipient: bytes, associated: bytes) -> bytes:
    """Encrypt ``secret`` to the X25519 public key ``recipient`` (raw 32 bytes)."""
    ephemeral = X25519PrivateKey.generate()
    sender = public_bytes(ephemeral)
    key = _key(ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient)), sender, recipient)
    return sender + AESGCM(key).encrypt(_NONCE, secret, associated)


def open_sealed(sealed: bytes, private: X25519PrivateKey, associated: bytes, sender: str) -> bytes:
    """Decrypt a ``seal`` output; anything that does not open raises MessageRejected naming ``sender``."""
    if len(sealed) <= PUBLIC_BYTES + 16:
        raise MessageRejected(f"sealed seed of {len(sealed)} bytes is too short", sender)
    ephemeral = sealed[:PUBLIC_BYTES]
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        return AESGCM(_key(shared, ephemeral, public_bytes(private))).decrypt(_NONCE, sealed[PUBLIC_BYTES:],
                                                                            associated)
    except (InvalidTag, ValueError):
        raise MessageRejected("the sealed seed does not open with this round's key", sender) from None

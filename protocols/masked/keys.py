"""Per-round key agreement: X25519 key pairs, HKDF-derived pairwise seeds and share-encryption keys.

Each client makes two fresh X25519 pairs per round: one whose agreements seed the pairwise
masks, one whose agreements key the encryption of Shamir shares. Every derived value (HKDF info, and
the ChaCha20-Poly1305 associated data) is bound to the session, the view digest the client signed, the
round and both ids, so nothing carries over between runs, views, rounds or pairs (issue 10 item 3: a
share ciphertext or mask seed of another run never fits this one).

Public keys are checked when they arrive (RFC 7748 §6.1): a low-order point makes every shared secret
all-zero, whatever the private key, so such a key would give the server the "secret" pairwise mask.
"""

from __future__ import annotations

import json
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import MessageRejected
from ..x25519 import check_x25519_public_key

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_PAIRWISE = b"feddat-secure/masked/v2/pairwise-mask-seed"
_SHARES = b"feddat-secure/masked/v2/share-encryption-key"


def raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def raw_public(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key(raw: bytes, owner: str) -> X25519PublicKey:
    """``raw`` as an X25519 public key; refuses a wrong length, a non-canonical encoding and small-order points
    (RFC 7748 §6.1; ``protocols.x25519``) with MessageRejected naming ``owner``."""
    return X25519PublicKey.from_public_bytes(check_x25519_public_key(raw, owner, sender=owner))


def _derive(shared: bytes, label: bytes, context: list) -> bytes:
    info = label + json.dumps(context, separators=(",", ":")).encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _agree(private: X25519PrivateKey, public: X25519PublicKey, peer: str) -> bytes:
    try:
        return private.exchange(public)
    except ValueError:  # a low-order point gives the all-zero secret; the library refuses it
        raise MessageRejected(f"{peer}'s X25519 public key is degenerate") from None


def pairwise_seed(private: X25519PrivateKey, peer_public: X25519PublicKey, session: str, view: str, round_id: int,
                  me: str, peer: str) -> bytes:
    """The mask seed both ends of the pair (me, peer) derive: HKDF-SHA256(X25519; session, view, round, both ids)."""
    low, high = sorted((me, peer))
    return _derive(_agree(private, peer_public, peer), _PAIRWISE, [session, view, round_id, low, high])


def _share_key(private: X25519PrivateKey, peer_public: X25519PublicKey, context: list, peer: str) -> bytes:
    # one key per direction (the context names sender then recipient): the two ends never share a key
    return _derive(_agree(private, peer_public, peer), _SHARES, context)


def _context(protocol: str, session: str, view: str, round_id: int, sender: str, recipient: str) -> list:
    return [protocol, session, view, round_id, sender, recipient]


def encrypt_shares(private: X25519PrivateKey, peer_public: X25519PublicKey, protocol: str, session: str, view: str,
                   round_id: int, sender: str, recipient: str, plaintext: bytes) -> bytes:
    """ChaCha20-Poly1305 under a key from the sender's and recipient's share-encryption pairs; key and
    associated data both bind (protocol, session, view, round, sender, recipient)."""
    nonce = os.urandom(NONCE_BYTES)
    context = _context(protocol, session, view, round_id, sender, recipient)
    key = _share_key(private, peer_public, context, recipient)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, json.dumps(context).encode())


def decrypt_shares(private: X25519PrivateKey, peer_public: X25519PublicKey, protocol: str, session: str, view: str,
                   round_id: int, sender: str, recipient: str, ciphertext: bytes) -> bytes:
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise MessageRejected(f"the shares from {sender!r} are truncated", sender)
    context = _context(protocol, session, view, round_id, sender, recipient)
    key = _share_key(private, peer_public, context, sender)
    try:
        return ChaCha20Poly1305(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:],
                                             json.dumps(context).encode())
    except InvalidTag:
        raise MessageRejected(f"the shares from {sender!r} do not decrypt (tampered, misdirected or replayed)",
                              sender) from None


def fresh_pair() -> X25519PrivateKey:
    return X25519PrivateKey.generate()

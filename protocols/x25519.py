"""Checking an X25519 public key where it arrives, before anyone agrees a secret with it.

X25519 (RFC 7748) accepts any 32 bytes as a public key. Two kinds are never what an honest party
sends, and both are refused here, by the party receiving the key, with the owner named:

* A point of small order (RFC 7748 §6.1; Bernstein, "How do I validate Curve25519 public keys?",
  cr.yp.to/ecdh.html#validate). A clamped X25519 scalar is a multiple of 8, so with a point whose
  order divides 8 every shared secret is all zero, the same for everyone and known to everyone:
  pairwise masks or sealed messages keyed by it protect nothing. ``cryptography`` notices only
  when the secret is computed, deep inside a later stage, as a bare ``ValueError``.
* A non-canonical encoding: the top bit set, or a u-coordinate of at least p = 2^255 − 19. RFC 7748
  §5 reads such bytes modulo p with the top bit masked, so they name the same key as other, canonical
  bytes: a check that compares keys as bytes (two keys of one party must differ, one key must not
  serve two parties) would be fooled. Every key an honest party makes is canonical, as
  ``X25519PublicKey.public_bytes`` writes it.

On the Montgomery curve and its twist the u-coordinates of the points of order dividing 8 are 0, 1,
p − 1 and the two order-8 coordinates below; below 2^255, p and p + 1 spell 0 and 1 again, and with
the top bit set all seven appear once more (libsodium's blocklist, ``crypto_scalarmult_curve25519``).
Refusing non-canonical bytes first leaves only the five canonical coordinates to compare against.
"""

from __future__ import annotations

from .errors import MessageRejected

X25519_KEY_BYTES = 32
_P = 2**255 - 19
# 0 has order 2; 1 and p - 1 order 4 (one on the curve, one on its twist); the two long ones order 8.
SMALL_ORDER_U = frozenset({
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    _P - 1,
})


def check_x25519_public_key(raw: bytes, owner: str, *, sender: str | None = None) -> bytes:
    """Return ``raw`` if it is a canonical X25519 public key of large order; else raise MessageRejected.

    ``owner`` is whose key it is (a party id, or a description such as "the key holder"); the error
    names it. ``sender`` is the party whose message carried the key, when there is one, for
    ``MessageRejected.sender`` (a server relaying a client's key is the sender, the client the owner).
    """
    if not isinstance(raw, bytes):
        raise MessageRejected(f"{owner}'s X25519 public key must be bytes, not {type(raw).__name__}", sender)
    if len(raw) != X25519_KEY_BYTES:
        raise MessageRejected(f"{owner}'s X25519 public key must be {X25519_KEY_BYTES} bytes, not {len(raw)}", sender)
    u = int.from_bytes(raw, "little")
    if u >= _P:
        raise MessageRejected(f"{owner}'s X25519 public key is not canonically encoded (u-coordinate at or above "
                              "2^255 - 19, or its top bit set; RFC 7748 §5)", sender)
    if u in SMALL_ORDER_U:
        raise MessageRejected(f"{owner}'s X25519 public key is a point of small order: every secret agreed with it "
                              "is all zero (RFC 7748 §6.1)", sender)
    return raw

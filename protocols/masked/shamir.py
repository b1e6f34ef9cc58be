"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

The field is larger than any 32-byte secret, so a secret is one field element; shares are
(x, y) with x the holder's public index (>= 1) and y a 66-byte big-endian field element.
Coefficients come from ``secrets`` (the OS generator).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from ..errors import ProtocolError

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
SHARE_BYTES = 66


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """Shares of ``secret`` for the holders ``xs``; any ``threshold`` of them reconstruct it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, not {len(secret)}")
    xs = list(xs)
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise ValueError("need 1 <= threshold <= distinct positive share indices")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for coefficient in reversed(coefficients):
            y = (y * x + coefficient) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret from ``threshold`` of ``shares`` (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise ProtocolError(f"{len(shares)} shares cannot reconstruct a {threshold}-of-n secret")
    points = sorted(shares.items())[:threshold]
    values = []
    for x, y in points:
        if len(y) != SHARE_BYTES or not 0 < x < PRIME:
            raise ProtocolError("malformed share")
        values.append((x, int.from_bytes(y, "big")))
    secret = 0
    for i, (x_i, y_i) in enumerate(values):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(values):
            if i != j:
                numerator = numerator * x_j % PRIME
                denominator = denominator * (x_j - x_i) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise ProtocolError("the shares are inconsistent (they reconstruct no 32-byte secret)")
    return secret.to_bytes(SECRET_BYTES, "big")

"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

The field is larger than any 32-byte secret, so a secret is one field element; shares are
(x, y) with x the holder's public index (>= 1) and y a 66-byte big-endian field element.
Coefficients come from ``secrets`` (the OS generator).

``recover`` reconstructs from ANY t consistent shares when some holders lie (issue 10 item 6): it
checks the candidate from the first t shares against a verifier (a commitment to the secret), and if
that fails decodes all shares with Berlekamp–Welch (Welch & Berlekamp, US patent 4,633,470, 1986),
which corrects up to ⌊(m − t)/2⌋ wrong shares among m. It also names every share that is off the
recovered polynomial, so that the caller can flag its holder.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping

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


def recover(shares: Mapping[int, bytes], threshold: int, verify: Callable[[bytes], bool]) -> tuple[bytes, set[int]]:
    """The secret that ``verify`` accepts, from any ``threshold`` consistent shares, and the indices of the shares
    that are not on its polynomial (wrong length, out of the field, or simply wrong).

    Tries the first ``threshold`` well-formed shares; if their candidate fails ``verify``, Berlekamp–Welch over
    all of them. Raises ProtocolError when neither yields a verified secret (too many bad shares)."""
    points, bad = [], set()
    for x, y in sorted(shares.items()):
        value = int.from_bytes(y, "big") if len(y) == SHARE_BYTES else PRIME
        (bad.add(x) if value >= PRIME or not 0 < x < PRIME else points.append((x, value)))
    if len(points) < threshold:
        raise ProtocolError(f"{len(points)} well-formed shares cannot reconstruct a {threshold}-of-n secret")
    for decode in (lambda: _interpolate(points[:threshold]), lambda: _berlekamp_welch(points, threshold)):
        polynomial = decode()  # the second only when the first fails: Berlekamp–Welch is O(m³)
        secret = _secret(polynomial)
        if secret is not None and verify(secret):
            return secret, bad | {x for x, y in points if _evaluate(polynomial, x) != y}
    raise ProtocolError(f"no {threshold} of the {len(shares)} shares reconstruct the committed secret "
                        "(too many bad shares)")


def _secret(polynomial: list[int] | None) -> bytes | None:
    if polynomial is None or polynomial[0] >> (8 * SECRET_BYTES):
        return None
    return polynomial[0].to_bytes(SECRET_BYTES, "big")


def _evaluate(polynomial: list[int], x: int) -> int:
    value = 0
    for coefficient in reversed(polynomial):
        value = (value * x + coefficient) % PRIME
    return value


def _interpolate(points: list[tuple[int, int]]) -> list[int]:
    """The coefficients (lowest first) of the polynomial of degree < len(points) through ``points``."""
    master = [1]  # Π (X − x_j), lowest coefficient first
    for x, _ in points:
        master = [(low - x * high) % PRIME for low, high in zip([0, *master], [*master, 0])]
    coefficients = [0] * len(points)
    for i, (x_i, y_i) in enumerate(points):
        quotient, carry = [0] * len(points), 0  # master / (X − x_i) by synthetic division
        for degree in range(len(points), 0, -1):
            carry = (master[degree] + carry * x_i) % PRIME if degree < len(points) else master[degree]
            quotient[degree - 1] = carry
        denominator = 1
        for j, (x_j, _) in enumerate(points):
            if j != i:
                denominator = denominator * (x_i - x_j) % PRIME
        factor = y_i * pow(denominator, -1, PRIME) % PRIME
        coefficients = [(c + factor * q) % PRIME for c, q in zip(coefficients, quotient)]
    return coefficients


def _berlekamp_welch(points: list[tuple[int, int]], threshold: int) -> list[int] | None:
    """The polynomial of degree < threshold agreeing with all but at most e = ⌊(m − threshold)/2⌋ points, or None.

    Unknowns: E (monic, degree e) and Q (degree < e + threshold) with Q(x_i) = y_i·E(x_i) for every point;
    then P = Q / E."""
    errors = (len(points) - threshold) // 2
    if errors < 1:
        return None
    width = errors + threshold  # Q's coefficients, then E's lower ones
    rows = [[pow(x, j, PRIME) for j in range(width)] + [(-y * pow(x, j, PRIME)) % PRIME for j in range(errors)]
            + [y * pow(x, errors, PRIME) % PRIME] for x, y in points]
    solution = _solve(rows, width + errors)
    if solution is None:
        return None
    q, e = solution[:width], solution[width:] + [1]
    quotient, remainder = _divide(q, e)
    if any(remainder) or any(quotient[threshold:]):
        return None
    return (quotient + [0] * threshold)[:threshold]


def _solve(rows: list[list[int]], unknowns: int) -> list[int] | None:
    """One solution of the linear system (augmented rows) over GF(PRIME), free unknowns set to 0; None if none."""
    rows = [row[:] for row in rows]
    pivots, rank = [], 0
    for column in range(unknowns):
        pivot = next((r for r in range(rank, len(rows)) if rows[r][column]), None)
        if pivot is None:
            continue
        rows[rank], rows[pivot] = rows[pivot], rows[rank]
        inverse = pow(rows[rank][column], -1, PRIME)
        rows[rank] = [value * inverse % PRIME for value in rows[rank]]
        for r in range(len(rows)):
            if r != rank and rows[r][column]:
                factor = rows[r][column]
                rows[r] = [(a - factor * b) % PRIME for a, b in zip(rows[r], rows[rank])]
        pivots.append(column)
        rank += 1
    if any(row[-1] for row in rows[rank:]):
        return None
    solution = [0] * unknowns
    for r, column in enumerate(pivots):
        solution[column] = rows[r][-1]
    return solution


def _divide(numerator: list[int], denominator: list[int]) -> tuple[list[int], list[int]]:
    """Polynomial division over GF(PRIME) by a monic ``denominator`` (coefficients lowest first)."""
    remainder = numerator[:]
    degree = len(denominator) - 1
    quotient = [0] * max(len(numerator) - degree, 1)
    for shift in range(len(numerator) - 1 - degree, -1, -1):
        factor = remainder[shift + degree]
        quotient[shift] = factor
        if factor:
            for j, coefficient in enumerate(denominator):
                remainder[shift + j] = (remainder[shift + j] - factor * coefficient) % PRIME
    return quotient, remainder

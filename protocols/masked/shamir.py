"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

The field is larger than any 32-byte secret, so a secret is one field element; shares are
(x, y) with x the holder's public index (>= 1) and y a 66-byte big-endian field element.
Coefficients come from ``secrets`` (the OS generator).

``recover`` reconstructs from ANY t consistent shares when some holders lie (issue 10 item 6), using a
verifier (a commitment to the secret). Within the unique-decoding radius ⌊(m − t)/2⌋ it interpolates the
first t shares and, if their polynomial does not verify or disagrees with more than that many shares, decodes
all of them with Berlekamp–Welch (Welch & Berlekamp, US patent 4,633,470, 1986): the polynomial it returns
is the only one of degree < t that close to the shares, so the holders off it are exactly the liars.
Beyond the radius (up to m − t bad shares, e.g. one bad share among t + 1) it searches t-subsets until one
verifies, at most ``MAX_SUBSETS`` of them; there two or more colluding holders can craft shares that keep
the secret but move the polynomial, so the holders it names are a lead, not proof.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping

from ..errors import ProtocolError

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
SHARE_BYTES = 66
MAX_SUBSETS = 512  # t-subsets tried beyond the unique-decoding radius: bounds a liar-made search


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


def recover(shares: Mapping[int, bytes], threshold: int, verify: Callable[[bytes], bool]) -> tuple[bytes, set[int]]:
    """The secret that ``verify`` accepts, from any ``threshold`` consistent shares, and the indices of the shares
    that are not on its polynomial (wrong length, out of the field, or simply wrong).

    In order (see the module docstring): the first ``threshold`` well-formed shares, Berlekamp–Welch over all,
    then up to ``MAX_SUBSETS`` subsets of ``threshold`` shares. Raises ProtocolError when none yields a verified
    secret (too many bad shares, or too few well-formed ones)."""
    points, bad = [], set()
    for x, y in sorted(shares.items()):
        value = int.from_bytes(y, "big") if len(y) == SHARE_BYTES else PRIME
        (bad.add(x) if value >= PRIME or not 0 < x < PRIME else points.append((x, value)))
    if len(points) < threshold:
        raise ProtocolError(f"{len(points)} well-formed shares cannot reconstruct a {threshold}-of-n secret")
    radius = (len(points) - threshold) // 2
    # the first t, then Berlekamp–Welch (O(m³), only when the first fails): each trusted only within the radius
    for decode, through in ((lambda: _interpolate(points[:threshold]), points[:threshold]),
                            (lambda: _polynomial_function(_berlekamp_welch(points, threshold)), ())):
        found = _verified(decode(), points, verify, through)
        if found is not None and len(found[1]) <= radius:
            return found[0], bad | found[1]
    for subset in itertools.islice(_subsets(points, threshold), MAX_SUBSETS):
        found = _verified(_interpolate(subset), points, verify, subset)
        if found is not None:
            return found[0], bad | found[1]
    raise ProtocolError(f"no {threshold} of the {len(shares)} shares reconstruct the committed secret "
                        f"(too many bad shares, or more than {MAX_SUBSETS} subsets to search)")


def _verified(polynomial: Callable[[int], int] | None, points: list[tuple[int, int]],
              verify: Callable[[bytes], bool],
              through: Iterable[tuple[int, int]] = ()) -> tuple[bytes, set[int]] | None:
    """The secret P(0) of ``polynomial`` (a function over the field) and the indices of the points off it, if
    ``verify`` accepts that secret. ``through``: points the polynomial was interpolated through, on it by
    construction, so not evaluated again (half of the points when the first t interpolate)."""
    if polynomial is None:
        return None
    value = polynomial(0)
    if value >> (8 * SECRET_BYTES):
        return None
    secret = value.to_bytes(SECRET_BYTES, "big")
    if not verify(secret):
        return None
    on = set(through)
    return secret, {x for x, y in points if (x, y) not in on and polynomial(x) != y}


def _subsets(points: list[tuple[int, int]], threshold: int) -> Iterator[list[tuple[int, int]]]:
    """Every ``threshold``-subset of ``points``, the leave-one-out subsets of the first t + 1 first: one bad share
    among the first t (the only way a single bad share defeats the first try) is then passed over within t + 1
    tries, whatever m is."""
    first = min(threshold + 1, len(points))
    for chosen in itertools.combinations(range(first), threshold):
        yield [points[i] for i in chosen]
    for chosen in itertools.combinations(range(len(points)), threshold):
        if chosen[-1] >= first:  # lazily: the caller stops after MAX_SUBSETS
            yield [points[i] for i in chosen]


def _polynomial_function(coefficients: list[int] | None) -> Callable[[int], int] | None:
    """The polynomial with ``coefficients`` (lowest first) as a function, by Horner's rule."""
    if coefficients is None:
        return None

    def value(x: int) -> int:
        result = 0
        for coefficient in reversed(coefficients):
            result = (result * x + coefficient) % PRIME
        return result

    return value


def _interpolate(points: list[tuple[int, int]]) -> Callable[[int], int]:
    """The polynomial of degree < len(points) through ``points`` (distinct x), as a function: in Lagrange form,
    P(x) = Σ_i c_i·Π_{j≠i}(x − x_j) with c_i = y_i / Π_{j≠i}(x_i − x_j). The products of differences are exact
    small integers (x are share indices), so each c_i costs one field inversion and each value t products, where
    the coefficients cost O(t²) field products (issue 16: the server reconstructs a secret per client and round).
    A product of nonzero differences, each smaller than the prime, is never 0 modulo it, so every inverse exists."""
    xs = [x for x, _ in points]
    denominators = []
    for i, x_i in enumerate(xs):
        denominator = 1
        for j, x_j in enumerate(xs):
            if j != i:
                denominator *= x_i - x_j
        denominators.append(denominator % PRIME)
    weights = [y * inverse % PRIME for (_, y), inverse in zip(points, _inverses(denominators))]

    def value(x: int) -> int:
        differences = [x - x_j for x_j in xs]
        suffix = [1] * (len(xs) + 1)  # suffix[i] = Π_{j>=i}(x − x_j)
        for i in range(len(xs) - 1, -1, -1):
            suffix[i] = suffix[i + 1] * differences[i]
        total, prefix = 0, 1  # prefix = Π_{j<i}(x − x_j)
        for i, weight in enumerate(weights):
            total += weight * (prefix * suffix[i + 1])
            prefix *= differences[i]
        return total % PRIME

    return value


def _inverses(values: list[int]) -> list[int]:
    """The inverses of nonzero ``values`` modulo PRIME with one field inversion (Montgomery's trick: running
    products, one inverse, then back), where t inversions cost the server about 7 ms a round (issue 16)."""
    prefix, running = [], 1
    for value in values:
        prefix.append(running)
        running = running * value % PRIME
    inverse, result = pow(running, -1, PRIME), [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        result[i] = inverse * prefix[i] % PRIME
        inverse = inverse * values[i] % PRIME
    return result


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

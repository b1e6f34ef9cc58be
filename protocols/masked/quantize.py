"""From float updates to bounded integers, and back, exactly.

A value x is clipped to [-r, r] and mapped onto the integer grid 0..L (L = 2^bits - 1) with
step ``scale`` = 2r / L, rounding stochastically (up with probability equal to the fractional
part, so the rounding is unbiased). Up to ``FAST_ROUNDING_BITS`` it is computed as floor(g + u) for u
uniform in [0, 1), one pass fewer than comparing u with the fractional part; float64's rounding of
g + u moves the chance of rounding up by at most 2^(bits − 53) (2^-37 at 16 bits, 2^-21 at 32). On
finer grids, where that would grow, u is compared with the fractional part, exactly. A client then
sends w·q + z for an integer weight w and an optional integer noise z (distributed DP), masked
modulo 2^m.

The grid is offset by r (q = 0 stands for -r), so a sum of counted inputs dequantizes as
``scale · Σ(w_i q_i + z_i) − r · Σ w_i``: the offset is removed once per unit of counted
weight, which keeps the result exact whichever clients end up counted.

The stochastic rounding draws from numpy's PCG64 seeded from the protocol seed, the round and
the client id: reproducible, and deliberately not cryptographic (it hides nothing; the masks do).

Conditional randomized rounding (Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", ICML, §4.1 and Theorem 1): given a
``norm_bound``, the rounding is drawn again until the rounded vector, measured from the grid's
centre L/2 (where 0 lies), has L2 norm at most ``norm_bound`` (in grid steps). Every vector that
leaves then satisfies the bound, whatever the draws: a differential-privacy sensitivity built on
it needs no failure probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigurationError

MAX_ROUNDING_DRAWS = 100  # conditional rounding: draws before refusing (each fails with probability <= β)
ROUNDING_PIECE = 1 << 15  # values rounded at a time (256 KiB a float64 buffer: they stay in cache)
FAST_ROUNDING_BITS = 32  # grids up to 2^32 points round by floor(g + u) (the module docstring: bias <= 2^-21)


@dataclass(frozen=True)
class Quantizer:
    clip_range: float  # r: inputs are clipped to [-r, r]
    bits: int  # the grid has 2^bits points

    @property
    def levels(self) -> int:
        """L = 2^bits - 1, the largest quantized value."""
        return (1 << self.bits) - 1

    @property
    def scale(self) -> float:
        """The value of one integer step, 2r / L (the quantized-domain unit, for DP sensitivity)."""
        return 2 * self.clip_range / self.levels

    def quantize(self, vector: np.ndarray, rng: np.random.Generator, norm_bound: float | None = None, *,
                 dtype: np.dtype | type = np.int64) -> np.ndarray:
        """Clip and stochastically round ``vector`` to integers in 0..L, as ``dtype`` (int64, or an integer type
        that holds L: a masked client's word type); with ``norm_bound``, by
        conditional randomized rounding (the module docstring): redrawn until ‖q − L/2‖₂ <= norm_bound.

        The norm is compared in floating point with the margin of Higham's inner-product bound
        (Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1: |fl(yᵀy) − yᵀy| <= γ_d·yᵀy,
        γ_d = d·u/(1 − d·u), u = 2^-53; the half-integers y = q − L/2 are exact in float64), so an accepted
        vector's exact norm never exceeds the bound. Refuses (ConfigurationError) when no draw in
        MAX_ROUNDING_DRAWS meets it: for an input whose norm is within what the bound was computed for, each
        draw fails with probability at most β, so this only happens to an input that was not clipped."""
        dtype = np.dtype(dtype)
        if dtype.kind not in "iu" or np.iinfo(dtype).max < self.levels:
            raise ConfigurationError(f"quantized values 0..{self.levels} do not fit {dtype}")
        if norm_bound is None:
            return self._round_stochastically(vector, rng, dtype)
        if not (isinstance(norm_bound, int | float) and not isinstance(norm_bound, bool) and norm_bound > 0
                and math.isfinite(norm_bound)):
            raise ConfigurationError(f"the rounding norm bound must be a positive number, not {norm_bound!r}")
        grid = np.empty(np.shape(vector))
        self._on_grid(vector, grid)
        unit = 2.0**-53
        accepted = norm_bound**2 * (1 - 2 * (len(grid) + 2) * unit)  # <= bound² / (1 + γ_d), rounding included
        for _ in range(MAX_ROUNDING_DRAWS):
            rounded = self._rounded(grid.copy(), rng.random(grid.shape))
            centred = rounded - self.levels / 2  # from the centre: half-integers when L is odd, exact in float64
            if float(np.dot(centred, centred)) <= accepted:
                return rounded.astype(dtype)
        raise ConfigurationError(f"conditional rounding: no rounding of this input has norm <= {norm_bound:.6g} grid "
                                 f"steps in {MAX_ROUNDING_DRAWS} draws; the input is larger than the bound allows "
                                 "(clip it to the norm the bound was computed for)")

    def _round_stochastically(self, vector: np.ndarray, rng: np.random.Generator, dtype: np.dtype) -> np.ndarray:
        """``quantize`` without a norm bound, one cache-sized piece at a time: the result is the only array as
        long as the input, which matters where a fresh page costs more than the arithmetic on it (issue 16).
        Bit-identical to rounding the whole vector at once: PCG64 yields the same doubles in pieces."""
        shape, vector = np.shape(vector), np.ascontiguousarray(vector).reshape(-1)
        quantized = np.empty(len(vector), dtype)
        piece = max(1, min(len(vector), ROUNDING_PIECE))
        grid, draws = np.empty(piece), np.empty(piece)
        for start in range(0, len(vector), piece):
            size = min(piece, len(vector) - start)
            grid_, draws_ = grid[:size], draws[:size]
            self._on_grid(vector[start:start + size], grid_)
            rng.random(out=draws_)
            quantized[start:start + size] = self._rounded(grid_, draws_)  # exact: integers 0..L
        return quantized.reshape(shape)

    def _on_grid(self, values: np.ndarray, grid: np.ndarray) -> None:
        """``values`` clipped to [-r, r] and put on the grid, offset by r and in steps, into ``grid`` (a float64
        array of ``values``' shape): every entry in [0, L], up to the division's rounding."""
        np.clip(values, -self.clip_range, self.clip_range, out=grid)
        grid += self.clip_range
        grid /= self.scale

    def _rounded(self, grid: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """Each g of ``grid`` rounded up when its draw u (uniform in [0, 1), ``draws``) is at least 1 − frac(g), that
        is with probability frac(g), then clipped to 0..L (the division's rounding could put g a hair above L); in
        place in ``grid``, which is returned (``draws`` may be overwritten too). floor(g + u) where the grid is
        coarse enough for float64's rounding of g + u not to matter (the module docstring), an exact comparison
        of u with frac(g) = g − floor(g) (exact in float64) where it is not."""
        if self.bits <= FAST_ROUNDING_BITS:
            grid += draws
            np.floor(grid, out=grid)
        else:
            floor = np.floor(grid)
            grid -= floor  # the fractional parts, exactly
            np.less(draws, grid, out=draws)  # u < frac(g): the same chance as u >= 1 − frac(g)
            np.add(floor, draws, out=grid)
        return np.clip(grid, 0, self.levels, out=grid)

    def dequantize_sum(self, integer_sum: np.ndarray, total_weight: int) -> np.ndarray:
        """Σ w_i·x̂_i from Σ (w_i q_i + z_i) and Σ w_i (x̂ = q·scale − r is the quantized input)."""
        vector = integer_sum.astype(np.float64)
        vector *= self.scale
        vector -= self.clip_range * total_weight
        return vector


def largest_safe_weight(num_clients: int, bits: int, modulus_bits: int, noise_bound: int) -> int:
    """The largest integer weight W with n·(W·L + 2B) <= 2^m − 1: then any sum of n inputs
    w·q + z (0 <= q <= L, 1 <= w <= W, |z| <= B) spans fewer than 2^m values and decodes exactly."""
    levels = (1 << bits) - 1
    return (((1 << modulus_bits) - 1) // num_clients - 2 * noise_bound) // levels


def check_no_overflow(num_clients: int, max_weight: int, bits: int, modulus_bits: int, noise_bound: int) -> None:
    """Refuse a configuration where n clients' largest weighted (noisy) values could wrap the modulus."""
    safe = largest_safe_weight(num_clients, bits, modulus_bits, noise_bound)
    if safe < 1 or max_weight > safe:
        levels = (1 << bits) - 1
        needed = num_clients * (max(max_weight, 1) * levels + 2 * noise_bound)
        raise ConfigurationError(
            f"overflow: {num_clients} clients × (max weight {max(max_weight, 1)} × {levels} + 2 × noise bound "
            f"{noise_bound}) = {needed} does not fit modulus 2^{modulus_bits}; "
            + (f"lower max_weight to at most {safe}, " if safe >= 1 else "")
            + "lower quantization_bits or noise_bound, or raise modulus_bits")

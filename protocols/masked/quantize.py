"""From float updates to bounded integers, and back, exactly.

A value x is clipped to [-r, r] and mapped onto the integer grid 0..L (L = 2^bits - 1) with
step ``scale`` = 2r / L, rounding stochastically (up with probability equal to the fractional
part, so the rounding is unbiased). A client then sends w·q + z for an integer weight w and an
optional integer noise z (distributed DP), masked modulo 2^m.

The grid is offset by r (q = 0 stands for -r), so a sum of counted inputs dequantizes as
``scale · Σ(w_i q_i + z_i) − r · Σ w_i``: the offset is removed once per unit of counted
weight, which keeps the result exact whichever clients end up counted.

The stochastic rounding draws from numpy's PCG64 seeded from the protocol seed, the round and
the client id: reproducible, and deliberately not cryptographic (it hides nothing; the masks do).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigurationError


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

    def quantize(self, vector: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clip and stochastically round ``vector`` to int64 values in 0..L."""
        grid = np.clip(vector, -self.clip_range, self.clip_range)  # a fresh array, updated in place below
        grid += self.clip_range
        grid /= self.scale
        low = np.floor(grid)
        grid -= low  # the fractional part: the probability of rounding up
        low += rng.random(grid.shape) < grid
        return np.clip(low, 0, self.levels, out=low).astype(np.int64)

    def dequantize_sum(self, integer_sum: np.ndarray, total_weight: int) -> np.ndarray:
        """Σ w_i·x̂_i from Σ (w_i q_i + z_i) and Σ w_i (x̂ = q·scale − r is the quantized input)."""
        return integer_sum.astype(np.float64) * self.scale - self.clip_range * total_weight


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
